"""Hand references the scoring tests share: tiny calibration windows, the objectives written the way a
reader of the paper would write them, and float64 gradients from one plain ``backward()``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nirvana.adapters import get_adapter
from nirvana.sources.gradients import prunable_parameters

from .tiny_models import tiny_batch

N_WINDOWS, SEQ = 5, 12


def windows(seed: int = 0) -> torch.Tensor:
    return tiny_batch(N_WINDOWS, SEQ, seed=seed)


def flat_params(model) -> list[torch.nn.Parameter]:
    return [p for layer in get_adapter(model).layers(model) for part in prunable_parameters(layer) for p in part]


# --------------------------------------------------------------------------------------------------
# Hand references: the objectives through the model's own forward, and scores grouped by hand
# --------------------------------------------------------------------------------------------------


def hand_objective(model, ids: torch.Tensor, objective: str) -> torch.Tensor:
    """The objective from ``model(ids).logits``, the way a reader of the paper would write it."""
    logits = model(ids).logits  # [B, T, V], soft-capped by the model itself where it does that
    if objective == "maxlogit":
        return logits.max(dim=1).values.mean()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def naive_grads(model, ids: torch.Tensor, objective: str) -> list[torch.Tensor]:
    """float64 gradients of the prunable weights from one plain full-batch ``backward()``."""
    params = flat_params(model)
    model.zero_grad(set_to_none=True)
    hand_objective(model, ids, objective).backward()
    grads = [p.grad.detach().double().clone() for p in params]
    model.zero_grad(set_to_none=True)
    return grads
