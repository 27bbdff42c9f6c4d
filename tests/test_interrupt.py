"""Killing a sweep loses nothing: real `nngraft sweep` subprocesses, interrupted half-way.

Each test starts `python -m nngraft.cli sweep sweep.json` on a tiny model pair (30 rows in 30
batches), waits until results.jsonl holds some rows but not all, then kills it (SIGKILL: no chance
to clean up; SIGINT: Ctrl-C). Rerunning the same command must resume, skip the saved rows, and end
with exactly the rows (same units, identical numbers) of an uninterrupted run in another folder.
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

SPECS = Path(__file__).resolve().parents[1] / "recipes" / "specs"
CONFIG = {
    "name": "interrupt",
    "models": [{"name": "tiny", "tiny": "llama"}],
    "data": {"dataset": "fake_movies_real_actors", "n": 10, "seed": 0, "templates": ["sentence_3"]},
    "specs": [str(SPECS / "fe_lt.json")],  # + the baselines p and f
    "batch_size": 1,  # 30 batches: room to interrupt half-way
    "check_baselines": 1,
    "output": "out",
}
TOTAL = 3 * 10
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


def wait_until_some_rows(proc: subprocess.Popen, folder: Path, at_least: int = 4) -> None:
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
def uninterrupted(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("uninterrupted")
    code, err = finish(start(folder), folder)
    assert code == 0, err
    assert f"{TOTAL} rows written, 0 already done" in err
    rows = load_results(folder / "out")
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
