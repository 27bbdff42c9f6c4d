"""Inputs that used to give a silent wrong result or lose data (issue: every boundary checked).

Each test here failed before its fix: duplicate JSON keys, a donor deeper than the recipient, a
generation of 0 tokens, a delta donor made from another P, facts with null or list values, an
output that is someone else's file, and two runs writing one output folder.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from nngraft import ArgumentError, DonorMismatchError, GraftRule, GraftSpec, Grafter, Last, SpecError
from nngraft.cli import main
from nngraft.donors.delta import DeltaDonor
from nngraft.study.errors import DataError
from nngraft.study.data import load_facts
from nngraft.study.examples import TestExample
from nngraft.study.results import OutputInUseError, ResultsError, output_lock
from nngraft.study.sweep import SweepConfigError, load_examples_jsonl, load_sweep_config, save_examples_jsonl
from nngraft.testing import perturbed_copy, tiny_model, tiny_pair
from tests.helpers import ROOT

SPEC = '{"name": "lt", "rules": [{"components": ["mlp"], "positions": [{"last": true}]}]}'


@lru_cache(maxsize=None)
def pair(model_type: str = "llama", n_layers: int = 2):
    return tiny_pair(model_type, n_layers=n_layers)


@pytest.fixture()
def examples(tmp_path: Path) -> Path:
    return save_examples_jsonl([
        TestExample("f1", "s3", "Ada Lovelace stars in The Engine alongside",
                    {"first_actor": "Ada Lovelace"}, "Alan Turing"),
    ], tmp_path / "examples.jsonl")


# -- 1: duplicate JSON keys ---------------------------------------------------------------------


def test_duplicate_key_in_a_spec_is_refused(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"name": "x",\n "rules": [{"components": ["mlp"], "positions": [{"last": true}]}],\n "rules": []}')
    with pytest.raises(SpecError, match=r"dup.json: the key 'rules' occurs twice in one JSON object \(line 3\)"):
        GraftSpec.load(path)
    nested = '{"rules": [{"components": ["mlp"], "components": ["o"], "positions": [{"last": true}]}]}'
    with pytest.raises(SpecError, match="the key 'components' occurs twice"):
        GraftSpec.from_json(nested, source="n.json")


@pytest.mark.parametrize("name, text, load, error, match", [
    ("sweep.json", '{"models": [{"name": "t", "tiny": "llama"}], "data": {"examples": "e.jsonl"}, "grid": "main", '
     '"grid": "positions"}', load_sweep_config, SweepConfigError, r"sweep config .*sweep.json: the key 'grid' occurs twice"),
    ("facts.jsonl", '{"first_actor": "Ada", "second_actor": "Alan"}\n{"first_actor": "Marie", "second_actor": '
     '"Pierre", "second_actor": "Irene"}\n', load_facts, DataError,
     r"facts.jsonl, line 2: the key 'second_actor' occurs twice"),
    ("examples.jsonl", '{"fact_id": "f1", "template": "t", "prompt": "Ada stars", "answer": "A", "answer": "B"}\n',
     load_examples_jsonl, DataError, r"examples.jsonl:1: the key 'answer' occurs twice"),
])
def test_duplicate_key_in_configs_facts_and_examples_is_refused(tmp_path, name, text, load, error, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(error, match=match):
        load(tmp_path / name)


# -- 2: P/F compatibility in both directions ---------------------------------------------------------


def test_donor_deeper_than_the_recipient_is_refused():
    P, _, tok = pair()
    F3 = perturbed_copy(tiny_model("llama", n_layers=3, vocab_size=len(tok)))
    with pytest.raises(DonorMismatchError, match=r"the recipient has depth num_hidden_layers=2 but the donor has "
                                                 r"num_hidden_layers=3"):
        Grafter(P, F3, tok)


def test_donor_with_an_extra_parameter_is_refused():
    """Same config, but F carries a parameter P lacks: the check walks F's parameters too."""
    P, F, tok = pair()
    F = copy.deepcopy(F)
    F.model.layers[1].mlp.register_parameter("extra", torch.nn.Parameter(torch.zeros(2)))
    with pytest.raises(DonorMismatchError, match=r"the donor has parameter 'model.layers.1.mlp.extra'.*which the "
                                                 "recipient lacks"):
        Grafter(P, F, tok)


@pytest.mark.parametrize("change", [{"num_attention_heads": 2, "num_key_value_heads": 2}, {"vocab_size": 400}])
def test_donor_of_another_config_is_refused(change):
    P, _, tok = pair()
    F = tiny_model("llama", vocab_size=len(tok))
    for key, value in change.items():
        setattr(F.config, key, value)
    with pytest.raises(DonorMismatchError, match=f"the recipient has .* {next(iter(change))}="):
        Grafter(P, F, tok)


# -- 3: generation length ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -5, 1.5, True, "3", None])
def test_generate_refuses_a_bad_max_new_tokens(value):
    P, F, tok = pair()
    with pytest.raises(ArgumentError, match=r"Grafter.generate: max_new_tokens: Input should be an integer >= 1, "
                                            rf"got {repr(value).replace('.', '[.]')} \("):
        Grafter(P, F, tok).generate(GraftSpec(), ["Ada stars in"], max_new_tokens=value)


