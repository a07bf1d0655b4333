"""``nirvana``: :func:`nirvana.saliency.compute_scores`, by default the max-logit objective with Taylor saliency.

``sum |W * G|`` over the unit, ``G`` the gradient of the objective summed over all windows; ``prune``
passes its ``objective`` and ``saliency`` settings (``--saliency adam`` scales by Adam's second moment).
"""

from __future__ import annotations

from ..saliency import compute_scores
from ..scores import Scores
from .base import GRADIENTS, Method


class Nirvana(Method):
    """NIRVANA's own scores: the gradient of one objective over all calibration windows."""

    name = "nirvana"
    needs = GRADIENTS
    settings = ("objective", "saliency")
    allocation = "global"

    def scores(
        self,
        model,
        windows,
        *,
        micro_batch_size=8,
        seed=0,
        progress=True,
        stats=None,
        objective="maxlogit",
        saliency="taylor",
        **settings,
    ) -> Scores:
        """:func:`nirvana.saliency.compute_scores` with ``objective`` and ``saliency``."""
        self.check_settings(settings)
        scores = compute_scores(
            model,
            windows,
            objective=objective,
            saliency=saliency,
            micro_batch_size=micro_batch_size,
            progress=progress,
            seed=int(seed),
        )
        scores.meta["method"] = self.name
        return scores


METHOD = Nirvana()

__all__ = ["METHOD", "Nirvana"]
