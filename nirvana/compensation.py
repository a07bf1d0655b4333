"""Which compensation ``nirvana prune`` runs on the dense model before compaction: the method's own, or
FLAP's bias compensation asked for with ``--compensate bias`` for any method.

Kept apart from ``prune()`` so that the flow has no method-specific branch: it asks
:func:`compensation_for` (one process) or :func:`sharded_compensation_for` (``--distributed fsdp``) what to
run, and :func:`needs_statistics` whether to gather activation statistics for it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .methods import NEEDS_ACTIVATIONS as _COMPENSATING
from .methods.base import Method
from .methods.flap import METHOD as FLAP
from .methods.flap import apply_flap_compensation
from .plan import PruningPlan

# ``--compensate`` values. "bias": fold the calibration mean of the removed inputs into the o_proj and
# down_proj biases (nirvana.methods.flap.apply_flap_compensation), from activation statistics.
COMPENSATIONS = ("bias",)

Compensation = Callable[[nn.Module, PruningPlan, object], nn.Module]


def check_compensate(compensate, *, method: Method, distributed: str | None, scores: str | None) -> None:
    """A one-line ValueError unless ``compensate`` (None or one of :data:`COMPENSATIONS`) runs with these settings.

    ``--scores`` re-plans without calibration windows, so there are no activation statistics to compensate
    from; under ``--distributed`` only the methods whose statistics the ranks gather anyway (those that score
    from statistics) get the sharded bias compensation.
    """
    if compensate is None:
        return
    if compensate not in COMPENSATIONS:
        raise ValueError(f"compensate: must be one of {', '.join(COMPENSATIONS)} (or None), got {compensate!r}")
    if scores is not None:
        raise ValueError(
            f"compensate: {compensate!r} needs the calibration set's activation statistics, which --scores "
            "does not gather; drop --scores or --compensate"
        )
    if distributed is not None and not method.uses_statistics:
        raise ValueError(
            f"compensate: {compensate!r} under --distributed needs activation statistics that the ranks gather "
            f"only for methods scoring from them (wanda-sp, flap), not for {method.name!r}; prune on one process"
        )


def check_model(compensate, model: nn.Module) -> None:
    """A one-line ValueError if ``compensate`` cannot be applied to ``model`` (an encoder-decoder)."""
    if compensate is not None and getattr(model.config, "is_encoder_decoder", False):
        why = FLAP.encoder_decoder_refusal
        raise ValueError(f"compensate: {compensate!r} does not work on encoder-decoders: {why}")


def compensation_for(method: Method, compensate: str | None) -> Compensation | None:
    """What to run as ``f(dense_model, plan, stats) -> model`` before compaction, or None for nothing.

    A method that compensates (FLAP) runs its own compensation, which for FLAP is the bias compensation
    itself: ``--compensate bias`` changes nothing there. Any other method gets
    :func:`~nirvana.methods.flap.apply_flap_compensation` with ``compensate="bias"``.
    """
    if method.compensates:
        return method.compensate
    if compensate == "bias":
        return apply_flap_compensation
    return None


def needs_statistics(method: Method, compensate: str | None) -> bool:
    """Whether the run must keep activation statistics of each calibration set for its compensation."""
    return compensation_for(method, compensate) is not None


def sharded_compensation_for(method: Method, compensate: str | None):
    """Under ``--distributed fsdp``: ``f(sharded, plan, stats) -> {bias name: float64 tensor}`` (collective), or None.

    The bias compensation on the shards is :func:`nirvana.distributed.flap_biases_on_ranks`, whichever
    method scored (:func:`check_compensate` has refused the methods whose statistics the ranks lack).
    """
    from .distributed import SHARDED_COMPENSATIONS

    if method.compensates:
        return SHARDED_COMPENSATIONS.get(method.name)
    if compensate == "bias":
        return SHARDED_COMPENSATIONS[FLAP.name]
    return None


# Beside plan.json in a pruned folder: the calibration means a compensated plan's biases fold in, so that
# ``nirvana apply`` recomputes the same biases from the dense checkpoint (float64 [L, hidden] inputs of
# o_proj, [L, intermediate] inputs of down_proj; 23.6 MB for a 70B Llama).
MEANS_FILE = "compensation.safetensors"


def plan_compensates(plan: PruningPlan) -> bool:
    """Whether ``plan`` was made with a bias compensation (FLAP's own, or ``--compensate bias``)."""
    method = plan.meta.get("method")
    own = isinstance(method, str) and method in _COMPENSATING
    return own or plan.meta.get("compensate") is not None


def save_means(stats, path: Path) -> Path:
    """Write the means :func:`~nirvana.methods.flap.apply_flap_compensation` reads from ``stats`` (ActivationStats)."""
    from safetensors.torch import save_file

    means = {"o": stats.mean("o").contiguous(), "down": stats.mean("down").contiguous()}
    save_file(means, path, metadata={"format": "nirvana-compensation", "tokens": str(int(stats.tokens))})
    return path


def load_means(path: Path, plan: PruningPlan) -> dict[str, torch.Tensor]:
    """The means :func:`save_means` wrote, checked against ``plan``'s geometry; one-line ValueErrors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    g = plan.geometry
    try:
        means = load_file(path)
    except (OSError, SafetensorError) as e:
        raise ValueError(f"compensation: cannot read {str(path)!r}: {e}") from None
    want = {"o": (g.num_layers, g.num_heads * g.head_dim), "down": (g.num_layers, g.intermediate_size)}
    for name, shape in want.items():
        t = means.get(name)
        if t is None or tuple(t.shape) != shape or t.dtype != torch.float64:
            got = None if t is None else (tuple(t.shape), str(t.dtype))
            raise ValueError(f"compensation: {str(path)!r} must hold float64 {name!r} of shape {shape}, got {got}")
    return means


def streamed_biases(meta: nn.Module, plan: PruningPlan, means: dict, read) -> dict[str, torch.Tensor]:
    """The compensated o_proj / down_proj biases (float64, by parameter name) of ``plan``, reading the dense
    weights one tensor at a time with ``read(name) -> tensor or None`` (None: no such tensor, a bias the model
    lacks); ``meta`` is the dense model on the meta device. Equal, bit for bit, to the in-memory compensation."""
    from .adapters import get_adapter
    from .compaction import pruned_indices
    from .methods.flap import compensated_bias

    g = plan.geometry
    names = {id(m): name for name, m in meta.named_modules()}
    out = {}
    for i, (lm, lp) in enumerate(zip(get_adapter(meta).layers(meta), plan.layers)):
        for linear, kept, total, width, mean in (
            (lm.o, lp.kv_groups_kept, g.num_kv_heads, g.group_size * g.head_dim, means["o"][i]),
            (lm.down, lp.mlp_channels_kept, g.intermediate_size, 1, means["down"][i]),
        ):
            name = names[id(linear)]
            weight = read(f"{name}.weight")
            out[f"{name}.bias"] = compensated_bias(
                weight, read(f"{name}.bias"), pruned_indices(kept, total, width), mean
            )
            del weight
    return out


__all__ = [
    "COMPENSATIONS",
    "MEANS_FILE",
    "Compensation",
    "check_compensate",
    "check_model",
    "compensation_for",
    "load_means",
    "needs_statistics",
    "plan_compensates",
    "save_means",
    "sharded_compensation_for",
    "streamed_biases",
]
