"""``torch.library`` registrations (namespace ``nirvana``), so the kernels work under torch.compile.

Each op has a fake implementation that only computes the output's shape, dtype and device; the
real implementation validates its arguments and dispatches to Triton or the PyTorch reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import compaction as _compaction
from . import saliency as _saliency
from ._checks import dim as _check_dim


@torch.library.custom_op("nirvana::saliency", mutates_args=())
def saliency_op(
    weight: torch.Tensor,
    grad: torch.Tensor,
    dim: int,
    group_size: int,
    exp_avg_sq: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    return _saliency._saliency_impl(weight, grad, dim, group_size, exp_avg_sq, eps)


@saliency_op.register_fake
def _(weight, grad, dim, group_size, exp_avg_sq, eps):
    _saliency._check_saliency(weight, grad, dim, group_size, exp_avg_sq, eps)
    n = weight.shape[0] if dim == 1 else weight.shape[1]
    return weight.new_empty(n // group_size, dtype=torch.float32)


@torch.library.custom_op("nirvana::attention_group_saliency", mutates_args=())
def attention_group_saliency_op(
    q_w: torch.Tensor,
    q_g: torch.Tensor,
    k_w: torch.Tensor,
    k_g: torch.Tensor,
    v_w: torch.Tensor,
    v_g: torch.Tensor,
    o_w: torch.Tensor,
    o_g: torch.Tensor,
    num_kv_heads: int,
    head_dim: int,
    biases: Sequence[torch.Tensor | None],
    exp_avg_sq: Sequence[torch.Tensor | None],
    eps: float,
) -> torch.Tensor:
    return _saliency._attention_impl(
        q_w, q_g, k_w, k_g, v_w, v_g, o_w, o_g, num_kv_heads, head_dim, biases, exp_avg_sq, eps
    )


@attention_group_saliency_op.register_fake
def _(q_w, q_g, k_w, k_g, v_w, v_g, o_w, o_g, num_kv_heads, head_dim, biases, exp_avg_sq, eps):
    return q_w.new_empty(num_kv_heads, dtype=torch.float32)


@torch.library.custom_op("nirvana::mlp_channel_saliency", mutates_args=())
def mlp_channel_saliency_op(
    up_w: torch.Tensor,
    up_g: torch.Tensor,
    down_w: torch.Tensor,
    down_g: torch.Tensor,
    gate_w: torch.Tensor | None,
    gate_g: torch.Tensor | None,
    exp_avg_sq: Sequence[torch.Tensor | None],
    eps: float,
) -> torch.Tensor:
    return _saliency._mlp_impl(up_w, up_g, down_w, down_g, gate_w, gate_g, exp_avg_sq, eps)


@mlp_channel_saliency_op.register_fake
def _(up_w, up_g, down_w, down_g, gate_w, gate_g, exp_avg_sq, eps):
    return up_w.new_empty(up_w.shape[0], dtype=torch.float32)


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
