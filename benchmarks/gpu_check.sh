#!/usr/bin/env bash
# GPU check: exactness (float32 and bfloat16 against the per-token reference, one device and a
# two-device split), timings (graft ÷ plain at the 1B and 8B shapes, grid throughput) and
# torch.cuda.max_memory_allocated per variant — benchmarks/gpu_check.py says what each step does.
#
# Made for the lent GPU machine: no internet; Python 3.12 with torch, transformers, accelerate,
# peft, safetensors but no nnsight or pydantic, which are installed offline from the wheels that
# benchmarks/fetch_gpu_wheels.sh fetched into benchmarks/wheels/ (carry that folder); results go to
# $OUT (the only folder whose files come back) as each step finishes; the whole run stays under
# 8 minutes: the Python steps are stopped at 400 s (timing steps skipped past a 340 s budget), then,
# with the time left up to 465 s, the sandbox harness (tests/backends/test_sandbox.py) with P on the GPU,
# where NDIF's autocast bracket is active (its log: $OUT/sandbox.log).
#
# Usage: benchmarks/gpu_check.sh [--dry-run]     (--dry-run: the same steps on the CPU, tiny shapes)
#        OUT=DIR benchmarks/gpu_check.sh         (default: benchmarks/results/gpu_check)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-benchmarks/results/gpu_check}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
start=$SECONDS
if [ "${1:-}" = "--dry-run" ]; then
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m benchmarks.gpu_check --dry-run --out "$OUT_DIR" --budget 400 \
        2>&1 | tee "$OUT_DIR/gpu_check.log"
    exit "${PIPESTATUS[0]}"
fi
if ! "$PY" -c "import nnsight, pydantic" 2>/dev/null; then
    if ! ls benchmarks/wheels/*.whl >/dev/null 2>&1; then
        echo "gpu_check: nnsight/pydantic missing and no wheels in benchmarks/wheels/: run" \
             "benchmarks/fetch_gpu_wheels.sh where pip reaches PyPI, and carry benchmarks/wheels" | tee "$OUT_DIR/gpu_check.log" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/nngraft-site \
        benchmarks/wheels/*.whl 2>&1 | tee "$OUT_DIR/install.log" || { echo "gpu_check: offline install failed" >&2; exit 2; }
    export PYTHONPATH="/tmp/nngraft-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)" || {
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); use --dry-run" | tee -a "$OUT_DIR/gpu_check.log" >&2; exit 2; }
timeout 400 "$PY" -m benchmarks.gpu_check --out "$OUT_DIR" --budget 340 2>&1 | tee -a "$OUT_DIR/gpu_check.log"
rc=${PIPESTATUS[0]}
left=$((465 - (SECONDS - start)))
if [ "$left" -ge 60 ]; then
    NNGRAFT_SANDBOX_DEVICE=cuda timeout "$left" "$PY" -m pytest -q -p no:cacheprovider tests/backends/test_sandbox.py \
        > "$OUT_DIR/sandbox.log" 2>&1
    sandbox_rc=$?
    echo "gpu_check: sandbox harness on the GPU: rc=$sandbox_rc, $(grep -E 'passed|failed|error' "$OUT_DIR/sandbox.log" | tail -1)" \
        | tee -a "$OUT_DIR/gpu_check.log"
    [ "$sandbox_rc" -eq 0 ] || rc=1
else
    echo "gpu_check: sandbox harness skipped: ${left} s left" | tee -a "$OUT_DIR/gpu_check.log"
fi
echo "gpu_check: done in $((SECONDS - start)) s, rc=$rc; results in $OUT_DIR" | tee -a "$OUT_DIR/gpu_check.log"
exit "$rc"
