#!/usr/bin/env bash
# Fetch the wheels that the lent GPU machine lacks (Python 3.12, x86-64 Linux; it has torch,
# transformers, accelerate, peft, safetensors, rich, matplotlib, but not nnsight and its needs)
# into benchmarks/wheels/ (ignored by git), for benchmarks/gpu_check.sh to install offline.
# Run it where pip reaches PyPI; then carry benchmarks/wheels with the run. About 9 MiB (9 wheels).
#
# Usage: benchmarks/fetch_gpu_wheels.sh [--list]     (--list: print the pinned wheels, fetch nothing)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DEST=benchmarks/wheels
WHEELS=(nnsight==0.8.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        zstandard==0.25.0 greenlet==3.5.6 websocket-client==1.9.2 typing-extensions==4.16.0)
if [ "${1:-}" = "--list" ]; then printf '%s\n' "${WHEELS[@]}"; exit 0; fi
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}"
kib=$(du -sk "$DEST" | cut -f1)
echo "benchmarks/wheels: $(ls "$DEST"/*.whl | wc -l) wheels, $((kib / 1024)) MiB"
if [ "$kib" -gt $((50 * 1024)) ]; then echo "more than 50 MiB: a run carries at most 64 MiB with the tree" >&2; exit 1; fi
