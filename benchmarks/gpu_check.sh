#!/usr/bin/env bash
# GPU check — run on a machine with a CUDA GPU (never needed by the tests; CI is CPU only).
#
# What it checks, in under 10 minutes on one GPU:
#   1. Exactness, core cases, on the GPU: the one-pass graft equals the literal per-token weight
#      swap (tests/reference.py) on all 11 tiny architectures, for "everything at FE+LT" and "mlp at
#      LT", in float32 (at the suite's 2e-5 / 1e-4) and in bfloat16 (within 2ε, ε = the bfloat16
#      reference's own distance from the float32 one).
#   2. The sandbox harness on the GPU: tests/test_sandbox.py with P served on CUDA
#      (NNGRAFT_SANDBOX_DEVICE=cuda), so NDIF's autocast bracket (CUDA + bfloat16) is active on both
#      sides of the socket; dense/delta/LoRA donors on Llama and GPT-2 against the local graft,
#      float32 (tight) and bfloat16 (the derived tolerance), and the traffic counts.
#   3. Benchmark rows with GPU columns: plain forward, one-pass LT and FE+LT grafts and a grid of 8
#      specs, tiny Llama and SmolLM2-135M, float32 and bfloat16 (medians, CUDA-synchronized).
# Results: benchmarks/results/gpu_check.json and the "GPU check" section of docs/benchmarks.md.
#
# Usage: benchmarks/gpu_check.sh            (from anywhere; uses $PYTHON or python3)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)" || {
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing checked" >&2; exit 2; }
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
start=$SECONDS

echo "== 2. sandbox harness on the GPU"
sandbox_log=$(mktemp)
NNGRAFT_SANDBOX_DEVICE=cuda PYTHONPATH="$PWD" timeout 300 "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_sandbox.py 2>&1 | tee "$sandbox_log" | tail -5
sandbox_rc=${PIPESTATUS[0]}
summary=$(grep -E "passed|failed|error" "$sandbox_log" | tail -1)

echo "== 1 and 3. exactness on the GPU, timing rows"
PYTHONPATH="$PWD" timeout 420 "$PY" -m benchmarks.gpu_check --sandbox "${summary:-no summary (rc $sandbox_rc)}"
check_rc=$?
echo "gpu_check: done in $((SECONDS - start)) s; sandbox rc=$sandbox_rc, exactness/timing rc=$check_rc"
[ "$sandbox_rc" -eq 0 ] && [ "$check_rc" -eq 0 ]
