"""`nngraft bundle RUN` and `nngraft reproduce BUNDLE` (issue #25 part 2): a run packed into one file
is rerun in another folder, by another process with another cache, and every row matches; a
tampered row is a mismatch (exit 1); a wrong F is refused before anything runs; a LoRA F travels
inside the bundle, a large F by reference."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from nngraft.cli import main
from nngraft.study.results import load_results
from tests.helpers.runs import run_inputs, run_specs, save_examples, save_tiny_pair


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """P and a full F saved as folders, a LoRA F trained by nngraft finetune, and a run of each."""
    root = tmp_path_factory.mktemp("bundle")
    P, F, adapter, data = run_inputs(root)
    for name, donor in (("full", F), ("lora", adapter)):
        run_specs(P, donor, data, root / name, ("fe_lt", "lt"))
    return root


def _moved(path: Path):
    """Context: ``path`` renamed away (a machine that does not have it), put back afterwards."""
    import contextlib

    @contextlib.contextmanager
    def away():
        hidden = path.with_name(path.name + ".away")
        path.rename(hidden)
        try:
            yield hidden
        finally:
            hidden.rename(path)

    return away()


def test_a_bundle_reproduces_in_another_folder_process_and_cache(runs, tmp_path, capsys):
    bundle = tmp_path / "made-here" / "full.zip"
    code, out, err = _cli(capsys, "bundle", str(runs / "full"), "-o", str(bundle), "--no-progress")
    assert code == 0 and "yes" in out, err
    with zipfile.ZipFile(bundle) as archive:
        names = set(archive.namelist())
    model = "F"  # nngraft run names the pair after F's folder
    assert {"bundle.json", "run/manifest.json", "run/results.jsonl", "run/examples.jsonl",
            f"donors/{model}/donor/model.safetensors", f"donors/{model}/donor/config.json"} <= names
    elsewhere = tmp_path / "colleague"
    elsewhere.mkdir()
    shutil.copy(bundle, elsewhere / "full.zip")
    env = {**os.environ, "NNGRAFT_CACHE": str(tmp_path / "other-cache"), "HF_HUB_OFFLINE": "1"}
    with _moved(runs / "F"):  # F is packed: the recorded folder need not exist here
        done = subprocess.run([sys.executable, "-m", "nngraft.cli", "reproduce", "full.zip", "-o", "check", "--json",
                               "--no-progress"], capture_output=True, text=True, cwd=elsewhere, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    rows = load_results(runs / "full")
    assert report["ok"] and report["counts"]["rows"] == len(rows) == 4 * 3
    assert report["counts"]["identical"] + report["counts"]["within"] == len(rows)
    assert {(r["spec"], r["example"]) for r in report["rows"]} == {(r["spec"], r["example"]) for r in rows}
    verified = report["models"][model]
    assert verified["F"]["checked"] and verified["F"]["source"].endswith("donors/F/donor")
    assert verified["P"]["checked"] and verified["P"]["source"] == str(runs / "P")
    assert json.loads((elsewhere / "check" / "report.json").read_text())["counts"] == report["counts"]
    rerun = load_results(elsewhere / "check" / "rerun")
    assert len(rerun) == len(rows)
    assert report["tolerance"]["atol"] == 1e-5
    # same venv: at most the commit (a checkout that moved) and OMP_WAIT_POLICY (set by the CLI's re-exec) differ
    assert report["environment_differences"].keys() <= {"nngraft_commit", "OMP_WAIT_POLICY"}


def test_environment_differences_are_reported(runs, tmp_path, capsys):
    import importlib.metadata as md

    run = tmp_path / "run"
    shutil.copytree(runs / "full", run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["versions"].update(torch="2.4.0", nngraft_commit="unknown")
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert _cli(capsys, "bundle", str(run), "-o", str(tmp_path / "b.zip"), "--no-progress")[0] == 0
    code, out, _ = _cli(capsys, "reproduce", str(tmp_path / "b.zip"), "--json", "--no-progress")
    differences = json.loads(out)["environment_differences"]
    assert code == 0 and differences["torch"] == ["2.4.0", md.version("torch")]
    assert differences["nngraft_commit"][0] == "unknown"
    code, out, _ = _cli(capsys, "reproduce", str(tmp_path / "b.zip"), "--no-progress")
    assert "environment: the run's versions → this machine's" in out and "2.4.0" in out


def test_a_tampered_row_is_reported_as_a_mismatch(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs / "full", run)
    lines = (run / "results.jsonl").read_text().splitlines()
    row = json.loads(lines[5])
    row["prob"] += 1e-3
    lines[5] = json.dumps(row)
    (run / "results.jsonl").write_text("\n".join(lines) + "\n")
    assert _cli(capsys, "bundle", str(run), "-o", str(tmp_path / "b.zip"), "--no-progress")[0] == 0
    code, out, err = _cli(capsys, "reproduce", str(tmp_path / "b.zip"), "--json", "--no-progress")
    assert code == 1 and "not reproduced: 1 of 12 rows differ" in err, err
    report = json.loads(out)
    (bad,) = [r for r in report["rows"] if r["status"] == "mismatch"]
    assert (bad["spec"], bad["example"]) == (row["spec"], row["example"])
    (what,) = [m for m in bad["mismatched"] if m["column"] == "prob"]
    assert what["recorded"] == row["prob"] and abs(what["abs_diff"] - 1e-3) < 1e-9
    # the table says the same, in words
    code, out, err = _cli(capsys, "reproduce", str(tmp_path / "b.zip"), "--no-progress")
    assert code == 1 and "rows that do not match (1)" in out and row["example"] in out, out


def test_a_tolerance_of_zero_still_matches_the_same_machine(runs, tmp_path, capsys):
    assert _cli(capsys, "bundle", str(runs / "full"), "-o", str(tmp_path / "b.tar.gz"), "--no-progress")[0] == 0
    code, out, _ = _cli(capsys, "reproduce", str(tmp_path / "b.tar.gz"), "--atol", "0", "--rtol", "0", "--json",
                        "--no-progress")
    assert code == 0 and json.loads(out)["counts"]["identical"] == 12  # bit-identical: same batches, same machine
    code, out, _ = _cli(capsys, "reproduce", str(tmp_path / "b.tar.gz"), "--rows", "--no-progress")
    assert code == 0 and "every row matches (12 identical" in " ".join(out.split())
    assert sum(1 for line in out.splitlines() if "│ identical │" in line) == 12  # --rows: one line per row


def test_a_wrong_f_is_refused_before_anything_runs(runs, tmp_path, capsys):
    from nngraft.testing import perturbed_copy, tiny_model

    other = tmp_path / "otherF"
    perturbed_copy(tiny_model("llama", vocab_size=len(json.loads((runs / "P" / "tokenizer.json").read_text())
                                                     ["model"]["vocab"])), seed=5).save_pretrained(other)
    shutil.copy(runs / "P" / "tokenizer.json", other / "tokenizer.json")
    shutil.copy(runs / "P" / "tokenizer_config.json", other / "tokenizer_config.json")
    assert _cli(capsys, "bundle", str(runs / "full"), "-o", str(tmp_path / "b.zip"), "--no-progress")[0] == 0
    code, out, err = _cli(capsys, "reproduce", str(tmp_path / "b.zip"), "--donor", str(other), "-o",
                          str(tmp_path / "rep"), "--no-progress")
    text = " ".join(err.split())
    assert code == 2 and "F of model 'F'" in text and "is not the model this run used: its weights fingerprint" in text
    assert "Nothing was computed" in text and "Traceback" not in err
    assert not (tmp_path / "rep" / "rerun" / "manifest.json").exists()
    code, _, err = _cli(capsys, "reproduce", str(tmp_path / "b.zip"), "--model", str(runs / "F"), "--no-progress")
    assert code == 2 and "P of model 'F'" in " ".join(err.split()) and "Traceback" not in err


def test_a_lora_f_travels_inside_the_bundle(runs, tmp_path, capsys):
    from safetensors.torch import load_file

    from nngraft.donors.loading import tensors_fingerprint

    code, out, _ = _cli(capsys, "bundle", str(runs / "lora"), "-o", str(tmp_path / "lora.zip"), "--no-progress")
    assert code == 0 and "a LoRA adapter" in " ".join(out.split())
    with zipfile.ZipFile(tmp_path / "lora.zip") as archive:
        record = json.loads(archive.read("bundle.json"))
        names = set(archive.namelist())
    entry = record["models"]["lora"]["donors"]["donor"]
    assert entry["packed"] and entry["adapter_fingerprint"] == tensors_fingerprint(
        load_file(str(runs / "lora" / "adapter_model.safetensors")))
    assert {"donors/lora/donor/adapter_model.safetensors", "donors/lora/donor/adapter_config.json",
            "donors/lora/donor/finetune-manifest.json"} <= names
    with _moved(runs / "lora"):
        code, out, err = _cli(capsys, "reproduce", str(tmp_path / "lora.zip"), "--json", "--no-progress")
    assert code == 0, err
    report = json.loads(out)
    assert report["ok"] and report["models"]["lora"]["F"]["fingerprint"] == "adapter_fingerprint"


def test_a_large_f_goes_by_reference(runs, tmp_path, capsys):
    code, out, _ = _cli(capsys, "bundle", str(runs / "full"), "-o", str(tmp_path / "ref.zip"), "--pack-limit-mb",
                        "0.01", "--no-progress")
    assert code == 0 and "by reference" in out
    with zipfile.ZipFile(tmp_path / "ref.zip") as archive:
        record = json.loads(archive.read("bundle.json"))
        assert not [n for n in archive.namelist() if n.startswith("donors/")]
    entry = record["models"]["F"]["donors"]["donor"]
    assert not entry["packed"] and entry["source"] == str(runs / "F") and len(entry["weights_fingerprint"]) == 64
    assert entry["size_bytes"] > 0.01 * 1024 * 1024 and "> 0.01 MB" in entry["why"]
    assert _cli(capsys, "reproduce", str(tmp_path / "ref.zip"), "--no-progress")[0] == 0  # F where it was
    with _moved(runs / "F") as hidden:
        code, _, err = _cli(capsys, "reproduce", str(tmp_path / "ref.zip"), "--no-progress")
        assert code == 2 and "give --donor PATH" in " ".join(err.split()) and "Traceback" not in err
        code, out, err = _cli(capsys, "reproduce", str(tmp_path / "ref.zip"), "--donor", str(hidden), "--json",
                              "--no-progress")
        assert code == 0 and json.loads(out)["models"]["F"]["F"]["source"] == str(hidden), err
    # --pack-donor never / always override the size rule
    _cli(capsys, "bundle", str(runs / "lora"), "-o", str(tmp_path / "never.zip"), "--pack-donor", "never",
         "--no-progress")
    with zipfile.ZipFile(tmp_path / "never.zip") as archive:
        assert not [n for n in archive.namelist() if n.startswith("donors/")]


@pytest.mark.parametrize("argv, message", [
    (["bundle", "{tmp}/nothing"], "no such run folder"),
    (["bundle", "{tmp}"], "is not a run folder: it has no results.jsonl and no manifest.json"),
    (["bundle", "{runs}/full", "-o", "{tmp}/b.rar"], "a bundle is a .zip or a .tar.gz file"),
    (["bundle", "{runs}/full", "-o", "{runs}/full/b.zip"], "is inside the run folder"),
    (["reproduce", "{tmp}/none.zip"], "no such bundle file"),
    (["reproduce", "{runs}/examples.jsonl"], "is neither a zip nor a tar file"),
    (["reproduce", "{runs}/full.zip", "--atol", "-1"], "--atol: should be a number >= 0, got -1"),
])
def test_bad_input_is_one_clear_error(runs, tmp_path, capsys, argv, message):
    if not (runs / "full.zip").exists():
        assert _cli(capsys, "bundle", str(runs / "full"), "-o", str(runs / "full.zip"), "--no-progress")[0] == 0
    code, out, err = _cli(capsys, *[a.format(tmp=tmp_path, runs=runs) for a in argv])
    assert code == 2 and message in " ".join(err.split()) and "Traceback" not in err, err


def test_an_existing_bundle_is_replaced_only_with_force(runs, tmp_path, capsys):
    target = tmp_path / "b.zip"
    target.write_text("mine")
    code, _, err = _cli(capsys, "bundle", str(runs / "full"), "-o", str(target), "--no-progress")
    assert code == 2 and "exists; give another -o FILE, or --force" in " ".join(err.split())
    assert target.read_text() == "mine"
    assert _cli(capsys, "bundle", str(runs / "full"), "-o", str(target), "--force", "--no-progress")[0] == 0
    assert zipfile.is_zipfile(target)


def test_a_run_older_than_bundles_says_how_to_record_its_examples(runs, tmp_path, capsys):
    run = tmp_path / "old"
    shutil.copytree(runs / "full", run)
    (run / "examples.jsonl").unlink()
    code, _, err = _cli(capsys, "bundle", str(run), "-o", str(tmp_path / "b.zip"))
    assert code == 2 and "has no examples.jsonl" in err and "rerun the same `nngraft run`" in " ".join(err.split())


def test_a_bundle_that_writes_outside_its_folder_is_refused(tmp_path, capsys):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("bundle.json", json.dumps({"format": "nngraft.bundle", "version": 1}))
        archive.writestr("../outside.txt", "x")
    code, _, err = _cli(capsys, "reproduce", str(evil), "-o", str(tmp_path / "in"))
    assert code == 2 and "would be written outside the folder" in err
    assert not (tmp_path / "outside.txt").exists()


def test_the_commands_of_docs_bundle_md_run_as_written(tmp_path, capsys, monkeypatch):
    """Every `nngraft …` line of docs/bundle.md's bash blocks, in a folder holding P, F (tiny
    models saved as folders) and examples.jsonl."""
    import re
    import shlex

    from tests.helpers import ROOT

    monkeypatch.chdir(tmp_path)
    save_tiny_pair(tmp_path)
    save_examples(tmp_path / "examples.jsonl")
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "docs" / "bundle.md").read_text(), flags=re.S)
    lines = [line for block in blocks for line in block.splitlines() if line.startswith("nngraft ")]
    assert len(lines) == 8
    for line in lines:
        code, out, err = _cli(capsys, *shlex.split(line.split("  #")[0])[1:], "--no-progress")
        assert code == 0 and "Traceback" not in err, (line, err[-2000:])
    report = json.loads((tmp_path / "check" / "report.json").read_text())
    assert report["ok"] and report["counts"]["rows"] == 4 * 3
    # `--model P --donor F` given relative: the manifest records where they are, for a rerun from elsewhere
    (identity,) = json.loads((tmp_path / "runs" / "mine" / "manifest.json").read_text())["models"].values()
    assert identity["donor"]["source"] == str((tmp_path / "F").resolve())
    assert identity["recipient"]["source"] == str((tmp_path / "P").resolve())
    with tarfile.open(tmp_path / "mine-ref.tar.gz") as archive:
        assert not [n for n in archive.getnames() if n.startswith("donors/")]


def test_the_two_installs_recipe_reproduces_in_one_interpreter(tmp_path, capsys):
    """recipes/two_installs.py with --current-python (its venvs are made by hand: docs/bundle.md):
    install A runs the paper's main grid on tiny folders and bundles it, F is deleted, install B's
    side reproduces every row from the bundle in another folder with another cache."""
    from tests.helpers.recipe_loader import load_recipe

    assert load_recipe("two_installs").main(["--current-python", "--workdir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "two_installs.json").read_text())
    assert summary["reproduce_exit"] == 0 and summary["counts"]["rows"] == 8 * 4
    assert summary["counts"]["mismatch"] == summary["counts"]["missing"] == 0
    assert not (tmp_path / "A" / "F").exists() and summary["models"]["F"]["F"]["checked"]
    assert summary["models"]["F"]["F"]["source"] == str(tmp_path / "B" / "check" / "bundle" / "donors" / "F" / "donor")


def test_a_demo_folder_older_than_bundles_gets_its_examples_back(tmp_path, capsys):
    """A demo folder written before runs recorded examples.jsonl: its examples are regenerated from
    the dataset's name, size, seed and template, and written only when their hash is the recorded one."""
    from nngraft.study.data import make_facts, make_test_examples
    from nngraft.study.examples import examples_hash
    from nngraft.study.provenance import load_run_examples

    examples = make_test_examples(make_facts("fake_movies_fake_actors", 3, seed=1), "sentence_3")
    for name, digest in (("old", examples_hash(examples)), ("other", "0" * 64)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "results.jsonl").write_text(json.dumps({"model": "m", "spec": "p", "example": examples[0].key,
                                                          "prob": 0.5}) + "\n")
        (folder / "manifest.json").write_text(json.dumps({
            "format": "nngraft.results", "demo": {"seed": 1}, "models": {},
            "dataset": {"name": "fake_movies_fake_actors", "n": 3, "seed": 1, "template": "sentence_3",
                        "hash": digest}}))
    code, _, err = _cli(capsys, "bundle", str(tmp_path / "old"), "-o", str(tmp_path / "old.zip"), "--no-progress")
    assert code == 0 and "recorded" in err and load_run_examples(tmp_path / "old") == examples
    assert json.loads((tmp_path / "old" / "manifest.json").read_text())["rerun"]["batch_size"] == 64
    code, _, err = _cli(capsys, "bundle", str(tmp_path / "other"), "-o", str(tmp_path / "other.zip"))
    assert code == 2 and "rerun the same `nngraft demo` command" in err and not (tmp_path / "other" /
                                                                               "examples.jsonl").exists()


