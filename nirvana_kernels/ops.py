"""``torch.library`` registrations (namespace ``nirvana``), so the kernels work under torch.compile.

Each op has a fake implementation that only computes the output's shape, dtype and device; the
real implementation dispatches to Triton or the PyTorch reference. The saliency op checks nothing:
the public launchers (``nirvana_kernels.saliency``) check and orient its parts once per call. The
compaction ops check their index (its values too, unless ``check_index=False``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import compaction as _compaction
from . import saliency as _saliency
from ._checks import dim as _check_dim


@torch.library.custom_op("nirvana::grouped_saliency", mutates_args=())
def grouped_saliency_op(
    weights: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avg_sq: Sequence[torch.Tensor],
    group_sizes: Sequence[int],
    groups: int,
    eps: float,
) -> torch.Tensor:
    """The one op behind all three saliency launchers: each part is a [N, K] view reduced over K,
    ``group_sizes[i]`` consecutive outputs of part i adding into each of ``groups`` groups.
    ``exp_avg_sq`` is empty for plain ``|W * G|`` scores, else one tensor per part.

    The public launchers check and orient the parts; this op trusts them, so it checks nothing.
    """
    return _saliency._parts_impl(weights, grads, exp_avg_sq, group_sizes, groups, eps)


@grouped_saliency_op.register_fake
def _(weights, grads, exp_avg_sq, group_sizes, groups, eps):
    return weights[0].new_empty(groups, dtype=torch.float32)


@torch.library.custom_op("nirvana::compact", mutates_args=())
def compact_op(
    weight: torch.Tensor, index: torch.Tensor, dim: int, group_size: int, check_index: bool = True
) -> torch.Tensor:
    return _compaction._compact_impl(weight, index, dim, group_size, check_index)


def _compact_shape(weight, index, dim, group_size):
    dim = _check_dim(dim)
    shape = list(weight.shape)
    shape[dim] = index.shape[0] * group_size
    return shape


@compact_op.register_fake
def _(weight, index, dim, group_size, check_index=True):
    return weight.new_empty(_compact_shape(weight, index, dim, group_size))


@torch.library.custom_op("nirvana::compact_many", mutates_args=())
def compact_many_op(
    weights: Sequence[torch.Tensor], index: torch.Tensor, dim: int, group_size: int, check_index: bool = True
) -> list[torch.Tensor]:
    return _compaction._compact_many_impl(weights, index, dim, group_size, check_index)


@compact_many_op.register_fake
def _(weights, index, dim, group_size, check_index=True):
    return [w.new_empty(_compact_shape(w, index, dim, group_size)) for w in weights]
