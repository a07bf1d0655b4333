"""Compaction: gather the kept rows or columns (or whole groups of them) into new compact tensors.

One tiled 2-D gather serves rows and columns alike: the launcher names one axis "gathered" and
the other "kept whole", passing the source strides of each, so a row gather on a row-major matrix
and a column gather on a transposed view are the same kernel. Output position ``i`` along the
gathered axis reads source position ``index[i // group] * group + i % group``, which is how whole
heads are kept without materialising an expanded index. One launch can fill up to four outputs that
share an index (q/k/v rows of the same heads, gate and up rows of the same channels): a third grid
axis picks the tensor.

The gather moves bytes without arithmetic, so the result is bit-identical to ``index_select``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from . import _checks
from ._dispatch import HAS_TRITON, backend, empty

if HAS_TRITON:
    import triton
    import triton.language as tl

# (BLOCK_G, BLOCK_O): BLOCK_G along the gathered axis, BLOCK_O along the axis kept whole. The wide
# side of the tile follows whichever axis is contiguous in the output.
_GPU_BLOCKS = {"rows": (16, 256), "cols": (128, 32)}
_INTERP_BLOCKS = {"rows": (8, 32), "cols": (32, 8)}
_MAX_TENSORS = 4


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------


def compact_torch(weight: torch.Tensor, index: torch.Tensor, *, dim: int) -> torch.Tensor:
    """PyTorch reference for :func:`compact`."""
    weight, index = _check_compact(weight, index, dim, 1, "index")
    return weight.index_select(dim, index).contiguous()


def compact_groups_torch(weight: torch.Tensor, keep: torch.Tensor, *, group_size: int, dim: int) -> torch.Tensor:
    """PyTorch reference for :func:`compact_groups`."""
    weight, keep = _check_compact(weight, keep, dim, group_size, "keep")
    return weight.index_select(dim, _expand(keep, group_size)).contiguous()


def compact_many_torch(weights, index, *, dim, group_size=1) -> list[torch.Tensor]:
    """PyTorch reference for :func:`compact_many`."""
    weights, index = _check_many(weights, index, dim, group_size)
    rows = _expand(index, group_size)
    return [w.index_select(dim, rows).contiguous() for w in weights]


def _expand(keep: torch.Tensor, group_size: int) -> torch.Tensor:
    offsets = torch.arange(group_size, device=keep.device, dtype=torch.int64)
    return (keep.to(torch.int64)[:, None] * group_size + offsets).reshape(-1)


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def _check_compact(weight, index, dim, group_size, index_name):
    _checks.tensor("weight", weight, ndim=(1, 2), floating=False)
    dim = _checks.dim(dim)
    if weight.dim() == 1 and dim != 0:
        raise ValueError(f"dim: a 1-D tensor (a bias) can only be compacted along dim 0, got {dim}")
    _checks.positive_int("group_size", group_size)
    extent = weight.shape[dim]
    _checks.divides("group_size", group_size, f"weight.shape[{dim}]", extent)
    what = f"weight.shape[{dim}]" if group_size == 1 else f"the number of groups (weight.shape[{dim}] / {group_size})"
    index = _checks.index(index_name, index, extent=extent // group_size, extent_name=what, device=weight.device)
    return weight, index


def _check_metadata(weight, index, index_name, weight_name="weight") -> None:
    # Type checks up front, so a wrong type gets a ValueError rather than the op schema's cast error;
    # the value checks (order, range) run inside the op, where the data is at hand.
    _checks.tensor(weight_name, weight, ndim=(1, 2), floating=False)
    if not isinstance(index, torch.Tensor):
        raise ValueError(f"{index_name}: expected a torch.Tensor, got {type(index).__name__}")


def _check_many(weights, index, dim, group_size):
    if not isinstance(weights, (tuple, list)) or not weights:
        raise ValueError(f"weights: expected a non-empty list of tensors, got {weights!r:.80}")
    if len(weights) > _MAX_TENSORS:
        raise ValueError(f"weights: at most {_MAX_TENSORS} tensors share one launch, got {len(weights)}")
    first = weights[0]
    _checks.tensor("weights[0]", first, ndim=(1, 2), floating=False)
    for i, w in enumerate(weights[1:], start=1):
        _checks.tensor(f"weights[{i}]", w, ndim=(1, 2), floating=False)
        _checks.same(f"weights[{i}]", w, "weights[0]", first)
    _, index = _check_compact(first, index, dim, group_size, "index")
    return list(weights), index


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _gather_tile(
        index_ptr,
        group,
        n_gather,
        n_keep,
        d_sg,
        d_so,
        src,
        dst,
        s_g,
        s_o,
        RUNS: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_O: tl.constexpr,
    ):
        pid_g = tl.program_id(0).to(tl.int64)
        pid_o = tl.program_id(1).to(tl.int64)
        offs_g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
        offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        mask_g = offs_g < n_gather
        mask = mask_g[:, None] & (offs_o < n_keep)[None, :]
        kept = tl.load(index_ptr + offs_g // group, mask=mask_g, other=0).to(tl.int64)
        src_g = kept * group + offs_g % group
        if RUNS:
            # Whole groups that are multiples of BLOCK_G: each tile reads one contiguous run,
            # which lets the compiler vectorise the loads of a head gather.
            src_g = tl.max_contiguous(tl.multiple_of(src_g, BLOCK_G), BLOCK_G)
        vals = tl.load(src + src_g[:, None] * s_g + offs_o[None, :] * s_o, mask=mask)
        tl.store(dst + offs_g[:, None] * d_sg + offs_o[None, :] * d_so, vals, mask=mask)

    @triton.jit
    def _gather_kernel(
        index_ptr,
        group,
        n_gather,
        n_keep,
        d_sg,
        d_so,
        src0,
        dst0,
        s0_g,
        s0_o,
        src1,
        dst1,
        s1_g,
        s1_o,
        src2,
        dst2,
        s2_g,
        s2_o,
        src3,
        dst3,
        s3_g,
        s3_o,
        NUM_TENSORS: tl.constexpr,
        RUNS: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_O: tl.constexpr,
    ):
        t = tl.program_id(2)
        if t == 0:
            _gather_tile(index_ptr, group, n_gather, n_keep, d_sg, d_so, src0, dst0, s0_g, s0_o, RUNS, BLOCK_G, BLOCK_O)
        if NUM_TENSORS > 1:
            if t == 1:
                _gather_tile(
                    index_ptr, group, n_gather, n_keep, d_sg, d_so, src1, dst1, s1_g, s1_o, RUNS, BLOCK_G, BLOCK_O
                )
        if NUM_TENSORS > 2:
            if t == 2:
                _gather_tile(
                    index_ptr, group, n_gather, n_keep, d_sg, d_so, src2, dst2, s2_g, s2_o, RUNS, BLOCK_G, BLOCK_O
                )
        if NUM_TENSORS > 3:
            if t == 3:
                _gather_tile(
                    index_ptr, group, n_gather, n_keep, d_sg, d_so, src3, dst3, s3_g, s3_o, RUNS, BLOCK_G, BLOCK_O
                )


def _launch(weights: Sequence[torch.Tensor], index: torch.Tensor, dim: int, group: int) -> list[torch.Tensor]:
    first = weights[0]
    views = [w.unsqueeze(1) if w.dim() == 1 else w for w in weights]
    n_gather = index.numel() * group
    shape = list(first.shape)
    shape[dim] = n_gather
    outs = [empty(shape, dtype=first.dtype, device=first.device) for _ in weights]
    out_views = [o.unsqueeze(1) if o.dim() == 1 else o for o in outs]
    keep_axis = 1 - dim
    n_keep = views[0].shape[keep_axis]
    if n_gather == 0 or n_keep == 0:
        return outs
    on_gpu = first.device.type == "cuda"
    block_g, block_o = (_GPU_BLOCKS if on_gpu else _INTERP_BLOCKS)["rows" if dim == 0 else "cols"]
    args = []
    for i in range(_MAX_TENSORS):
        j = min(i, len(weights) - 1)  # unused slots repeat a real tensor; NUM_TENSORS skips them
        args += [views[j], out_views[j], views[j].stride(dim), views[j].stride(keep_axis)]
    grid = (triton.cdiv(n_gather, block_g), triton.cdiv(n_keep, block_o), len(weights))
    runs = group % block_g == 0
    with torch.cuda.device(first.device) if on_gpu else contextlib.nullcontext():
        _gather_kernel[grid](
            index,
            group,
            n_gather,
            n_keep,
            out_views[0].stride(dim),
            out_views[0].stride(keep_axis),
            *args,
            NUM_TENSORS=len(weights),
            RUNS=runs,
            BLOCK_G=block_g,
            BLOCK_O=block_o,
        )
    return outs


# --------------------------------------------------------------------------------------------------
# Implementations behind the torch.library ops (see ops.py) and the public launchers
# --------------------------------------------------------------------------------------------------


def _compact_impl(weight, index, dim, group_size) -> torch.Tensor:
    weight, index = _check_compact(weight, index, dim, group_size, "index" if group_size == 1 else "keep")
    if backend(weight) == "torch":
        return weight.index_select(dim, _expand(index, group_size)).contiguous()
    return _launch([weight], index, dim, group_size)[0]


def _compact_many_impl(weights, index, dim, group_size) -> list[torch.Tensor]:
    weights, index = _check_many(weights, index, dim, group_size)
    if backend(weights[0]) == "torch":
        rows = _expand(index, group_size)
        return [w.index_select(dim, rows).contiguous() for w in weights]
    return _launch(weights, index, dim, group_size)


def compact(weight: torch.Tensor, index: torch.Tensor, *, dim: int) -> torch.Tensor:
    """Gather the rows (``dim=0``) or columns (``dim=1``) listed by ``index`` into a new tensor.

    Args:
        weight: a 2-D tensor of any dtype, or a 1-D one (a bias) with ``dim=0``; any strided view.
        index: 1-D int32 or int64, strictly increasing, every value in ``[0, weight.shape[dim])``;
            moved to ``weight``'s device if it lives elsewhere.

    Returns:
        A new contiguous tensor of ``weight``'s dtype, bit-identical to
        ``weight.index_select(dim, index)``.

    Raises:
        ValueError: for a non-increasing or out-of-range index, or a bad ``dim``.
    """
    _check_metadata(weight, index, "index")
    return torch.ops.nirvana.compact(weight, index, dim, 1)


def compact_groups(weight: torch.Tensor, keep: torch.Tensor, *, group_size: int, dim: int) -> torch.Tensor:
    """Keep whole groups of ``group_size`` consecutive rows or columns (heads, say).

    Args:
        weight: 2-D (or 1-D with ``dim=0``), any dtype, any strided view; ``group_size`` must
            divide ``weight.shape[dim]``.
        keep: 1-D int32 or int64 group numbers, strictly increasing, in
            ``[0, weight.shape[dim] // group_size)``.

    Returns:
        A new contiguous tensor of ``weight``'s dtype with ``len(keep) * group_size`` rows or
        columns, bit-identical to the matching ``index_select``.
    """
    _check_metadata(weight, keep, "keep")
    return torch.ops.nirvana.compact(weight, keep, dim, group_size)


def compact_many(
    weights: Sequence[torch.Tensor], index: torch.Tensor, *, dim: int, group_size: int = 1
) -> list[torch.Tensor]:
    """Compact up to four same-shaped tensors that share one index, in a single launch.

    Meant for k and v rows of the same KV heads, or gate and up rows of the same MLP channels.
    The tensors must share shape, dtype and device; their strides may differ. ``index`` lists
    groups of ``group_size`` (1 for plain rows or columns), as in :func:`compact_groups`.

    Returns:
        A list of new contiguous tensors, each bit-identical to its ``index_select``.
    """
    if not isinstance(weights, (tuple, list)) or not weights:
        raise ValueError(f"weights: expected a non-empty list of tensors, got {weights!r:.80}")
    for i, w in enumerate(weights):
        _check_metadata(w, index, "index", f"weights[{i}]")
    return torch.ops.nirvana.compact_many(list(weights), index, dim, group_size)
