"""Compaction kernels: bit-identical to ``index_select`` for every layout, dtype and index type."""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nirvana_kernels as nk
from tests.conftest import requires_cuda
from tests.helpers import assert_bitwise_equal
from tests.kernels.conftest import DEVICE, LAYOUTS, Axis, make_matrix, pairwise

comp = importlib.import_module("nirvana_kernels.compaction")
RG, RO = comp._INTERP_BLOCKS["rows"]
CG, CO = comp._INTERP_BLOCKS["cols"]

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32]
DTYPE_IDS = ["fp32", "fp16", "bf16", "int32"]


def with_special_values(t: torch.Tensor) -> torch.Tensor:
    """Put -0.0, +-inf and a NaN with a non-default payload in, so bit-exactness means something."""
    if not t.dtype.is_floating_point or t.numel() < 4:
        return t
    flat = t.view(-1) if t.is_contiguous() else None
    if flat is None:
        t[0, 0], t[-1, -1] = -0.0, float("inf")
        return t
    flat[0], flat[1], flat[2] = -0.0, float("inf"), float("-inf")
    bits = {2: torch.int16, 4: torch.int32}[t.element_size()]
    payload = {torch.float32: 0x7FC01234, torch.float16: 0x7E05, torch.bfloat16: 0x7FC5}[t.dtype]
    flat.view(bits)[3] = payload
    return t


def draw(rows, cols, dtype, layout, gen):
    if dtype == torch.int32:
        base = make_matrix(rows, cols, torch.float32, layout, gen=gen)
        return (base * 1000).to(torch.int32) if layout == "contiguous" else (base * 1000).round().to(torch.int32)
    return with_special_values(make_matrix(rows, cols, dtype, layout, gen=gen))


def random_index(n: int, k: int, gen, dtype=torch.int64, device="cpu") -> torch.Tensor:
    return torch.randperm(n, generator=gen)[:k].sort().values.to(device, dtype)


ROW_EDGES = [(RG - 1, RO - 1), (RG, RO), (RG + 1, RO + 1)]
COL_EDGES = [(CO + 1, CG - 1), (CO, CG), (CO - 1, CG + 1)]
SHAPES = [(1, 1), *ROW_EDGES, *COL_EDGES, (37, 53)]


