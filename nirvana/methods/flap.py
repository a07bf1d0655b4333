"""``flap``: FLAP's fluctuation metric, standardised per layer, and its bias compensation."""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import text_config
from ..allocation import divide_per_row
from ..compaction import pruned_indices
from ..plan import PruningPlan
from ..scores import Scores
from ..sources.activations import ActivationStats, check_stats
from ..sources.common import dense_layers
from ..sources.weights import DENSE_WEIGHTS, WeightReductions
from .base import FromStatistics
from .common import base_meta, finish


def standardize_per_layer(x: torch.Tensor) -> torch.Tensor:
    """Each row (layer) of ``x`` minus its mean, divided by its unbiased standard deviation, in float64.

    A row with a single entry or zero spread becomes all zeros (nothing tells its entries apart).
    """
    x = x.to(torch.float64)
    centred = x - x.mean(dim=1, keepdim=True)
    if x.shape[1] < 2:
        return centred
    return divide_per_row(centred, x.std(dim=1, keepdim=True))


def flap_scores(model: nn.Module, stats: ActivationStats, weights: WeightReductions = DENSE_WEIGHTS) -> Scores:
    """FLAP's fluctuation metric (WIFV), standardised per layer.

    Per input column ``c`` of o_proj (attention) and of down_proj (MLP)::

        F_c = var_c * ||W[:, c]||^2      (var_c: unbiased variance of X_c over the calibration tokens)

    Then, as FLAP's reference code does before its global ranking, each layer's ``F`` of one module
    type is standardised, ``z = (F - mean) / std`` over that layer's columns (:func:`standardize_per_layer`):
    this puts layers of different activation scales on one footing, so the global allocation compares
    layers by how a unit stands within its own layer. A KV group's score is the mean of ``z`` over its
    ``G*d`` o_proj columns; an MLP channel's score is its down_proj column's ``z``. (FLAP's released code
    also squares the attention metric before standardising; the paper's formula, used here, does not.)
    FLAP ranks attention and MLP units in one list; here the flow's ``gamma`` sets that split, as for
    every other method. The bias compensation is :func:`apply_flap_compensation`. ``weights`` computes
    ``||W[:, c]||^2`` (:data:`~nirvana.sources.weights.DENSE_WEIGHTS`, or a sharded model's
    :class:`nirvana.sources.fsdp.ShardedWeights`).
    """
    METHOD.check_model(model)
    geometry, layers = dense_layers(model)
    stats = check_stats(stats, geometry)
    var_o, var_down = stats.variance("o"), stats.variance("down")
    o_cols, down_cols = [], []
    with torch.no_grad():
        for i, lm in enumerate(layers):
            for linear, var, out in ((lm.o, var_o[i], o_cols), (lm.down, var_down[i], down_cols)):
                col_sq = weights.col_square_sum(linear).cpu()
                out.append(var * col_sq)
    z_o = standardize_per_layer(torch.stack(o_cols))  # [L, H*d]
    z_down = standardize_per_layer(torch.stack(down_cols))  # [L, I]
    g = geometry
    attention = z_o.view(g.num_layers, g.num_kv_heads, g.group_size * g.head_dim).mean(dim=2)
    meta = base_meta(model, "flap") | {"tokens": stats.tokens, "standardization": "per-layer z-score"}
    return finish(list(attention), list(z_down), geometry, meta)


def compensated_bias(
    weight: torch.Tensor, bias: torch.Tensor | None, cols: torch.Tensor, mean: torch.Tensor
) -> torch.Tensor:
    """float64 CPU ``b + W[:, cols] @ mean[cols]`` for the rows of ``weight`` given (all, or one rank's).

    weight: ``[rows, in]`` any float dtype and device; bias: ``[rows]`` or None (zero); cols: int64 removed
    input columns; mean: float64 ``[in]`` calibration means of the inputs. One formula for the in-memory,
    the sharded and the streamed compensation, so that all three give the same bits.
    """
    out = torch.zeros(weight.shape[0], dtype=torch.float64)
    if bias is not None:
        out += bias.detach().to("cpu", torch.float64)
    if cols.numel() and weight.shape[0]:
        removed = weight.detach().index_select(1, cols.to(weight.device)).to(torch.float64)
        out += (removed @ mean[cols].to(weight.device)).cpu()
    return out


def _new_bias(linear: nn.Linear, value: torch.Tensor) -> None:
    # A new Parameter rather than an in-place add: a copy that shares its tensors with the dense model
    # (selection.pruned_copy) must leave the dense model's biases alone.
    w = linear.weight
    linear.bias = nn.Parameter(value.to(w.device, w.dtype), requires_grad=w.requires_grad)


def _zero_bias_if_missing(linear: nn.Linear) -> None:
    if linear.bias is None:
        _new_bias(linear, torch.zeros(linear.out_features, dtype=torch.float64))