def test_generate_makes_exactly_max_new_tokens():
    P, F, tok = pair()
    out = Grafter(P, F, tok).generate(GraftSpec(), ["Ada stars in"], max_new_tokens=3)
    assert out.tokens.shape == (1, 3) and len(out.step_logits) == 3


# -- 4: a delta donor made from another P --------------------------------------------------------


def test_delta_donor_from_another_pretrained_model_is_refused():
    P, F, tok = pair()
    other = perturbed_copy(P, seed=7)
    with pytest.raises(DonorMismatchError, match=r"this DeltaDonor was made from another pretrained model than the "
                                                 r"recipient: tensor 'model.embed_tokens.weight' differs \(pretrained "
                                                 r"fingerprint [0-9a-f]{12}, recipient's [0-9a-f]{12}\)"):
        Grafter(P, DeltaDonor(F, other), tok)
    donor = DeltaDonor(F, other)  # also when used without a Grafter's check
    layer = P.model.layers[0].mlp.up_proj
    with pytest.raises(DonorMismatchError, match="made from another pretrained model"):
        donor.params("model.layers.0.mlp.up_proj", layer)


def test_delta_donor_from_the_same_pretrained_model_records_its_fingerprint():
    P, F, tok = pair()
    donor = DeltaDonor(F, copy.deepcopy(P))  # an equal copy is the same P
    g = Grafter(P, donor, tok)
    assert len(donor.pretrained_fingerprints) == len(list(P.parameters()))
    spec = GraftSpec(rules=[GraftRule(components=["mlp"], positions=[Last()])])
    torch.testing.assert_close(g.run(spec, ["Ada stars in"]).logits, Grafter(P, F, tok).run(spec, ["Ada stars in"]).logits)


# -- 5: facts with values that are not text ---------------------------------------------------------


@pytest.mark.parametrize("value, kind", [("null", "null"), ('["Marie Curie", "Pierre Curie"]', "a list"),
                                         ('{"a": 1}', "an object"), ("true", "a boolean")])
def test_facts_with_non_text_values_are_refused(tmp_path, value, kind):
    path = tmp_path / "facts.jsonl"
    path.write_text('{"first_actor": "Ada", "second_actor": "Alan"}\n{"first_actor": "Marie", "second_actor": '
                    f'{value}}}\n')
    with pytest.raises(DataError, match=rf"facts.jsonl, line 2: field 'second_actor' is {kind} .*must be a string "
                                        "or a number"):
        load_facts(path)


def test_facts_cli_with_a_null_answer_exits_2(tmp_path, capsys):
    path = tmp_path / "facts.jsonl"
    path.write_text('{"first_actor": "Ada Lovelace", "second_actor": null}\n')
    spec = tmp_path / "lt.json"
    spec.write_text(SPEC)
    code = main(["run", "--tiny", "llama", "--spec", str(spec), "--facts", str(path), "--template", "sentence_3",
                 "--no-progress"])
    assert code == 2
    assert "line 1: field 'second_actor' is null" in capsys.readouterr().err


# -- 6: an output that is someone else's file ----------------------------------------------------------


def test_run_refuses_to_write_over_a_notes_file(tmp_path, examples, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    spec = tmp_path / "lt.json"
    spec.write_text(SPEC)
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["run", "--tiny", "llama", "--spec", str(spec), "--data", str(examples), "-o", str(notes),
                 "--no-progress"])
    assert code == 2
    assert "refusing to write results into" in capsys.readouterr().err
    assert notes.read_text() == "my notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no manifest beside it


def test_sweep_refuses_an_output_that_is_not_a_results_file(tmp_path, examples):
    from nngraft.study.sweep import run_sweep

    (tmp_path / "other.jsonl").write_text('{"text": "training data, not results"}\n')
    config = _sweep(tmp_path, output="other.jsonl")
    with pytest.raises(ResultsError, match="other.jsonl: it is not an nngraft results file"):
        run_sweep(load_sweep_config(config), show_progress=False)
    assert (tmp_path / "other.jsonl").read_text() == '{"text": "training data, not results"}\n'
    assert not (tmp_path / "manifest.json").exists()


def test_sweep_refuses_to_overwrite_a_foreign_manifest(tmp_path, examples):
    from nngraft.study.sweep import run_sweep

    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"format": "someone.else"}\n')
    config = _sweep(tmp_path)
    with pytest.raises(ResultsError, match="manifest.json exists and is not an nngraft results manifest"):
        run_sweep(load_sweep_config(config), show_progress=False)
    assert (out / "manifest.json").read_text() == '{"format": "someone.else"}\n'
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]


# -- 7: two writers on one output folder -------------------------------------------------------------


