"""``wanda-sp``: each weight's magnitude times the 2-norm of the input channel it reads, summed per unit."""

from __future__ import annotations

import torch
from torch import nn

from ..scores import Scores
from ..sources.activations import CROSS_INPUTS, INPUTS, ActivationStats, check_stats
from ..sources.common import dense_layers
from ..sources.weights import DENSE_WEIGHTS, WeightReductions
from .base import FromStatistics
from .common import base_meta, finish, group_attention, group_mlp


def wanda_sp_scores(model: nn.Module, stats: ActivationStats, weights: WeightReductions = DENSE_WEIGHTS) -> Scores:
    """Wanda-SP: each weight's magnitude times the 2-norm of the input channel it reads, summed per unit.

    KV group ``j``::

        sum_{r in Q_j} sum_c |Wq[r, c]| ||X^attn_c|| + sum_{r in K_j} sum_c (|Wk[r, c]| + |Wv[r, c]|) ||X^attn_c||
          + sum_{c in Q_j} sum_i |Wo[i, c]| ||X^o_c||

    MLP channel ``c``::

        sum_k (|Wgate[c, k]| + |Wup[c, k]|) ||X^mlp_k|| + sum_i |Wdown[i, c]| ||X^down_c||

    with ``||X_c|| = sqrt(sum_t x_{t,c}^2)`` over all calibration tokens. An encoder-decoder's
    cross-attention KV group reads the decoder's hidden state in q and the encoder's output in k/v
    (:data:`~nirvana.sources.activations.CROSS_INPUTS`). The q/k/v biases (Qwen2) read no input channel
    and are left out. This is Wanda's ``|W| * ||X||`` summed over every weight the
    unit owns (Wanda-SP as FLAP's authors released it scores the o_proj / down_proj columns only and
    averages over rows; summing all the unit's weights makes it comparable with the other methods).
    Row contributions are float32 matrix-vector products ``|W| @ ||X||``, grouped in float64.
    ``weights`` computes those reductions (:data:`~nirvana.sources.weights.DENSE_WEIGHTS` on the
    whole weights; a sharded model passes :class:`nirvana.sources.fsdp.ShardedWeights`).

    The raw scores scale with each layer's activations, so they rank units within a layer but not
    across layers: FLAP's authors prune Wanda-SP layer-uniformly, and ``allocation="uniform"`` is the
    faithful setting (on SmolLM2 at 20%, held-out perplexity 74 uniform against 13000 global).
    """
    geometry, layers = dense_layers(model)
    stats = check_stats(stats, geometry)
    n_attn, n_o, n_mlp, n_down = (stats.norm(k) for k in INPUTS)
    att_rows, mlp_rows = [], []

    def rows(linear: nn.Linear, norms: torch.Tensor) -> torch.Tensor:
        return weights.row_abs_dot(linear, norms)

    def cols(linear: nn.Linear, norms: torch.Tensor) -> torch.Tensor:  # float64 norms[c] * sum_i |W[i, c]|
        sums = weights.col_abs_sum(linear)
        return sums.double() * norms.to(sums.device)

    with torch.no_grad():
        for i, lm in enumerate(layers):
            att_rows.append(
                group_attention(
                    geometry, rows(lm.q, n_attn[i]), rows(lm.k, n_attn[i]), rows(lm.v, n_attn[i]), cols(lm.o, n_o[i])
                )
            )
            gate = rows(lm.gate, n_mlp[i]) if lm.gate is not None else None
            mlp_rows.append(group_mlp(rows(lm.up, n_mlp[i]), cols(lm.down, n_down[i]), gate))
        if geometry.cross_attention_layers:
            n_q, n_kv, n_co = (stats.norm(k) for k in CROSS_INPUTS)
            for j, c in enumerate(lm.cross for lm in layers if lm.cross is not None):
                k_rows, v_rows = rows(c.k, n_kv[j]), rows(c.v, n_kv[j])
                att_rows.append(group_attention(geometry, rows(c.q, n_q[j]), k_rows, v_rows, cols(c.o, n_co[j])))
    meta = base_meta(model, "wanda-sp") | {"tokens": stats.tokens}
    return finish(att_rows, mlp_rows, geometry, meta)


class WandaSP(FromStatistics):
    """:func:`wanda_sp_scores` from the calibration windows' activation statistics."""

    name = "wanda-sp"
    # FLAP's authors prune Wanda-SP layer-uniformly: its raw scores carry each layer's activation scale.
    allocation = "uniform"
    misallocations = {
        "global": "its raw scores scale with each layer's activations, so they rank units only within a layer"
    }

    def from_statistics(self, model: nn.Module, stats, weights: WeightReductions = DENSE_WEIGHTS) -> Scores:
        return wanda_sp_scores(model, stats, weights)


METHOD = WandaSP()

__all__ = ["METHOD", "WandaSP", "wanda_sp_scores"]
