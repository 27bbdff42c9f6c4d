"""Killing a sweep loses nothing: real `nngraft sweep` subprocesses, interrupted half-way.

Each test starts `python -m nngraft.cli sweep sweep.json` on a tiny model pair (18 rows in 18
batches), waits until results.jsonl holds some rows but not all, then kills it (SIGKILL: no chance
to clean up; SIGINT: Ctrl-C). Rerunning the same command must resume, skip the saved rows, and end
with exactly the rows (same units, identical numbers) of an uninterrupted run in another folder.
The manifest beside the results records what made them (versions, spec hashes, model identities,
seeds, dtype).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from nngraft.study.results import load_manifest, load_results, unit_key
from tests.helpers import ROOT

SPECS = ROOT / "recipes" / "specs"
CONFIG = {
    "name": "interrupt",
    "models": [{"name": "tiny", "tiny": "llama"}],
    "data": {"dataset": "fake_movies_real_actors", "n": 6, "seed": 0, "templates": ["sentence_3"]},
    "specs": [str(SPECS / "fe_lt.json")],  # + the baselines p and f
    "batch_size": 1,  # 18 batches: room to interrupt half-way
    "check_baselines": 1,
    "output": "out",
}
TOTAL = 3 * 6
COMMAND = ["sweep", "sweep.json", "--no-progress"]
HANG_GUARD_S = 120  # only guards against a hang; nothing here measures speed


def _default_sigint() -> None:
    # A shell that runs the test suite in the background may ignore SIGINT, and children inherit
    # that; restore what a terminal gives the user's process (Python's KeyboardInterrupt).
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(folder: Path) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sweep.json").write_text(json.dumps(CONFIG))
    return subprocess.Popen([sys.executable, "-m", "nngraft.cli", *COMMAND], cwd=folder,
                            stdout=open(folder / "stdout.txt", "w"), stderr=open(folder / "stderr.txt", "w"),
                            preexec_fn=_default_sigint)


def finish(proc: subprocess.Popen, folder: Path) -> tuple[int, str]:
    code = proc.wait(timeout=HANG_GUARD_S)
    return code, (folder / "stderr.txt").read_text()


def complete_lines(folder: Path) -> int:
    path = folder / "out" / "results.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def wait_until_some_rows(proc: subprocess.Popen, folder: Path, at_least: int = 3) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while complete_lines(folder) < at_least:
        if proc.poll() is not None:
            raise AssertionError(f"the sweep exited ({proc.returncode}) before it could be interrupted:\n"
                                 + (folder / "stderr.txt").read_text())
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("no rows appeared")
        time.sleep(0.02)


def by_unit(rows: list[dict]) -> dict:
    keyed = {unit_key(r): r for r in rows}
    assert len(keyed) == len(rows), "a unit occurs twice in the results"
    return keyed


def assert_same_rows(got: list[dict], expected: list[dict]) -> None:
    got, expected = by_unit(got), by_unit(expected)
    assert set(got) == set(expected)
    for key, row in expected.items():
        assert got[key] == row, f"row {key} differs from the uninterrupted run"  # exact, floats included


@pytest.fixture(scope="module")
def uninterrupted_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("uninterrupted")
    code, err = finish(start(folder), folder)
    assert code == 0, err
    assert f"{TOTAL} rows written, 0 already done" in err
    return folder


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_folder) -> list[dict]:
    rows = load_results(uninterrupted_folder / "out")
    assert len(rows) == TOTAL
    return rows


def test_sigkill_mid_sweep_then_rerun_resumes_to_identical_results(uninterrupted, tmp_path):
    proc = start(tmp_path)
    wait_until_some_rows(proc, tmp_path)
    proc.send_signal(signal.SIGKILL)
    code, _ = finish(proc, tmp_path)
    assert code == -signal.SIGKILL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a line cut by the kill is dropped (tested in test_sweep)
        saved = len(load_results(tmp_path / "out"))
    assert 0 < saved < TOTAL, "the kill must land mid-sweep"
    assert load_manifest(tmp_path / "out")["runs"] == []  # written atomically; no run record: it never ended

    code, err = finish(start(tmp_path), tmp_path)
    assert code == 0, err
    assert f"{TOTAL - saved} rows written, {saved} already done" in err
    assert_same_rows(load_results(tmp_path / "out"), uninterrupted)
    runs = load_manifest(tmp_path / "out")["runs"]
    assert runs[-1]["rows_before"] == saved and runs[-1]["rows_written"] == TOTAL - saved


def test_ctrl_c_mid_sweep_says_how_to_resume_and_rerun_gives_identical_results(uninterrupted, tmp_path):
    proc = start(tmp_path)
    wait_until_some_rows(proc, tmp_path)
    proc.send_signal(signal.SIGINT)
    code, err = finish(proc, tmp_path)
    assert code == 130, err
    assert "Traceback" not in err
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Ctrl-C stops between batches: no cut line, no warning
        partial = load_results(tmp_path / "out")
    saved = len(partial)
    assert 0 < saved < TOTAL
    assert f"interrupted: {saved} rows are saved in out/results.jsonl (manifest: out/manifest.json)" in err
    assert "To resume, run the same command again" in err
    assert "nngraft sweep sweep.json --no-progress" in err
    manifest = load_manifest(tmp_path / "out")
    assert manifest["runs"][-1]["rows_written"] == saved and "interrupted" in manifest["runs"][-1]
    assert manifest["models"]["tiny"]["recipient"]["config_hash"]

    code, err = finish(start(tmp_path), tmp_path)
    assert code == 0, err
    assert f"{TOTAL - saved} rows written, {saved} already done" in err
    assert_same_rows(load_results(tmp_path / "out"), uninterrupted)
    assert [("interrupted" in r, "finished" in r) for r in load_manifest(tmp_path / "out")["runs"]] == [
        (True, False), (False, True)]


# ---------------------------------------------------------------------------------------------
# The manifest: what made these numbers
# ---------------------------------------------------------------------------------------------


def test_manifest_records_versions_spec_hashes_model_identities_seeds_and_dtype(uninterrupted_folder, uninterrupted):
    import hashlib
    import importlib.metadata

    from nngraft import GraftSpec
    from nngraft.study.grids import paper_specs
    from nngraft.testing import tiny_pair

    manifest = load_manifest(uninterrupted_folder / "out")
    assert manifest["versions"]["nngraft"] == importlib.metadata.version("nngraft")
    assert manifest["versions"]["torch"] == importlib.metadata.version("torch")
    hashes = {"p": paper_specs()["p"].content_hash(), "f": paper_specs()["f"].content_hash(),
              "fe_lt": GraftSpec.load(SPECS / "fe_lt.json").content_hash()}
    assert {name: s["hash"] for name, s in manifest["specs"].items()} == hashes
    assert {r["spec_hash"] for r in uninterrupted} == set(hashes.values())
    assert all(r["spec_hash"] == hashes[r["spec"]] for r in uninterrupted)
    P, F, _ = tiny_pair("llama")
    config_hash = hashlib.sha256(json.dumps(P.config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]
    tiny = manifest["models"]["tiny"]
    for side, model in (("recipient", P), ("donor", F)):
        ident = tiny[side]
        assert ident["config_hash"] == config_hash
        assert ident["source"].startswith("nngraft.testing.tiny_pair('llama', n_layers=2)")
        assert ident["revision"] is None and ident["dtype"] == "float32"
        assert ident["n_params"] == sum(p.numel() for p in model.parameters())
    assert tiny["recipient"]["weights_fingerprint"] != tiny["donor"]["weights_fingerprint"]
    assert manifest["seeds"] == {"data": 0, "bootstrap": 0, "tiny_models": 0}
    assert manifest["dtypes"] == {"tiny": "float32"}
    assert manifest["dataset"]["n_examples"] == 6 and len(manifest["dataset"]["hash"]) == 64
    assert manifest["sweep"]["batch_size"] == 1


def test_manifest_model_identity_records_the_hub_revision(tmp_path, monkeypatch):
    """A model from the Hub cache is identified by its commit (read off the cache path, offline)."""
    import huggingface_hub.constants

    from nngraft.study.provenance import hub_revision, model_identity
    from nngraft.testing import tiny_pair

    commit = "0123456789abcdef" * 2 + "01234567"
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / commit
    P, _, _ = tiny_pair("llama")
    P.config.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert model_identity(P, "org/tiny")["revision"] == commit  # a hub id, found in the cache
    assert hub_revision(str(snapshot)) == commit  # the snapshot folder itself
    assert hub_revision("org/not-cached") is None
    assert hub_revision(str(tmp_path)) is None  # a plain local folder: its path is the identity


def test_ctrl_c_during_a_write_lands_after_the_batch_is_written_and_counted(tmp_path, monkeypatch):
    """The race behind "rows saved" counts: Ctrl-C in the middle of ResultsWriter.append is held
    back until the batch is on disk and counted, then raised as usual."""
    import os

    from nngraft.study.results import ResultsWriter

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        writer = ResultsWriter(tmp_path)
        real_fsync = os.fsync

        def fsync_hit_by_ctrl_c(fd):
            os.kill(os.getpid(), signal.SIGINT)
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync_hit_by_ctrl_c)
        rows = [{"model": "m", "spec": "p", "example": f"e{i}"} for i in range(3)]
        with pytest.raises(KeyboardInterrupt):
            writer.append(rows)
        monkeypatch.undo()
        writer.close()
        assert writer.written == 3 and len(writer.done) == 3
        assert load_results(tmp_path) == rows
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_in_nngraft_run(tmp_path, monkeypatch, capsys):
    """`nngraft run -o DIR` says what is saved and how to resume; without -o it says nothing was kept."""
    from nngraft.cli import main
    from nngraft.grafter import Grafter

    real = Grafter.run_rows
    calls = []

    def ctrl_c_on_third_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Grafter, "run_rows", ctrl_c_on_third_batch)
    monkeypatch.chdir(tmp_path)
    args = ["run", "--tiny", "llama", "--spec", str(SPECS / "lt.json"), "--dataset", "fake_movies_real_actors",
            "--n", "3", "--template", "sentence_3", "--batch-size", "1", "--no-progress"]
    assert main([*args, "-o", "out dir"]) == 130
    err = capsys.readouterr().err
    assert len(load_results(tmp_path / "out dir")) == 2  # the two batches before Ctrl-C
    assert "interrupted: 2 rows are saved in out dir/results.jsonl (manifest: out dir/manifest.json)" in err
    assert ("nngraft run --tiny llama --spec " + str(SPECS / "lt.json")) in err
    assert err.rstrip().endswith("--no-progress -o 'out dir'")  # quoted: pasteable as is
    calls.clear()
    assert main(args) == 130
    assert "nothing was kept (without -o DIR" in capsys.readouterr().err