def test_a_named_donor_travels_and_is_checked_like_f(runs, tmp_path, capsys):
    """`--donor hybrid=H`: H is packed by the same rule as F and checked against its fingerprint."""
    from nngraft.testing import perturbed_copy
    from transformers import AutoModelForCausalLM

    H = tmp_path / "H"
    perturbed_copy(AutoModelForCausalLM.from_pretrained(runs / "P"), seed=7).save_pretrained(H)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(runs / "P" / name, H / name)
    spec = tmp_path / "hybrid.json"
    spec.write_text(json.dumps({"name": "f_mlp_hybrid_o_lt", "rules": [
        {"components": ["mlp"], "positions": [{"span": "first_actor"}]},
        {"components": ["o"], "positions": [{"last": True}], "donor": "hybrid"}]}))
    assert main(["run", "--model", str(runs / "P"), "--donor", str(runs / "F"), "--donor", f"hybrid={H}", "--spec",
                 str(spec), "--data", str(runs / "examples.jsonl"), "-o", str(tmp_path / "run"), "--no-progress",
                 "-q"]) == 0
    capsys.readouterr()
    assert _cli(capsys, "bundle", str(tmp_path / "run"), "-o", str(tmp_path / "h.zip"), "--no-progress")[0] == 0
    with zipfile.ZipFile(tmp_path / "h.zip") as archive:
        assert "donors/F/donor-hybrid/model.safetensors" in archive.namelist()
    with _moved(H):
        code, out, err = _cli(capsys, "reproduce", str(tmp_path / "h.zip"), "--json", "--no-progress")
    assert code == 0, err
    report = json.loads(out)
    assert report["ok"] and report["counts"]["rows"] == 3 * 3 and report["models"]["F"]["donor 'hybrid'"]["checked"]
    # by reference, and H changed since the run: refused, naming the named donor
    assert _cli(capsys, "bundle", str(tmp_path / "run"), "-o", str(tmp_path / "ref.zip"), "--pack-donor", "never",
                "--no-progress")[0] == 0
    perturbed_copy(AutoModelForCausalLM.from_pretrained(runs / "P"), seed=8).save_pretrained(H)
    code, _, err = _cli(capsys, "reproduce", str(tmp_path / "ref.zip"), "--no-progress")
    text = " ".join(err.split())
    assert code == 2 and "donor 'hybrid' of model 'F'" in text and "is not the model this run used" in text, text


