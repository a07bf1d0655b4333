"""``random``: uniform [0, 1) scores from ``seed``; no data."""

from __future__ import annotations

from .base import WeightsOnly


class Random(WeightsOnly):
    """:func:`nirvana.saliency.compute_scores` with ``saliency="random"``."""

    name = "random"
    saliency = "random"


METHOD = Random()

__all__ = ["METHOD", "Random"]
