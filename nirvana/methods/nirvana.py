"""``nirvana``: :func:`nirvana.saliency.compute_scores`, by default the max-logit objective with Taylor saliency.

``sum |W * G|`` over the unit, ``G`` the gradient of the objective summed over all windows; ``prune``
passes its ``objective`` and ``saliency`` settings (``--saliency adam`` scales by Adam's second moment:
the mean squared micro-batch gradient, or with ``adam_steps`` an AdamW's ``exp_avg_sq`` after that many
steps at learning rate 0 on the calibration windows). ``window_weight`` and ``trim`` aggregate the windows'
gradients robustly (:func:`nirvana.sources.gradients.accumulate_gradients`).
"""

from __future__ import annotations

from ..adapters import get_adapter
from ..saliency import compute_scores, scored_blocks
from ..scores import Scores
from ..sources.gradients import adam_state_from_steps
from .base import GRADIENTS, Method


class Nirvana(Method):
    """NIRVANA's own scores: the gradient of one objective over all calibration windows."""

    name = "nirvana"
    needs = GRADIENTS
    settings = ("objective", "saliency", "adam_steps", "window_weight", "trim")
    allocation = "global"
    # Layer 0 kept whole: the published recipe prunes one or two of its KV groups in most calibration draws, and
    # those draws are its worst (benchmarks/results/quality-smollm2-variance.md); --recipe paper gives 0.
    protect_layers = 1
    # 32 windows of 512 tokens: with layer 0 whole, lower perplexity than 32 x 128 in 29 of 30 paired draws
    # (-16% on average, at 4.4x the scoring time), where 128 windows of 128 tokens, the same text, gain
    # nothing (benchmarks/results/quality-smollm2-variance.md); --recipe paper gives 128.
    seq_len = 512
    # The mean of 4 calibration draws' scores: with the two above, the only variant of the study whose seed
    # spread is within +-5 at every sparsity and text (mean perplexity 103.6 at +-4.8 worst, against 107.9 at
    # +-9.9 with one draw; benchmarks/results/quality-smollm2-variance.md), at 4x the scoring; --recipe paper
    # gives 1.
    draws = 4

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
        adam_steps=0,
        window_weight="none",
        trim=0.0,
        **settings,
    ) -> Scores:
        """:func:`nirvana.saliency.compute_scores` with ``objective`` and ``saliency``."""
        self.check_settings(settings)
        optimizer = None
        if adam_steps:
            if saliency != "adam":
                raise ValueError(f"adam_steps: only used with saliency='adam', got saliency={saliency!r}")
            params = [p for _, block in scored_blocks(get_adapter(model).layers(model)) for p in block]
            # The training loss, as an optimizer's state would have come from training on this text.
            optimizer = adam_state_from_steps(
                model, windows, params, steps=adam_steps, micro_batch_size=micro_batch_size, progress=progress
            )
        scores = compute_scores(
            model,
            windows,
            objective=objective,
            saliency=saliency,
            micro_batch_size=micro_batch_size,
            optimizer=optimizer,
            progress=progress,
            seed=int(seed),
            window_weight=window_weight,
            trim=trim,
        )
        if adam_steps:
            scores.meta["adam_steps"] = adam_steps
        scores.meta["method"] = self.name
        return scores


METHOD = Nirvana()

__all__ = ["METHOD", "Nirvana"]