def stock_bias_flags(config) -> bool:
    """Whether the stock config can say that o_proj and down_proj carry biases (Llama's
    ``attention_bias`` and ``mlp_bias``); the other supported architectures build them without."""
    c = text_config(config)
    return hasattr(c, "attention_bias") and hasattr(c, "mlp_bias")


@torch.no_grad()
def apply_flap_compensation(model: nn.Module, plan: PruningPlan, stats: ActivationStats) -> nn.Module:
    """Fold the calibration mean of the inputs ``plan`` removes into the o_proj and down_proj biases.

    Call it on the DENSE model, after :func:`nirvana.allocation.allocate` and BEFORE
    :func:`nirvana.compaction.compact_model` (which keeps o/down biases whole): the removed columns of
    ``W`` are needed, and compaction deletes them. Per layer, with ``R`` the o_proj columns of the
    pruned KV groups (resp. the down_proj columns of the pruned channels) and ``mu`` the input means
    from ``stats``::

        b <- b + W[:, R] @ mu[R]          (b = 0 where the linear had no bias)

    so that, over the calibration tokens, the pruned linear's output has the dense one's mean, and
    its squared error to the dense output is the smallest any constant can give. Every layer gets an
    o_proj and a down_proj bias (zero where the plan prunes nothing there), so all layers look alike.

    Loadability: where the config has Llama's ``attention_bias`` and ``mlp_bias`` flags, both are set
    and the q/k/v and gate/up linears they also govern get zero biases (an exact no-op), so a saved
    checkpoint is one that stock ``from_pretrained`` (and :func:`nirvana.checkpoint.load_pruned`) build
    with every bias in place. Other architectures' stock classes build o_proj/down_proj without a bias
    whatever the config says; the checkpoint's ``nirvana`` block then lists those biases
    (:func:`nirvana.checkpoint.extra_biases`), and ``load_pruned`` or ``trust_remote_code`` loading
    adds them before the weights load.

    New bias Parameters are created (no tensor is modified in place), so the function is safe on a
    copy that shares tensors with the dense model (``selection.pruned_copy`` before its compaction).
    :func:`nirvana.compaction.mask_model` after it gives the compensated pruned model's outputs too.

    Returns:
        ``model``, modified in place.

    Raises:
        ValueError: ``plan`` or ``stats`` do not fit the model, or the model was compacted already.
    """
    if not isinstance(plan, PruningPlan):
        raise ValueError(f"plan: expected a PruningPlan, got {type(plan).__name__}")
    plan.validate()
    geometry, layers = dense_layers(model)
    if plan.geometry != geometry:
        raise ValueError(f"plan.geometry: {plan.geometry} does not match the model's {geometry}")
    stats = check_stats(stats, geometry)
    g = geometry
    mean_o, mean_down = stats.mean("o"), stats.mean("down")
    for i, (lm, lp) in enumerate(zip(layers, plan.layers)):
        for linear, kept, total, width, mean in (
            (lm.o, lp.kv_groups_kept, g.num_kv_heads, g.group_size * g.head_dim, mean_o[i]),
            (lm.down, lp.mlp_channels_kept, g.intermediate_size, 1, mean_down[i]),
        ):
            cols = pruned_indices(kept, total, width)
            _new_bias(linear, compensated_bias(linear.weight, linear.bias, cols, mean))
    if stock_bias_flags(model.config):
        c = text_config(model.config)
        c.attention_bias, c.mlp_bias = True, True
        for lm in layers:
            for linear in (lm.q, lm.k, lm.v, lm.up, lm.gate):
                if linear is not None:
                    _zero_bias_if_missing(linear)
    return model


class Flap(FromStatistics):
    """:func:`flap_scores` from the activation statistics, then :func:`apply_flap_compensation` from the same."""

    name = "flap"
    compensates = True
    # FLAP ranks globally; flap_scores standardises each layer's scores for exactly that.
    allocation = "global"
    encoder_decoder_refusal = (
        "its compensation adds o/wo biases, which T5 builds without, and a pruned T5 checkpoint cannot carry "
        "them (the config's bias list names one path for every layer; T5's encoder and decoder hold wo apart)"
    )

    def from_statistics(self, model: nn.Module, stats, weights: WeightReductions = DENSE_WEIGHTS) -> Scores:
        return flap_scores(model, stats, weights)

    def compensate(self, model: nn.Module, plan: PruningPlan, stats) -> nn.Module:
        """:func:`apply_flap_compensation`."""
        return apply_flap_compensation(model, plan, stats)


METHOD = Flap()

__all__ = ["METHOD", "Flap", "apply_flap_compensation", "flap_scores", "standardize_per_layer", "stock_bias_flags"]