def test_second_writer_is_refused_naming_the_first(tmp_path, examples):
    from nngraft.study.sweep import run_sweep

    config = _sweep(tmp_path)
    with output_lock(tmp_path / "out"):
        with pytest.raises(OutputInUseError, match=rf"out is in use by another nngraft run \(pid {os.getpid()} on "
                                                   r".*, started 20\d\d-.*\)"):
            run_sweep(load_sweep_config(config), show_progress=False)
    assert not (tmp_path / "out" / "results.jsonl").exists()
    outcome = run_sweep(load_sweep_config(config), show_progress=False)  # the lock is gone
    assert outcome.results.exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["examples.jsonl", "manifest.json", "results.jsonl"]


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    folder = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from nngraft.study.results import output_lock\n"
         f"with output_lock({str(folder)!r}):\n    print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputInUseError, match=f"pid {holder.pid} on"):
            with output_lock(folder):
                pass
        holder.send_signal(signal.SIGKILL)  # a crash: no cleanup runs
        holder.wait(timeout=30)
        with output_lock(folder):  # the OS released the lock
            pass
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_refused_resume_leaves_the_manifest_as_it_was(tmp_path, examples):
    """Found by the fuzz test: a run refused on resume (its data changed) used to rewrite the
    manifest with its own config and dataset, describing rows it never wrote."""
    from nngraft.study.sweep import run_sweep

    config = _sweep(tmp_path)
    run_sweep(load_sweep_config(config), show_progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    examples.write_text(examples.read_text().replace("The Engine alongside", "The Loom alongside"))
    with pytest.raises(ResultsError, match="The data changed; use a new output directory"):
        run_sweep(load_sweep_config(config), show_progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


# -- the CLI's error boundary: user errors exit 2 with one message, bugs show a traceback ---------------


def _cli(capsys, *argv: str) -> tuple[int, str]:
    """Run the CLI in-process; (exit code, stderr with its line breaks folded)."""
    try:
        code = main(list(argv))
    except SystemExit as stop:  # argparse usage errors
        code = stop.code
    err = capsys.readouterr().err
    return code, " ".join(err.split())


@pytest.fixture()
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "lt.json"
    path.write_text(SPEC)
    return path


def _sweep(tmp_path: Path, **changes) -> Path:
    config = {"models": [{"name": "t", "tiny": "llama"}], "data": {"examples": "examples.jsonl"}, "grid": "main",
              "output": "out"}
    for key, value in changes.items():
        if key in ("tiny", "tiny_layers", "device"):
            config["models"][0][key] = value
        else:
            config[key] = value
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("content, message", [
    ('{"name": "caf\xe9", "rules": []}'.encode("latin-1"), r"lt.json is not UTF-8 text \(byte 0xe9 on line 1"),
    (SPEC.encode("utf-16"), "lt.json is encoded as UTF-16; nngraft reads UTF-8 text"),
    (b"", r"\(JSON\): Invalid JSON: EOF while parsing"),
])
def test_spec_files_in_other_encodings_exit_2(tmp_path, examples, capsys, content, message):
    import re

    (tmp_path / "lt.json").write_bytes(content)
    code, err = _cli(capsys, "run", "--tiny", "llama", "--spec", str(tmp_path / "lt.json"), "--data", str(examples))
    assert code == 2 and re.search(message, err) and "Traceback" not in err, err


def test_facts_in_utf16_exit_2(tmp_path, spec_file, capsys):
    facts = tmp_path / "facts.jsonl"
    facts.write_bytes('{"first_actor": "Ada", "second_actor": "Alan"}\n'.encode("utf-16"))
    code, err = _cli(capsys, "run", "--tiny", "llama", "--spec", str(spec_file), "--facts", str(facts),
                     "--template", "sentence_3")
    assert code == 2 and "facts.jsonl is encoded as UTF-16" in err


def test_a_directory_where_a_file_is_expected_exits_2(tmp_path, examples, spec_file, capsys):
    code, err = _cli(capsys, "run", "--tiny", "llama", "--spec", str(tmp_path), "--data", str(examples))
    assert code == 2 and f"cannot read spec file {tmp_path}: it is a directory; give the path of a file" in err
    code, err = _cli(capsys, "run", "--tiny", "llama", "--spec", str(spec_file), "--data", str(tmp_path))
    assert code == 2 and "is a directory; give the path of a file" in err
    code, err = _cli(capsys, "sweep", str(tmp_path))
    assert code == 2 and f"cannot read sweep config {tmp_path}: it is a directory" in err


def test_an_unreadable_file_exits_2(tmp_path, examples, spec_file, capsys, monkeypatch):
    real = Path.read_bytes

    def denied(self):
        if self.name == "lt.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    code, err = _cli(capsys, "run", "--tiny", "llama", "--spec", str(spec_file), "--data", str(examples))
    assert code == 2 and "cannot read spec file" in err and "permission denied" in err


@pytest.mark.parametrize("change, message", [
    ({"tiny": "mamba"}, r"models\[0\].tiny: Value error, no tiny model of type 'mamba'; known: gemma"),
    ({"tiny_layers": 0}, r"models\[0\].tiny_layers: Input should be greater than or equal to 1"),
    ({"tiny_layers": 10**9}, r"models\[0\].tiny_layers: Input should be less than or equal to 64"),
    ({"device": "gpu7"}, r"models\[0\].device: Value error, 'gpu7' is not a device"),
    ({"batch_size": 0}, "batch_size: Input should be greater than or equal to 1"),
    ({"batch_size": -3}, "batch_size: Input should be greater than or equal to 1"),
    ({"batch_size": 1.5}, "batch_size: Input should be a valid integer, got a number with a fractional part"),
    ({"batch_size": "many"}, "batch_size: Input should be a valid integer"),
])
def test_bad_sweep_config_values_exit_2(tmp_path, examples, capsys, change, message):
    import re

    code, err = _cli(capsys, "sweep", str(_sweep(tmp_path, **change)), "--no-progress")
    assert code == 2 and re.search(message, err) and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_device_without_a_gpu_exits_2(tmp_path, examples, capsys):
    code, err = _cli(capsys, "sweep", str(_sweep(tmp_path, device="cuda")), "--no-progress")
    assert code == 2 and "--device cuda: this torch build has no usable CUDA GPU" in err


@pytest.mark.parametrize("value", ["0", "-2"])
def test_bad_batch_size_on_the_command_line_exits_2(tmp_path, examples, spec_file, capsys, value):
    code, err = _cli(capsys, "run", "--tiny", "llama", "--spec", str(spec_file), "--data", str(examples),
                     "--batch-size", value)
    assert code == 2 and "batch_size: Input should be greater than or equal to 1" in err
    code, err = _cli(capsys, "run", "--tiny", "llama", "--spec", str(spec_file), "--data", str(examples),
                     "--batch-size", "1.5")
    assert code == 2 and "--batch-size: invalid int value: '1.5'" in err


def test_corrupt_results_on_plot_exit_2(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    results.write_text('{"model": "m", "spec": "p", "example": "e", "prob": 0.5}\nnot json\n'
                       '{"model": "m", "spec": "f", "example": "e", "prob": 0.5}\n')
    code, err = _cli(capsys, "plot", str(results))
    assert code == 2 and "line 2 is not a JSON object" in err


def test_a_hub_id_that_cannot_be_loaded_offline_exits_2(tmp_path, spec_file, examples):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for argv in (["run", "--spec", str(spec_file), "--model", "nobody/no-model", "--donor", "nobody/no-donor",
                  "--data", str(examples), "--no-progress"],
                 ["payload", str(spec_file), "--model", "nobody/no-model"]):
        run = subprocess.run([sys.executable, "-m", "nngraft.cli", *argv], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=300)
        err = " ".join(run.stderr.split())
        assert run.returncode == 2, run.stderr
        assert "no model 'nobody/no-model'" in err and "Hugging Face cache" in err
        assert "does not download models at run time" in err
        assert "Traceback" not in err


def test_a_full_disk_exits_2_and_keeps_the_rows_written(tmp_path, examples, spec_file, capsys, monkeypatch):
    import errno

    from nngraft.study import results as results_module
    from nngraft.study.results import load_manifest, load_results

    calls = []
    real = os.fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) > 3:  # after the first batch and the manifest: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(results_module.os, "fsync", fsync)
    out = tmp_path / "out"
    code, err = _cli(capsys, "run", "--tiny", "llama", "--spec", str(spec_file), "--data", str(examples),
                     "--batch-size", "1", "-o", str(out), "--no-progress")
    assert code == 2 and "no space left on device" in err and "Results already written are intact" in err
    rows = load_results(out)  # complete rows, no cut-off line
    assert 1 <= len(rows) <= 3 and load_manifest(out)["format"] == "nngraft.results"
    monkeypatch.setattr(results_module.os, "fsync", real)
    assert _cli(capsys, "run", "--tiny", "llama", "--spec", str(spec_file), "--data", str(examples),
                "--batch-size", "1", "-o", str(out), "--no-progress")[0] == 0
    rows = load_results(out)
    assert len(rows) == 3 and len({(r["spec"], r["example"]) for r in rows}) == 3


def test_debug_shows_the_traceback_of_a_user_error(tmp_path, capsys):
    code, err = _cli(capsys, "--debug", "sweep", str(tmp_path / "missing.json"))
    assert code == 2 and "Traceback" in err and "cannot read sweep config" in err
    code, err = _cli(capsys, "sweep", str(tmp_path / "missing.json"))
    assert code == 2 and "Traceback" not in err


def test_a_bug_shows_its_traceback(monkeypatch):
    from nngraft import cli

    def broken(args):
        """A command with a bug."""
        return 1 / 0

    monkeypatch.setitem(cli.COMMANDS, "broken", (broken, lambda p: None))
    with pytest.raises(ZeroDivisionError):
        main(["broken"])


# -- arguments of the public API: the message names the argument and the value received -------------


def _grafter(**kwargs):
    P, F, tok = pair()
    return Grafter(P, F, tok, **kwargs)


SPEC_OBJ = GraftSpec(rules=[GraftRule(components=["mlp"], positions=[Last()])])


@pytest.mark.parametrize("call, message", [
    (lambda: _grafter(batch_size=0), r"Grafter: batch_size: Input should be an integer >= 1 or None, got 0 \(int\)"),
    (lambda: _grafter(batch_size=-4), r"Grafter: batch_size: Input should be an integer >= 1 or None, got -4 \(int\)"),
    (lambda: _grafter(batch_size=2.5), r"Grafter: batch_size: Input should be an integer >= 1 or None, got 2.5 \(float\)"),
    (lambda: _grafter(batch_size=True), r"Grafter: batch_size: Input should be an integer >= 1 or None, got True \(bool\)"),
    (lambda: _grafter(share_prefix="yes"), r"Grafter: share_prefix: Input should be True or False, got 'yes' \(str\)"),
    (lambda: _grafter(call_cost=-1.0), r"Grafter: call_cost: Input should be a finite number >= 0 or None, got -1.0"),
    (lambda: _grafter(call_cost=float("nan")), r"Grafter: call_cost: Input should be a finite number >= 0 or None"),
    (lambda: _grafter(donors=["hybrid"]), r"Grafter: donors: Input should be a dict of donor name → donor"),
    (lambda: _grafter(donors={"default": pair()[1]}), r"Grafter: donors key: Input should be a donor name"),
    (lambda: Grafter(pair()[0], pair()[1], None), r"Grafter: tokenizer: Input should be the recipient's tokenizer"),
    (lambda: Grafter(42, pair()[1], pair()[2]), r"Grafter: recipient: Input should be a loaded transformers model, "
                                               r"or a local path / hub id, got 42 \(int\)"),
    (lambda: _grafter().run(SPEC_OBJ, ["Ada stars in"], all_logits="no"),
     r"Grafter.run: all_logits: Input should be True or False, got 'no' \(str\)"),
    (lambda: _grafter().run(SPEC_OBJ, ["Ada stars in"], batch_size=0),
     r"Grafter.run: batch_size: Input should be an integer >= 1 or None, got 0 \(int\)"),
    (lambda: _grafter().run(SPEC_OBJ, [b"Ada stars in"]), r"Grafter.run: prompts\[0\]: Input should be a string, got "
                                                           r"b'Ada stars in' \(bytes\)"),
    (lambda: _grafter().run(SPEC_OBJ, 42), r"Grafter.run: prompts: Input should be a string or a list of strings"),
    (lambda: _grafter().run(SPEC_OBJ, ["Ada stars in"], spans=[["Ada"]]),
     r"Grafter.run: spans\[0\]: Input should be a dict of span name → text, got \['Ada'\] \(list\)"),
    (lambda: _grafter().run(SPEC_OBJ, ["Ada stars in"], spans=[{"who": (0, "x")}]),
     r"Grafter.run: spans\[0\]\['who'\]: Input should be the span's text"),
    (lambda: _grafter().run(42, ["Ada stars in"]), r"spec: Input should be a GraftSpec, a spec file path, a dict, or "
                                                   r"a list of them, got 42 \(int\)"),
    (lambda: _grafter().run_grid("lt.json", ["Ada stars in"]),
     r"Grafter.run_grid: specs: Input should be a list of specs or a dict of name → spec, got 'lt.json'"),
    (lambda: _grafter().run_grid([SPEC_OBJ], ["Ada stars in"], progress=3),
     r"Grafter.run_grid: progress: Input should be True, False, None or a callable, got 3 \(int\)"),
    (lambda: _grafter().run_grid([SPEC_OBJ], ["Ada stars in"], batch_size=-1),
     r"Grafter.run_grid: batch_size: Input should be an integer >= 1 or None, got -1"),
    (lambda: DeltaDonor(pair()[1], pair()[0], rank=0), r"DeltaDonor: rank: Input should be an integer >= 1 or None, "
                                                       r"got 0 \(int\)"),
    (lambda: DeltaDonor(pair()[1], pair()[0], rank=2.5), r"DeltaDonor: rank: Input should be an integer >= 1 or None"),
    (lambda: DeltaDonor(pair()[1], pair()[0], dtype="bf16"),
     r"DeltaDonor: dtype: Input should be a floating torch dtype \(torch.float32, torch.bfloat16 …\) or None, got 'bf16'"),
    (lambda: DeltaDonor(pair()[1], pair()[0], dtype=torch.int8), r"DeltaDonor: dtype: Input should be a floating"),
    (lambda: __import__("nngraft").DenseDonor(pair()[1], dtype=float), r"DenseDonor: dtype: Input should be a floating"),
    (lambda: __import__("nngraft").LoraDonor(3), r"LoraDonor: path: Input should be the adapter folder"),
    (lambda: __import__("nngraft").TensorDonor({"model.norm.weight": [1.0, 2.0]}),
     r"TensorDonor: tensors\['model.norm.weight'\]: Input should be a tensor under a parameter name"),
])
def test_public_arguments_are_checked(call, message):
    with pytest.raises(ArgumentError, match=message):
        call()


@pytest.mark.parametrize("extra, message", [
    (["--limit", "0"], "data.limit: Input should be greater than or equal to 1"),  # was ignored: all facts ran
    (["--k", "0"], "argument --k: should be an integer >= 1, got 0"),
    (["--k", "-3"], "argument --k: should be an integer >= 1, got -3"),
])
def test_zero_or_negative_counts_on_the_command_line_exit_2(tmp_path, examples, spec_file, capsys, extra, message):
    code, err = _cli(capsys, "run", "--tiny", "llama", "--spec", str(spec_file), "--data", str(examples), *extra)
    assert code == 2 and message in err


def test_plot_refuses_rows_that_are_not_results(tmp_path, capsys):
    (tmp_path / "results.jsonl").write_text('{"model": "m", "spec": "p", "example": "e"}\n')
    code, err = _cli(capsys, "plot", str(tmp_path))
    assert code == 2 and "results.jsonl: row 1 has no template, fact_id, prob; is it an nngraft results file?" in err
    (tmp_path / "results.jsonl").write_text('{"model": "m", "spec": "p", "example": "e", "template": "t", '
                                            '"fact_id": "f", "prob": "high"}\n')
    code, err = _cli(capsys, "plot", str(tmp_path))
    assert code == 2 and "row 1: prob should be a number, got 'high'" in err


def test_writing_a_file_onto_a_directory_names_it(tmp_path, capsys):
    code, err = _cli(capsys, "schema", "-o", str(tmp_path))
    assert code == 2 and f"Is a directory (give a file path): {tmp_path};" in err


# -- the remote backend's own settings ------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"max_payload_mb": 0}, r"NdifBackend: max_payload_mb: Input should be a finite number > 0 or None, got 0 \(int\)"),
    ({"max_payload_mb": -5.0}, r"NdifBackend: max_payload_mb: Input should be a finite number > 0 or None, got -5.0"),
    ({"max_payload_mb": float("nan")}, r"NdifBackend: max_payload_mb: Input should be a finite number > 0 or None, "
                                       r"got nan \(float\)"),
    ({"max_payload_mb": "10"}, r"NdifBackend: max_payload_mb: Input should be a finite number > 0 or None, "
                               r"got '10' \(str\)"),
    ({"host": "ndif.example"}, r"NdifBackend: host: Input should be an http:// or https:// URL or None, "
                               r"got 'ndif.example' \(str\)"),
    ({"host": 8001}, r"NdifBackend: host: Input should be an http:// or https:// URL or None, got 8001 \(int\)"),
    ({"revision": ""}, r"NdifBackend: revision: Input should be a non-empty string or None, got '' \(str\)"),
    ({"dtype": "bf16"}, r"NdifBackend: dtype: Input should be a floating torch dtype \(torch.float32, torch.bfloat16 "
                        r"…\) or None, got 'bf16' \(str\)"),
    ({"dtype": torch.int8}, r"NdifBackend: dtype: Input should be a floating torch dtype"),
    ({"check_model": "yes"}, r"NdifBackend: check_model: Input should be True or False, got 'yes' \(str\)"),
    ({"verbose": 1}, r"NdifBackend: verbose: Input should be True or False, got 1 \(int\)"),
    ({"execution": "remote"}, r"NdifBackend: execution: Input should be 'ndif', 'local' or a callable server"
                              r"\(metadata, blob\) -> bytes, got 'remote' \(str\)"),
])
def test_remote_settings_are_checked(options, message):
    from nngraft.backends.ndif import NdifBackend

    with pytest.raises(ArgumentError, match=message):
        NdifBackend(**options)
    with pytest.raises(ArgumentError, match=message):  # the same check through Grafter.remote, before any load
        Grafter.remote("no/such-model", DeltaDonor(pair()[1], pair()[0]), **options)


