"""How the benchmarks measure: median times, the device's copy bandwidth, and comparing results.

Shared by the pytest benchmarks and ``gpu_check.py``. On CUDA, times come from
``triton.testing.do_bench`` (CUDA events, L2 flushed before every repetition, median); on CPU from
``time.perf_counter`` around each call.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

# do_bench defaults: 25 ms of warmup calls, then as many calls as fit in 100 ms.
WARMUP_MS = 25.0
REP_MS = 100.0
# The copy that sets the bandwidth ceiling: 1 GiB dwarfs any GPU cache; a CPU copy that size would
# take seconds per call on two cores, and 64 MiB already leaves the CPU caches.
COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 26}
# A buffer larger than the H200's L2 (60 MiB), zeroed between pytest-benchmark rounds.
_FLUSH_BYTES = 256 << 20
_flush_buffers: dict[torch.device, torch.Tensor] = {}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flush_cache(device: torch.device) -> None:
    """Evict the GPU's L2, so small matrices (a k_proj is 8 MiB) are timed from memory, not cache."""
    if device.type != "cuda":
        return
    if device not in _flush_buffers:
        _flush_buffers[device] = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device=device)
    _flush_buffers[device].zero_()
    torch.cuda.synchronize(device)


def median_ms(
    fn: Callable[[], object], device: torch.device, *, warmup_ms: float = WARMUP_MS, rep_ms: float = REP_MS
) -> float:
    """Median wall time of ``fn()`` in milliseconds, after warmup; ``fn`` is called at least 4 times."""
    if warmup_ms < 0 or rep_ms < 0:
        raise ValueError(f"warmup_ms, rep_ms: must be >= 0, got {warmup_ms}, {rep_ms}")
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()  # the first call pays for one-off work (lazy init, compilation) and is never timed
    start = time.perf_counter()
    while (time.perf_counter() - start) * 1e3 < warmup_ms:
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or ((time.perf_counter() - start) * 1e3 < rep_ms and len(times) < 1000):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def copy_bandwidth(device: torch.device, nbytes: int | None = None, **timing: float) -> tuple[float, int]:
    """The device's achievable memory bandwidth in bytes/s, from the median time of ``dst.copy_(src)``.

    A copy reads and writes ``nbytes`` each, so bandwidth = 2 * nbytes / time. Returns
    ``(bytes_per_s, nbytes)``; ``timing`` passes ``warmup_ms`` / ``rep_ms`` on to :func:`median_ms`.
    """
    nbytes = COPY_BYTES.get(device.type, COPY_BYTES["cpu"]) if nbytes is None else nbytes
    if nbytes < 1:
        raise ValueError(f"nbytes: must be positive, got {nbytes}")
    # Filled, not just allocated, so the pages exist before timing starts.
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    ms = median_ms(lambda: dst.copy_(src), device, **timing)
    return 2 * nbytes / (ms * 1e-3), nbytes


def gb_per_s(nbytes: int, ms: float) -> float:
    """Bytes moved in ``ms`` milliseconds, as GB/s (10^9 bytes per second)."""
    return nbytes / (ms * 1e-3) / 1e9


def as_list(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, (list, tuple)) else [result]


def check_output(result, out_shapes: list[tuple[int, ...]], dtype: torch.dtype) -> tuple[bool, str]:
    """Whether an op returned tensors of the expected shapes and dtype (and, for float32 scores, finite ones)."""
    outs = as_list(result)
    shapes = [tuple(o.shape) for o in outs]
    if shapes != [tuple(s) for s in out_shapes]:
        return False, f"shapes {shapes}, expected {out_shapes}"
    if any(o.dtype != dtype for o in outs):
        return False, f"dtypes {[o.dtype for o in outs]}, expected {dtype}"
    if dtype == torch.float32 and not all(bool(torch.isfinite(o).all()) for o in outs):
        return False, "non-finite scores"
    return True, "shapes and dtype as expected"


def compare(result, expected, *, exact: bool, rtol: float = 1e-4) -> tuple[bool, str]:
    """Whether ``result`` matches ``expected``: bit for bit (``exact``) or within relative error ``rtol``.

    Saliency scores are sums of positive terms in fp32, so the kernels and the reference differ
    only in summation order; their relative difference is bounded by a few fp32 ulps times log(n).
    """
    got, want = as_list(result), as_list(expected)
    if len(got) != len(want):
        return False, f"{len(got)} outputs, expected {len(want)}"
    worst = 0.0
    for i, (a, b) in enumerate(zip(got, want)):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False, f"output {i}: {a.dtype}{list(a.shape)}, expected {b.dtype}{list(b.shape)}"
        if exact:
            # Compare the bytes, so -0.0 vs 0.0 or a NaN payload would count as a difference.
            a_bytes = a.contiguous().view(torch.uint8).reshape(-1, a.element_size())
            b_bytes = b.contiguous().view(torch.uint8).reshape(-1, b.element_size())
            diff = int((a_bytes != b_bytes).any(dim=1).sum())
            if diff:
                return False, f"output {i}: {diff} of {a.numel()} elements differ"
            continue
        a64, b64 = a.double(), b.double()
        err = ((a64 - b64).abs() / b64.abs().clamp_min(1e-30)).max().item() if a.numel() else 0.0
        if not err <= rtol:  # also catches NaN
            return False, f"max rel err {err:.1e} > {rtol:.0e}"
        worst = max(worst, err)
    return True, "bit-exact" if exact else f"max rel err {worst:.1e}"