def test_a_row_edited_inside_the_bundle_is_a_mismatch_and_the_file_is_named(runs, tmp_path, capsys):
    assert _cli(capsys, "bundle", str(runs / "full"), "-o", str(tmp_path / "b.zip"), "--no-progress")[0] == 0
    with zipfile.ZipFile(tmp_path / "b.zip") as source, zipfile.ZipFile(tmp_path / "edited.zip", "w") as edited:
        for name in source.namelist():
            data = source.read(name)
            if name == "run/results.jsonl":
                lines = data.decode().splitlines()
                row = json.loads(lines[0])
                row["rank"] += 1
                data = ("\n".join([json.dumps(row), *lines[1:]]) + "\n").encode()
            edited.writestr(name, data)
    code, out, err = _cli(capsys, "reproduce", str(tmp_path / "edited.zip"), "--json", "--no-progress")
    text = " ".join(err.split())
    assert code == 1 and "run/results.jsonl changed since the bundle was made" in text, text
    report = json.loads(out)
    assert report["changed_since_bundling"] == ["run/results.jsonl"] and report["counts"]["mismatch"] == 1
    (bad,) = [r for r in report["rows"] if r["status"] == "mismatch"]
    assert bad["mismatched"] == [{"column": "rank", "recorded": row["rank"], "now": row["rank"] - 1}]