def test_a_bad_api_key_is_refused_without_echoing_it():
    from nngraft.backends.ndif import NdifBackend

    with pytest.raises(ArgumentError, match=r"NdifBackend: api_key: Input should be a non-empty string or None, got a "
                                            r"str of 3 characters \(not shown: keys are never echoed\)") as caught:
        NdifBackend(api_key="   ")
    with pytest.raises(ArgumentError, match=r"got a bytes of no characters") as caught:
        NdifBackend(api_key=b"secret-key")
    assert "secret" not in str(caught.value)


@pytest.mark.parametrize("value", ["lots", "0", "-1", "inf", "nan"])
def test_a_bad_payload_limit_in_the_environment_is_refused(monkeypatch, value):
    from nngraft.backends.ndif import NdifBackend

    monkeypatch.setenv("NNGRAFT_MAX_PAYLOAD_MB", value)
    with pytest.raises(ArgumentError, match=rf"NdifBackend: the environment variable NNGRAFT_MAX_PAYLOAD_MB should be "
                                            rf"a number of megabytes > 0, got '{value}'; fix or unset it"):
        NdifBackend()
    assert NdifBackend(max_payload_mb=2).limit_bytes == 2_000_000  # an explicit limit does not read it
    monkeypatch.setenv("NNGRAFT_MAX_PAYLOAD_MB", "3")
    assert NdifBackend().limit_bytes == 3_000_000


