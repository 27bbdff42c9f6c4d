"""Reliability III (issue #23): no silent wrong number through any door.

Each concept (a count, a spec, a donor's fit, a metric's edge) is checked the same way whatever
the door it comes through: the CLI, the Python API, pydantic's own entry points, a path or an
object. Every test here failed before its fix.
"""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from nngraft import GraftRule, GraftSpec, Grafter, Last, Span
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


# -- one donor/P compatibility check, whatever the door ---------------------------------------------

# Config changes that keep every shape (a donor "accepted" by a shape check) and ones that change shapes.
SAME_SHAPES = [("rope_theta", {"rope_theta": 500.0}), ("rms_norm_eps", {"rms_norm_eps": 1e-3}),
               ("hidden_act", {"hidden_act": "gelu"}), ("tie_word_embeddings", {"tie_word_embeddings": False}),
               ("rope_parameters.rope_type", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}})]
OTHER_SHAPES = [("num_hidden_layers", {"n_layers": 3}), ("vocab_size", {"vocab_size": 400})]


def _other_f(change: dict):
    """A donor like F but with one config change (``n_layers``/``vocab_size``: another shape)."""
    from transformers import AutoModelForCausalLM

    P, F, tok = pair()
    if "n_layers" in change or "vocab_size" in change:
        kwargs = {"n_layers": 2, "vocab_size": len(tok), **change}
        return tiny_model("llama", **kwargs)
    config = P.config.to_dict()
    if "rope_theta" in change or "rope_scaling" in change:
        params = dict(config.get("rope_parameters") or {"rope_type": "default", "rope_theta": 10000.0})
        if "rope_theta" in change:
            params["rope_theta"] = change["rope_theta"]
        else:
            params.update(change["rope_scaling"])
        config["rope_parameters"] = params
    else:
        config.update(change)
    model = AutoModelForCausalLM.from_config(type(P.config).from_dict(config), attn_implementation="eager")
    model.load_state_dict(F.state_dict(), strict=False)
    if "tie_word_embeddings" in change:
        with torch.no_grad():
            model.lm_head.weight.copy_(F.lm_head.weight)
    return model.eval()


def _save(model, folder: Path, tok=None) -> Path:
    model.save_pretrained(folder)
    if tok is not None:
        tok.save_pretrained(folder)
    return folder


def _donor_doors(tmp_path: Path, F):
    """Every way a donor reaches a Grafter: a model object, a folder, a .safetensors file, both by
    name, and the remote backend's donors (checked when the Grafter is made, before any request)."""
    from nngraft.donors.delta import DeltaDonor, DenseDonor

    P, _, tok = pair()
    folder = _save(F, tmp_path / "F", tok)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    _save(P, tmp_path / "P", tok)
    return {
        "object": lambda: Grafter(P, F, tok),
        "folder": lambda: Grafter(P, str(folder), tok),
        "Path folder": lambda: Grafter(P, folder, tok),
        ".safetensors in its folder": lambda: Grafter(P, str(folder / "model.safetensors"), tok),
        ".safetensors alone (no config)": lambda: Grafter(P, str(bare / "model.safetensors"), tok),
        "both by name": lambda: Grafter(str(tmp_path / "P"), str(folder)),
        "remote DenseDonor(object)": lambda: Grafter.remote(P, DenseDonor(F), tok, execution="local"),
        "remote DenseDonor(folder)": lambda: Grafter.remote(P, DenseDonor(str(folder)), tok, execution="local"),
        "remote DeltaDonor(F, P)": lambda: Grafter.remote(P, DeltaDonor(F, P), tok, execution="local"),
        "hybrid donor": lambda: Grafter(P, pair()[1], tok, donors={"hybrid": F}),
    }


@pytest.mark.parametrize("field, change", OTHER_SHAPES + SAME_SHAPES, ids=[f for f, _ in OTHER_SHAPES + SAME_SHAPES])
def test_a_donor_of_another_config_is_refused_through_every_door(tmp_path, field, change):
    from nngraft.errors import DonorMismatchError

    F = _other_f(change)
    for door, make in _donor_doors(tmp_path, F).items():
        match = field
        if door == ".safetensors alone (no config)":
            if field in dict(SAME_SHAPES):
                continue  # a bare tensor file says nothing of its config: only shapes can be checked
            match = r"of shape \(400, 32\)|'model.layers.2.* which the recipient lacks"
        with pytest.raises(DonorMismatchError, match=match) as caught:
            make()
        assert "finetuned copy of P" in str(caught.value), (door, str(caught.value))


def test_the_donor_doors_accept_a_real_finetuned_copy(tmp_path):
    for door, make in _donor_doors(tmp_path, pair()[1]).items():
        assert make() is not None, door


