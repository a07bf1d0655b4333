"""``random``: uniform [0, 1) scores from ``seed``; no data."""

from __future__ import annotations

from .base import WeightsOnly


class Random(WeightsOnly):
    """:func:`nirvana.saliency.compute_scores` with ``saliency="random"``."""

    name = "random"
    saliency = "random"
    # As LLM-Pruner runs its random baseline: the same share of every layer.
    allocation = "uniform"


METHOD = Random()

__all__ = ["METHOD", "Random"]