@pytest.mark.parametrize("value", ["0", "-2", "nan", "lots"])
def test_payload_limit_on_the_command_line_is_checked(capsys, value):
    code, err = _cli(capsys, "payload", "spec.json", "--model", "m", f"--limit-mb={value}")
    assert code == 2 and "argument --limit-mb: should be a number > 0, got" in err and value in err


# -- no clobbered file for every writer -------------------------------------------------------------

RESULT_ROW = {"model": "m", "spec": "p", "example": "f1/s3", "template": "s3", "fact_id": "f1", "prob": 0.25}


def _results(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.jsonl").write_text(json.dumps(RESULT_ROW) + "\n")
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_plot_refuses_a_folder_of_other_files_and_reruns_into_its_own(tmp_path, capsys):
    runs = _results(tmp_path / "runs")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes\n")
    code, err = _cli(capsys, "plot", str(runs), "-o", str(mine))
    assert code == 2
    assert (f"refusing to write into {mine}: it holds files that `nngraft plot` did not write (notes.txt), and "
            "nngraft never overwrites other files. Give a new or empty directory with -o") in err
    assert _files(mine) == {"notes.txt": b"my notes\n"}
    figures = tmp_path / "figures"
    assert _cli(capsys, "plot", str(runs), "-o", str(figures))[0] == 0
    first = sorted(p.name for p in figures.iterdir())
    assert "aggregates.csv" in first and ".nngraft-output" in first and ".nngraft-lock" not in first
    assert _cli(capsys, "plot", str(runs), "-o", str(figures))[0] == 0  # a rerun replaces its own files
    assert sorted(p.name for p in figures.iterdir()) == first
    # a plots folder written before folders were marked (figures and aggregates.csv only) is plot's own
    (figures / ".nngraft-output").unlink()
    assert _cli(capsys, "plot", str(runs), "-o", str(figures))[0] == 0
    # another command's folder is not plot's, and the message says whose it is
    (figures / ".nngraft-output").write_text('{"command": "localize"}\n')
    code, err = _cli(capsys, "plot", str(runs), "-o", str(figures))
    assert code == 2 and "(it is `nngraft localize`'s output)" in err


def test_plot_into_a_folder_another_writer_holds_is_refused(tmp_path, capsys):
    runs = _results(tmp_path / "runs")
    with output_lock(tmp_path / "figures"):
        code, err = _cli(capsys, "plot", str(runs), "-o", str(tmp_path / "figures"))
    assert code == 2 and f"figures is in use by another nngraft run (pid {os.getpid()} on " in err
    assert not (tmp_path / "figures" / "aggregates.csv").exists()


def test_plot_output_that_is_a_file_is_refused(tmp_path, capsys):
    runs = _results(tmp_path / "runs")
    (tmp_path / "notes.txt").write_text("my notes\n")
    code, err = _cli(capsys, "plot", str(runs), "-o", str(tmp_path / "notes.txt"))
    assert code == 2 and f"cannot write into {tmp_path / 'notes.txt'}: it exists and is not a directory" in err
    assert (tmp_path / "notes.txt").read_text() == "my notes\n"


@pytest.mark.parametrize("command, flag", [
    (["localize", "--tiny", "llama", "--dataset", "fake_movies_fake_actors", "--n", "2", "--template", "sentence_1",
      "--no-progress"], "-o"),
    (["demo", "--quick", "--no-progress"], "--out"),
])
def test_folder_writers_refuse_a_folder_of_other_files(tmp_path, capsys, command, flag):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes\n")
    code, err = _cli(capsys, *command, flag, str(mine))
    assert code == 2
    assert (f"refusing to write into {mine}: it holds files that `nngraft {command[0]}` did not write (notes.txt)"
            f", and nngraft never overwrites other files. Give a new or empty directory with {flag}") in err
    assert _files(mine) == {"notes.txt": b"my notes\n"}
    with output_lock(tmp_path / "busy"):  # and a folder another writer holds
        code, err = _cli(capsys, *command, flag, str(tmp_path / "busy"))
    assert code == 2 and "busy is in use by another nngraft run" in err


def test_localize_reruns_into_its_own_folder(tmp_path, capsys):
    out = tmp_path / "loc"
    args = ["localize", "--tiny", "llama", "--dataset", "fake_movies_fake_actors", "--n", "2", "--template",
            "sentence_1", "--targets", "donor_top1", "--metric", "logprob", "--no-plot", "--no-progress", "-o", str(out)]
    assert _cli(capsys, *args)[0] == 0
    first = json.loads((out / "localize.json").read_text())
    assert _cli(capsys, *args)[0] == 0
    assert json.loads((out / "localize.json").read_text())["units"] == first["units"]
    assert sorted(p.name for p in out.iterdir()) == [".nngraft-output", "localize.json", "spec.json"]


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_finetune_never_replaces_a_folder_it_did_not_write(tmp_path, capsys, extra):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes\n")
    code, err = _cli(capsys, "finetune", "--model", "not-loaded", "--dataset", "fake_movies_fake_actors", "--n", "2",
                     "--out", str(mine), *extra)
    assert code == 2
    if extra:
        assert (f"refusing to overwrite {mine}: it is not a folder nngraft finetune wrote (no "
                "finetune-manifest.json), and --overwrite would replace all of it. Give a new folder with --out") in err
    else:
        assert f"{mine} already exists; pass --overwrite or choose another --out" in err
    assert _files(mine) == {"notes.txt": b"my notes\n"}
    (tmp_path / "notes.txt").write_text("my notes\n")  # a file is never replaced by a model folder
    code, err = _cli(capsys, "finetune", "--model", "not-loaded", "--dataset", "fake_movies_fake_actors", "--n", "2",
                     "--out", str(tmp_path / "notes.txt"), *extra)
    assert code == 2 and f"{tmp_path / 'notes.txt'} exists and is not a folder; give a new folder with --out" in err
    assert (tmp_path / "notes.txt").read_text() == "my notes\n"


def test_save_finetuned_overwrite_replaces_only_its_own_folder(tmp_path):
    from nngraft.study.finetune import FinetuneError, save_finetuned

    P, _, tok = pair()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes\n")
    with pytest.raises(FinetuneError, match="refusing to overwrite .*mine: it is not a folder nngraft finetune wrote"):
        save_finetuned(P, tok, {"note": "test"}, mine, overwrite=True)
    assert _files(mine) == {"notes.txt": b"my notes\n"}
    out = save_finetuned(P, tok, {"note": "first"}, tmp_path / "model")
    save_finetuned(P, tok, {"note": "second"}, out, overwrite=True)  # its own folder: replaced
    assert json.loads((out / "finetune-manifest.json").read_text()) == {"note": "second"}


@pytest.mark.parametrize("argv, command", [
    (["data", "make", "fake_movies_fake_actors", "-n", "3"], "data make"),
    (["data", "texts", "FACTS"], "data texts"),
    (["schema"], "schema"),
])
def test_file_writers_refuse_to_overwrite_other_files_and_rerun_over_their_own(tmp_path, capsys, argv, command):
    from nngraft.study.data import make_facts, save_facts

    facts = tmp_path / "facts.jsonl"
    save_facts(make_facts("fake_movies_fake_actors", 2), facts, dataset="fake_movies_fake_actors")
    argv = [str(facts) if a == "FACTS" else a for a in argv]
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"my": "notes"}\n')
    before = _files(tmp_path)
    code, err = _cli(capsys, *argv, "-o", str(notes))
    assert code == 2
    assert (f"refusing to overwrite {notes}: it exists and is not a file `nngraft {command}` wrote, and nngraft "
            "never overwrites other files. Give a new path with -o (or move that file away)") in err
    assert _files(tmp_path) == before
    new = tmp_path / "new.jsonl"
    assert _cli(capsys, *argv, "-o", str(new))[0] == 0
    assert _cli(capsys, *argv, "-o", str(new))[0] == 0  # a rerun replaces its own output
    assert new.stat().st_size > 0


