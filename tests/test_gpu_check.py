"""benchmarks/gpu_check.sh: its dry run (the same steps on the CPU, tiny shapes) passes and writes
every step's record to $OUT as it finishes; a failing step does not lose the others; the wheels it
installs on the GPU machine are the versions this suite runs with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from tests.helpers import ROOT

STEPS = ["environment", "exactness", "split", "timing-tiny-a", "timing-tiny-b"]


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "gpu_check.jsonl").read_text().splitlines()]


def test_dry_run_passes_and_writes_every_step_to_out(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = records(tmp_path)
    assert [r["step"] for r in found] == STEPS
    assert all(r["status"] == "ok" for r in found), found
    by_step = {r["step"]: r["result"] for r in found}
    assert {(x["arch"], x["spec"]) for x in by_step["exactness"]} == {
        (a, s) for a in ("llama", "gpt2") for s in ("everything FE+LT", "mlp LT")}
    assert all(x["ok_float32"] and x["ok_bfloat16"] for x in by_step["exactness"])
    assert all(x["devices"] == ["cuda:0", "cuda:1"] and x["ok_float32"] for x in by_step["split"])
    for step in ("timing-tiny-a", "timing-tiny-b"):
        assert by_step[step]["LT MLPs ÷ plain"] > 0 and by_step[step]["grid rows/s"] > 0
    section = (tmp_path / "gpu_check.md").read_text()
    assert section.startswith("<!-- gpu-check:begin -->") and "**split**" in section
    assert (tmp_path / "gpu_check.log").read_text().count("gpu_check: ") >= len(STEPS)
    docs = tmp_path / "benchmarks.md"  # --publish, on a copy of the docs page
    docs.write_text((ROOT / "docs" / "benchmarks.md").read_text())
    subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--publish", str(tmp_path / "gpu_check.jsonl"),
                    "--docs", str(docs)], cwd=ROOT, check=True, timeout=300)
    published = docs.read_text()
    assert section.strip() in published and published.count("<!-- gpu-check:begin -->") == 1


def test_a_failing_step_is_recorded_and_the_next_ones_still_run(tmp_path, monkeypatch):
    from benchmarks import gpu_check

    def broken(*args, **kwargs):
        raise RuntimeError("planted failure")
    monkeypatch.setattr(gpu_check, "exactness", broken)
    monkeypatch.setattr(gpu_check, "DRY_SHAPES", {"tiny-a": gpu_check.DRY_SHAPES["tiny-a"]})
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 1
    found = {r["step"]: r for r in records(tmp_path)}
    assert found["exactness"]["status"] == "failed" and "planted failure" in found["exactness"]["error"]
    assert found["split"]["status"] == "ok" and found["timing-tiny-a"]["status"] == "ok"
    assert "**exactness** (" in (tmp_path / "gpu_check.md").read_text()


def test_the_carried_wheels_are_the_versions_this_suite_runs_with():
    pins = subprocess.run([str(ROOT / "benchmarks" / "fetch_gpu_wheels.sh"), "--list"], capture_output=True,
                          text=True, check=True).stdout.split()
    pinned = dict(p.split("==") for p in pins)
    for name in ("nnsight", "pydantic", "pydantic-core"):
        assert pinned[name] == version(name), f"benchmarks/fetch_gpu_wheels.sh pins {name} {pinned[name]}"
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    assert "--no-index" in script and "timeout 400" in script and "465 - (SECONDS" in script  # offline; < 8 min
