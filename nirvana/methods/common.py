"""What every scorer shares: the checks, the layer walk, the hooks, and grouping contributions into units.

A KV group ``j`` owns q rows and o_proj columns ``Q_j = [j*G*d, (j+1)*G*d)`` and k/v rows ``K_j = [j*d,
(j+1)*d)``; an MLP channel ``c`` owns row ``c`` of gate/up and column ``c`` of down (see :mod:`nirvana.methods`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..adapters import LayerModules, architecture_names, get_adapter
from ..compaction import check_dense
from ..plan import Geometry
from ..saliency import Scores, check_micro_batch


def check_windows(model: nn.Module, windows, min_length: int = 1) -> torch.Tensor:
    """``windows`` as int64 ``[N, T]`` token ids; a ValueError unless they are integers inside the
    model's vocabulary with ``T >= min_length``."""
    if not isinstance(windows, torch.Tensor):
        raise ValueError(f"windows: expected a torch.Tensor of token ids, got {type(windows).__name__}")
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < min_length:
        raise ValueError(
            f"windows: expected a [N, T] tensor with N >= 1 and T >= {min_length}, got shape {tuple(windows.shape)}"
        )
    if windows.dtype.is_floating_point or windows.dtype.is_complex or windows.dtype == torch.bool:
        raise ValueError(f"windows: dtype must be an integer type, got {windows.dtype}")
    vocab = getattr(model.get_input_embeddings(), "num_embeddings", None)
    lo, hi = int(windows.min()), int(windows.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise ValueError(f"windows: token id {lo if lo < 0 else hi} is outside the vocabulary [0, {vocab})")
    return windows.long()


def dense_layers(model: nn.Module) -> tuple[Geometry, list[LayerModules]]:
    """The dense geometry and the layers; a ValueError if any layer was compacted."""
    adapter = get_adapter(model)
    geometry = check_dense(model, adapter, "scores need the dense model")
    return geometry, adapter.layers(model)


def base_meta(model: nn.Module, method: str) -> dict:
    """The metadata every method's scores start from: method, architecture, model dtype."""
    names = ", ".join(architecture_names(model))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return {"method": method, "architecture": names, "model_dtype": dtype}


@contextlib.contextmanager
def hooks() -> Iterator[list]:
    """A list to append hook handles to; every one is removed on exit, also after an error."""
    handles: list = []
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


def progress_bar(total: int, enabled: bool, desc: str):
    """A tqdm bar over ``total`` micro-batches, hidden unless ``enabled``."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="micro-batch", disable=not enabled)


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
    attention = torch.stack(att_rows).to(torch.float32)
    mlp = torch.stack(mlp_rows).to(torch.float32)
    for name, t in (("attention", attention), ("mlp", mlp)):
        bad = (~torch.isfinite(t)).any(dim=1)
        if bad.any():
            raise ValueError(
                f"scores: layer {int(bad.nonzero()[0, 0])} has non-finite {name} scores "
                "(NaN or inf in its weights or activations)"
            )
    return Scores(attention, mlp, geometry, meta)


def with_window_meta(scores: Scores, windows: torch.Tensor, micro_batch_size: int) -> Scores:
    """``scores`` with the micro-batch size and window shape its statistics came from in ``meta``."""
    scores.meta |= {
        "micro_batch_size": micro_batch_size,
        "num_windows": int(windows.shape[0]),
        "window_length": int(windows.shape[1]),
    }
    return scores


__all__ = [
    "base_meta",
    "check_micro_batch",
    "check_windows",
    "dense_layers",
    "finish",
    "group_attention",
    "group_mlp",
    "hooks",
    "progress_bar",
    "with_window_meta",
]
