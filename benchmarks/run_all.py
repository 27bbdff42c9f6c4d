"""Run every benchmark on the tiny model and on SmolLM2-135M, save the results as JSON under
benchmarks/results/, draw the scaling plots into docs/, and rewrite the "Grafting performance"
section of docs/benchmarks.md.

Each benchmark runs in its own process, one after another (so memory and threads of one never
affect the next). About 10 minutes on a 2-core CPU.

    python -m benchmarks.run_all                       # everything
    python -m benchmarks.run_all --models tiny         # seconds
    python -m benchmarks.run_all --only bench_grid     # one benchmark, then re-render the docs
    python -m benchmarks.run_all --models smollm2 --threads 1 --only bench_vs_paper bench_overhead bench_grid
                                                       # a 1-thread cross-check: an extra summary column
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from . import report
from .common import MODELS, RESULTS, ROOT, log, write_json


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--only", nargs="+", choices=report.BENCHMARKS, default=list(report.BENCHMARKS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--no-docs", action="store_true", help="do not touch docs/ (no plots, no section)")
    args = p.parse_args(argv)

    started = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    failed = []
    for model in args.models:
        for bench in args.only:
            key = report.results_key(model, args.threads)
            cmd = [sys.executable, "-m", f"benchmarks.{bench}", "--model", model, "--threads", str(args.threads),
                   "--out", str(args.results / key / f"{bench}.json")]
            if bench == "bench_scaling" and not args.no_docs and key == model:
                cmd += ["--plot", str(args.docs.parent / f"benchmark-scaling-{model}.png")]
            log(f"run_all: {' '.join(cmd[1:])}")
            if subprocess.run(cmd, cwd=ROOT, env=env).returncode != 0:
                failed.append(f"{model}/{bench}")
                log(f"run_all: {model}/{bench} FAILED")
    seconds = time.perf_counter() - start
    # uncommitted changes to the code (not to the results and docs this very command rewrites)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                            ":!benchmarks/results", ":!docs"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip() != ""
    given = list(sys.argv[1:] if argv is None else argv)
    if args.threads != 2:  # a cross-check run: keep the main run's record
        write_json(args.results / f"run-{args.threads}thread.json", {
            "command": "python -m benchmarks.run_all " + " ".join(sys.argv[1:] if argv is None else argv),
            "started": started, "seconds": time.perf_counter() - start, "failed": failed})
    else:
        write_json(args.results / "run.json", {
            "command": "python -m benchmarks.run_all " + " ".join(given), "started": started,
            "seconds": seconds, "failed": failed, "dirty": dirty,
        })
    if not args.no_docs:
        report.main(["--results", str(args.results), "--docs", str(args.docs)])
    log(f"run_all: done in {seconds / 60:.1f} min" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