def test_data_make_refuses_a_foreign_manifest_beside_its_output(tmp_path, capsys):
    (tmp_path / "f.manifest.json").write_text('{"mine": true}\n')
    code, err = _cli(capsys, "data", "make", "fake_movies_fake_actors", "-n", "3", "-o", str(tmp_path / "f.jsonl"))
    assert code == 2 and f"refusing to overwrite {tmp_path / 'f.manifest.json'}: it exists and is not a file" in err
    assert not (tmp_path / "f.jsonl").exists()
    assert (tmp_path / "f.manifest.json").read_text() == '{"mine": true}\n'


# -- seeds: a negative seed silently drew another seed's data -------------------------------------------


def test_a_negative_seed_is_refused_it_would_repeat_another_seeds_facts():
    import random

    from nngraft.study.data import make_facts

    assert random.Random(-5).random() == random.Random(5).random()  # why: Python seeds with |seed|
    with pytest.raises(DataError, match=r"seed must be an integer >= 0, got -5 \(Python's random draws the same data "
                                        r"for -5 as for 5"):
        make_facts("fake_movies_fake_actors", 3, seed=-5)
    with pytest.raises(DataError, match=r"seed must be an integer >= 0, got 1.5"):
        make_facts("fake_movies_fake_actors", 3, seed=1.5)


