#!/usr/bin/env bash
# Check and time every nirvana kernel on a CUDA GPU (an H200 in mind) in one call, from the repo root:
#     bash benchmarks/gpu_check.sh [gpu_check.py options]
# Prints one markdown table and, when $OUT is set, writes it to $OUT/gpu_check.md as well. Then the end-to-end
# distributed case (benchmarks/distributed_e2e.py, $OUT/distributed_e2e.md). Then it runs the
# kernel tests' full grid (NIRVANA_FULL_GRID=1; CI runs a pairwise subset in the interpreter) compiled, on
# CUDA tensors, in what is left of the call's 5 minutes; with $OUT set, their output goes to
# $OUT/kernel_tests.txt too.
# Installs nothing: it uses the image's torch (with CUDA), Triton and pytest, and this checkout's
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

# The whole call fits 300 s. The table gets 180 s of cases (gpu_check.py may overrun that by one case,
# at most its 45 s compile margin, plus start-up); the tests get what is left, and stop at 300 s.
SLOT_S=300
start=$SECONDS
rc=0
"$PY" benchmarks/gpu_check.py --budget-s 180 "$@" || rc=$?

left=$((SLOT_S - (SECONDS - start)))
# End to end (benchmarks/distributed_e2e.py): Llama-3.1-8B layer shapes, 4 layers, bf16, pruned by one
# process and by --distributed fsdp at world size 1 (NCCL), against a plain forward+backward; the plans
# must be identical. At most 100 s of the slot, and only with 150 s left, so the kernel tests keep 50.
if ((rc != 2)) && [[ "${TRITON_INTERPRET:-0}" != 1 ]] && ((left >= 150)); then
    echo
    set +e
    timeout -s INT -k 10 100 "$PY" benchmarks/distributed_e2e.py --device cuda --layers 4
    e2e_rc=$?
    set -e
    if ((e2e_rc == 124)); then
        echo "gpu_check: distributed_e2e not finished in its 100 s"
    elif ((e2e_rc != 0)); then
        echo "gpu_check: distributed_e2e failed (exit status $e2e_rc)"
        rc=1
    fi
    left=$((SLOT_S - (SECONDS - start)))
fi
if ((rc == 2)) || [[ "${TRITON_INTERPRET:-0}" == 1 ]]; then
    exit "$rc"  # no GPU run (the machine cannot, or a --smoke run in the interpreter): no GPU tests either
elif ! "$PY" -c 'import pytest, hypothesis' 2>/dev/null; then
    echo "gpu_check: kernel tests skipped: $PY cannot import pytest and hypothesis"
elif ((left < 30)); then
    echo "gpu_check: kernel tests skipped: ${left} s left of the ${SLOT_S} s slot"
else
    echo
    echo "Kernel tests, full grid, compiled on the GPU (${left} s left):"
    # Only the grid tests (and the CUDA-only ones): the rest check the interpreter or the CPU path itself.
    # Compiling dominates, so the cases run in parallel where pytest-xdist is there.
    workers=()
    if "$PY" -c 'import xdist' 2>/dev/null; then workers=(-n 8); fi
    log="${OUT:+$OUT/kernel_tests.txt}"
    set +e
    TRITON_INTERPRET=0 NIRVANA_FULL_GRID=1 timeout -s INT -k 10 "$left" \
        "$PY" -m pytest -q -p no:cacheprovider "${workers[@]}" tests/kernels -m "(grid or cuda) and not slow" 2>&1 |
        tee ${log:+"$log"}
    tests_rc=${PIPESTATUS[0]}
    set -e
    if ((tests_rc == 124)); then
        echo "gpu_check: kernel tests not finished in the ${SLOT_S} s slot (the cases above ran)"
    elif ((tests_rc != 0)); then
        echo "gpu_check: kernel tests failed (pytest exit status $tests_rc)"
        rc=1
    fi
fi
exit "$rc"
