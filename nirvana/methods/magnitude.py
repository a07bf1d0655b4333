"""``magnitude``: ``sum |W|`` over the unit's weights (and q/k/v bias entries); no data."""

from __future__ import annotations

from .base import WeightsOnly


class Magnitude(WeightsOnly):
    """:func:`nirvana.saliency.compute_scores` with ``saliency="magnitude"``."""

    name = "magnitude"
    saliency = "magnitude"
    # As LLM-Pruner runs its magnitude baseline: the same share of every layer.
    allocation = "uniform"


METHOD = Magnitude()

__all__ = ["METHOD", "Magnitude"]