@pytest.mark.parametrize("field, change", [("num_hidden_layers", {"n_layers": 3}), ("rope_theta", {"rope_theta": 500.0})])
def test_the_cli_refuses_a_donor_of_another_config(tmp_path, capsys, field, change):
    P, _, tok = pair()
    _save(P, tmp_path / "P", tok)
    _save(_other_f(change), tmp_path / "F", tok)
    code, text = _cli(capsys, "run", "--model", str(tmp_path / "P"), "--donor", str(tmp_path / "F"), "--spec", "lt",
                      "--dataset", "fake_movies_fake_actors", "--n", "2", "--template", "sentence_1", "--no-progress")
    assert code == 2 and field in text and "Traceback" not in text, text


def _adapter(tmp_path: Path, base: str) -> Path:
    import copy

    from peft import LoraConfig, get_peft_model

    P, _, _ = pair()
    model = get_peft_model(copy.deepcopy(P), LoraConfig(r=2, lora_alpha=4, target_modules=["up_proj"],
                                                        init_lora_weights=False))
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_a_lora_adapter_for_another_base_is_refused_locally_as_remotely(tmp_path):
    from nngraft.donors.delta import LoraDonor
    from nngraft.errors import DonorMismatchError

    P, _, tok = pair()
    named = _other_f({})  # P's weights under a hub name
    named.config._name_or_path = "someone/tiny-llama"
    named.load_state_dict(P.state_dict())
    adapter = _adapter(tmp_path, "someone-else/other-llama")
    for door, make in {"local, object": lambda: Grafter(named, LoraDonor(adapter), tok),
                       "local, adapter folder": lambda: Grafter(named, str(adapter), tok),
                       "remote": lambda: Grafter.remote(named, LoraDonor(adapter), tok, execution="local")}.items():
        with pytest.raises(DonorMismatchError, match=r"trained on 'someone-else/other-llama' but the recipient is "
                                                     r"'someone/tiny-llama'"):
            make()
    same = _adapter(tmp_path, "someone/tiny-llama")
    assert Grafter(named, LoraDonor(same), tok) is not None


def test_a_lora_adapter_whose_local_base_has_another_config_is_refused(tmp_path):
    from nngraft.donors.delta import LoraDonor
    from nngraft.errors import DonorMismatchError

    P, _, tok = pair()
    base = _save(_other_f({"rope_theta": 500.0}), tmp_path / "base", tok)
    adapter = _adapter(tmp_path, str(base))
    with pytest.raises(DonorMismatchError, match="rope_theta"):
        Grafter(P, LoraDonor(adapter), tok)
    good = _save(P, tmp_path / "good", tok)
    assert Grafter(P, LoraDonor(_adapter(tmp_path, str(good))), tok) is not None


# -- the identity guard: the empty spec is P, "everything" is F -------------------------------------


def _fresh_pair():
    import copy

    P, F, tok = pair()
    return copy.deepcopy(P), copy.deepcopy(F), tok


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama", "gemma2", "qwen3", "olmo2"])
def test_the_identity_guard_passes_on_a_real_pair(arch):
    P, F, tok = tiny_pair(arch)
    g = Grafter(P, F, tok)
    g.run(GraftSpec(), ["Ada Lovelace stars in", "Q: Who stars in a movie with Grace Hopper? A:"])
    assert g._identities_checked


def test_the_identity_guard_names_a_module_setting_that_differs():
    from nngraft.errors import IdentityCheckError

    P, F, tok = _fresh_pair()
    g = Grafter(P, F, tok)
    F.model.norm.variance_epsilon = 0.5  # same weights, same config: only F's norm computes otherwise
    with pytest.raises(IdentityCheckError, match=r"grafting everything does not reproduce F .*"
                                                 r"model\.norm\.variance_epsilon: P 1e-06, F 0\.5"):
        g.run(GraftSpec(), ["Ada stars in"])
    assert not g._identities_checked  # checked again on the next run


def test_the_identity_guard_names_a_buffer_that_differs():
    from nngraft.errors import IdentityCheckError

    P, F, tok = _fresh_pair()
    g = Grafter(P, F, tok)
    F.model.rotary_emb.inv_freq.mul_(2)  # another rope_theta, as a buffer
    with pytest.raises(IdentityCheckError, match=r"buffer 'model\.rotary_emb\.inv_freq'"):
        g.run_grid([GraftSpec(name="a")], ["Ada stars in"])


def test_the_identity_guard_catches_rows_that_are_not_independent():
    from nngraft.errors import IdentityCheckError

    P, F, tok = _fresh_pair()
    P.model.norm.register_forward_hook(lambda m, i, out: out + 0.1 * (out.shape[0] - 1))
    g = Grafter(P, F, tok)
    with pytest.raises(IdentityCheckError, match="the empty spec does not reproduce P"):
        g.run(GraftSpec(), ["Ada stars in"])


def test_the_identity_guard_can_be_switched_off(monkeypatch):
    P, F, tok = _fresh_pair()
    F.model.norm.variance_epsilon = 0.5
    Grafter(P, F, tok, check_identities=False).run(GraftSpec(), ["Ada stars in"])
    monkeypatch.setenv("NNGRAFT_IDENTITY_CHECK", "0")
    Grafter(P, F, tok).run(GraftSpec(), ["Ada stars in"])
    with pytest.raises(ArgumentError, match="check_identities: Input should be True or False"):
        Grafter(P, F, tok, check_identities="no")


