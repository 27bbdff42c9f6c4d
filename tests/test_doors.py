"""Reliability III (issue #23): no silent wrong number through any door.

Each concept (a count, a spec, a donor's fit, a metric's edge) is checked the same way whatever
the door it comes through: the CLI, the Python API, pydantic's own entry points, a path or an
object. Every test here failed before its fix.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from nngraft import GraftRule, GraftSpec, Grafter, Last
from nngraft.errors import ArgumentError
from nngraft.testing import tiny_config, tiny_model, tiny_pair, tiny_tokenizer


@lru_cache(maxsize=None)
def pair(model_type: str = "llama"):
    return tiny_pair(model_type)


def _cli(capsys, *argv: str) -> tuple[int, str]:
    from nngraft.cli import main

    try:
        code = main(list(argv))
    except SystemExit as stop:  # argparse usage errors
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# -- numbers that cannot be -------------------------------------------------------------------------


@pytest.fixture()
def payload_inputs(tmp_path: Path) -> tuple[Path, Path]:
    tiny_config("llama").save_pretrained(tmp_path / "cfg")
    spec_file = tmp_path / "lt_mlp.json"
    GraftSpec(name="lt_mlp", rules=[GraftRule(components=["mlp"], layers="last:1", positions=[Last()])]).save(spec_file)
    return spec_file, tmp_path / "cfg"


@pytest.mark.parametrize("extra, message", [
    (["--rows", "-5"], r"--rows: should be an integer >= 1, got -5"),
    (["--rows", "0"], r"--rows: should be an integer >= 1, got 0"),
    (["--tokens", "-32"], r"--tokens: should be an integer >= 1, got -32"),
    (["--donor", "lora:-2"], r"bad donor form 'lora:-2': the rank must be an integer >= 1"),
    (["--donor", "delta:0"], r"bad donor form 'delta:0': the rank must be an integer >= 1"),
    (["--donor", "delta:-3"], r"bad donor form 'delta:-3': the rank must be an integer >= 1"),
    (["--donor", "lora:16:foo_proj"], r"lora:16:foo_proj: no module named 'foo_proj' in .*; LoRA targets here: "
                                      r".*down_proj.*up_proj"),
    (["--donor", "lora:16:up_proj,"], r"bad donor form 'lora:16:up_proj,': an empty module name"),
])
def test_payload_refuses_numbers_and_modules_that_cannot_be(payload_inputs, capsys, extra, message):
    import re

    spec_file, cfg = payload_inputs
    code, text = _cli(capsys, "payload", str(spec_file), "--model", str(cfg), *extra)
    assert code == 2 and re.search(message, " ".join(text.split())), text
    assert "Traceback" not in text


def test_shape_donor_refuses_a_rank_below_one():
    from nngraft.backends.payload import ShapeDonor

    for text in ("delta:0", "lora:0", "lora:-2", "delta:-1"):
        with pytest.raises(ValueError, match="the rank must be an integer >= 1"):
            ShapeDonor.parse(text)
    assert ShapeDonor.parse("delta:2").describe() == "ΔW rank 2"


def test_target_prob_refuses_an_empty_answer():
    P, F, tok = pair()
    out = Grafter(P, F, tok).run(GraftSpec(), ["Ada stars in", "Alan stars in"])
    for bad in ("", ["Alan", ""], ["Alan", "   "]):
        for metric in (out.target_prob, out.target_rank):
            with pytest.raises(ArgumentError, match=r"GraftResult: targets\[\d\]: Input should be a non-empty "
                                                    r"answer"):
                metric(bad)
    with pytest.raises(ArgumentError, match=r"foils\[0\]: Input should be a non-empty answer"):
        out.logit_diff("Alan", "")


def test_kl_divergence_is_defined_at_the_edges():
    from nngraft.result import kl_divergence

    inf = float("inf")
    p = torch.tensor([[0.0, -inf, 0.0]])  # one impossible token: (0.5, 0, 0.5)
    q = torch.log(torch.tensor([[0.25, 0.5, 0.25]]))
    assert torch.allclose(kl_divergence(p, q), torch.tensor([math.log(2)]))  # 0·log(0/q) = 0
    assert torch.equal(kl_divergence(p, p), torch.tensor([0.0]))
    assert kl_divergence(q, p).item() == inf  # q puts mass where p has none: KL is +inf, not NaN
    both = torch.tensor([[0.0, -inf, -inf]])
    assert torch.equal(kl_divergence(both, both), torch.tensor([0.0]))
    for bad in (torch.full((1, 3), -inf), torch.tensor([[0.0, float("nan"), 0.0]])):
        with pytest.raises(ValueError, match="row 0 .* not a distribution"):
            kl_divergence(bad, q)
        with pytest.raises(ValueError, match="row 0 .* not a distribution"):
            kl_divergence(q, bad)


def test_finetune_texts_file_from_the_command_line(tmp_path, capsys):
    """`nngraft finetune --texts FILE` (README's table, docs/data.md) raised UnboundLocalError."""
    from nngraft.study.finetune import read_finetune_manifest

    tok = tiny_tokenizer("llama")
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                             ["Ada Lovelace stars in The Engine alongside Alan Turing.",
                              "Grace Hopper stars in The Compiler alongside Marie Curie."]))
    code, text = _cli(capsys, "finetune", "--model", str(tmp_path / "base"), "--texts", str(texts), "--out",
                      str(tmp_path / "ft"), "--preset", "cpu-fast", "--epochs", "1", "--no-progress")
    assert code == 0, text
    manifest = read_finetune_manifest(tmp_path / "ft")
    assert manifest["n_texts"] == 2 and manifest["training_texts"] == {"texts": str(texts.resolve())}
    assert manifest["config"]["lr"] == 3e-4  # the preset asked for, not the paper's default


