"""``magnitude``: ``sum |W|`` over the unit's weights (and q/k/v bias entries); no data."""

from __future__ import annotations

from ..saliency import Scores, compute_scores
from .base import WEIGHTS_ONLY, Method


class Magnitude(Method):
    """:func:`nirvana.saliency.compute_scores` with ``saliency="magnitude"``: the weights alone."""

    name = "magnitude"
    needs = WEIGHTS_ONLY

    def scores(self, model, windows, *, micro_batch_size=8, seed=0, progress=True, stats=None, **settings) -> Scores:
        """``sum |W|`` per unit; ``windows`` may be None."""
        self.check_settings(settings)
        scores = compute_scores(
            model,
            windows,
            objective="maxlogit",
            saliency="magnitude",
            micro_batch_size=micro_batch_size,
            progress=progress,
            seed=int(seed),
        )
        scores.meta["method"] = self.name
        return scores


METHOD = Magnitude()

__all__ = ["METHOD", "Magnitude"]