def test_the_identity_guard_fails_the_command_line_with_exit_1(tmp_path, capsys, monkeypatch):
    """A difference the config check does not know (here: hidden from it) is caught by the guard."""
    P, F, tok = pair()
    _save(P, tmp_path / "P", tok)
    _save(_other_f({"rms_norm_eps": 0.5}), tmp_path / "F", tok)
    monkeypatch.setattr("nngraft.donors.donor.COMPUTATION_CONFIG_KEYS", ("model_type",))
    code, text = _cli(capsys, "run", "--model", str(tmp_path / "P"), "--donor", str(tmp_path / "F"), "--spec", "lt",
                      "--dataset", "fake_movies_fake_actors", "--n", "2", "--template", "sentence_1", "--no-progress")
    assert code == 1 and "identity check failed" in text and "variance_epsilon: P 1e-06, F 0.5" in text, text


# -- grafts inside a user's trace: the same semantics on both backends --------------------------------

from tests.helpers.ndif import worker  # noqa: E402,F401 - the NDIF stand-in (a fresh server process)

TRACE_ARCHS = ("llama", "gpt2")
TRACE_PROMPTS = ["Ada Lovelace stars in a movie alongside", "Marie Curie stars in"]
TRACE_SPANS = [{"first_actor": "Ada Lovelace"}, {"first_actor": "Marie Curie"}]
FE_LT = GraftSpec(name="fe_lt", rules=[GraftRule(components=["all"], positions=[Span(span="first_actor"), Last()])])
LT_MLP = GraftSpec(name="lt_mlp", rules=[GraftRule(components=["mlp"], positions=[Last()])])


@lru_cache(maxsize=None)
def setup(model_type: str):
    P, F, tok = tiny_pair(model_type)
    return P, F, tok, Grafter(P, F, tok)


UP_LT = {"llama": GraftSpec(name="gate_up_lt", rules=[GraftRule(components=["gate", "up"], positions=[Last()])]),
         "gpt2": GraftSpec(name="up_lt", rules=[GraftRule(components=["up"], positions=[Last()])])}


def _first_projection(layers, arch: str):
    """The first projection reading layer 0's normed MLP input, grafted (llama: gate_proj, then
    up_proj reads the same tensor; GPT-2: c_fc, its 'up')."""
    return layers[0].mlp.gate_proj if arch == "llama" else layers[0].mlp.c_fc


def _edit_block(g, arch: str, prompt: str, where: str):
    """The user's block, the same on every backend: halve, in place at the last token, the input of
    layer 0's first MLP projection (``where="input"``, as docs/nnsight.md shows; the grafted 'up'
    reads the same tensor) or the output of the norm before it (``"norm"``: the same edit, made
    where the graft has always seen it); save the logits."""
    lm = g.model_envoy
    layers = lm.model.layers if arch == "llama" else lm.transformer.h
    with g.trace([prompt], UP_LT[arch]):
        if where == "input":
            _first_projection(layers, arch).input[:, -1] *= 0.5
        else:
            (layers[0].post_attention_layernorm if arch == "llama" else layers[0].ln_2).output[:, -1] *= 0.5
        logits = lm.output.logits.save()
    return logits.detach()


@pytest.mark.parametrize("arch", TRACE_ARCHS)
def test_an_in_place_edit_of_a_grafted_modules_input_is_applied_on_both_backends(worker, arch):
    """Halving a grafted projection's input in place equals halving the norm's output it reads
    (an output edit, exact against the per-token reference in tests/compile/test_trace.py), on the local and the
    NDIF backend alike (the local one used to compute a grafted projection before the user's block
    saw its input, ignoring the edit at every position)."""
    from nngraft.donors.delta import DeltaDonor

    P, F, tok, g = setup(arch)
    prompt = TRACE_PROMPTS[0]
    expected = _edit_block(g, arch, prompt, "norm")
    with g.trace([prompt], UP_LT[arch]):
        unedited = g.model_envoy.output.logits.save()
    assert (expected - unedited.detach()).abs().max() > 1e-3  # the edit matters
    torch.testing.assert_close(_edit_block(g, arch, prompt, "input"), expected, atol=2e-5, rtol=1e-4)
    remote = Grafter.remote(P, DeltaDonor(F, P, dtype=torch.float32), tok, execution=worker.server(arch),
                            verbose=False)
    for where in ("input", "norm"):
        torch.testing.assert_close(_edit_block(remote, arch, prompt, where), expected, atol=2e-5, rtol=1e-4)


