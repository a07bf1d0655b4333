"""``taylor``: LLM-Pruner's first-order term, ``sum_s |w * dCE_s/dw|``, accumulated per window."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..scores import Scores
from ..sources.common import check_micro_batch, check_windows, dense_layers
from ..sources.fsdp import rank_steps
from ..sources.gradients import attention_parameters, prunable_parameters
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
    scored = scored_linears(layers)
    sums = per_window_saliency(
        model, windows, scored, objective="ce", micro_batch_size=mbs, progress=progress, desc="taylor"
    )
    acc_w, acc_b = sums.weights, sums.biases
    att_rows, mlp_rows = unit_rows(geometry, layers, lambda m, dim: acc_w.pop(id(m)).sum(dim=dim), acc_b)
    return finish(att_rows, mlp_rows, geometry, taylor_meta(model, mbs, windows))


def sharded_taylor_scores(
    sharded: nn.Module, windows: torch.Tensor, *, micro_batch_size: int = 8, progress: bool = True
) -> Scores:
    """:func:`taylor_scores` of ``windows`` on an FSDP2-sharded model, computed by every rank together.

    Collective: every rank passes the same full ``windows``, runs its block of each global step
    (:func:`nirvana.sources.fsdp.rank_steps`) and returns the same float32 :class:`Scores` on the CPU.
    The per-window source's hooks run while FSDP has each layer unsharded (its forward, and its
    backward after the pre-backward all-gather), so the whole ``W`` is at hand there; each rank keeps
    only the per-row or per-column sums the units need, and one ``all_reduce`` adds them over ranks.
    The sums run in another order (over the unit's rows first, then over windows), so the scores equal
    one process's to float32 rounding, not bit for bit.

    Args:
        sharded: what :func:`nirvana.sources.fsdp.shard_for_scoring` returned.
        windows: integer ``[N, T]`` token ids, ``T >= 2``.
    """
    mbs = check_micro_batch(micro_batch_size)
    model = sharded.lm
    windows = check_windows(model, windows, 2, "taylor")
    geometry, layers = dense_layers(model)
    scored = scored_linears(layers)
    rank, world = dist.get_rank(), dist.get_world_size()
    steps = [(start, stop) for start, stop, _ in rank_steps(windows.shape[0], world, rank, mbs)]
    sums = per_window_saliency(
        model,
        windows,
        scored,
        micro_batch_size=mbs,
        progress=progress and rank == 0,
        desc="taylor",
        reduce={id(m): _SUM_OVER[role] for m, role in _roles(layers)},
        steps=steps,
        # objective_sum("ce") through the sharded root: the sum over windows of each window's mean CE.
        loss=lambda ids: sharded(ids, "ce"),
        root=sharded,
    )
    order = [sums.weights[id(m)] for m, _ in scored] + [sums.biases[id(m)] for m, b in scored if b]
    flat = torch.cat(order)
    dist.all_reduce(flat)
    flat, pos = flat.cpu(), 0
    for t in order:
        t.copy_(flat[pos : pos + t.numel()])
        pos += t.numel()
    att_rows, mlp_rows = unit_rows(geometry, layers, lambda m, _dim: sums.weights[id(m)], sums.biases)
    meta = taylor_meta(model, mbs, windows) | {"distributed": {"strategy": "fsdp", "world_size": world}}
    return finish(att_rows, mlp_rows, geometry, meta)


# A unit owns rows of q/k/v/gate/up (summed over their columns, dim 1) and columns of o/down (dim 0).
_SUM_OVER = {"q": 1, "k": 1, "v": 1, "o": 0, "up": 1, "down": 0, "gate": 1}


def _roles(layers) -> list[tuple[nn.Linear, str]]:
    out = []
    for lm in layers:
        out += [(getattr(lm, role), role) for role in _SUM_OVER if getattr(lm, role) is not None]
    return out


def scored_linears(layers) -> list[tuple[nn.Linear, bool]]:
    """Every prunable linear of ``layers`` with whether its bias is scored (q/k/v, when the model has them),
    the cross-attentions' (an encoder-decoder's) after every layer's own."""
    scored = []
    for lm in layers:
        attn_params, _ = prunable_parameters(lm)  # checks that q/k/v biases are all or none
        with_bias = len(attn_params) > 4
        scored += [(lm.q, with_bias), (lm.k, with_bias), (lm.v, with_bias), (lm.o, False)]
        scored += [(m, False) for m in (lm.up, lm.down, lm.gate) if m is not None]
    for cross in (lm.cross for lm in layers if lm.cross is not None):
        with_bias = len(attention_parameters(cross)) > 4
        scored += [(cross.q, with_bias), (cross.k, with_bias), (cross.v, with_bias), (cross.o, False)]
    return scored


def unit_rows(geometry, layers, reduced, biases: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each attention block's float64 KV-group row (every layer's self-attention, then the cross-attentions)
    and each layer's MLP-channel row from ``reduced(linear, dim)``, the linear's per-window sums over ``dim``
    (1 for row-owning parts, 0 for o/down), plus the q/k/v ``biases``."""

    def attention_row(block) -> torch.Tensor:
        rows = {n: reduced(m, 1) for n, m in (("q", block.q), ("k", block.k), ("v", block.v))}
        for n, m in (("q", block.q), ("k", block.k), ("v", block.v)):
            if id(m) in biases:
                rows[n] = rows[n] + biases.pop(id(m))
        return group_attention(geometry, rows["q"], rows["k"], rows["v"], reduced(block.o, 0))

    att_rows, mlp_rows = [], []
    for lm in layers:
        att_rows.append(attention_row(lm))
        gate = reduced(lm.gate, 1) if lm.gate is not None else None
        mlp_rows.append(group_mlp(reduced(lm.up, 1), reduced(lm.down, 0), gate))
    att_rows += [attention_row(lm.cross) for lm in layers if lm.cross is not None]
    return att_rows, mlp_rows


def taylor_meta(model: nn.Module, micro_batch_size: int, windows: torch.Tensor) -> dict:
    """The metadata of taylor scores of ``windows``."""
    return base_meta(model, "taylor") | {
        "objective": "ce",
        "accumulation": "per-sample",
        "micro_batch_size": micro_batch_size,
        "num_windows": int(windows.shape[0]),
        "window_length": int(windows.shape[1]),
    }


class Taylor(Method):
    """:func:`taylor_scores`: each window's cross-entropy gradient, taken window by window."""

    name = "taylor"
    needs = PER_WINDOW_GRADIENTS
    # LLM-Pruner prunes the same share of every layer it prunes.
    allocation = "uniform"

    def scores(self, model, windows, *, micro_batch_size=8, seed=0, progress=True, stats=None, **settings) -> Scores:
        """:func:`taylor_scores` (``seed`` and ``stats`` are unused)."""
        self.check_settings(settings)
        return taylor_scores(model, windows, micro_batch_size=micro_batch_size, progress=progress)


METHOD = Taylor()

__all__ = ["METHOD", "Taylor", "scored_linears", "sharded_taylor_scores", "taylor_meta", "taylor_scores", "unit_rows"]
