"""Backend choice, output poisoning, the torch.library ops, and the CUDA-only checks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import nirvana_kernels as nk
from nirvana_kernels import _dispatch
from tests.conftest import requires_cuda
from tests.helpers import assert_bitwise_equal, assert_close


def test_cpu_tensors_run_the_interpreter_under_the_test_settings():
    assert os.environ["TRITON_INTERPRET"] == "1"
    assert nk.backend(torch.zeros(1)) == "triton-interpreter"


def test_poisoned_allocations_are_nan():
    # The guarantee behind every kernel test: outputs start as NaN, so unwritten elements show.
    assert _dispatch.poison_enabled()
    assert _dispatch.empty((3, 2), dtype=torch.float32, device=torch.device("cpu")).isnan().all()
    assert (_dispatch.empty((3,), dtype=torch.int32, device=torch.device("cpu")) == 2**31 - 1).all()


def test_cpu_without_interpreter_uses_the_reference():
    code = textwrap.dedent(
        """
        import torch, nirvana_kernels as nk
        w = torch.randn(6, 10); g = torch.randn(6, 10)
        assert nk.backend(w) == "torch", nk.backend(w)
        s = nk.saliency(w, g, dim=1, group_size=2)
        assert torch.equal(s, nk.saliency_torch(w, g, dim=1, group_size=2))
        i = torch.tensor([1, 4])
        assert torch.equal(nk.compact(w, i, dim=0), w[i])
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_backend_rejects_non_tensors():
    with pytest.raises(ValueError, match="tensor: expected a torch.Tensor"):
        nk.backend([1.0])


def _opcheck_cases():
    g = torch.Generator().manual_seed(0)
    w, gr = torch.randn(12, 20, generator=g), torch.randn(12, 20, generator=g)
    v = torch.rand(12, 20, generator=g)
    kv, d, hidden = 2, 4, 10
    q, k, o = (
        torch.randn(kv * 2 * d, hidden, generator=g),
        torch.randn(kv * d, hidden, generator=g),
        torch.randn(hidden, kv * 2 * d, generator=g),
    )
    b = torch.randn(kv * 2 * d, generator=g)
    up, down = torch.randn(9, hidden, generator=g), torch.randn(hidden, 9, generator=g)
    ops = torch.ops.nirvana
    return [
        # The saliency launchers all call one op with their checked, oriented parts.
        ("saliency", ops.grouped_saliency.default, ([w], [gr], [], [3], 4, 1e-8)),
        ("saliency-adam-T", ops.grouped_saliency.default, ([w.t()], [gr.t()], [v.t()], [2], 10, 1e-8)),
        (
            "attention",
            ops.grouped_saliency.default,
            ([q, k, k, o.t(), b[:, None]], [q, k, k, o.t(), b[:, None]], [], [8, 4, 4, 8, 8], kv, 1e-8),
        ),
        ("mlp", ops.grouped_saliency.default, ([up, up, down.t()], [up, up, down.t()], [], [1, 1, 1], 9, 1e-8)),
        ("compact", ops.compact.default, (w, torch.tensor([0, 5, 7]), 0, 1)),
        ("compact-groups", ops.compact.default, (w.t(), torch.tensor([1, 2]), 1, 4)),
        ("compact-many", ops.compact_many.default, ([w, w.t().contiguous().t()], torch.tensor([2]), 1, 5)),
    ]


@pytest.mark.parametrize("name,op,args", _opcheck_cases(), ids=[c[0] for c in _opcheck_cases()])
def test_opcheck(name, op, args):
    torch.library.opcheck(op, args)


def test_ops_work_under_torch_compile():
    w, g = torch.randn(8, 16), torch.randn(8, 16)
    index = torch.tensor([0, 3, 6])

    def fn(w, g, index):
        keep = nk.compact(w, index, dim=0)
        return nk.saliency(keep, keep, dim=1) + nk.saliency(w, g, dim=1, group_size=8).sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    assert_close(compiled(w, g, index), fn(w, g, index), rtol=1e-6)


@requires_cuda
@pytest.mark.cuda
def test_cuda_tensors_take_triton_and_match_the_reference():
    w = torch.randn(1000, 3000, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(w)
    assert nk.backend(w) == "triton"
    for dim in (0, 1):
        assert_close(nk.saliency(w, g, dim=dim), nk.saliency_torch(w, g, dim=dim), rtol=1e-4)
    index = torch.arange(0, 1000, 3, device="cuda")
    assert_bitwise_equal(nk.compact(w, index, dim=0), w[index])


@requires_cuda
@pytest.mark.cuda
def test_int64_offsets_on_a_70b_mlp_matrix():
    # 8192 x 28672 = 2^27.8 elements: offsets past 2^31 bytes must not wrap.
    w = torch.randn(8192, 28672, device="cuda", dtype=torch.bfloat16)
    g = torch.ones_like(w)
    assert_close(nk.saliency(w, g, dim=0), nk.saliency_torch(w, g, dim=0), rtol=1e-4)
    assert_close(nk.saliency(w.t(), g.t(), dim=1), nk.saliency_torch(w, g, dim=0), rtol=1e-4)
    index = torch.tensor([0, 4095, 8191], device="cuda")
    assert_bitwise_equal(nk.compact(w, index, dim=0), w[index])
    cols = torch.tensor([0, 28671], device="cuda")
    assert_bitwise_equal(nk.compact(w, cols, dim=1), w[:, cols])
