"""Benchmark settings and the one runner every benchmark uses.

Unlike ``tests/conftest.py`` this leaves ``TRITON_INTERPRET`` alone: on CUDA the compiled kernels
are timed, and on CPU only the PyTorch references are (the interpreter would time Python, not the
kernels). Each benchmark is one (op, model, implementation) triple:

- ``triton``: the public ``nirvana_kernels`` op; on CUDA it runs the Triton kernel.
- ``eager``: the ``*_torch`` reference.
- ``compile``: ``torch.compile(reference)``, compiled once per case (during warmup, never timed).

Real layer shapes and the ``triton`` / ``compile`` implementations need CUDA; on CPU they are skipped
with a reason and the references run at ``shapes.CPU_MODELS``.
"""

from __future__ import annotations

import measure
import pytest
import shapes
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS = ("triton", "eager", "compile")
# pytest-benchmark rounds: each round is one call (plus a CUDA sync), the L2 flushed before it.
ROUNDS = {"cuda": 30, "cpu": 5}
WARMUP_ROUNDS = {"cuda": 3, "cpu": 1}


def cases(family: str) -> list:
    """``pytest.param(op, model, impl)`` for every op of ``family``, every model, every implementation."""
    models = shapes.GPU_MODELS + shapes.CPU_MODELS
    return [
        pytest.param(op, m.name, impl, id=f"{op}-{m.name}-{impl}")
        for op in shapes.ops(family)
        for m in models
        for impl in IMPLS
    ]


def _skip_reason(model: str, impl: str) -> str | None:
    on_cpu_list = model in {m.name for m in shapes.CPU_MODELS}
    if DEVICE.type == "cuda":
        return "a CPU-sized shape; on CUDA the real layer shapes run instead" if on_cpu_list else None
    if not on_cpu_list:
        return "real layer shapes need a CUDA GPU (several GB per layer)"
    if impl != "eager":
        return f"{impl} is timed on CUDA only; on CPU the public ops would just run the reference"
    return None


@pytest.fixture(autouse=True)
def _no_poisoned_outputs(monkeypatch):
    # tests/conftest.py NaN-fills every kernel output when it is loaded in the same session; that is
    # an extra write per output, which would skew the timings.
    monkeypatch.setenv("NIRVANA_POISON_OUTPUTS", "0")


@pytest.fixture(scope="session")
def copy_bandwidth() -> tuple[float, int]:
    """(bytes/s, bytes copied): the device's measured ``dst.copy_(src)`` bandwidth, once per session."""
    return measure.copy_bandwidth(DEVICE)


@pytest.fixture
def run_case(benchmark, copy_bandwidth):
    """``run_case(op, model, impl)``: check one implementation's output, then time it into ``benchmark``."""

    def run(op: str, model: str, impl: str) -> None:
        reason = _skip_reason(model, impl)
        if reason:
            pytest.skip(reason)
        w = shapes.workload(op, model, DEVICE)
        fn = w.kernel if impl == "triton" else w.reference
        if impl == "compile":
            torch._dynamo.reset()  # each case compiles from scratch, never hitting the recompile limit
            fn = torch.compile(w.reference)
        try:
            result = fn(*w.args, **w.kwargs)
        except Exception as err:  # torch.compile's failures on the reference are not the kernels' bugs
            if impl != "compile":
                raise
            pytest.xfail(f"torch.compile(reference) failed: {type(err).__name__}: {err}")
        ok, detail = measure.check_output(result, w.out_shapes, w.out_dtype)
        assert ok, f"{impl} {op} on {model}: {detail}"
        if impl != "eager":
            ok, detail = measure.compare(result, w.run_reference(), exact=w.exact)
            assert ok, f"{impl} {op} on {model} disagrees with the reference: {detail}"

        def timed():
            fn(*w.args, **w.kwargs)
            measure.synchronize(DEVICE)

        benchmark.group = f"{op} {model}"
        benchmark.extra_info.update(
            op=op, model=model, impl=impl, shape=w.shape, dtype=shapes.dtype_name(w.dtype), device=str(DEVICE)
        )
        benchmark.pedantic(
            timed,
            setup=lambda: measure.flush_cache(DEVICE),
            rounds=ROUNDS[DEVICE.type],
            warmup_rounds=WARMUP_ROUNDS[DEVICE.type],
        )
        if not benchmark.stats:  # --benchmark-disable: the call ran once, untimed
            return
        ms = benchmark.stats.stats.median * 1e3
        bw, copied = copy_bandwidth
        rate = measure.gb_per_s(w.bytes_moved, ms)
        benchmark.extra_info.update(
            median_ms=ms,
            bytes=w.bytes_moved,
            gb_per_s=rate,
            copy_gb_per_s=bw / 1e9,
            copy_bytes=copied,
            pct_of_copy_bandwidth=100 * rate * 1e9 / bw,
        )

    return run