@pairwise(
    index_dtype=Axis([torch.int32, torch.int64], ["i32", "i64"]),
    dim=Axis([0, 1], ["rows", "cols"]),
    shape=Axis(SHAPES, [f"{r}x{c}" for r, c in SHAPES]),
    layout=Axis(LAYOUTS),
    dtype=Axis(DTYPES, DTYPE_IDS),
    # The edge shapes gathered along the axis whose tile they straddle, with both index dtypes.
    must=[dict(shape=s, dim=0, index_dtype=i) for s in ROW_EDGES for i in (torch.int32, torch.int64)]
    + [dict(shape=s, dim=1, index_dtype=i) for s in COL_EDGES for i in (torch.int32, torch.int64)],
)
def test_compact_is_index_select(dtype, layout, shape, dim, index_dtype, gen):
    w = draw(*shape, dtype, layout, gen)
    n = shape[dim]
    for k in sorted({1, max(1, n // 2), n}):
        index = random_index(n, k, gen, index_dtype, DEVICE)
        got = nk.compact(w, index, dim=dim)
        assert got.is_contiguous()
        assert_bitwise_equal(got, w.index_select(dim, index.long()), name=f"k={k}")
        assert_bitwise_equal(got, nk.compact_torch(w, index, dim=dim), name=f"reference k={k}")


@pairwise(
    layout=Axis(LAYOUTS),
    dim=Axis([0, 1], ["rows", "cols"]),
    group_size=Axis([1, 2, 3, RG, 2 * RG, CG], lambda g: f"gs{g}"),
)
def test_compact_groups(group_size, dim, layout, gen):
    # Group sizes that are multiples of the gathered block take the contiguous-runs path.
    groups = 5
    shape = (groups * group_size, 19) if dim == 0 else (19, groups * group_size)
    w = draw(*shape, torch.bfloat16, layout, gen)
    keep = torch.tensor([0, 2, 3], dtype=torch.int32, device=DEVICE)
    rows = (keep.long()[:, None] * group_size + torch.arange(group_size, device=DEVICE)).reshape(-1)
    got = nk.compact_groups(w, keep, group_size=group_size, dim=dim)
    assert_bitwise_equal(got, w.index_select(dim, rows))
    assert_bitwise_equal(got, nk.compact_groups_torch(w, keep, group_size=group_size, dim=dim), name="reference")


@pytest.mark.parametrize("count", [1, 2, 3, 4], ids=lambda c: f"{c}-tensors")
@pytest.mark.parametrize("dim", [0, 1], ids=["rows", "cols"])
def test_compact_many_shares_one_index(count, dim, gen):
    shape = (3 * (RG + 1), 3 * (CG + 1))  # tiles overhang the edge in both directions
    weights = [draw(*shape, torch.float16, LAYOUTS[i % 3], gen) for i in range(count)]  # strides differ
    index = random_index(shape[dim] // 3, 4, gen)
    outs = nk.compact_many(weights, index, dim=dim, group_size=3)
    assert len(outs) == count
    rows = (index[:, None] * 3 + torch.arange(3)).reshape(-1)
    for i, (w, o) in enumerate(zip(weights, outs)):
        assert_bitwise_equal(o, w.index_select(dim, rows), name=f"tensor {i}")
    for i, (o, r) in enumerate(zip(outs, nk.compact_many_torch(weights, index, dim=dim, group_size=3))):
        assert_bitwise_equal(o, r, name=f"reference {i}")


@pytest.mark.parametrize("group_size", [1, 4], ids=["plain", "heads"])
def test_compact_bias(group_size, gen):
    b = torch.randn(40, generator=gen).to(torch.bfloat16)[::2]  # strided 1-D
    keep = torch.tensor([1, 3, 4])
    got = nk.compact_groups(b, keep, group_size=group_size, dim=0) if group_size > 1 else nk.compact(b, keep, dim=0)
    rows = (keep[:, None] * group_size + torch.arange(group_size)).reshape(-1)
    assert_bitwise_equal(got, b[rows])


@pytest.mark.parametrize(
    "shape,dim,k",
    [((0, 5), 0, 0), ((5, 0), 0, 2), ((5, 0), 1, 0), ((4, 6), 0, 0), ((4, 6), 1, 0)],
    ids=["no-rows", "no-cols-gather-rows", "no-cols", "empty-index-rows", "empty-index-cols"],
)
def test_compact_empty(shape, dim, k):
    w = torch.randn(shape)
    index = torch.arange(k)
    got = nk.compact(w, index, dim=dim)
    assert_bitwise_equal(got, w.index_select(dim, index))


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 60),
    cols=st.integers(1, 60),
    dim=st.sampled_from([0, 1]),
    layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_compact_property(rows, cols, dim, layout, seed, data):
    gen = torch.Generator().manual_seed(seed)
    w = make_matrix(rows, cols, torch.bfloat16, layout, gen=gen)
    n = (rows, cols)[dim]
    chosen = data.draw(st.sets(st.integers(0, n - 1), max_size=n))
    index = torch.tensor(sorted(chosen), dtype=torch.int64)
    assert_bitwise_equal(nk.compact(w, index, dim=dim), w.index_select(dim, index))


BAD = [
    ("unsorted", torch.tensor([2, 1]), "index: must be strictly increasing, but index\\[1\\] = 1 follows 2"),
    ("repeated", torch.tensor([1, 1]), "index: must be strictly increasing"),
    ("too-large", torch.tensor([0, 4]), "index: value 4 is out of range for weight.shape\\[0\\] = 4"),
    ("negative", torch.tensor([-1, 0]), "index: value -1 is out of range"),
    ("float", torch.tensor([0.0, 1.0]), "index: dtype must be int32 or int64"),
    ("2d", torch.tensor([[0, 1]]), "index: expected a 1-D tensor"),
    ("list", [0, 1], "index: expected a torch.Tensor"),
]


@pytest.mark.parametrize("case,index,message", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("fn", [nk.compact, nk.compact_torch], ids=["kernel", "reference"])
def test_compact_rejects_bad_index(fn, case, index, message):
    with pytest.raises(ValueError, match=message):
        fn(torch.zeros(4, 3), index, dim=0)


def test_compact_rejects_bad_arguments():
    w = torch.zeros(6, 4)
    with pytest.raises(ValueError, match="weight: expected a 1-D or 2-D tensor"):
        nk.compact(torch.zeros(2, 2, 2), torch.tensor([0]), dim=0)
    with pytest.raises(ValueError, match="dim: a 1-D tensor"):
        nk.compact(torch.zeros(4), torch.tensor([0]), dim=1)
    with pytest.raises(ValueError, match="dim: must be 0 or 1"):
        nk.compact(w, torch.tensor([0]), dim=-1)
    with pytest.raises(ValueError, match="group_size: 4 does not divide weight.shape\\[0\\] = 6"):
        nk.compact_groups(w, torch.tensor([0]), group_size=4, dim=0)
    with pytest.raises(ValueError, match="keep: value 3 is out of range for the number of groups"):
        nk.compact_groups(w, torch.tensor([3]), group_size=2, dim=0)
    with pytest.raises(ValueError, match="weights\\[1\\]: shape"):
        nk.compact_many([w, torch.zeros(6, 5)], torch.tensor([0]), dim=0)
    with pytest.raises(ValueError, match="weights\\[1\\]: dtype"):
        nk.compact_many([w, w.half()], torch.tensor([0]), dim=0)
    with pytest.raises(ValueError, match="weights: at most 4 tensors"):
        nk.compact_many([w] * 5, torch.tensor([0]), dim=0)
    with pytest.raises(ValueError, match="weights: expected a non-empty list"):
        nk.compact_many([], torch.tensor([0]), dim=0)


@pytest.mark.parametrize("count", [1, 3, 5, 7], ids=lambda c: f"{c}-parts")
@pytest.mark.parametrize("dim", [0, 1], ids=["rows", "cols"])
def test_gather_kernel_has_no_part_limit(count, dim, gen):
    # compact_many promises four tensors; the kernel itself takes a tuple of any length in one launch.
    shape = (2 * RG + 1, 2 * CG + 1)
    weights = [draw(*shape, torch.bfloat16, LAYOUTS[i % 3], gen) for i in range(count)]
    index = random_index(shape[dim], shape[dim] // 2, gen)
    outs = comp._launch(weights, index, dim, 1)
    assert len(outs) == count
    for i, (w, o) in enumerate(zip(weights, outs)):
        assert_bitwise_equal(o, w.index_select(dim, index), name=f"part {i}")


def test_compact_many_biases_over_several_tiles(gen):
    # A bias is gathered as one row: several tiles along it, one part per grid slice.
    block = comp._INTERP_BLOCKS["bias"][0]
    biases = [torch.randn(3 * block + 5, generator=gen).to(torch.bfloat16) for _ in range(3)]
    biases[1] = torch.randn(2 * (3 * block + 5), generator=gen).to(torch.bfloat16)[::2]  # strided
    index = random_index(3 * block + 5, 2 * block + 3, gen)
    for b, o in zip(biases, nk.compact_many(biases, index, dim=0)):
        assert_bitwise_equal(o, b[index])


@pytest.mark.parametrize("case,index,message", BAD[:4], ids=[b[0] for b in BAD[:4]])
def test_every_public_op_rejects_a_bad_index_value(case, index, message):
    w = torch.zeros(4, 3)
    for fn in (
        lambda: nk.compact_groups(w, index, group_size=1, dim=0),
        lambda: nk.compact_many([w, w.t().contiguous().t()], index, dim=0),
        lambda: torch.ops.nirvana.compact(w, index, 0, 1),
    ):
        with pytest.raises(ValueError, match=message.replace("index", "(index|keep)")):
            fn()


def test_a_cpu_index_is_checked_once_on_the_host(monkeypatch):
    calls = []
    checks = importlib.import_module("nirvana_kernels._checks")
    real = checks._index_values
    monkeypatch.setattr(checks, "_index_values", lambda *a: calls.append(a[1].device) or real(*a))
    w = torch.randn(6, 4)
    nk.compact_many([w, w], torch.tensor([1, 4]), dim=0)
    assert calls == [torch.device("cpu")]


def test_the_unchecked_path_reads_nothing_back(monkeypatch):
    # What the pruning flow calls with indices built from a validated plan. On a GPU, tolist/item
    # of a device tensor is a host synchronisation; here any call of them, or of the value check, fails.
    def refuse(*_a, **_k):
        raise AssertionError("read back a tensor's values")

    checks = importlib.import_module("nirvana_kernels._checks")
    w = torch.randn(6, 8)
    index = torch.tensor([0, 2, 5])
    expected = w.index_select(0, index), w.index_select(1, index)
    monkeypatch.setattr(checks, "_index_values", refuse)
    monkeypatch.setattr(torch.Tensor, "tolist", refuse)
    monkeypatch.setattr(torch.Tensor, "item", refuse)
    got = [
        nk.compact(w, index, dim=0, check_index=False),
        nk.compact_groups(w, index, group_size=1, dim=1, check_index=False),
        *nk.compact_many([w, w], index, dim=0, check_index=False),
    ]
    monkeypatch.undo()
    for g, e in zip(got, [expected[0], expected[1], expected[0], expected[0]]):
        assert_bitwise_equal(g, e)


def test_the_unchecked_path_still_checks_the_metadata():
    with pytest.raises(ValueError, match="index: dtype must be int32 or int64"):
        nk.compact(torch.zeros(4, 3), torch.tensor([0.0]), dim=0, check_index=False)
    with pytest.raises(ValueError, match="index: expected a torch.Tensor"):
        nk.compact(torch.zeros(4, 3), [0], dim=0, check_index=False)


@requires_cuda
@pytest.mark.cuda
def test_cuda_index_checks_and_host_index_copies():
    w = torch.randn(64, 96, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="index: must be strictly increasing"):
        nk.compact(w, torch.tensor([3, 1], device="cuda"), dim=1)
    with pytest.raises(ValueError, match="index: value 96 is out of range"):
        nk.compact(w, torch.tensor([0, 96]), dim=1)
    index = torch.tensor([1, 2, 3, 40, 95])
    for check in (True, False):
        assert_bitwise_equal(nk.compact(w, index, dim=1, check_index=check), w[:, index.cuda()])
