"""The scoring methods, one small module each, in one registry, so that methods are compared on equal terms.

Every method turns a dense model (and, for most, calibration windows) into the same :class:`Scores`
(float32 ``[num_layers, num_kv_heads]`` and ``[num_layers, intermediate_size]`` on the CPU, higher
means more important), which then go through the flow's own allocation, compaction and checkpoint
steps. Only the scores, and FLAP's bias compensation, differ between methods.

Notation for one decoder layer: KV group ``j`` owns q rows and o_proj columns ``Q_j = [j*G*d,
(j+1)*G*d)`` and k/v rows ``K_j = [j*d, (j+1)*d)``; MLP channel ``c`` owns row ``c`` of gate/up and
column ``c`` of down. Over the calibration tokens ``t`` (every position of every window),
``X^attn`` is the input of q/k/v (the normed layer input), ``X^o`` the input of o_proj, ``X^mlp`` the
input of gate/up, ``X^down`` the input of down_proj; ``||X_c||`` is the 2-norm over tokens of
channel ``c``, ``mu_c`` and ``var_c`` its mean and unbiased variance.

* ``nirvana``: :func:`nirvana.saliency.compute_scores` with the max-logit objective and Taylor
  saliency, ``sum |W * G|`` over the unit, ``G`` the gradient of the objective over all windows.
* ``magnitude``: ``sum |W|`` over the unit's weights (and q/k/v bias entries); no data.
* ``random``: uniform [0, 1) scores from ``seed``; no data.
* ``taylor`` (LLM-Pruner's first-order term, per sample): ``sum_s sum_{w in unit} |w * dCE_s/dw|``
  where ``CE_s`` is window ``s``'s next-token cross-entropy (mean over its ``T-1`` predictions).
  See :func:`taylor_scores` for why per sample.
* ``wanda-sp``: ``sum_{w in unit} |w| * ||X_{in(w)}||``, each weight times the norm of the input
  channel it reads. See :func:`wanda_sp_scores`.
* ``flap``: the fluctuation ``var_c * ||W[:, c]||^2`` of each o_proj / down_proj input column,
  standardised per layer, then per KV group the mean over its columns; plus the bias compensation
  :func:`apply_flap_compensation`. See :func:`flap_scores`.

The activation statistics (``wanda-sp``, ``flap``) are running float64 sums of ``x`` and ``x**2`` per
input channel, gathered by forward pre-hooks during plain no-grad forward passes, one micro-batch at
a time: no activation outlives its micro-batch. The per-sample gradients (``taylor``) come from
forward hooks that keep one micro-batch's linear inputs and tensor hooks that receive the gradient
of each linear's output. Every hook is removed and every flag restored afterwards, also on error.

Each method is a :class:`Method` (``name``, which source it ``needs``, ``scores(...)`` and an optional
``compensate(model, plan, stats)``); :func:`get_method` finds one by name and :data:`METHODS` lists them
in the order the CLI offers them. ``nirvana.pruning.prune`` calls them without knowing which it runs.
What they read comes from :mod:`nirvana.sources` (gradients, per-window gradients, activation
statistics); the metadata and grouping they share are in :mod:`nirvana.methods.common`.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from ..scores import Scores
from ..sources.activations import INPUTS, ActivationStats, activation_statistics, load_statistics, save_statistics
from ..sources.common import check_micro_batch
from . import flap, magnitude, nirvana, random, taylor, wanda_sp
from .base import NEEDS, Method

REGISTRY: dict[str, Method] = {
    m.name: m for m in (nirvana.METHOD, magnitude.METHOD, random.METHOD, taylor.METHOD, wanda_sp.METHOD, flap.METHOD)
}
METHODS = tuple(REGISTRY)
# The methods that need no calibration windows.
DATA_FREE = tuple(name for name, m in REGISTRY.items() if m.data_free)
# The methods whose result is more than the plan: FLAP's bias compensation is computed from calibration
# activations, so only nirvana prune (which runs them) can produce it; nirvana apply refuses such plans.
NEEDS_ACTIVATIONS = frozenset(name for name, m in REGISTRY.items() if m.compensates)


def get_method(name) -> Method:
    """The registered :class:`Method` called ``name``; a ValueError naming ``name`` if there is none."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"method: must be one of {METHODS}, got {name!r}")
    return REGISTRY[name]


def score(
    model: nn.Module,
    windows: torch.Tensor | None = None,
    method: str = "nirvana",
    *,
    micro_batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    **settings,
) -> Scores:
    """Score every KV group and MLP channel of a dense model with one of :data:`METHODS` (``nirvana.score``).

    ``nirvana``, ``magnitude`` and ``random`` are :func:`nirvana.saliency.compute_scores` (max-logit
    Taylor; ``sum |W|``; uniform from ``seed``); ``taylor`` is :func:`taylor_scores`; ``wanda-sp`` and
    ``flap`` gather :func:`activation_statistics` and score with :func:`wanda_sp_scores` /
    :func:`flap_scores` (to apply FLAP's compensation too, call those two directly and keep the
    statistics). The formulas are in the module docstring.

    Args:
        windows: integer ``[N, T]`` calibration token ids; may be None for ``magnitude`` and ``random``.
        method: one of :data:`METHODS`.
        micro_batch_size: windows per forward (and backward) pass.
        seed: only ``random`` uses it.
        progress: show a tqdm bar over micro-batches.
        settings: the method's own keywords (its ``settings``), e.g. ``objective="ce"`` or
            ``saliency="adam"`` for ``nirvana``; any other is a ValueError naming it.

    Returns:
        :class:`Scores` (float32 on the CPU) with ``meta["method"] = method``. The model is left as found.

    Raises:
        ValueError: a bad argument (named), or a model that was compacted already.
    """
    scorer = get_method(method)
    check_micro_batch(micro_batch_size)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed: must be an integer, got {seed!r}")
    if windows is None and not scorer.data_free:
        raise ValueError(f"windows: method {method!r} needs calibration windows, got None")
    scorer.check_settings(settings)
    return scorer.scores(
        model, windows, micro_batch_size=micro_batch_size, seed=int(seed), progress=progress, **settings
    )


# The name this function had before it became nirvana.score.
method_scores = score


apply_flap_compensation = flap.apply_flap_compensation
flap_scores = flap.flap_scores
standardize_per_layer = flap.standardize_per_layer
stock_bias_flags = flap.stock_bias_flags
taylor_scores = taylor.taylor_scores
wanda_sp_scores = wanda_sp.wanda_sp_scores

__all__ = [
    "DATA_FREE",
    "INPUTS",
    "METHODS",
    "NEEDS",
    "NEEDS_ACTIVATIONS",
    "REGISTRY",
    "ActivationStats",
    "Method",
    "activation_statistics",
    "apply_flap_compensation",
    "flap_scores",
    "get_method",
    "load_statistics",
    "method_scores",
    "save_statistics",
    "score",
    "standardize_per_layer",
    "stock_bias_flags",
    "taylor_scores",
    "wanda_sp_scores",
]
