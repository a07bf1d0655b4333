"""Saliency kernels against their PyTorch reference and an independent float64 computation.

Under the test settings (tests/conftest.py) CPU tensors run the real Triton kernels in the
interpreter, and every output buffer starts out as NaN.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nirvana_kernels as nk
from tests.helpers import assert_bitwise_equal, assert_close
from tests.kernels.conftest import DEVICE, DTYPE_IDS, DTYPES, KERNEL_BACKEND, LAYOUTS, Axis, make_matrix, pairwise

sal = importlib.import_module("nirvana_kernels.saliency")

BN, BK = sal._INTERP_BLOCKS["k_contiguous"]  # row sums of a row-major matrix
CN, CK = sal._INTERP_BLOCKS["n_contiguous"]  # column sums of a row-major matrix
CHUNK = sal._INTERP_CHUNK_BLOCKS * BK

# Odd shapes, and shapes one below, at and one above the tile and K-chunk edges of both orientations.
SHAPES = [
    (1, 1),
    (3, 5),
    (BN - 1, CHUNK - 1),
    (BN, CHUNK),
    (BN + 1, CHUNK + 1),
    (CK + 1, CN - 1),
    (CK, CN),
    (CK - 1, CN + 1),
    (37, 53),
    (2 * BN + 1, 2 * CHUNK + 1),
]
# The edge shapes in the orientation whose tile they straddle: row sums (dim 1) of a row-major or sliced
# matrix run the K-contiguous tile, column sums (dim 0) of a row-major one the N-contiguous tile.
K_EDGES = [(BN - 1, CHUNK - 1), (BN, CHUNK), (BN + 1, CHUNK + 1)]
N_EDGES = [(CK + 1, CN - 1), (CK, CN), (CK - 1, CN + 1)]
EDGE_CASES = [
    *(dict(shape=s, dim=1, layout="contiguous", adam=a) for s in K_EDGES for a in (False, True)),
    *(dict(shape=s, dim=1, layout="sliced") for s in K_EDGES),
    *(dict(shape=s, dim=0, layout="contiguous", adam=a) for s in N_EDGES for a in (False, True)),
]


def f64_scores(w, g, v, *, dim, group_size, eps):
    s = (w.double() * g.double()).abs()
    if v is not None:
        s = s / (v.double().sqrt() + eps)
    s = s.sum(dim=dim)
    return s.view(-1, group_size).sum(dim=1)


def fp32_rtol(k: int) -> float:
    # Summing k non-negative fp32 terms in any order: relative error below k * 2^-24, plus a few
    # roundings for the product, sqrt and division.
    return max(1e-5, (k + 4) * 2.0**-24)


@pairwise(
    adam=Axis([False, True], ["taylor", "adam"]),
    dim=Axis([0, 1], ["dim0", "dim1"]),
    shape=Axis(SHAPES, [f"{r}x{c}" for r, c in SHAPES]),
    layout=Axis(LAYOUTS),
    dtype=Axis(DTYPES, DTYPE_IDS),
    must=EDGE_CASES,
)
def test_saliency_matches_reference_and_float64(dtype, layout, shape, dim, adam, gen):
    rows, cols = shape
    w = make_matrix(rows, cols, dtype, layout, gen=gen)
    g = make_matrix(rows, cols, dtype, layout, gen=gen)
    v = make_matrix(rows, cols, dtype, layout, gen=gen, positive=True) if adam else None
    assert nk.backend(w) == KERNEL_BACKEND
    got = nk.saliency(w, g, dim=dim, exp_avg_sq=v)
    ref = nk.saliency_torch(w, g, dim=dim, exp_avg_sq=v)
    assert got.dtype == torch.float32 and got.device == w.device
    k = cols if dim == 1 else rows
    assert_close(got, ref, rtol=fp32_rtol(k), name="kernel vs reference")
    assert_close(got, f64_scores(w, g, v, dim=dim, group_size=1, eps=1e-8), rtol=fp32_rtol(k), name="kernel vs float64")


@pytest.mark.parametrize("group_size", [1, 2, 3, 8, 24], ids=lambda g: f"gs{g}")
@pytest.mark.parametrize("dim", [0, 1], ids=["dim0", "dim1"])
def test_saliency_group_sums(group_size, dim, gen):
    w = make_matrix(48, 72, torch.bfloat16, "contiguous", gen=gen)
    g = make_matrix(48, 72, torch.bfloat16, "contiguous", gen=gen)
    got = nk.saliency(w, g, dim=dim, group_size=group_size)
    n = 48 if dim == 1 else 72
    assert got.shape == (n // group_size,)
    expect = f64_scores(w, g, None, dim=dim, group_size=group_size, eps=1e-8)
    assert_close(got, expect, rtol=fp32_rtol(72 * group_size), name=f"group_size={group_size}")


@pytest.mark.parametrize(
    "shape,dim",
    [((0, 5), 1), ((0, 5), 0), ((5, 0), 1), ((5, 0), 0)],
    ids=["0x5-dim1", "0x5-dim0", "5x0-dim1", "5x0-dim0"],
)
def test_saliency_empty_dimension(shape, dim):
    w = torch.randn(shape, dtype=torch.float16)
    got = nk.saliency(w, w, dim=dim)
    n = shape[0] if dim == 1 else shape[1]
    # An empty reduction sums to exactly zero; an empty output is empty.
    assert_bitwise_equal(got, torch.zeros(n, dtype=torch.float32), name="empty")


def test_eps_zero_with_masked_lanes(gen):
    # Masked lanes load V = 1, so a tile edge never produces 0/0 when eps is 0.
    w = make_matrix(BN + 1, CHUNK + 1, torch.float32, "contiguous", gen=gen)
    v = make_matrix(BN + 1, CHUNK + 1, torch.float32, "contiguous", gen=gen, positive=True)
    got = nk.saliency(w, w, dim=1, exp_avg_sq=v, eps=0.0)
    assert_close(got, f64_scores(w, w, v, dim=1, group_size=1, eps=0.0), rtol=fp32_rtol(CHUNK))


def test_exp_avg_sq_may_have_its_own_dtype(gen):
    w = make_matrix(9, 33, torch.bfloat16, "contiguous", gen=gen)
    v = make_matrix(9, 33, torch.float32, "contiguous", gen=gen, positive=True)
    got = nk.saliency(w, w, dim=1, exp_avg_sq=v)
    assert_close(got, f64_scores(w, w, v, dim=1, group_size=1, eps=1e-8), rtol=fp32_rtol(33))


def test_saliency_is_deterministic(gen):
    w = make_matrix(70, 130, torch.bfloat16, "contiguous", gen=gen)
    g = make_matrix(70, 130, torch.bfloat16, "contiguous", gen=gen)
    for dim in (0, 1):
        first = nk.saliency(w, g, dim=dim, group_size=2)
        assert_bitwise_equal(nk.saliency(w, g, dim=dim, group_size=2), first, name=f"rerun dim={dim}")


def test_nan_in_gradient_propagates_to_its_group_only(gen):
    # Documented choice: NaN propagates (raising would cost a second read of every gradient); the
    # pruning flow checks the scores and names the layer.
    w = make_matrix(16, 40, torch.float32, "contiguous", gen=gen)
    g = make_matrix(16, 40, torch.float32, "contiguous", gen=gen)
    g[5, 7] = float("nan")
    got = nk.saliency(w, g, dim=1, group_size=4)
    assert got[1].isnan()
    keep = torch.tensor([0, 2, 3])
    assert_close(got[keep], f64_scores(w, g, None, dim=1, group_size=4, eps=1e-8)[keep], rtol=1e-5)


def test_reference_chunks_do_not_change_the_result(monkeypatch, gen):
    w = make_matrix(37, 53, torch.bfloat16, "transposed", gen=gen)
    g = make_matrix(37, 53, torch.bfloat16, "transposed", gen=gen)
    monkeypatch.setattr(sal, "_CHUNK_ELEMS", 100)  # two rows per chunk: many chunk boundaries
    for dim in (0, 1):
        got = nk.saliency_torch(w, g, dim=dim)
        assert_close(
            got, f64_scores(w, g, None, dim=dim, group_size=1, eps=1e-8), rtol=fp32_rtol(53), name=f"dim={dim}"
        )


# ----------------------------------------------------------------------------------------------
# Attention and MLP
# ----------------------------------------------------------------------------------------------


def attention_inputs(kv, G, d, hidden, dtype, gen, *, layout="contiguous", adam=False, bias=False):
    q_rows = kv * G * d
    shapes = {"q": (q_rows, hidden), "k": (kv * d, hidden), "v": (kv * d, hidden), "o": (hidden, q_rows)}
    t = {}
    for name, (r, c) in shapes.items():
        t[name + "_w"] = make_matrix(r, c, dtype, layout, gen=gen)
        t[name + "_g"] = make_matrix(r, c, dtype, layout, gen=gen)
    extra = {}
    vs = [make_matrix(r, c, dtype, layout, gen=gen, positive=True) for r, c in shapes.values()] if adam else None
    if bias:
        for name, n in (("q", q_rows), ("k", kv * d), ("v", kv * d)):
            extra[name + "_b"] = torch.randn(2 * n, generator=gen).to(DEVICE, dtype)[::2]  # a strided 1-D view
            extra[name + "_bg"] = torch.randn(n, generator=gen).to(DEVICE, dtype)
        if adam:
            vs += [torch.rand(n, generator=gen).to(DEVICE, dtype) + 0.05 for n in (q_rows, kv * d, kv * d)]
    return t, extra, vs


def attention_f64(t, extra, vs, kv, eps=1e-8):
    def part(w, g, v, dim):
        s = (w.double() * g.double()).abs()
        if v is not None:
            s = s / (v.double().sqrt() + eps)
        return (s.sum(dim=dim) if s.dim() == 2 else s).view(kv, -1).sum(dim=1)

    vs = vs or [None] * 7
    total = part(t["q_w"], t["q_g"], vs[0], 1) + part(t["k_w"], t["k_g"], vs[1], 1)
    total += part(t["v_w"], t["v_g"], vs[2], 1) + part(t["o_w"], t["o_g"], vs[3], 0)
    for i, name in enumerate(("q", "k", "v")):
        if name + "_b" in extra:
            total += part(extra[name + "_b"], extra[name + "_bg"], vs[4 + i], None)
    return total


@pairwise(
    bias=Axis([False, True], ["nobias", "bias"]),
    adam=Axis([False, True], ["taylor", "adam"]),
    G=Axis([1, 2, 3, 4], lambda G: f"G{G}"),
    d=Axis([8, 64], lambda d: f"d{d}"),
    # Qwen2 (seven parts with their V) and the plainest case, at both head sizes.
    must=[dict(bias=True, adam=True, G=4, d=64), dict(bias=False, adam=False, G=1, d=8)],
)
def test_attention_group_saliency(G, d, adam, bias, gen):
    kv, hidden = (3, 20) if d == 8 else (2, 12)
    t, extra, vs = attention_inputs(kv, G, d, hidden, torch.bfloat16, gen, adam=adam, bias=bias)
    got = nk.attention_group_saliency(**t, num_kv_heads=kv, head_dim=d, exp_avg_sq=vs, **extra)
    ref = nk.attention_group_saliency_torch(**t, num_kv_heads=kv, head_dim=d, exp_avg_sq=vs, **extra)
    assert got.shape == (kv,) and got.dtype == torch.float32
    rtol = fp32_rtol(4 * G * d * hidden)
    assert_close(got, ref, rtol=rtol, name="kernel vs reference")
    assert_close(got, attention_f64(t, extra, vs, kv), rtol=rtol, name="kernel vs float64")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_attention_dtypes_and_layouts(dtype, layout, gen):
    kv, G, d, hidden = 2, 3, 8, 33
    t, extra, vs = attention_inputs(kv, G, d, hidden, dtype, gen, layout=layout, bias=True)
    got = nk.attention_group_saliency(**t, num_kv_heads=kv, head_dim=d, **extra)
    assert_close(got, attention_f64(t, extra, None, kv), rtol=fp32_rtol(4 * G * d * hidden))


@pytest.fixture
def launches(monkeypatch):
    """Every launch of the saliency kernel during the test, as a dict of its named arguments."""
    kernel = sal._saliency_kernel
    run, calls = kernel.run, []

    def spy(*args, grid, warmup, **kwargs):
        calls.append({"grid": grid, **dict(zip(kernel.arg_names, args)), **kwargs})
        return run(*args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(kernel, "run", spy)
    return calls


@pytest.mark.parametrize("adam", [False, True], ids=["taylor", "adam"])
def test_attention_with_biases_is_one_launch(adam, launches, gen):
    # Qwen2: q, k, v, o and three biases, seven parts, one launch; an absent V is None, not a dummy.
    kv, G, d, hidden = 2, 2, 64, 12
    t, extra, vs = attention_inputs(kv, G, d, hidden, torch.bfloat16, gen, adam=adam, bias=True)
    got = nk.attention_group_saliency(**t, num_kv_heads=kv, head_dim=d, exp_avg_sq=vs, **extra)
    assert len(launches) == 1
    (launch,) = launches
    assert len(launch["w_ptrs"]) == 7
    assert (launch["v_ptrs"] is None) == (not adam) and (launch["v_strides"] is None) == (not adam)
    # The biases are laid along N: one K element, no K blocks.
    assert launch["BLOCK_K"][4:] == (1, 1, 1)
    assert_close(got, attention_f64(t, extra, vs, kv), rtol=fp32_rtol(4 * G * d * hidden))


@pytest.mark.parametrize("adam", [False, True], ids=["taylor", "adam"])
def test_any_number_of_parts_in_one_launch(adam, launches, gen):
    # Nine parts (more than the four one launch used to take) of mixed layouts, dtypes, K = 1
    # vectors and tile-edge sizes, through the op itself.
    groups = 3
    specs = [
        (3 * (BN + 1), CHUNK + 1, torch.bfloat16, "contiguous"),
        (3 * CN, CK + 1, torch.float16, "transposed"),
        (3, 2 * CHUNK + 1, torch.float32, "sliced"),
        (3 * 33, 1, torch.bfloat16, "contiguous"),
        (3 * 5, 1, torch.float32, "sliced"),
        (3 * 7, 37, torch.bfloat16, "transposed"),
        (3, 1, torch.float16, "contiguous"),
        (3 * 2, CN + 1, torch.float32, "contiguous"),
        (3 * 11, 3, torch.bfloat16, "sliced"),
    ]
    ws, gs, vs = [], [], []
    for n, k, dtype, layout in specs:
        ws.append(make_matrix(n, k, dtype, layout, gen=gen))
        gs.append(make_matrix(n, k, dtype, layout, gen=gen))
        vs.append(make_matrix(n, k, torch.float32, layout, gen=gen, positive=True))
    vs = vs if adam else []
    got = torch.ops.nirvana.grouped_saliency(ws, gs, vs, [w.shape[0] // groups for w in ws], groups, 1e-8)
    assert len(launches) == 1 and len(launches[0]["w_ptrs"]) == len(specs)
    assert (launches[0]["v_ptrs"] is None) == (not adam)
    expect = sum(
        f64_scores(w, g, v, dim=1, group_size=w.shape[0] // groups, eps=1e-8)
        for w, g, v in zip(ws, gs, vs or [None] * len(ws))
    )
    assert_close(got, expect, rtol=fp32_rtol(sum(w.numel() for w in ws)))


def mlp_f64(up_w, up_g, down_w, down_g, gate_w=None, gate_g=None, vs=None, eps=1e-8):
    def part(w, g, v, dim):
        s = (w.double() * g.double()).abs()
        if v is not None:
            s = s / (v.double().sqrt() + eps)
        return s.sum(dim=dim)

    vs = vs or [None, None, None]
    total = part(up_w, up_g, vs[0], 1) + part(down_w, down_g, vs[1], 0)
    if gate_w is not None:
        total += part(gate_w, gate_g, vs[2], 1)
    return total


@pairwise(
    layout=Axis(LAYOUTS),
    adam=Axis([False, True], ["taylor", "adam"]),
    gated=Axis([True, False], ["gated", "plain"]),
    dtype=Axis(DTYPES, DTYPE_IDS),
)
def test_mlp_channel_saliency(dtype, gated, adam, layout, gen):
    inter, hidden = 2 * CN + 1, CHUNK + 1
    m = {k: make_matrix(inter, hidden, dtype, layout, gen=gen) for k in ("up_w", "up_g", "gate_w", "gate_g")}
    m["down_w"] = make_matrix(hidden, inter, dtype, layout, gen=gen)
    m["down_g"] = make_matrix(hidden, inter, dtype, layout, gen=gen)
    if not gated:
        m.pop("gate_w"), m.pop("gate_g")
    vs = None
    if adam:
        vs = [
            make_matrix(inter, hidden, dtype, layout, gen=gen, positive=True),
            make_matrix(hidden, inter, dtype, layout, gen=gen, positive=True),
        ]
        if gated:
            vs.append(make_matrix(inter, hidden, dtype, layout, gen=gen, positive=True))
    got = nk.mlp_channel_saliency(**m, exp_avg_sq=vs)
    ref = nk.mlp_channel_saliency_torch(**m, exp_avg_sq=vs)
    assert got.shape == (inter,) and got.dtype == torch.float32
    assert_close(got, ref, rtol=fp32_rtol(3 * hidden), name="kernel vs reference")
    assert_close(got, mlp_f64(**m, vs=vs), rtol=fp32_rtol(3 * hidden), name="kernel vs float64")


# ----------------------------------------------------------------------------------------------
# Properties over random shapes and strides
# ----------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(0, 70),
    cols=st.integers(0, 70),
    dim=st.sampled_from([0, 1]),
    layout=st.sampled_from(LAYOUTS),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_saliency_property(rows, cols, dim, layout, dtype, seed, data):
    gen = torch.Generator().manual_seed(seed)
    w = make_matrix(rows, cols, dtype, layout, gen=gen)
    g = make_matrix(rows, cols, dtype, layout, gen=gen)
    n, k = (rows, cols) if dim == 1 else (cols, rows)
    divisors = [x for x in range(1, max(n, 1) + 1) if n % x == 0] if n else [1, 2, 5]
    gs = data.draw(st.sampled_from(divisors))
    got = nk.saliency(w, g, dim=dim, group_size=gs)
    assert_close(got, f64_scores(w, g, None, dim=dim, group_size=gs, eps=1e-8), rtol=fp32_rtol(k * gs))


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def _w(*shape, dtype=torch.float32, device="cpu"):
    return torch.ones(*shape, dtype=dtype, device=device)


BAD_SALIENCY = [
    ("shape", dict(weight=_w(4, 6), grad=_w(4, 5), dim=1), "grad: shape"),
    ("device", dict(weight=_w(4, 6), grad=_w(4, 6, device="meta"), dim=1), "grad: device"),
    ("dtype", dict(weight=_w(4, 6), grad=_w(4, 6, dtype=torch.float16), dim=1), "grad: dtype"),
    ("int-dtype", dict(weight=_w(4, 6, dtype=torch.int32), grad=_w(4, 6, dtype=torch.int32), dim=1), "weight: dtype"),
    ("not-2d", dict(weight=_w(4, 6, 2), grad=_w(4, 6, 2), dim=1), "weight: expected a 2-D"),
    ("1d", dict(weight=_w(4), grad=_w(4), dim=1), "weight: expected a 2-D"),
    ("group", dict(weight=_w(4, 6), grad=_w(4, 6), dim=1, group_size=3), "group_size: 3 does not divide"),
    ("group-zero", dict(weight=_w(4, 6), grad=_w(4, 6), dim=1, group_size=0), "group_size: must be a positive"),
    ("dim", dict(weight=_w(4, 6), grad=_w(4, 6), dim=2), "dim: must be 0 or 1"),
    ("eps", dict(weight=_w(4, 6), grad=_w(4, 6), dim=1, eps=-1.0), "eps:"),
    ("v-shape", dict(weight=_w(4, 6), grad=_w(4, 6), dim=1, exp_avg_sq=_w(6, 4)), "exp_avg_sq: shape"),
    ("not-tensor", dict(weight=[[1.0]], grad=_w(1, 1), dim=1), "weight: expected a torch.Tensor"),
]


@pytest.mark.parametrize("case,kwargs,message", BAD_SALIENCY, ids=[c[0] for c in BAD_SALIENCY])
@pytest.mark.parametrize("fn", [nk.saliency, nk.saliency_torch], ids=["kernel", "reference"])
def test_saliency_rejects_bad_input(fn, case, kwargs, message):
    kwargs = dict(kwargs)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        fn(kwargs.pop("weight"), kwargs.pop("grad"), **kwargs)


def test_attention_rejects_bad_input(gen):
    t, extra, _ = attention_inputs(2, 2, 8, 16, torch.float32, gen, bias=True)
    with pytest.raises(ValueError, match="k_w: has 16 rows, expected num_kv_heads"):
        nk.attention_group_saliency(**t, num_kv_heads=3, head_dim=8)
    with pytest.raises(ValueError, match="o_w: shape"):
        nk.attention_group_saliency(**{**t, "o_w": t["o_w"].t(), "o_g": t["o_g"].t()}, num_kv_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="q_b: a bias and its gradient"):
        nk.attention_group_saliency(**t, num_kv_heads=2, head_dim=8, q_b=extra["q_b"])
    with pytest.raises(ValueError, match="exp_avg_sq: biases were given, so a 7-tuple"):
        vs = [torch.ones_like(t[n + "_w"]) for n in "qkvo"]
        nk.attention_group_saliency(**t, num_kv_heads=2, head_dim=8, exp_avg_sq=vs, **extra)
    with pytest.raises(ValueError, match="v_g: dtype"):
        nk.attention_group_saliency(**{**t, "v_g": t["v_g"].half()}, num_kv_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="head_dim: must be a positive integer"):
        nk.attention_group_saliency(**t, num_kv_heads=2, head_dim=0)


def test_mlp_rejects_bad_input(gen):
    up = torch.ones(6, 4)
    with pytest.raises(ValueError, match=r"down_w: shape \(6, 4\), expected \(4, 6\)"):
        nk.mlp_channel_saliency(up, up, up, up)
    with pytest.raises(ValueError, match="gate_w: gate_w and gate_g must be given together"):
        nk.mlp_channel_saliency(up, up, up.t(), up.t(), gate_w=up)
    with pytest.raises(ValueError, match="exp_avg_sq: expected a 3-tuple"):
        nk.mlp_channel_saliency(up, up, up.t(), up.t(), gate_w=up, gate_g=up, exp_avg_sq=[up, up.t()])
    with pytest.raises(ValueError, match="exp_avg_sq: expected a 2-tuple"):
        nk.mlp_channel_saliency(up, up, up.t(), up.t(), exp_avg_sq=[up, up.t(), up])
