"""Which compensation ``nirvana prune`` runs on the dense model before compaction: the method's own, or
FLAP's bias compensation asked for with ``--compensate bias`` for any method.

Kept apart from ``prune()`` so that the flow has no method-specific branch: it asks
:func:`compensation_for` (one process) or :func:`sharded_compensation_for` (``--distributed fsdp``) what to
run, and :func:`needs_statistics` whether to gather activation statistics for it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

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


__all__ = [
    "COMPENSATIONS",
    "Compensation",
    "check_compensate",
    "check_model",
    "compensation_for",
    "needs_statistics",
    "sharded_compensation_for",
]