def test_a_graft_inside_the_trace_of_another_model_is_refused():
    import copy

    import nnsight

    import nngraft
    from nngraft.errors import TraceError

    P, F, tok, g = setup("llama")
    compiled = g.compile(FE_LT, TRACE_PROMPTS, TRACE_SPANS)
    other = nnsight.NNsight(F)  # same architecture and depth: the old check let it through
    with pytest.raises(TraceError, match=r"compiled for another model than the one traced .*'model.embed_tokens"
                                         r".weight' differs"):
        with other.trace(**compiled.inputs):
            nngraft.graft(other, compiled)
            other.output.logits.save()
    twin = nnsight.NNsight(copy.deepcopy(P))  # P loaded twice: the same weights, accepted
    with twin.trace(**compiled.inputs):
        nngraft.graft(twin, compiled)
        logits = twin.output.logits.save()
    torch.testing.assert_close(logits[:, -1], g.run(FE_LT, TRACE_PROMPTS, TRACE_SPANS).logits, atol=1e-5, rtol=0)


def test_a_second_graft_in_one_trace_is_refused():
    import nnsight

    import nngraft
    from nngraft.errors import TraceError

    P, F, tok, g = setup("llama")
    compiled = g.compile(FE_LT, TRACE_PROMPTS, TRACE_SPANS)
    model = nnsight.NNsight(P)
    with pytest.raises(TraceError, match="this trace already has a graft"):
        with model.trace(**compiled.inputs):
            nngraft.graft(model, compiled)
            nngraft.graft(model, compiled)
            model.output.logits.save()
    lm = g.model_envoy
    with pytest.raises(TraceError, match="this trace already has a graft"):
        with g.trace(TRACE_PROMPTS, LT_MLP, spans=TRACE_SPANS):
            nngraft.graft(lm, compiled)  # FE+LT inside g.trace(LT): used to be dropped silently
            lm.output.logits.save()


# -- provenance: no rows appended to rows whose model cannot be verified ------------------------------


def _tiny_sweep(folder: Path, tiny: str) -> Path:
    config = {"name": "t", "models": [{"name": "m", "tiny": tiny}],
              "data": {"dataset": "fake_movies_fake_actors", "n": 2, "templates": ["sentence_1"]},
              "specs": [str(Path(__file__).parents[1] / "recipes" / "specs" / "lt.json")], "output": "runs/t",
              "check_baselines": 0}
    path = folder / f"sweep-{tiny}.json"
    path.write_text(json.dumps(config))
    return path


def test_rows_whose_model_cannot_be_verified_are_not_extended(tmp_path, capsys, monkeypatch):
    """The manifest deleted, another model run under the same name (baseline checks off): the old
    rows used to be kept and the manifest relabelled with the new model."""
    monkeypatch.chdir(tmp_path)
    code, text = _cli(capsys, "sweep", str(_tiny_sweep(tmp_path, "llama")), "--no-progress")
    assert code == 0, text
    results = tmp_path / "runs" / "t" / "results.jsonl"
    rows = results.read_text()
    (results.parent / "manifest.json").unlink()
    for tiny in ("qwen2", "llama"):  # another model, or the same one: neither can be verified now
        code, text = _cli(capsys, "sweep", str(_tiny_sweep(tmp_path, tiny)), "--no-progress")
        assert code == 2 and "holds 6 rows for model 'm'" in text and "no manifest" in text, text
        assert results.read_text() == rows and not (results.parent / "manifest.json").exists()


# -- every command of README's table, run with tiny models -------------------------------------------

ELSEWHERE = {"demo": ("tests/study/test_demo.py", "test_quick_demo_writes_a_row_for_every_spec_and_fact")}
"""Table commands whose run is too long for this test, and the test that runs them."""


def _table_verbs() -> list[str]:
    import re

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    return re.findall(r"^\| `nngraft ([a-z-]+)", readme, flags=re.M)