@pytest.mark.parametrize("argv, option", [
    (["data", "make", "fake_movies_fake_actors", "-n", "3", "-o", "f.jsonl", "--seed", "-5"], "--seed"),
    (["run", "--tiny", "llama", "--spec", "lt.json", "--dataset", "fake_movies_fake_actors", "--n", "2",
      "--seed", "-5"], "--seed"),
    (["finetune", "--model", "m", "--out", "o", "--dataset", "fake_movies_fake_actors", "--n", "2",
      "--data-seed", "-5"], "--data-seed"),
    (["finetune", "--model", "m", "--out", "o", "--dataset", "fake_movies_fake_actors", "--n", "2", "--seed", "-5"],
     "--seed"),
    (["demo", "--seed", "-5"], "--seed"),
])
def test_a_negative_seed_on_the_command_line_exits_2(tmp_path, capsys, monkeypatch, argv, option):
    monkeypatch.chdir(tmp_path)
    code, err = _cli(capsys, *argv)
    assert code == 2 and f"argument {option}: should be an integer >= 0, got -5 (a negative seed draws the same data " \
                          "as 5)" in err
    assert list(tmp_path.iterdir()) == []


def test_a_negative_seed_in_a_sweep_config_is_refused(tmp_path):
    config = tmp_path / "sweep.json"
    config.write_text(json.dumps({"models": [{"name": "t", "tiny": "llama"}], "specs": ["lt.json"],
                                  "data": {"dataset": "fake_movies_fake_actors", "n": 2, "seed": -1}}))
    with pytest.raises(SweepConfigError, match=r"data.seed: Input should be greater than or equal to 0"):
        load_sweep_config(config)
