#!/usr/bin/env bash
# Check and time every nirvana kernel on a CUDA GPU (an H200 in mind) in one call, from the repo root:
#     bash benchmarks/gpu_check.sh [gpu_check.py options]
# Prints one markdown table and, when $OUT is set, writes it to $OUT/gpu_check.md as well.
# Installs nothing: it uses the image's torch (with CUDA) and Triton, and this checkout's
# nirvana_kernels when the package is not installed. $PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
if ! "$PY" -c 'import torch, triton' 2>/dev/null; then
    echo "gpu_check: $PY cannot import torch and triton; this script installs nothing" >&2
    exit 2
fi
if ! "$PY" -c 'import nirvana_kernels' 2>/dev/null; then
    export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" benchmarks/gpu_check.py "$@"
