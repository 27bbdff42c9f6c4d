"""nngraft's benchmarks (not part of the installed package; run from the repository root).

Each ``bench_*.py`` module is a script (``python -m benchmarks.bench_vs_paper --model smollm2``)
with a ``main(argv) -> dict`` that prints a table and returns the result it writes as JSON.
``python -m benchmarks.run_all`` runs them all and rewrites the "Grafting performance" section of
docs/benchmarks.md. See benchmarks/README.md.
"""

import os as _os
import sys as _sys

# Must be set before torch (OpenMP) initializes: see benchmarks/common.py. Only in a fresh
# benchmark process: when torch is already loaded (e.g. under pytest) it would change nothing here
# and would only leak into the caller's later subprocesses.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