def test_every_command_of_the_readme_table_runs(tmp_path, capsys, monkeypatch):
    """Each row of README's command table, as written there, on a tiny Llama pair saved to folders
    (a verb added to the table fails here until it is run)."""
    from nngraft.study.data import make_facts, save_facts

    root = Path(__file__).parents[1]
    monkeypatch.chdir(tmp_path)
    P, F, tok = pair()
    _save(P, tmp_path / "P", tok)
    _save(F, tmp_path / "F", tok)
    tiny_config("llama").save_pretrained(tmp_path / "cfg")
    save_facts(make_facts("fake_movies_fake_actors", 2, seed=0), tmp_path / "facts.jsonl")
    (tmp_path / "texts.txt").write_text("Ada Lovelace stars in The Engine alongside Alan Turing.\n"
                                        "Grace Hopper stars in The Compiler alongside Marie Curie.\n")
    spec = str(root / "recipes" / "specs" / "lt.json")
    (tmp_path / "sweep.json").write_text(json.dumps(
        {"name": "s", "models": [{"name": "m", "recipient": str(tmp_path / "P"), "donor": str(tmp_path / "F")}],
         "data": {"facts": "facts.jsonl", "templates": ["sentence_3"]}, "specs": [spec], "output": "runs/s"}))
    pf = ["--model", str(tmp_path / "P"), "--donor", str(tmp_path / "F"), "--facts", "facts.jsonl",
          "--template", "sentence_3"]
    runs = {
        "schema": [["schema"]],
        "validate": [["validate", str(root / "recipes" / "specs" / "fe_lt.json"), "--model-type", "gpt2", "--layers", "12"]],
        "payload": [["payload", spec, "--model", str(tmp_path / "cfg"), "--donor", "dense", "--donor", "delta:64",
                     "--donor", "lora:16"]],
        "run": [["run", "--spec", spec, *pf, "-o", "runs/try", "--json", "--no-progress"]],
        "sweep": [["sweep", "sweep.json", "--plot", "--no-progress"]],
        "plot": [["plot", "runs/s", "--k", "100", "--specs", "p,f,lt"]],
        "models": [["models", "--json"]],
        "finetune": [["finetune", "--model", str(tmp_path / "P"), "--facts", "facts.jsonl", "--out", "ft1",
                      "--preset", "cpu-fast", "--epochs", "1", "--no-progress"],
                     ["finetune", "--model", str(tmp_path / "P"), "--texts", "texts.txt", "--out", "ft2",
                      "--preset", "cpu-fast", "--epochs", "1", "--lora-r", "8", "--no-progress"]],
        # a random tiny F knows no fact: F's own top token as the target (docs/study.md's tiny run)
        "localize": [["localize", *pf, "--target", "0.9", "--targets", "donor_top1", "--metric", "logprob",
                      "-o", "loc", "--no-progress"]],
        "attribute": [["attribute", *pf, "--metric", "logprob", "--steps", "4", "-o", "attr"]],
        "bundle": [["bundle", "runs/try", "-o", "try.zip", "--pack-donor", "auto"]],
        "reproduce": [["reproduce", "try.zip", "--donor", str(tmp_path / "F"), "--model", str(tmp_path / "P"),
                       "-o", "check", "--json"]],
    }
    verbs = _table_verbs()
    assert set(verbs) == set(runs) | set(ELSEWHERE), "run every command of README's table here"
    for verb, (path, name) in ELSEWHERE.items():
        assert f"def {name}(" in (root / path).read_text(), (verb, path, name)
    for verb in verbs:
        for argv in runs.get(verb, []):
            code, text = _cli(capsys, *argv)
            assert code == 0 and "Traceback" not in text, (argv, text[-2000:])
    assert json.loads(_cli(capsys, "schema")[1])["title"] == "GraftSpec"


@pytest.mark.parametrize("make, message", [
    (lambda d: None, r"--demo-out .*demo: no such folder; give the output folder of a `nngraft demo` run"),
    (lambda d: d.mkdir(), r"not a `nngraft demo` output folder \(its manifest.json, with the demo's template, is "
                          r"missing or unreadable\)"),
    (lambda d: (d.mkdir(), (d / "manifest.json").write_text('{"demo": {"template": "sentence_3"}}')),
     r"the demo's facts.jsonl is missing"),
])
def test_donor_compress_checks_its_demo_folder_before_compressing(tmp_path, capsys, make, message):
    """`--demo-out` used to be read after the SVD, failing with a bare "No such file" (and after minutes)."""
    import re

    P, F, tok = pair()
    _save(P, tmp_path / "P", tok)
    _save(F, tmp_path / "F", tok)
    make(tmp_path / "demo")
    code, text = _cli(capsys, "donor", "compress", str(tmp_path / "F"), str(tmp_path / "P"), "--out",
                      str(tmp_path / "adapter"), "--rank", "2", "--demo-out", str(tmp_path / "demo"))
    assert code == 2 and re.search(message, " ".join(text.split())), text
    assert "Traceback" not in text and not (tmp_path / "adapter").exists()


# -- messages that used to mislead: adapters, GGUF, template names, forced tokens, long answers ----


def _gguf(path: Path, arch: str) -> Path:
    """A GGUF file of architecture ``arch`` with one tensor (enough for transformers to read its header)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture()
def folders(tmp_path, monkeypatch):
    """P, F, a LoRA adapter for P and facts in a fresh working folder; NNGRAFT_CACHE inside it."""
    from nngraft.study.data import make_facts, save_facts

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NNGRAFT_CACHE", str(tmp_path / "cache"))
    P, F, tok = pair()
    _save(P, tmp_path / "P", tok)
    _save(F, tmp_path / "F", tok)
    _adapter(tmp_path, str(tmp_path / "P"))
    save_facts(make_facts("fake_movies_fake_actors", 2, seed=0), tmp_path / "facts.jsonl")
    return tmp_path


def _run_argv(model: str = "P", donor: str = "F", *extra: str) -> list[str]:
    return ["run", "--model", model, "--donor", donor, "--spec", "lt", "--facts", "facts.jsonl", "--template",
            "sentence_1", "--no-progress", *extra]


def _no_adapter_config(folder: Path) -> str:
    import shutil

    shutil.copytree(folder / "adapter", folder / "weights-only")
    (folder / "weights-only" / "adapter_config.json").unlink()
    return "weights-only"


def _adapter_for_other_modules(folder: Path) -> str:
    """The adapter with its modules renamed to GPT-2's c_fc (absent from a Llama)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folder / "adapter", folder / "gpt2-adapter")
    config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    config["target_modules"] = ["c_fc"]
    (folder / "gpt2-adapter" / "adapter_config.json").write_text(json.dumps(config))
    weights = load_file(folder / "adapter" / "adapter_model.safetensors")
    save_file({k.replace("mlp.up_proj", "mlp.c_fc"): v for k, v in weights.items()},
              folder / "gpt2-adapter" / "adapter_model.safetensors")
    return "gpt2-adapter"


