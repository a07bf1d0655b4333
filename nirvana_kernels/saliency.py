"""Saliency: grouped sums of |W * G| (optionally Adam-scaled) over rows or columns, in fp32.

One kernel family serves the three public ops. Every matrix is seen as a "part": a 2-D strided
view with N outputs and K reduced elements per output, plus the number of consecutive outputs that
make up one group (a KV group, an MLP channel, or ``group_size``). A launch takes up to four parts
and gives each program one tile of one part: BLOCK_N outputs times one K-chunk. The program reduces
its tile in fp32 and writes one partial per output into a ``[groups, slots]`` scratch buffer, at a
slot fixed by (part, K-chunk, position in the group). A single ``sum(dim=1)`` then finishes the job.

Determinism: tiles, chunks and the final sum all reduce in a fixed order, and no atomics are used,
so the same inputs on the same device give the same bits on every run. For the same reason the
block sizes come from a fixed heuristic rather than ``triton.autotune``, whose pick (and with it the
summation order) could differ from one process to the next.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import _checks
from ._dispatch import HAS_TRITON, backend, empty, num_sms

if HAS_TRITON:
    import triton
    import triton.language as tl

# Reference path: rows per chunk are chosen so that one chunk holds about this many elements.
_CHUNK_ELEMS = 1 << 22

# (BLOCK_N, BLOCK_K) by which axis is contiguous in memory. Under the interpreter each program costs
# about 0.5 ms per loop step, so it gets fewer, larger tiles; the tests read these to place shapes at
# block edges.
_GPU_BLOCKS = {"k_contiguous": (16, 256), "n_contiguous": (256, 16)}
_INTERP_BLOCKS = {"k_contiguous": (8, 32), "n_contiguous": (32, 8)}
# Under the interpreter every K-chunk is two K-blocks, so the split path is always exercised.
_INTERP_CHUNK_BLOCKS = 2
_MAX_PARTS = 4


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------


def _scores_torch(weight, grad, exp_avg_sq, *, dim: int, eps: float) -> torch.Tensor:
    """Per-row (dim=1) or per-column (dim=0) fp32 sums, one row chunk at a time."""
    rows, cols = weight.shape
    step = max(1, _CHUNK_ELEMS // max(cols, 1))
    out = torch.zeros(rows if dim == 1 else cols, dtype=torch.float32, device=weight.device)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        s = weight[r0:r1].to(torch.float32, copy=True)  # the one fp32 copy of the chunk
        s.mul_(grad[r0:r1]).abs_()
        if exp_avg_sq is not None:
            s.div_(exp_avg_sq[r0:r1].to(torch.float32).sqrt().add_(eps))
        if dim == 1:
            out[r0:r1] = s.sum(dim=1)
        else:
            out += s.sum(dim=0)
    return out


def saliency_torch(weight, grad, *, dim, group_size=1, exp_avg_sq=None, eps=1e-8) -> torch.Tensor:
    """PyTorch reference for :func:`saliency`, processing the matrix in row chunks."""
    _check_saliency(weight, grad, dim, group_size, exp_avg_sq, eps)
    scores = _scores_torch(weight, grad, exp_avg_sq, dim=dim, eps=eps)
    return scores.view(-1, group_size).sum(dim=1)


def attention_group_saliency_torch(
    q_w,
    q_g,
    k_w,
    k_g,
    v_w,
    v_g,
    o_w,
    o_g,
    *,
    num_kv_heads,
    head_dim,
    exp_avg_sq=None,
    eps=1e-8,
    q_b=None,
    q_bg=None,
    k_b=None,
    k_bg=None,
    v_b=None,
    v_bg=None,
) -> torch.Tensor:
    """PyTorch reference for :func:`attention_group_saliency`."""
    parts = _attention_parts(
        q_w,
        q_g,
        k_w,
        k_g,
        v_w,
        v_g,
        o_w,
        o_g,
        num_kv_heads,
        head_dim,
        exp_avg_sq,
        eps,
        (q_b, q_bg, k_b, k_bg, v_b, v_bg),
    )
    return _parts_torch(parts, num_kv_heads, eps)


def mlp_channel_saliency_torch(
    up_w, up_g, down_w, down_g, *, gate_w=None, gate_g=None, exp_avg_sq=None, eps=1e-8
) -> torch.Tensor:
    """PyTorch reference for :func:`mlp_channel_saliency`."""
    parts = _mlp_parts(up_w, up_g, down_w, down_g, gate_w, gate_g, exp_avg_sq, eps)
    return _parts_torch(parts, up_w.shape[0], eps)


def _parts_torch(parts, groups: int, eps: float) -> torch.Tensor:
    total = torch.zeros(groups, dtype=torch.float32, device=parts[0].w.device)
    for p in parts:
        total += _scores_torch(p.w, p.g, p.v, dim=1, eps=eps).view(groups, p.group).sum(dim=1)
    return total


# --------------------------------------------------------------------------------------------------
# Argument checks and the part description
# --------------------------------------------------------------------------------------------------


@dataclass
class _Part:
    """A matrix seen as [N outputs, K reduced]; ``group`` consecutive outputs form one group."""

    w: torch.Tensor
    g: torch.Tensor
    v: torch.Tensor | None
    group: int


def _check_pair(name: str, w, g, v) -> None:
    _checks.tensor(f"{name}_w", w)
    _checks.tensor(f"{name}_g", g)
    _checks.same(f"{name}_g", g, f"{name}_w", w)
    if v is not None:
        _checks.tensor(f"exp_avg_sq[{name}]", v)
        _checks.same(f"exp_avg_sq[{name}]", v, f"{name}_w", w, dtype=False)


def _check_saliency(weight, grad, dim, group_size, exp_avg_sq, eps) -> None:
    _checks.tensor("weight", weight)
    _checks.tensor("grad", grad)
    _checks.same("grad", grad, "weight", weight)
    if exp_avg_sq is not None:
        _checks.tensor("exp_avg_sq", exp_avg_sq)
        _checks.same("exp_avg_sq", exp_avg_sq, "weight", weight, dtype=False)
    dim = _checks.dim(dim)
    _checks.positive_int("group_size", group_size)
    n = weight.shape[0] if dim == 1 else weight.shape[1]
    _checks.divides("group_size", group_size, "the number of scores" + (" (rows)" if dim == 1 else " (columns)"), n)
    _checks.eps(eps)


def _oriented(t: torch.Tensor | None, dim: int) -> torch.Tensor | None:
    # A part always reduces over its second axis; a column reduction is a row reduction of W^T.
    return None if t is None else (t if dim == 1 else t.t())


def _bias_2d(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.unsqueeze(1)


def _attention_parts(q_w, q_g, k_w, k_g, v_w, v_g, o_w, o_g, num_kv_heads, head_dim, exp_avg_sq, eps, biases):
    kv = _checks.positive_int("num_kv_heads", num_kv_heads)
    d = _checks.positive_int("head_dim", head_dim)
    _checks.eps(eps)
    names = ("q", "k", "v", "o")
    bias_names = ("q_b", "k_b", "v_b")
    given = [(b, bg) for b, bg in zip(biases[0::2], biases[1::2])]
    for bname, (b, bg) in zip(bias_names, given):
        if (b is None) != (bg is None):
            raise ValueError(f"{bname}: a bias and its gradient ({bname}g) must be given together")
    n_bias = sum(b is not None for b, _ in given)
    if exp_avg_sq is None:
        vs = [None] * 7
    else:
        if not isinstance(exp_avg_sq, (tuple, list)) or len(exp_avg_sq) not in (4, 7):
            got = len(exp_avg_sq) if isinstance(exp_avg_sq, (tuple, list)) else type(exp_avg_sq).__name__
            raise ValueError(
                f"exp_avg_sq: expected a 4-tuple (q, k, v, o) or a 7-tuple adding (q_b, k_b, v_b), got {got}"
            )
        if len(exp_avg_sq) == 4 and n_bias:
            raise ValueError(
                "exp_avg_sq: biases were given, so a 7-tuple (q, k, v, o, q_b, k_b, v_b) is needed; "
                "mixing Adam-scaled and plain scores in one group would not be comparable"
            )
        vs = list(exp_avg_sq) + [None] * (7 - len(exp_avg_sq))
        if any(v is None for v in vs[:4]):
            raise ValueError("exp_avg_sq: every entry for q, k, v and o must be a tensor")
    mats = ((q_w, q_g), (k_w, k_g), (v_w, v_g), (o_w, o_g))
    for name, (w, g), v in zip(names, mats, vs):
        _check_pair(name, w, g, v)
    device = q_w.device
    for name, (w, _) in zip(names[1:], mats[1:]):
        if w.device != device:
            raise ValueError(f"{name}_w: device {w.device} does not match q_w on {device}")
    q_rows, hidden = q_w.shape
    if k_w.shape[0] != kv * d:
        raise ValueError(f"k_w: has {k_w.shape[0]} rows, expected num_kv_heads * head_dim = {kv * d}")
    if q_rows == 0 or q_rows % (kv * d):
        raise ValueError(f"q_w: its {q_rows} rows are not a positive multiple of num_kv_heads * head_dim = {kv * d}")
    for name, w in (("k_w", k_w), ("v_w", v_w)):
        if w.shape != (kv * d, hidden):
            raise ValueError(f"{name}: shape {tuple(w.shape)}, expected {(kv * d, hidden)}")
    if o_w.shape != (hidden, q_rows):
        raise ValueError(
            f"o_w: shape {tuple(o_w.shape)}, expected {(hidden, q_rows)} (o_proj maps q heads back to hidden)"
        )
    rows = {"q_b": q_rows, "k_b": kv * d, "v_b": kv * d}
    parts = [
        _Part(q_w, q_g, vs[0], q_rows // kv),
        _Part(k_w, k_g, vs[1], d),
        _Part(v_w, v_g, vs[2], d),
        _Part(o_w.t(), o_g.t(), _oriented(vs[3], 0), q_rows // kv),
    ]
    for bname, (b, bg), v in zip(bias_names, given, vs[4:]):
        if b is None:
            continue
        _checks.tensor(bname, b, ndim=1)
        _checks.tensor(bname + "g", bg, ndim=1)
        _checks.same(bname + "g", bg, bname, b)
        if b.shape[0] != rows[bname]:
            raise ValueError(f"{bname}: has {b.shape[0]} entries, expected {rows[bname]}")
        if b.device != device:
            raise ValueError(f"{bname}: device {b.device} does not match q_w on {device}")
        if v is not None:
            _checks.tensor(f"exp_avg_sq[{bname}]", v, ndim=1)
            _checks.same(f"exp_avg_sq[{bname}]", v, bname, b, dtype=False)
        parts.append(_Part(_bias_2d(b), _bias_2d(bg), _bias_2d(v), rows[bname] // kv))
    return parts


def _mlp_parts(up_w, up_g, down_w, down_g, gate_w, gate_g, exp_avg_sq, eps):
    _checks.eps(eps)
    if (gate_w is None) != (gate_g is None):
        raise ValueError("gate_w: gate_w and gate_g must be given together")
    gated = gate_w is not None
    n_mats = 3 if gated else 2
    if exp_avg_sq is None:
        vs = [None] * n_mats
    else:
        if not isinstance(exp_avg_sq, (tuple, list)) or len(exp_avg_sq) != n_mats:
            got = len(exp_avg_sq) if isinstance(exp_avg_sq, (tuple, list)) else type(exp_avg_sq).__name__
            want = "a 3-tuple (up, down, gate)" if gated else "a 2-tuple (up, down)"
            raise ValueError(f"exp_avg_sq: expected {want}, got {got}")
        if any(v is None for v in exp_avg_sq):
            raise ValueError("exp_avg_sq: every entry must be a tensor")
        vs = list(exp_avg_sq)
    _check_pair("up", up_w, up_g, vs[0])
    _check_pair("down", down_w, down_g, vs[1])
    inter, hidden = up_w.shape
    if down_w.shape != (hidden, inter):
        raise ValueError(f"down_w: shape {tuple(down_w.shape)}, expected {(hidden, inter)} (the transpose of up_w)")
    if down_w.device != up_w.device:
        raise ValueError(f"down_w: device {down_w.device} does not match up_w on {up_w.device}")
    parts = [_Part(up_w, up_g, vs[0], 1), _Part(down_w.t(), down_g.t(), _oriented(vs[1], 0), 1)]
    if gated:
        _check_pair("gate", gate_w, gate_g, vs[2])
        if gate_w.shape != up_w.shape:
            raise ValueError(f"gate_w: shape {tuple(gate_w.shape)} does not match up_w {tuple(up_w.shape)}")
        if gate_w.device != up_w.device:
            raise ValueError(f"gate_w: device {gate_w.device} does not match up_w on {up_w.device}")
        parts.insert(0, _Part(gate_w, gate_g, vs[2], 1))
    return parts


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _part_tile(
        pid,
        w_ptr,
        g_ptr,
        v_ptr,
        out_ptr,
        slots,
        eps,
        N,
        K,
        k_chunk,
        tiles_n,
        group,
        slot_base,
        s_wn,
        s_wk,
        s_gn,
        s_gk,
        s_vn,
        s_vk,
        HAS_V: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_n = pid % tiles_n
        pid_s = pid // tiles_n
        offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        k_start = pid_s.to(tl.int64) * k_chunk
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, k_chunk, BLOCK_K):
            offs_k = k_start + k0 + tl.arange(0, BLOCK_K)
            mask = mask_n[:, None] & (offs_k < K)[None, :]
            # Widen straight after the load: the interpreter mishandles bf16 arithmetic, and the
            # product of two bf16/fp16 values is exact in fp32, which keeps us bit-close to the
            # reference.
            w = tl.load(w_ptr + offs_n[:, None] * s_wn + offs_k[None, :] * s_wk, mask=mask, other=0.0)
            g = tl.load(g_ptr + offs_n[:, None] * s_gn + offs_k[None, :] * s_gk, mask=mask, other=0.0)
            s = tl.abs(w.to(tl.float32) * g.to(tl.float32))
            if HAS_V:
                # other=1 keeps masked lanes at 0 / (1 + eps) even when eps is 0.
                v = tl.load(v_ptr + offs_n[:, None] * s_vn + offs_k[None, :] * s_vk, mask=mask, other=1.0)
                s = tl.div_rn(s, tl.sqrt_rn(v.to(tl.float32)) + eps)
            acc += s
        row = tl.sum(acc, axis=1)
        grp = offs_n // group
        dst = grp * slots + slot_base + pid_s.to(tl.int64) * group + (offs_n - grp * group)
        tl.store(out_ptr + dst, row, mask=mask_n)

    @triton.jit
    def _saliency_kernel(
        out_ptr,
        slots,
        eps,
        w0,
        g0,
        v0,
        N0,
        K0,
        kc0,
        tn0,
        grp0,
        sb0,
        s0_wn,
        s0_wk,
        s0_gn,
        s0_gk,
        s0_vn,
        s0_vk,
        end0,
        w1,
        g1,
        v1,
        N1,
        K1,
        kc1,
        tn1,
        grp1,
        sb1,
        s1_wn,
        s1_wk,
        s1_gn,
        s1_gk,
        s1_vn,
        s1_vk,
        end1,
        w2,
        g2,
        v2,
        N2,
        K2,
        kc2,
        tn2,
        grp2,
        sb2,
        s2_wn,
        s2_wk,
        s2_gn,
        s2_gk,
        s2_vn,
        s2_vk,
        end2,
        w3,
        g3,
        v3,
        N3,
        K3,
        kc3,
        tn3,
        grp3,
        sb3,
        s3_wn,
        s3_wk,
        s3_gn,
        s3_gk,
        s3_vn,
        s3_vk,
        NUM_PARTS: tl.constexpr,
        HAS_V: tl.constexpr,
        BN0: tl.constexpr,
        BK0: tl.constexpr,
        BN1: tl.constexpr,
        BK1: tl.constexpr,
        BN2: tl.constexpr,
        BK2: tl.constexpr,
        BN3: tl.constexpr,
        BK3: tl.constexpr,
    ):
        # Parts are laid end to end along one grid axis, so one launch covers q, k, v and o (or
        # gate, up and down) and the short k/v parts overlap with the long ones.
        pid = tl.program_id(0)
        if pid < end0:
            _part_tile(
                pid,
                w0,
                g0,
                v0,
                out_ptr,
                slots,
                eps,
                N0,
                K0,
                kc0,
                tn0,
                grp0,
                sb0,
                s0_wn,
                s0_wk,
                s0_gn,
                s0_gk,
                s0_vn,
                s0_vk,
                HAS_V,
                BN0,
                BK0,
            )
        if NUM_PARTS > 1:
            if (pid >= end0) & (pid < end1):
                _part_tile(
                    pid - end0,
                    w1,
                    g1,
                    v1,
                    out_ptr,
                    slots,
                    eps,
                    N1,
                    K1,
                    kc1,
                    tn1,
                    grp1,
                    sb1,
                    s1_wn,
                    s1_wk,
                    s1_gn,
                    s1_gk,
                    s1_vn,
                    s1_vk,
                    HAS_V,
                    BN1,
                    BK1,
                )
        if NUM_PARTS > 2:
            if (pid >= end1) & (pid < end2):
                _part_tile(
                    pid - end1,
                    w2,
                    g2,
                    v2,
                    out_ptr,
                    slots,
                    eps,
                    N2,
                    K2,
                    kc2,
                    tn2,
                    grp2,
                    sb2,
                    s2_wn,
                    s2_wk,
                    s2_gn,
                    s2_gk,
                    s2_vn,
                    s2_vk,
                    HAS_V,
                    BN2,
                    BK2,
                )
        if NUM_PARTS > 3:
            if pid >= end2:
                _part_tile(
                    pid - end2,
                    w3,
                    g3,
                    v3,
                    out_ptr,
                    slots,
                    eps,
                    N3,
                    K3,
                    kc3,
                    tn3,
                    grp3,
                    sb3,
                    s3_wn,
                    s3_wk,
                    s3_gn,
                    s3_gk,
                    s3_vn,
                    s3_vk,
                    HAS_V,
                    BN3,
                    BK3,
                )


@dataclass
class _Tiling:
    block_n: int
    block_k: int
    tiles_n: int
    k_chunk: int
    splits: int
    slot_base: int = 0

    @property
    def programs(self) -> int:
        return self.tiles_n * self.splits


def _tile(part: _Part, elems_per_program: int, interpret: bool) -> _Tiling:
    n, k = part.w.shape
    orient = "n_contiguous" if part.w.stride(0) == 1 and part.w.stride(1) != 1 else "k_contiguous"
    block_n, block_k = (_INTERP_BLOCKS if interpret else _GPU_BLOCKS)[orient]
    k_blocks = max(1, triton.cdiv(k, block_k))
    if interpret:
        chunk_blocks = _INTERP_CHUNK_BLOCKS
    else:
        # Split K so that every program reads about the same number of elements, whichever part
        # it falls in; long reductions (o_proj and down_proj columns) get several chunks.
        chunk_blocks = max(1, triton.cdiv(elems_per_program, block_n * block_k))
    chunk_blocks = min(chunk_blocks, k_blocks)
    splits = triton.cdiv(k_blocks, chunk_blocks)
    return _Tiling(block_n, block_k, triton.cdiv(n, block_n), chunk_blocks * block_k, splits)


def _launch(parts: Sequence[_Part], groups: int, eps: float) -> torch.Tensor:
    device = parts[0].w.device
    if groups == 0:
        return torch.zeros(0, dtype=torch.float32, device=device)
    interpret = device.type == "cpu"
    total = sum(p.w.numel() for p in parts)
    elems = max(1 << 16, triton.cdiv(total, 8 * num_sms(device)))
    tilings = [_tile(p, elems, interpret) for p in parts]
    slots = 0
    for p, t in zip(parts, tilings):
        t.slot_base = slots
        slots += t.splits * p.group
    partial = empty((groups, slots), dtype=torch.float32, device=device)
    has_v = parts[0].v is not None
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for i in range(0, len(parts), _MAX_PARTS):
            _launch_group(parts[i : i + _MAX_PARTS], tilings[i : i + _MAX_PARTS], partial, slots, eps, has_v)
    return partial.sum(dim=1)


def _launch_group(parts, tilings, partial, slots, eps, has_v) -> None:
    args, consts, end = [], {}, 0
    for i in range(_MAX_PARTS):
        if i < len(parts):
            p, t = parts[i], tilings[i]
            v = p.v if has_v else p.w  # an unused pointer, never read when HAS_V is false
            end += t.programs
            args += [
                p.w,
                p.g,
                v,
                p.w.shape[0],
                p.w.shape[1],
                t.k_chunk,
                t.tiles_n,
                p.group,
                t.slot_base,
                p.w.stride(0),
                p.w.stride(1),
                p.g.stride(0),
                p.g.stride(1),
                v.stride(0),
                v.stride(1),
            ]
            consts[f"BN{i}"], consts[f"BK{i}"] = t.block_n, t.block_k
        else:
            p = parts[0]
            args += [p.w, p.w, p.w] + [1] * 12
            consts[f"BN{i}"], consts[f"BK{i}"] = 1, 1
        if i < _MAX_PARTS - 1:
            args.append(end)
    _saliency_kernel[(end,)](partial, slots, eps, *args, NUM_PARTS=len(parts), HAS_V=has_v, **consts)


# --------------------------------------------------------------------------------------------------
# Implementations behind the torch.library ops (see ops.py) and the public launchers
# --------------------------------------------------------------------------------------------------


def _run(parts: Sequence[_Part], groups: int, eps: float) -> torch.Tensor:
    if backend(parts[0].w) == "torch":
        return _parts_torch(parts, groups, eps)
    return _launch(parts, groups, eps)


def _saliency_impl(weight, grad, dim, group_size, exp_avg_sq, eps) -> torch.Tensor:
    _check_saliency(weight, grad, dim, group_size, exp_avg_sq, eps)
    n = weight.shape[0] if dim == 1 else weight.shape[1]
    part = _Part(_oriented(weight, dim), _oriented(grad, dim), _oriented(exp_avg_sq, dim), group_size)
    return _run([part], n // group_size, eps)


def _attention_impl(q_w, q_g, k_w, k_g, v_w, v_g, o_w, o_g, num_kv_heads, head_dim, biases, exp_avg_sq, eps):
    vs = None if exp_avg_sq is None or all(v is None for v in exp_avg_sq) else _trim(exp_avg_sq)
    parts = _attention_parts(q_w, q_g, k_w, k_g, v_w, v_g, o_w, o_g, num_kv_heads, head_dim, vs, eps, tuple(biases))
    return _run(parts, num_kv_heads, eps)


def _mlp_impl(up_w, up_g, down_w, down_g, gate_w, gate_g, exp_avg_sq, eps):
    vs = None if exp_avg_sq is None or all(v is None for v in exp_avg_sq) else _trim(exp_avg_sq)
    parts = _mlp_parts(up_w, up_g, down_w, down_g, gate_w, gate_g, vs, eps)
    return _run(parts, up_w.shape[0], eps)


def _trim(vs):
    # The op schema carries a fixed-length list of optional tensors; drop the unused tail.
    vs = list(vs)
    while vs and vs[-1] is None:
        vs.pop()
    return vs


def saliency(
    weight: torch.Tensor,
    grad: torch.Tensor,
    *,
    dim: int,
    group_size: int = 1,
    exp_avg_sq: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Grouped saliency sums of one matrix.

    Each element scores ``s = |weight * grad|``, or ``|weight * grad| / (sqrt(exp_avg_sq) + eps)``
    when ``exp_avg_sq`` (Adam's second moment, or one the caller accumulated) is given.
    ``dim=1`` sums over columns (one score per row), ``dim=0`` over rows (one per column); then each
    ``group_size`` consecutive scores are summed.

    Args:
        weight, grad: ``[rows, cols]``, the same shape, device and dtype (float32, float16 or
            bfloat16); any 2-D strided view, a transposed one too. Nothing is copied.
        exp_avg_sq: ``None`` or ``[rows, cols]`` on the same device, any of the three float dtypes.

    Returns:
        float32 ``[n // group_size]`` on the input's device, ``n`` being rows (dim=1) or columns.
        NaN or Inf in an input propagates into its group's score (checking would cost a second read).
    """
    _check_saliency(weight, grad, dim, group_size, exp_avg_sq, eps)  # clear errors before the op's schema casts
    return torch.ops.nirvana.saliency(weight, grad, dim, group_size, exp_avg_sq, eps)