# -- one spec validation, whatever the door --------------------------------------------------------

RULE = '{"components": ["mlp"], "positions": [{"last": true}]}'
DUPLICATE_SPEC = '{"name": "x",\n "rules": [' + RULE + '],\n "rules": []}'  # last-one-wins: an empty spec = plain P
DUPLICATE_MESSAGE = r"the key 'rules' occurs twice in one JSON object \(line 3\)"


def _spec_json_doors(tmp_path: Path):
    """Every way a spec's JSON text reaches nngraft: pydantic's entry points, ours, files, the CLI."""
    from pydantic import TypeAdapter

    from nngraft.spec import as_spec

    def file(text: str) -> Path:
        path = tmp_path / "spec.json"
        path.write_text(text)
        return path

    P, F, tok = pair()
    return {
        "GraftSpec.model_validate_json(str)": lambda t: GraftSpec.model_validate_json(t),
        "GraftSpec.model_validate_json(bytes)": lambda t: GraftSpec.model_validate_json(t.encode()),
        "TypeAdapter(GraftSpec).validate_json": lambda t: TypeAdapter(GraftSpec).validate_json(t),
        "GraftSpec.from_json": lambda t: GraftSpec.from_json(t),
        "GraftSpec.load": lambda t: GraftSpec.load(file(t)),
        "as_spec(path)": lambda t: as_spec(str(file(t))),
        "Grafter.run(path)": lambda t: Grafter(P, F, tok).run(str(file(t)), ["Ada stars in"]),
    }


def test_duplicate_keys_are_refused_through_every_json_door(tmp_path):
    from nngraft.errors import SpecError

    doors = _spec_json_doors(tmp_path)
    for door, parse in doors.items():
        with pytest.raises(SpecError, match=DUPLICATE_MESSAGE):
            parse(DUPLICATE_SPEC)
        assert parse('{"name": "x", "rules": [' + RULE + ']}') is not None, door  # the same spec, once: fine


def test_duplicate_keys_are_refused_by_the_cli(tmp_path, capsys):
    path = tmp_path / "dup.json"
    path.write_text(DUPLICATE_SPEC)
    for argv in (["validate", str(path)],
                 ["run", "--tiny", "llama", "--spec", str(path), "--dataset", "fake_movies_fake_actors", "--n", "2",
                  "--template", "sentence_1", "--no-progress"]):
        code, text = _cli(capsys, *argv)
        assert code == 2 and "the key 'rules' occurs twice" in text and "Traceback" not in text, argv


@pytest.mark.parametrize("bad, message", [
    ({"name": "x", "rules": [{"components": ["mlp"], "positions": [{"last": True}], "layer": [0]}]},
     "Extra inputs are not permitted"),
    ({"name": "x", "rules": [{"components": ["mlpp"], "positions": [{"last": True}]}]}, "Input should be"),
    ({"name": "x", "schema_version": "99", "rules": []}, "newer nngraft"),
])
def test_the_same_bad_spec_is_refused_through_every_door(tmp_path, bad, message):
    """Python objects (model_validate, the constructor, as_spec(dict)) and JSON text alike."""
    from pydantic import ValidationError

    from nngraft.errors import SpecError
    from nngraft.spec import as_spec

    text = json.dumps(bad)
    doors = {**_spec_json_doors(tmp_path),
             "GraftSpec.model_validate": lambda t: GraftSpec.model_validate(json.loads(t)),
             "GraftSpec(**fields)": lambda t: GraftSpec(**json.loads(t)),
             "as_spec(dict)": lambda t: as_spec(json.loads(t))}
    for door, parse in doors.items():
        with pytest.raises((ValidationError, SpecError), match=message):
            parse(text)


def test_model_validate_strings_takes_no_json_text():
    """pydantic's third entry point reads strings as scalars; JSON text for a list is refused, so it
    is no way round the duplicate-key check."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="rules\n  Input should be a valid array"):
        GraftSpec.model_validate_strings({"name": "x", "rules": "[" + RULE + "]"})
    assert GraftSpec.model_validate_strings({"name": "x", "schema_version": "1"}).rules == []


SWEEP = ('{"models": [{"name": "t", "tiny": "llama"}], "data": {"dataset": "fake_movies_fake_actors", "n": 2},\n'
         ' "grid": "main",\n "grid": "positions"}')


def test_duplicate_keys_in_a_sweep_config_are_refused_through_every_door(tmp_path, capsys):
    from pydantic import TypeAdapter

    from nngraft.study.sweep import SweepConfig, SweepConfigError, load_sweep_config

    path = tmp_path / "sweep.json"
    path.write_text(SWEEP)
    for door, parse in {"SweepConfig.model_validate_json": SweepConfig.model_validate_json,
                        "TypeAdapter(SweepConfig).validate_json": TypeAdapter(SweepConfig).validate_json,
                        "load_sweep_config": lambda t: load_sweep_config(path)}.items():
        with pytest.raises(SweepConfigError, match=r"the key 'grid' occurs twice in one JSON object \(line 3\)"):
            parse(SWEEP)
    code, text = _cli(capsys, "sweep", str(path))
    assert code == 2 and "the key 'grid' occurs twice" in text