MISLEADING_CLI = {
    # name: (set-up returning the argv, the message)
    "adapter folder without adapter_config.json": (
        lambda d: _run_argv("P", _no_adapter_config(d)),
        r"\S*weights-only holds LoRA adapter weights but no adapter_config.json: copy the adapter_config.json saved "
        r"with them"),
    "an adapter's config file instead of its folder": (
        lambda d: _run_argv("P", "adapter/adapter_config.json"),
        r"adapter/adapter_config.json is one file of a saved model or adapter: give its folder, \S*adapter$"),
    "an adapter's weights file instead of its folder": (
        lambda d: _run_argv("P", "adapter/adapter_model.safetensors"),
        r"adapter/adapter_model.safetensors is one file of a saved model or adapter: give its folder, \S*adapter$"),
    "a model's config.json instead of its folder": (
        lambda d: _run_argv("P/config.json", "F"), r"P/config.json is one file of a saved model or adapter: give "
                                                   r"its folder, \S*P$"),
    "an adapter for modules P lacks (run)": (
        lambda d: _run_argv("P", _adapter_for_other_modules(d)),
        r"the LoRA adapter \S*gpt2-adapter adapts module 'model.layers.0.mlp.c_fc', which LlamaForCausalLM does not "
        r"have"),
    "an adapter for modules P lacks (payload)": (
        lambda d: ["payload", str(Path(__file__).parents[1] / "recipes/specs/lt.json"), "--model", "P", "--donor",
                   "adapter:" + _adapter_for_other_modules(d)],
        r"adapts module 'model.layers.0.mlp.c_fc', which LlamaForCausalLM does not have"),
    "a .gguf path that does not exist": (
        lambda d: _run_argv("nope.gguf"), r"no GGUF file at \S*nope.gguf: no such file; check the path"),
    "a .gguf that is a folder": (
        lambda d: (d / "dir.gguf").mkdir() or _run_argv("P", "dir.gguf"), r"no GGUF file at \S*dir.gguf \(it is a folder\)"),
    "a file that is not GGUF": (
        lambda d: [(d / "bad.gguf").write_bytes(b"GGUF" + bytes(60)), _run_argv("bad.gguf")][1],
        r"\S*bad.gguf is not a GGUF model file transformers can read \(ValueError: .*GGUF v0.*\); give a GGUF v2/v3 "
        r"file of a causal language model, or a Hugging Face model folder"),
    "a GGUF of an architecture transformers does not convert": (
        lambda d: _run_argv("P", str(_gguf(d / "rwkv.gguf", "rwkv6").name)),
        r"\S*rwkv.gguf: GGUF model with architecture rwkv6 is not supported yet. transformers converts GGUF files "
        r"of these architectures: .*llama.*; convert this model to a Hugging Face folder"),
    "a misspelt template name": (
        lambda d: [*_run_argv()[:-3], "--template", "sentnce_3", "--no-progress"],
        r"unknown test template 'sentnce_3' \(did you mean 'sentence_3'\?\); named templates are \[.*\], a file of "
        r"templates, or give a template with \{fields\}"),
    "an answer longer than the context, scored whole": (
        lambda d: _long_answer_facts(d) or [*_run_argv()[:7], "--facts", "long.jsonl", "--template", "sentence_1",
                                            "--answer-logprob", "--no-progress"],
        r"answer 0 has \d+ tokens: after its prompt's \d+, more than the model's context of 128 "
        r"\(max_position_embeddings\) to score it whole .*shorten the answer, or score its first token only"),
}


