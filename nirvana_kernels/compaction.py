"""Compaction: gather the kept rows or columns (or whole groups of them) into new compact tensors.

One tiled 2-D gather serves rows and columns alike: its tile is always [rows, columns] of the
output (contiguous), a mode flag says which axis is gathered, and the source comes with both its
strides, so any strided view works. Output position ``i`` along the gathered axis reads source
position ``index[i // group] * group + i % group``, which is how whole heads are kept without
materialising an expanded index. A bias is gathered as a one-row matrix. One launch fills every output that shares
an index (k and v rows of the same heads, gate and up rows of the same channels): the kernel takes
tuples of source and output pointers, and a third grid axis picks the part.

Index values (order, range) are checked where that is free: on the host, for a CPU index, which is
then copied to the GPU without blocking. A CUDA index costs one synchronisation to check, so the
pruning flow, which builds its indices from a validated plan, passes ``check_index=False`` and
launches without any.

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
# side of the tile is always the output's contiguous axis (columns). A bias is one row: its tile is
# at most BLOCK_G long (8 elements a thread with 4 warps).
_GPU_BLOCKS = {"rows": (16, 256), "cols": (128, 32), "bias": (1024, 1)}
_INTERP_BLOCKS = {"rows": (8, 32), "cols": (32, 8), "bias": (16, 1)}
_MAX_TENSORS = 4  # what compact_many promises; the kernel takes a tuple of any length


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


def _check_compact(weight, index, dim, group_size, index_name, check_index=True):
    _checks.tensor("weight", weight, ndim=(1, 2), floating=False)
    dim = _checks.dim(dim)
    if weight.dim() == 1 and dim != 0:
        raise ValueError(f"dim: a 1-D tensor (a bias) can only be compacted along dim 0, got {dim}")
    _checks.positive_int("group_size", group_size)
    extent = weight.shape[dim]
    _checks.divides("group_size", group_size, f"weight.shape[{dim}]", extent)
    what = f"weight.shape[{dim}]" if group_size == 1 else f"the number of groups (weight.shape[{dim}] / {group_size})"
    index = _checks.index(
        index_name, index, extent=extent // group_size, extent_name=what, device=weight.device, check_values=check_index
    )
    return weight, index


def _check_metadata(weight, index, index_name, weight_name="weight") -> None:
    # Type checks up front, so a wrong type gets a ValueError rather than the op schema's cast error;
    # the value checks (order, range) run inside the op, where the data is at hand.
    _checks.tensor(weight_name, weight, ndim=(1, 2), floating=False)
    if not isinstance(index, torch.Tensor):
        raise ValueError(f"{index_name}: expected a torch.Tensor, got {type(index).__name__}")


def _check_many(weights, index, dim, group_size, check_index=True):
    if not isinstance(weights, (tuple, list)) or not weights:
        raise ValueError(f"weights: expected a non-empty list of tensors, got {weights!r:.80}")
    if len(weights) > _MAX_TENSORS:
        raise ValueError(f"weights: at most {_MAX_TENSORS} tensors share one launch, got {len(weights)}")
    first = weights[0]
    _checks.tensor("weights[0]", first, ndim=(1, 2), floating=False)
    for i, w in enumerate(weights[1:], start=1):
        _checks.tensor(f"weights[{i}]", w, ndim=(1, 2), floating=False)
        _checks.same(f"weights[{i}]", w, "weights[0]", first)
    _, index = _check_compact(first, index, dim, group_size, "index", check_index)
    return list(weights), index


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _gather_kernel(
        index_ptr,  # [n_index] int32 or int64: kept units (groups of `group`), strictly increasing
        src_ptrs,  # P x [n_src_rows, n_src_cols] any dtype, any strides (a bias comes as [1, n])
        src_row_strides,  # P ints, in elements
        src_col_strides,  # P ints, in elements
        out_ptrs,  # P x [n_rows, n_cols] contiguous, the source dtype
        n_rows,
        n_cols,
        group,  # output position i on the gathered axis reads index[i // group] * group + i % group
        GATHER_COLS: tl.constexpr,  # gather columns (else rows); the other axis is kept whole
        RUNS: tl.constexpr,  # group is a multiple of the gathered block: each tile reads one run
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # The tile is always [rows, columns] of the output. Axis 1 is where Triton puts a warp's
        # lanes when no axis of a load is known to be contiguous, and the output's contiguous axis,
        # so the stores are wide whichever axis is gathered; and a column gather then has its lanes
        # on neighbouring kept columns (sorted, mostly in runs) instead of 32 rows a row apart.
        part = tl.program_id(2)
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_r = rows < n_rows
        mask_c = cols < n_cols
        if GATHER_COLS:
            kept = tl.load(index_ptr + cols // group, mask=mask_c, other=0).to(tl.int64)
            src_cols = kept * group + cols % group
            if RUNS:
                # Honest: a tile then lies inside one group, and starts at a multiple of BLOCK_C.
                src_cols = tl.max_contiguous(tl.multiple_of(src_cols, BLOCK_C), BLOCK_C)
            src_rows = rows
        else:
            kept = tl.load(index_ptr + rows // group, mask=mask_r, other=0).to(tl.int64)
            src_rows = kept * group + rows % group
            if RUNS:
                src_rows = tl.max_contiguous(tl.multiple_of(src_rows, BLOCK_R), BLOCK_R)
            src_cols = cols
        mask = mask_r[:, None] & mask_c[None, :]
        out_offsets = rows[:, None] * n_cols + cols[None, :]
        for i in tl.static_range(len(src_ptrs)):
            if part == i:
                src = src_ptrs[i] + src_rows[:, None] * src_row_strides[i] + src_cols[None, :] * src_col_strides[i]
                tl.store(out_ptrs[i] + out_offsets, tl.load(src, mask=mask), mask=mask)


def _launch(weights: Sequence[torch.Tensor], index: torch.Tensor, dim: int, group: int) -> list[torch.Tensor]:
    first = weights[0]
    shape = list(first.shape)
    shape[dim] = index.numel() * group
    outs = [empty(shape, dtype=first.dtype, device=first.device) for _ in weights]
    if first.dim() == 1:
        # A bias is a one-row matrix gathered along its columns, so its lanes run along its length.
        srcs, out_views, gather_cols = [w.unsqueeze(0) for w in weights], [o.unsqueeze(0) for o in outs], True
    else:
        srcs, out_views, gather_cols = list(weights), outs, dim == 1
    n_rows, n_cols = out_views[0].shape
    if n_rows == 0 or n_cols == 0:
        return outs
    on_gpu = first.device.type == "cuda"
    kind = "bias" if first.dim() == 1 else "cols" if gather_cols else "rows"
    block_g, block_o = (_GPU_BLOCKS if on_gpu else _INTERP_BLOCKS)[kind]
    block_r, block_c = (block_o, block_g) if gather_cols else (block_g, block_o)
    if kind == "bias":  # no longer than the bias
        block_c = min(triton.next_power_of_2(n_cols), block_c)
    block_gathered = block_c if gather_cols else block_r
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, block_c), len(weights))
    with torch.cuda.device(first.device) if on_gpu else contextlib.nullcontext():
        _gather_kernel[grid](
            index,
            tuple(srcs),
            tuple(s.stride(0) for s in srcs),
            tuple(s.stride(1) for s in srcs),
            tuple(out_views),
            n_rows,
            n_cols,
            group,
            GATHER_COLS=gather_cols,
            RUNS=group % block_gathered == 0,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
        )
    return outs


# --------------------------------------------------------------------------------------------------
# Implementations behind the torch.library ops (see ops.py) and the public launchers
# --------------------------------------------------------------------------------------------------


def _compact_impl(weight, index, dim, group_size, check_index=True) -> torch.Tensor:
    name = "index" if group_size == 1 else "keep"
    weight, index = _check_compact(weight, index, dim, group_size, name, check_index)
    if backend(weight) == "torch":
        return weight.index_select(dim, _expand(index, group_size)).contiguous()
    return _launch([weight], index, dim, group_size)[0]


def _compact_many_impl(weights, index, dim, group_size, check_index=True) -> list[torch.Tensor]:
    weights, index = _check_many(weights, index, dim, group_size, check_index)
    if backend(weights[0]) == "torch":
        rows = _expand(index, group_size)
        return [w.index_select(dim, rows).contiguous() for w in weights]
    return _launch(weights, index, dim, group_size)


def compact(weight: torch.Tensor, index: torch.Tensor, *, dim: int, check_index: bool = True) -> torch.Tensor:
    """Gather the rows (``dim=0``) or columns (``dim=1``) listed by ``index`` into a new tensor.

    Args:
        weight: a 2-D tensor of any dtype, or a 1-D one (a bias) with ``dim=0``; any strided view.
        index: 1-D int32 or int64, strictly increasing, every value in ``[0, weight.shape[dim])``;
            moved to ``weight``'s device if it lives elsewhere (from the CPU without blocking).
        check_index: check the order and range of ``index``. Free for a CPU index; a CUDA index
            costs one host synchronisation. Pass ``False`` only for an index built from data
            already validated (as the pruning flow does with its plan): nothing is then read back
            from the device, and a bad index silently gives a wrong result.

    Returns:
        A new contiguous tensor of ``weight``'s dtype, bit-identical to
        ``weight.index_select(dim, index)``.

    Raises:
        ValueError: for a non-increasing or out-of-range index (unless ``check_index=False``), an
            index of the wrong type, rank or dtype, or a bad ``dim``.
    """
    _check_metadata(weight, index, "index")
    return torch.ops.nirvana.compact(weight, index, dim, 1, check_index)


def compact_groups(
    weight: torch.Tensor, keep: torch.Tensor, *, group_size: int, dim: int, check_index: bool = True
) -> torch.Tensor:
    """Keep whole groups of ``group_size`` consecutive rows or columns (heads, say).

    Args:
        weight: 2-D (or 1-D with ``dim=0``), any dtype, any strided view; ``group_size`` must
            divide ``weight.shape[dim]``.
        keep: 1-D int32 or int64 group numbers, strictly increasing, in
            ``[0, weight.shape[dim] // group_size)``.
        check_index: as in :func:`compact`.

    Returns:
        A new contiguous tensor of ``weight``'s dtype with ``len(keep) * group_size`` rows or
        columns, bit-identical to the matching ``index_select``.
    """
    _check_metadata(weight, keep, "keep")
    return torch.ops.nirvana.compact(weight, keep, dim, group_size, check_index)


def compact_many(
    weights: Sequence[torch.Tensor], index: torch.Tensor, *, dim: int, group_size: int = 1, check_index: bool = True
) -> list[torch.Tensor]:
    """Compact up to four same-shaped tensors that share one index, in a single launch.

    Meant for k and v rows of the same KV heads, or gate and up rows of the same MLP channels.
    The tensors must share shape, dtype and device; their strides may differ. ``index`` lists
    groups of ``group_size`` (1 for plain rows or columns), as in :func:`compact_groups`;
    ``check_index`` is as in :func:`compact`. (The kernel itself takes any number of tensors;
    four is this function's promise.)

    Returns:
        A list of new contiguous tensors, each bit-identical to its ``index_select``.
    """
    if not isinstance(weights, (tuple, list)) or not weights:
        raise ValueError(f"weights: expected a non-empty list of tensors, got {weights!r:.80}")
    for i, w in enumerate(weights):
        _check_metadata(w, index, "index", f"weights[{i}]")
    return torch.ops.nirvana.compact_many(list(weights), index, dim, group_size, check_index)
