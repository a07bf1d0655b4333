"""Saliency: grouped sums of |W * G| (optionally Adam-scaled) over rows or columns, in fp32.

One kernel family serves the three public ops. Every matrix is seen as a "part": a 2-D strided
view with N outputs and K reduced elements per output, plus the number of consecutive outputs that
make up one group (a KV group, an MLP channel, or ``group_size``). One launch takes every part of
a layer (tuples of any length: q, k, v, o and Qwen2's biases are seven) and gives each program one
tile of one part: BLOCK_N outputs times one K-chunk. The program reduces its tile in fp32 and writes
one partial per output into a ``[groups, slots]`` scratch buffer, at a slot fixed by (part, K-chunk,
position in the group). A single ``sum(dim=1)`` then finishes the job.

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
from ._dispatch import HAS_TRITON, INTERPRET, backend, empty, num_sms

if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import libdevice

# Reference path: rows per chunk are chosen so that one chunk holds about this many elements.
_CHUNK_ELEMS = 1 << 22

# (BLOCK_N, BLOCK_K) by which axis is contiguous in memory; a "vector" part (K = 1, a bias) puts all
# its lanes along N. Under the interpreter each program costs about 0.5 ms per loop step, so it gets
# fewer, larger tiles; the tests read these to place shapes at block edges.
_GPU_BLOCKS = {"k_contiguous": (16, 256), "n_contiguous": (256, 16), "vector": (1024, 1)}
_INTERP_BLOCKS = {"k_contiguous": (8, 32), "n_contiguous": (32, 8), "vector": (32, 1)}
# Under the interpreter every K-chunk is two K-blocks, so the split path is always exercised.
_INTERP_CHUNK_BLOCKS = 2


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
    mats = ((q_w, q_g), (k_w, k_g), (v_w, v_g), (o_w, o_g))
    parts = _attention_parts(mats, ((q_b, q_bg), (k_b, k_bg), (v_b, v_bg)), num_kv_heads, head_dim, exp_avg_sq, eps)
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


def _attention_parts(mats, given, num_kv_heads, head_dim, exp_avg_sq, eps) -> list[_Part]:
    """Check one attention layer and describe it as parts: ``mats`` are the (weight, grad) pairs of
    q, k, v and o, ``given`` the (bias, grad) pairs of q, k and v, each ``(None, None)`` if absent."""
    kv = _checks.positive_int("num_kv_heads", num_kv_heads)
    d = _checks.positive_int("head_dim", head_dim)
    _checks.eps(eps)
    names = ("q", "k", "v", "o")
    bias_names = ("q_b", "k_b", "v_b")
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
    (q_w, _), (k_w, _), (v_w, _), (o_w, o_g) = mats
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
        _Part(*mats[0], vs[0], q_rows // kv),
        _Part(*mats[1], vs[1], d),
        _Part(*mats[2], vs[2], d),
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
    if INTERPRET:
        # The interpreter has no libdevice; its division (numpy's, exact) stands in.
        @triton.jit
        def _approx_div(x, y):
            return x / y

    else:
        # div.approx.ftz: MUFU.RCP and a multiply, within 2 ulp while |y| < 2^126. Here y = sqrt(V) + eps
        # stays below 2^64 for any finite V; the flush to zero only drops terms under 1.2e-38.
        @triton.jit
        def _approx_div(x, y):
            return libdevice.fast_dividef(x, y)

    @triton.jit
    def _scores(w_ptr, g_ptr, v_ptr, w_offs, g_offs, v_offs, mask, eps):
        """fp32 ``|W * G|``, or ``|W * G| / (sqrt(V) + eps)`` when ``v_ptr`` is given, at the offsets."""
        # Widen straight after the load: the interpreter mishandles bf16 arithmetic, and the product
        # of two bf16/fp16 values is exact in fp32, which keeps us bit-close to the reference.
        w = tl.load(w_ptr + w_offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + g_offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.abs(w * g)
        if v_ptr is not None:
            # other=1 keeps masked lanes at 0 / (1 + eps) even when eps is 0.
            v = tl.load(v_ptr + v_offs, mask=mask, other=1.0).to(tl.float32)
            # Approximate sqrt and division (a few ulp, far inside the fp32 summation error the result
            # is held to): the IEEE forms cost about 40 instructions per element.
            s = _approx_div(s, tl.sqrt(v) + eps)
        return s

    @triton.jit
    def _part_tile(
        tile,  # this program's tile within its part: K-split major, N-tile minor
        partial_ptr,  # [groups, slots] fp32 scratch, one partial per (group, slot)
        w_ptr,  # [N, K] fp32/fp16/bf16 weight
        g_ptr,  # [N, K] gradient, the weight's dtype
        v_ptr,  # [N, K] Adam second moment, any float dtype; None for plain |W * G|
        n_size,
        k_size,
        k_chunk,
        tiles_n,
        group,
        slot_base,
        slots,
        eps,
        w_stride_n,
        w_stride_k,
        g_stride_n,
        g_stride_k,
        v_stride_n,
        v_stride_k,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        tile_n = tile % tiles_n
        split = tile // tiles_n
        offs_n = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_size
        if BLOCK_K == 1:
            # A vector part (K = 1, a bias): one element per output, the lanes along N. With no K
            # offset in the address, a contiguous bias gets vector loads.
            row = _scores(
                w_ptr, g_ptr, v_ptr, offs_n * w_stride_n, offs_n * g_stride_n, offs_n * v_stride_n, mask_n, eps
            )
        else:
            k_start = split.to(tl.int64) * k_chunk
            # The last split stops at K rather than running the rest of its chunk masked. Its bound
            # is in int32 (split * k_chunk < K), which keeps the loop counter 32-bit.
            k_len = tl.minimum(k_size - split * k_chunk, k_chunk)
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            for k0 in range(0, k_len, BLOCK_K):
                offs_k = k_start + k0 + tl.arange(0, BLOCK_K)
                mask = mask_n[:, None] & (offs_k < k_size)[None, :]
                acc += _scores(
                    w_ptr,
                    g_ptr,
                    v_ptr,
                    offs_n[:, None] * w_stride_n + offs_k[None, :] * w_stride_k,
                    offs_n[:, None] * g_stride_n + offs_k[None, :] * g_stride_k,
                    offs_n[:, None] * v_stride_n + offs_k[None, :] * v_stride_k,
                    mask,
                    eps,
                )
            row = tl.sum(acc, axis=1)
        grp = offs_n // group
        dst = grp * slots + slot_base + split.to(tl.int64) * group + (offs_n - grp * group)
        tl.store(partial_ptr + dst, row, mask=mask_n)

    @triton.jit
    def _saliency_kernel(
        partial_ptr,  # [groups, slots] fp32 scratch
        w_ptrs,  # per part: [N, K] fp32/fp16/bf16 weight
        g_ptrs,  # per part: [N, K] gradient, the weight's dtype
        v_ptrs,  # per part: [N, K] Adam second moment; None for plain |W * G|
        n_sizes,  # outputs per part
        k_sizes,  # reduced elements per output
        k_chunks,  # K elements per split
        tiles_n,  # N tiles per split
        group_sizes,  # consecutive outputs per group
        slot_bases,  # first partial slot of each part
        program_ends,  # cumulative programs: part i owns [program_ends[i-1], program_ends[i])
        w_strides,  # per part: (stride along N, stride along K)
        g_strides,
        v_strides,  # None with v_ptrs
        slots,
        eps,
        BLOCK_N: tl.constexpr,  # per part
        BLOCK_K: tl.constexpr,  # per part
    ):
        # Parts are laid end to end along one grid axis, so one launch covers a whole layer (q, k, v,
        # o and the biases, or gate, up and down) and the short parts overlap with the long ones.
        pid = tl.program_id(0)
        start = 0
        for i in tl.static_range(len(w_ptrs)):
            end = program_ends[i]
            if (pid >= start) & (pid < end):
                block_n: tl.constexpr = BLOCK_N[i]
                block_k: tl.constexpr = BLOCK_K[i]
                if v_ptrs is None:
                    v_ptr = None
                    v_stride_n = 0
                    v_stride_k = 0
                else:
                    v_ptr = v_ptrs[i]
                    v_stride_n = v_strides[i][0]
                    v_stride_k = v_strides[i][1]
                _part_tile(
                    pid - start,
                    partial_ptr,
                    w_ptrs[i],
                    g_ptrs[i],
                    v_ptr,
                    n_sizes[i],
                    k_sizes[i],
                    k_chunks[i],
                    tiles_n[i],
                    group_sizes[i],
                    slot_bases[i],
                    slots,
                    eps,
                    w_strides[i][0],
                    w_strides[i][1],
                    g_strides[i][0],
                    g_strides[i][1],
                    v_stride_n,
                    v_stride_k,
                    block_n,
                    block_k,
                )
            start = end


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


def _layout(w: torch.Tensor) -> str:
    if w.shape[1] == 1:
        # A bias (or any one-column part): nothing to reduce, so its lanes go along N.
        return "vector"
    return "n_contiguous" if w.stride(0) == 1 and w.stride(1) != 1 else "k_contiguous"


def _tile(part: _Part, elems_per_program: int, interpret: bool) -> _Tiling:
    n, k = part.w.shape
    block_n, block_k = (_INTERP_BLOCKS if interpret else _GPU_BLOCKS)[_layout(part.w)]
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
    slots, ends = 0, []
    for p, t in zip(parts, tilings):
        t.slot_base = slots
        slots += t.splits * p.group
        ends.append((ends[-1] if ends else 0) + t.programs)
    partial = empty((groups, slots), dtype=torch.float32, device=device)
    has_v = parts[0].v is not None

    def per_part(fn):
        return tuple(fn(p, t) for p, t in zip(parts, tilings))

    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _saliency_kernel[(ends[-1],)](
            partial,
            per_part(lambda p, t: p.w),
            per_part(lambda p, t: p.g),
            per_part(lambda p, t: p.v) if has_v else None,
            per_part(lambda p, t: p.w.shape[0]),
            per_part(lambda p, t: p.w.shape[1]),
            per_part(lambda p, t: t.k_chunk),
            per_part(lambda p, t: t.tiles_n),
            per_part(lambda p, t: p.group),
            per_part(lambda p, t: t.slot_base),
            tuple(ends),
            per_part(lambda p, t: p.w.stride()),
            per_part(lambda p, t: p.g.stride()),
            per_part(lambda p, t: p.v.stride()) if has_v else None,
            slots,
            eps,
            BLOCK_N=per_part(lambda p, t: t.block_n),
            BLOCK_K=per_part(lambda p, t: t.block_k),
        )
    return partial.sum(dim=1)


# --------------------------------------------------------------------------------------------------
# The implementation behind the torch.library op (see ops.py) and the public launchers
# --------------------------------------------------------------------------------------------------


def _parts_impl(weights, grads, exp_avg_sq, group_sizes, groups: int, eps: float) -> torch.Tensor:
    """Grouped saliency of parts that the public launchers have already checked and oriented."""
    vs = exp_avg_sq if len(exp_avg_sq) else [None] * len(weights)
    parts = [_Part(w, g, v, n) for w, g, v, n in zip(weights, grads, vs, group_sizes)]
    if backend(parts[0].w) == "torch":
        return _parts_torch(parts, groups, eps)
    return _launch(parts, groups, eps)


def _call(parts: Sequence[_Part], groups: int, eps: float) -> torch.Tensor:
    has_v = parts[0].v is not None
    return torch.ops.nirvana.grouped_saliency(
        [p.w for p in parts],
        [p.g for p in parts],
        [p.v for p in parts] if has_v else [],
        [p.group for p in parts],
        groups,
        eps,
    )


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
    _check_saliency(weight, grad, dim, group_size, exp_avg_sq, eps)
    n = weight.shape[0] if dim == 1 else weight.shape[1]
    part = _Part(_oriented(weight, dim), _oriented(grad, dim), _oriented(exp_avg_sq, dim), group_size)
    return _call([part], n // group_size, eps)


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
    mats = ((q_w, q_g), (k_w, k_g), (v_w, v_g), (o_w, o_g))
    vs = None if exp_avg_sq is None else _entries(exp_avg_sq, 7, "exp_avg_sq")
    parts = _attention_parts(mats, ((q_b, q_bg), (k_b, k_bg), (v_b, v_bg)), num_kv_heads, head_dim, vs, eps)
    return _call(parts, num_kv_heads, eps)


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
    vs = None if exp_avg_sq is None else _entries(exp_avg_sq, 3, "exp_avg_sq")
    if vs is not None and gate_w is None and len(vs) != 2:
        raise ValueError(f"exp_avg_sq: expected a 2-tuple (up, down) without a gate, got {len(vs)}")
    parts = _mlp_parts(up_w, up_g, down_w, down_g, gate_w, gate_g, vs, eps)
    return _call(parts, up_w.shape[0], eps)


def _entries(vs, n: int, name: str) -> list | None:
    """The public launchers' reading of ``exp_avg_sq``: a tuple of up to ``n`` tensors; empty means none."""
    if not isinstance(vs, (tuple, list)):
        raise ValueError(f"{name}: expected a tuple of tensors, got {type(vs).__name__}")
    if len(vs) > n:
        raise ValueError(f"{name}: expected at most {n} entries, got {len(vs)}")
    if any(v is None for v in vs):
        raise ValueError(f"{name}: every entry must be a tensor")
    return list(vs) or None