def attention_group_saliency(
    q_w: torch.Tensor,
    q_g: torch.Tensor,
    k_w: torch.Tensor,
    k_g: torch.Tensor,
    v_w: torch.Tensor,
    v_g: torch.Tensor,
    o_w: torch.Tensor,
    o_g: torch.Tensor,
    *,
    num_kv_heads: int,
    head_dim: int,
    exp_avg_sq: Sequence[torch.Tensor] | None = None,
    eps: float = 1e-8,
    q_b: torch.Tensor | None = None,
    q_bg: torch.Tensor | None = None,
    k_b: torch.Tensor | None = None,
    k_bg: torch.Tensor | None = None,
    v_b: torch.Tensor | None = None,
    v_bg: torch.Tensor | None = None,
) -> torch.Tensor:
    """Saliency of each KV group of one attention layer, in one pass over its four matrices.

    With ``d = head_dim`` and ``G = q_rows / (num_kv_heads * d)`` query heads per KV head, group
    ``j`` sums ``s`` over q rows ``[j*G*d, (j+1)*G*d)``, k and v rows ``[j*d, (j+1)*d)`` and o_proj
    columns ``[j*G*d, (j+1)*G*d)``; G = 1 is plain multi-head attention.

    Args:
        q_w, q_g: ``[num_kv_heads*G*d, hidden]``; k_w, k_g, v_w, v_g: ``[num_kv_heads*d, hidden]``;
            o_w, o_g: ``[hidden, num_kv_heads*G*d]``. Each weight and its gradient share shape,
            device and dtype (float32, float16 or bfloat16); strided views are read in place.
        exp_avg_sq: ``None``, or a tuple aligned with (q, k, v, o), extended with (q_b, k_b, v_b)
            when biases are given.
        q_b, q_bg, k_b, k_bg, v_b, v_bg: optional 1-D biases with their gradients (Qwen2 has them);
            each bias element adds into its row's group.

    Returns:
        float32 ``[num_kv_heads]`` on the input's device.
    """
    biases = [q_b, q_bg, k_b, k_bg, v_b, v_bg]
    vs = [None] * 7 if exp_avg_sq is None else _padded(exp_avg_sq, 7, "exp_avg_sq")
    _attention_parts(q_w, q_g, k_w, k_g, v_w, v_g, o_w, o_g, num_kv_heads, head_dim, _trim(vs) or None, eps, biases)
    return torch.ops.nirvana.attention_group_saliency(
        q_w, q_g, k_w, k_g, v_w, v_g, o_w, o_g, num_kv_heads, head_dim, biases, vs, eps
    )


