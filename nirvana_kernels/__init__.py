"""Fused Triton kernels for structured pruning, each with a PyTorch reference.

Saliency ops return float32 scores on the input's device; compaction ops return new contiguous
tensors bit-identical to ``index_select``. ``backend(t)`` tells which path a tensor takes.
"""

from . import ops as _ops  # noqa: F401  (registers the torch.library ops the launchers call)
from ._dispatch import backend
from .compaction import compact, compact_groups, compact_groups_torch, compact_many, compact_many_torch, compact_torch
from .saliency import (
    attention_group_saliency,
    attention_group_saliency_torch,
    mlp_channel_saliency,
    mlp_channel_saliency_torch,
    saliency,
    saliency_torch,
)

__all__ = [
    "attention_group_saliency",
    "attention_group_saliency_torch",
    "backend",
    "compact",
    "compact_groups",
    "compact_groups_torch",
    "compact_many",
    "compact_many_torch",
    "compact_torch",
    "mlp_channel_saliency",
    "mlp_channel_saliency_torch",
    "saliency",
    "saliency_torch",
]
__version__ = "0.1.0"
