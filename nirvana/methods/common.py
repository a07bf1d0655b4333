"""What every scorer shares: the scores' metadata, and grouping per-row and per-column contributions into units.

A KV group ``j`` owns q rows and o_proj columns ``Q_j = [j*G*d, (j+1)*G*d)`` and k/v rows ``K_j = [j*d,
(j+1)*d)``; an MLP channel ``c`` owns row ``c`` of gate/up and column ``c`` of down (see :mod:`nirvana.methods`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import architecture_names
from ..plan import Geometry
from ..scores import Scores, stack_scores


def base_meta(model: nn.Module, method: str) -> dict:
    """The metadata every method's scores start from: method, architecture, model dtype."""
    names = ", ".join(architecture_names(model))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return {"method": method, "architecture": names, "model_dtype": dtype}


# --------------------------------------------------------------------------------------------------
# Grouping per-row / per-column contributions into units
# --------------------------------------------------------------------------------------------------


def group_attention(g: Geometry, q_rows, k_rows, v_rows, o_cols) -> torch.Tensor:
    """float64 ``[num_kv_heads]``: each KV group's total of the given per-row (q, k, v) and per-column
    (o) contributions, each a 1-D tensor (``None`` for a part that contributes nothing)."""
    h, d, qd = g.num_kv_heads, g.head_dim, g.group_size * g.head_dim
    total = torch.zeros(h, dtype=torch.float64)
    for part, width in ((q_rows, qd), (k_rows, d), (v_rows, d), (o_cols, qd)):
        if part is not None:
            total += part.detach().to("cpu", torch.float64).view(h, width).sum(dim=1)
    return total


def group_mlp(up_rows, down_cols, gate_rows) -> torch.Tensor:
    """float64 ``[intermediate_size]``: each channel's up/gate row plus down column contribution."""
    total = up_rows.detach().to("cpu", torch.float64) + down_cols.detach().to("cpu", torch.float64)
    if gate_rows is not None:
        total += gate_rows.detach().to("cpu", torch.float64)
    return total


def finish(att_rows, mlp_rows, geometry: Geometry, meta: dict) -> Scores:
    """Per-layer rows stacked into float32 :class:`Scores`; a ValueError naming the first layer with a
    non-finite score."""
    return stack_scores(att_rows, mlp_rows, geometry, meta, inputs="weights or activations")


def with_window_meta(scores: Scores, windows: torch.Tensor, micro_batch_size: int) -> Scores:
    """``scores`` with the micro-batch size and window shape its statistics came from in ``meta``."""
    scores.meta |= {
        "micro_batch_size": micro_batch_size,
        "num_windows": int(windows.shape[0]),
        "window_length": int(windows.shape[1]),
    }
    return scores


__all__ = ["base_meta", "finish", "group_attention", "group_mlp", "with_window_meta"]
