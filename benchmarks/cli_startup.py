"""How long ``nngraft --help`` takes to start, and which heavy packages it imports (target: under
1 s; torch, transformers and nnsight are imported lazily, only by commands that use them).

    python -m benchmarks.cli_startup            # 10 runs, median / min / max, to stdout
    python -m benchmarks.cli_startup --runs 20 --out benchmarks/results/cli_startup.json

Each run is a fresh ``python -m nngraft.cli --help`` process (what the ``nngraft`` script runs),
timed from start to exit; a machine busy with other jobs makes every run slower, so the minimum
is the best estimate of the cost itself and the median of what a user waits. Not a test: the test
suite only checks that ``--help`` imports none of the heavy packages (tests/cli/test_help.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "nnsight", "matplotlib", "numpy", "pydantic")
PROBE = ("import sys, runpy; sys.argv = ['nngraft', '--help']\n"
         "try:\n    runpy.run_module('nngraft.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
         "print('HEAVY=' + ','.join(m for m in %r if m in sys.modules), file=sys.stderr)" % (HEAVY,))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10, help="fresh processes to time (default 10)")
    p.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = p.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "nngraft.cli", "--help"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    probe = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    heavy = probe.stderr.strip().rpartition("HEAVY=")[2].split(",") if "HEAVY=" in probe.stderr else []
    result = {"command": "python -m nngraft.cli --help", "runs": args.runs,
              "median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
              "max_s": round(max(times), 3), "heavy_imports": [h for h in heavy if h],
              "load_average": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
              "python": platform.python_version()}
    print(f"nngraft --help: median {result['median_s']:.2f} s, min {result['min_s']:.2f} s, "
          f"max {result['max_s']:.2f} s over {args.runs} runs (load average {result['load_average'][0]} "
          f"on {result['cpus']} CPUs); heavy packages imported: {', '.join(result['heavy_imports']) or 'none'}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