def mlp_channel_saliency(
    up_w: torch.Tensor,
    up_g: torch.Tensor,
    down_w: torch.Tensor,
    down_g: torch.Tensor,
    *,
    gate_w: torch.Tensor | None = None,
    gate_g: torch.Tensor | None = None,
    exp_avg_sq: Sequence[torch.Tensor] | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Saliency of each MLP channel: its gate row (if gated), its up row and its down_proj column.

    Args:
        up_w, up_g (and gate_w, gate_g): ``[intermediate, hidden]``; down_w, down_g:
            ``[hidden, intermediate]``; float32, float16 or bfloat16, strided views read in place.
        exp_avg_sq: ``None``, or a tuple in argument order: (up, down) or (up, down, gate).

    Returns:
        float32 ``[intermediate]`` on the input's device.
    """
    vs = [None] * 3 if exp_avg_sq is None else _padded(exp_avg_sq, 3, "exp_avg_sq")
    if exp_avg_sq is not None and gate_w is None and len(exp_avg_sq) != 2:
        raise ValueError(f"exp_avg_sq: expected a 2-tuple (up, down) without a gate, got {len(exp_avg_sq)}")
    _mlp_parts(up_w, up_g, down_w, down_g, gate_w, gate_g, _trim(vs) or None, eps)
    return torch.ops.nirvana.mlp_channel_saliency(up_w, up_g, down_w, down_g, gate_w, gate_g, vs, eps)


def _padded(vs, n: int, name: str) -> list:
    if not isinstance(vs, (tuple, list)):
        raise ValueError(f"{name}: expected a tuple of tensors, got {type(vs).__name__}")
    if len(vs) > n:
        raise ValueError(f"{name}: expected at most {n} entries, got {len(vs)}")
    if any(v is None for v in vs):
        raise ValueError(f"{name}: every entry must be a tensor")
    return list(vs) + [None] * (n - len(vs))
