"""``taylor``: LLM-Pruner's first-order term, ``sum_s |w * dCE_s/dw|``, accumulated per window."""

from __future__ import annotations

import torch
from torch import nn

from ..scores import Scores
from ..sources.common import check_micro_batch, check_windows, dense_layers
from ..sources.gradients import prunable_parameters
from ..sources.per_window import per_window_saliency
from .base import PER_WINDOW_GRADIENTS, Method
from .common import base_meta, finish, group_attention, group_mlp


def taylor_scores(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    micro_batch_size: int = 8,
    progress: bool = True,
) -> Scores:
    """LLM-Pruner-style first-order Taylor importance, accumulated per sample.

    For every prunable weight (and q/k/v bias entry) ``w``::

        A(w) = sum_s |w * dCE_s/dw|

    where ``CE_s`` is window ``s``'s mean next-token cross-entropy over its ``T-1`` predictions, and a
    unit's score is the sum of ``A`` over the weights it owns (as for ``nirvana``'s ``|W * G|``).

    Why per sample, not ``|W * sum_s G_s|``: near a trained optimum the per-sample gradients point
    in many directions and largely cancel in their sum, so ``|W * sum G|`` measures mostly how much
    they failed to cancel; ``sum_s |W * G_s|`` measures how much each window's loss depends on the
    unit, which is the first-order estimate of the loss change from removing it, taken per window
    before averaging. It also makes the score independent of the micro-batching.

    How: :func:`nirvana.sources.per_window.per_window_saliency` with the ``"ce"`` objective, which
    takes each window's gradient in turn. Memory: one float32 copy of the prunable weights, plus the
    linear inputs of one micro-batch.
    """
    mbs = check_micro_batch(micro_batch_size)
    windows = check_windows(model, windows, 2, "taylor")
    geometry, layers = dense_layers(model)
    scored = []  # (module, has a scored bias)
    for lm in layers:
        attn_params, _ = prunable_parameters(lm)  # checks that q/k/v biases are all or none
        with_bias = len(attn_params) > 4
        scored += [(lm.q, with_bias), (lm.k, with_bias), (lm.v, with_bias), (lm.o, False)]
        scored += [(m, False) for m in (lm.up, lm.down, lm.gate) if m is not None]
    sums = per_window_saliency(
        model, windows, scored, objective="ce", micro_batch_size=mbs, progress=progress, desc="taylor"
    )
    acc_w, acc_b = sums.weights, sums.biases

    att_rows, mlp_rows = [], []
    for lm in layers:
        rows = {n: acc_w.pop(id(m)).sum(dim=1) for n, m in (("q", lm.q), ("k", lm.k), ("v", lm.v))}
        for n, m in (("q", lm.q), ("k", lm.k), ("v", lm.v)):
            if id(m) in acc_b:
                rows[n] = rows[n] + acc_b.pop(id(m))
        att_rows.append(group_attention(geometry, rows["q"], rows["k"], rows["v"], acc_w.pop(id(lm.o)).sum(dim=0)))
        gate = acc_w.pop(id(lm.gate)).sum(dim=1) if lm.gate is not None else None
        mlp_rows.append(group_mlp(acc_w.pop(id(lm.up)).sum(dim=1), acc_w.pop(id(lm.down)).sum(dim=0), gate))
    meta = base_meta(model, "taylor") | {
        "objective": "ce",
        "accumulation": "per-sample",
        "micro_batch_size": mbs,
        "num_windows": int(windows.shape[0]),
        "window_length": int(windows.shape[1]),
    }
    return finish(att_rows, mlp_rows, geometry, meta)


class Taylor(Method):
    """:func:`taylor_scores`: each window's cross-entropy gradient, taken window by window."""

    name = "taylor"
    needs = PER_WINDOW_GRADIENTS

    def scores(self, model, windows, *, micro_batch_size=8, seed=0, progress=True, stats=None, **settings) -> Scores:
        """:func:`taylor_scores` (``seed`` and ``stats`` are unused)."""
        self.check_settings(settings)
        return taylor_scores(model, windows, micro_batch_size=micro_batch_size, progress=progress)


METHOD = Taylor()

__all__ = ["METHOD", "Taylor", "taylor_scores"]
