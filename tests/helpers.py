"""The one comparison helper: on a mismatch it says where, by how much, and what it expected."""

from __future__ import annotations

import torch

DTYPE_EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _where(mask: torch.Tensor, actual, expected, limit: int = 5) -> str:
    idx = mask.nonzero()[:limit]
    rows = [
        f"  at {tuple(i.tolist())}: got {actual[tuple(i)].item()!r}, expected {expected[tuple(i)].item()!r}"
        for i in idx
    ]
    return "\n".join(rows)


def assert_close(actual, expected, *, rtol: float, atol: float = 0.0, name: str = "result") -> None:
    """Elementwise |actual - expected| <= atol + rtol * |expected|, NaN counting as a mismatch."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    bad = ~((a - e).abs() <= atol + rtol * e.abs())
    if bad.any():
        err = ((a - e).abs() / e.abs().clamp_min(1e-300)).nan_to_num(float("inf"))
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements differ (rtol={rtol:g}, atol={atol:g}); "
            f"max relative error {err.max().item():.3g}; NaN in result: {int(a.isnan().sum())}\n" + _where(bad, a, e)
        )


def assert_bitwise_equal(actual, expected, *, name: str = "result") -> None:
    """Same shape, dtype and bits (NaN payloads included)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != expected {expected.dtype}"
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if a.dtype.is_floating_point:
        bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, e = a.contiguous().view(bits), e.contiguous().view(bits)
    bad = a != e
    if bad.any():
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements differ bitwise\n"
            + _where(bad, actual.cpu(), expected.cpu())
        )


def one_line_error(code, err: str, *needles: str, stdout: str | None = None) -> str:
    """The CLI's contract for bad input: exit 2, one ``nirvana: error:`` line on stderr, no traceback,
    no raw errno text, nothing on stdout (when given), and each of ``needles`` in that line. Returns the line."""
    lines = err.strip().splitlines()
    assert code == 2, f"exit status {code}, expected 2; stderr:\n{err}"
    assert len(lines) == 1 and lines[0].startswith("nirvana: error: "), f"expected one error line, got:\n{err}"
    assert "Traceback" not in err and "Errno" not in err, err
    assert stdout in (None, ""), f"stdout should be empty, got:\n{stdout}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} is not in the error line:\n{lines[0]}"
    return lines[0]


def cores_per_worker() -> int:
    """This test process's share of the cores: all of them, or one worker's share under pytest-xdist.

    ``make test`` runs one worker per core; a real-model test that took every core for its threads would
    spin against the other workers' tests and run several times slower.
    """
    import os

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // workers)


def nirvana_as_user(*args) -> str:
    """Run ``python -m nirvana.cli ARGS`` as a CPU user does and return its stdout; assert it exits 0.

    A fresh process without TRITON_INTERPRET (or the test suite's output poisoning), so the kernels take
    their PyTorch reference path: the interpreter would take hours on a real model. Its torch threads are
    this process's share of the cores (:func:`cores_per_worker`).
    """
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NIRVANA_POISON_OUTPUTS")}
    env["OMP_NUM_THREADS"] = str(cores_per_worker())
    cmd = [sys.executable, "-m", "nirvana.cli", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def prune_args(model, calib, out, *extra, round_to: int = 2, draws: int | None = 1) -> list:
    """``nirvana prune`` argv for a tiny model: 4 windows of 16 tokens, 30% sparsity, on the CPU, quiet.

    ``draws=1`` by default, since these runs test other things and each draw runs the kernels in Triton's
    interpreter (NIRVANA's default 4 quadruples the suite's CLI time); None leaves the method's own default.
    ``extra`` comes last, so a flag in it overrides the ones here.
    """
    argv = ["prune", model, "--sparsity", "0.3", "--calib", calib, "--num-samples", "4", "--seq-len", "16"]
    argv += ["--round-to", str(round_to), "--device", "cpu", "--quiet", "--out", out]
    if draws is not None:
        argv += ["--draws", str(draws)]
    return [*argv, *extra]