def _long_answer_facts(folder: Path) -> None:
    rows = [json.loads(line) for line in (folder / "facts.jsonl").read_text().splitlines()]
    rows[0]["second_actor"] = " ".join(["Bartholomew"] * 60)
    (folder / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("name", MISLEADING_CLI)
def test_a_new_users_mistake_gets_one_clear_message_from_the_cli(folders, capsys, name):
    """Each used to end in a traceback, a message about the wrong file or flag, or (the adapter in
    `payload`, the long answer) a number with exit 0."""
    import re

    make, message = MISLEADING_CLI[name]
    code, text = _cli(capsys, *make(folders))
    assert code == 2 and "Traceback" not in text, text
    assert re.search(message, " ".join(text.split())), text


def test_reading_a_gguf_without_the_gguf_package_says_what_to_install(folders, capsys, monkeypatch):
    import sys

    from nngraft.errors import ModelLoadError

    _gguf(folders / "model.gguf", "llama")
    monkeypatch.setitem(sys.modules, "gguf", None)  # not installed
    with pytest.raises(ModelLoadError, match=r"reading a GGUF file needs the 'gguf' package; install it with: pip "
                                             r"install \"nngraft\[demo\]\""):
        Grafter(pair()[0], "model.gguf", pair()[2])
    code, text = _cli(capsys, *_run_argv("model.gguf"))
    assert code == 2 and "needs the 'gguf' package" in text and "Traceback" not in text


def test_the_same_mistakes_from_python(folders):
    """The Python doors raise the same messages, as nngraft errors (never a bare ValueError)."""
    from nngraft.donors.delta import LoraDonor
    from nngraft.errors import DonorMismatchError, ModelLoadError, RemoteDonorError
    from nngraft.study.data import load_facts, make_test_examples
    from nngraft.study.errors import TemplateError

    P, _, tok = pair()
    (folders / "bad.gguf").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ModelLoadError, match="bad.gguf is not a GGUF model file transformers can read"):
        Grafter(P, "bad.gguf", tok)
    with pytest.raises(ModelLoadError, match="rwkv6 is not supported yet. transformers converts GGUF files"):
        Grafter(P, str(_gguf(folders / "rwkv.gguf", "rwkv6")), tok)
    with pytest.raises(ModelLoadError, match="no GGUF file at nope.gguf: no such file"):
        Grafter(P, "nope.gguf", tok)
    with pytest.raises(RemoteDonorError, match=r"no adapter_config.json in weights-only: a PEFT adapter folder holds "
                                               r"it beside adapter_model.safetensors"):
        LoraDonor(_no_adapter_config(folders))
    with pytest.raises(ModelLoadError, match="weights-only holds LoRA adapter weights but no adapter_config.json"):
        Grafter(P, "weights-only", tok)
    with pytest.raises(DonorMismatchError, match="adapts module 'model.layers.0.mlp.c_fc'"):
        Grafter(P, LoraDonor(_adapter_for_other_modules(folders)), tok)
    with pytest.raises(TemplateError, match=r"unknown test template 'sentnce_3' \(did you mean 'sentence_3'\?\)"):
        make_test_examples(load_facts("facts.jsonl"), "sentnce_3")


def test_forced_tokens_the_model_cannot_take_are_refused():
    """Forced ids outside the vocabulary decoded to '' (or raised OverflowError), an empty row
    continued with padding, and an answer past the context was scored with no word."""
    from nngraft.errors import PromptError
    from nngraft.study.answer import answer_logprobs, answer_token_ids

    P, F, tok = pair()
    g = Grafter(P, F, tok)
    vocab = P.get_input_embeddings().weight.shape[0]
    for bad, where in (([[vocab]], r"forced\[0\]\[0\]: token id %d" % vocab), ([[3, -1]], r"forced\[0\]\[1\]: "
                                                                                         r"token id -1")):
        with pytest.raises(ArgumentError, match=where + r" is outside the model's vocabulary of \d+ tokens"):
            g.generate(GraftSpec(), ["Ada stars in"], forced=bad)
    with pytest.raises(ArgumentError, match=r"forced\[1\]: Input should be a non-empty list of token ids"):
        g.generate(GraftSpec(), ["Ada stars in", "Alan stars in"], forced=[[3], []])
    [prompt] = g.tokenize(["Ada stars in"])
    with pytest.raises(PromptError, match=r"answer 0 has 200 tokens: after its prompt's \d+, more than the model's "
                                          r"context of 128"):
        answer_logprobs(g, [GraftSpec()], [prompt], [[5] * 200])
    with pytest.raises(PromptError, match=r"prompt 0 has \d+ tokens \+ 199 forced tokens after its first, more than"):
        g.decode([GraftSpec()], [prompt], 200, forced=[[5] * 200])
    fits = 128 - len(prompt) + 1
    assert len(answer_logprobs(g, [GraftSpec()], [prompt], [[5] * fits])[0]) == fits  # exactly the context: fine
    with pytest.raises(ArgumentError, match=r"answer ' ' tokenizes to nothing \(an empty answer\)"):
        answer_token_ids(tok, "Ada stars in", " ")
    out = g.generate(GraftSpec(), ["Ada stars in", "Alan stars in"], forced=[[3, 4], [5]])  # ragged rows: fine
    assert out.tokens[:, 0].tolist() == [3, 5]


# -- the identity guard on the NDIF backend (its stand-ins: in process, a server process, fake NDIF) ---

from tests.helpers.ndif import fake_ndif  # noqa: E402,F401 - NDIF's endpoints, mocked; P hosted (weightless here)


