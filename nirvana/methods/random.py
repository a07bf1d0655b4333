"""``random``: uniform [0, 1) scores from ``seed``; no data."""

from __future__ import annotations

from ..saliency import Scores, compute_scores
from .base import WEIGHTS_ONLY, Method


class Random(Method):
    """:func:`nirvana.saliency.compute_scores` with ``saliency="random"``: no data, only ``seed``."""

    name = "random"
    needs = WEIGHTS_ONLY

    def scores(self, model, windows, *, micro_batch_size=8, seed=0, progress=True, stats=None, **settings) -> Scores:
        """Uniform [0, 1) scores from ``seed``; ``windows`` may be None."""
        self.check_settings(settings)
        scores = compute_scores(
            model,
            windows,
            objective="maxlogit",
            saliency="random",
            micro_batch_size=micro_batch_size,
            progress=progress,
            seed=int(seed),
        )
        scores.meta["method"] = self.name
        return scores


METHOD = Random()

__all__ = ["METHOD", "Random"]