def _normalized(message: str) -> str:
    return re.sub(r"max \|Δ log-prob\| [0-9.e+-]+ > [0-9.e+-]+", "max |Δ log-prob| …", message)


def _remote(execution: str, donor, worker, fake_ndif):
    from nngraft.donors.delta import DenseDonor

    P, _, tok = pair()
    if execution == "hosted":
        return Grafter.remote(fake_ndif.folder, DenseDonor(donor, dtype=torch.float32), dtype=torch.float32,
                              verbose=False)
    server = "local" if execution == "in process" else worker.server("llama")
    return Grafter.remote(P, DenseDonor(donor, dtype=torch.float32), tok, execution=server, verbose=False)


@pytest.fixture(params=["in process", "server process", "hosted"])
def execution(request):
    if request.param == "hosted":
        request.getfixturevalue("fake_ndif")
    return request.param




@pytest.mark.slow
def test_the_identity_guard_runs_on_the_ndif_backend(execution, worker, request):
    """On a remote backend the guard used to be skipped: a donor whose settings differ from P's
    gave wrong numbers silently there while the local backend refused it. Now the first run
    checks both identities (two extra requests: the three rows, and P's plain pass), with the
    local backend's error text."""
    from nngraft.errors import IdentityCheckError

    fake = request.getfixturevalue("fake_ndif") if execution == "hosted" else None
    P, F, tok = _fresh_pair()
    prompts = ["Ada Lovelace stars in", "Q: Who stars in a movie with Grace Hopper? A:"]
    g = _remote(execution, F, worker, fake)
    out = g.run(LT_MLP, prompts)
    assert g._identities_checked and len(g.backend.requests) == 3  # the guard's two, then the run's
    torch.testing.assert_close(out.logits, Grafter(P, F, tok).run(LT_MLP, prompts).logits, atol=2e-5, rtol=1e-4)
    F.model.norm.variance_epsilon = 0.5  # same weights, same config: only F's norm computes otherwise
    with pytest.raises(IdentityCheckError) as local:
        Grafter(P, F, tok).run(LT_MLP, prompts)
    g = _remote(execution, F, worker, fake)
    with pytest.raises(IdentityCheckError) as remote:
        g.run(LT_MLP, prompts)
    assert "model.norm.variance_epsilon: P 1e-06, F 0.5" in str(remote.value), str(remote.value)
    assert _normalized(str(remote.value)) == _normalized(str(local.value))
    assert not g._identities_checked


def test_the_identity_guard_on_ndif_catches_rows_that_are_not_independent():
    from nngraft.donors.delta import DenseDonor
    from nngraft.errors import IdentityCheckError

    P, F, tok = _fresh_pair()
    P.model.norm.register_forward_hook(lambda m, i, out: out + 0.1 * (out.shape[0] - 1))
    g = Grafter.remote(P, DenseDonor(F, dtype=torch.float32), tok, execution="local", verbose=False)
    with pytest.raises(IdentityCheckError, match="the empty spec does not reproduce P"):
        g.run(LT_MLP, ["Ada stars in"])


def test_the_ndif_guard_takes_the_tolerance_of_the_dtype_the_donor_travels_in():
    """A donor may choose its own travel dtype (``DenseDonor(F, dtype=torch.bfloat16)``) while P
    and the Grafter stay float32: the guard judged "everything" by float32's tolerance and called
    bfloat16's rounding a bug in nngraft. It takes the donor's own dtype, as the payload does."""
    from nngraft.donors.delta import DenseDonor

    P, F, tok = _fresh_pair()
    g = Grafter.remote(P, DenseDonor(F, dtype=torch.bfloat16), tok, execution="local", verbose=False)
    assert g.setup.dtype == torch.float32
    g.run(LT_MLP, ["Ada Lovelace stars in", "Grace Hopper stars in"])
    assert g._identities_checked


def test_the_ndif_guard_leaves_out_what_it_cannot_check(monkeypatch):
    """A low-rank delta or LoRA is not F (no F half); "everything" over the payload limit is not
    sent (no F half); switched off, no extra request."""
    from nngraft.donors.delta import DeltaDonor, DenseDonor

    P, F, tok = _fresh_pair()
    F.model.norm.variance_epsilon = 0.5  # would fail the F half
    for donor, options in ((DeltaDonor(F, P, rank=2, dtype=torch.float32), {}),
                           (DenseDonor(F, dtype=torch.float32), {"max_payload_mb": 0.12})):  # the run fits, "everything" (160 kB) not
        g = Grafter.remote(P, donor, tok, execution="local", verbose=False, **options)
        g.run(LT_MLP, ["Ada stars in"])
        assert g._identities_checked
    g = Grafter.remote(P, DenseDonor(F, dtype=torch.float32), tok, execution="local", verbose=False,
                       check_identities=False)
    g.run(LT_MLP, ["Ada stars in"])
    assert len(g.backend.requests) == 1
