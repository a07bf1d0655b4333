"""Apply a pruning plan to a model: keep only the planned KV groups and MLP channels of each layer.

An encoder-decoder (T5) is compacted the same way, block by block: each layer's self-attention, the
decoder layers' cross-attentions, and every FFN. T5's layers share a relative position bias computed
for all dense heads; each compacted attention records the dense heads it keeps and slices that bias
to them (see :mod:`nirvana.adapters.t5`), so :func:`compact_model` still equals :func:`mask_model`.

:func:`compact_model` slices the linears in place with the fused gather kernels, on whatever device
each layer lives, and updates the attention modules and the config so that forward, backward and
``generate()`` work on the smaller model. :func:`mask_model` is its dense twin: it zeroes the pruned
units instead of removing them, which gives the same outputs (see its docstring) at the dense cost.

KV group ``j`` (``G = num_heads // num_kv_heads`` query heads sharing one K/V head of width ``d``)
owns q rows and o columns ``[j*G*d, (j+1)*G*d)`` and k/v rows ``[j*d, (j+1)*d)``; MLP channel ``c``
owns row ``c`` of gate/up and column ``c`` of down.
"""

from __future__ import annotations

import torch
from torch import nn

from nirvana_kernels import compact, compact_groups, compact_many

from .adapters import Adapter, LayerModules, get_adapter, text_config
from .checkpoint import apply_config, base_architecture, layer_widths, plan_widths
from .plan import Geometry, LayerPlan, PruningPlan


def check_plan(model: nn.Module, plan: PruningPlan, adapter: Adapter) -> list[LayerModules]:
    """The model's layers, once ``plan`` is known to fit the dense model; a ValueError naming what does not."""
    if not isinstance(plan, PruningPlan):
        # The house rule makes every bad argument a ValueError, wrong types included.
        raise ValueError(f"plan: expected a PruningPlan, got {type(plan).__name__}")
    plan.validate()
    config = model.config
    names = {base_architecture(model), *(getattr(config, "architectures", None) or [])}
    names |= {getattr(config, "model_type", None), getattr(text_config(config), "model_type", None)}
    known = sorted(filter(None, names))
    if plan.architecture and plan.architecture not in known:
        raise ValueError(f"plan.architecture: {plan.architecture!r} does not match the model (one of {known})")
    dense = adapter.geometry(config)
    if plan.geometry != dense:
        raise ValueError(
            f"plan.geometry: {plan.geometry} does not match the model's {dense}; "
            "a plan applies to the dense model it was made for (was this model compacted already?)"
        )
    check_dense(model, adapter, "it was compacted already")
    return adapter.layers(model)


def dense_plan(geometry: Geometry, architecture: str = "") -> PruningPlan:
    """The plan that keeps every unit of ``geometry``."""
    first_cross = geometry.num_layers - geometry.cross_attention_layers
    groups, channels = list(range(geometry.num_kv_heads)), list(range(geometry.intermediate_size))
    layers = [
        LayerPlan(list(groups), list(channels), list(groups) if i >= first_cross else None)
        for i in range(geometry.num_layers)
    ]
    return PruningPlan(architecture, geometry, layers)


def check_dense(model: nn.Module, adapter: Adapter, why: str) -> Geometry:
    """The model's dense geometry; a ValueError naming the first layer whose widths differ from it."""
    dense = adapter.geometry(model.config)
    for i, (w, full) in enumerate(zip(layer_widths(model, adapter), plan_widths(dense_plan(dense)))):
        if w != full:
            raise ValueError(f"model: layer {i} has widths {w}, not the dense {full}; {why}")
    return dense


def _replace(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Swap in compacted tensors as new Parameters, keeping each one's requires_grad."""
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    linear.out_features, linear.in_features = weight.shape


def _rows(weights: list[torch.Tensor], index: torch.Tensor, group_size: int) -> list[torch.Tensor]:
    # compact_many wants same-shaped tensors; a lone one takes the single-tensor launch.
    if len(weights) == 1:
        return [compact_groups(weights[0], index, group_size=group_size, dim=0, check_index=False)]
    return compact_many(weights, index, dim=0, group_size=group_size, check_index=False)


def _plan_index(keep: list[int]) -> torch.Tensor:
    # A host tensor from the validated plan (check_plan), so the kernels skip their value check:
    # they copy it to the weights' device without blocking, and no launch waits for a read-back.
    return torch.tensor(keep, dtype=torch.int64)


def _compact_attention(lm: LayerModules, keep: list[int], g: Geometry, adapter: Adapter) -> None:
    if len(keep) == g.num_kv_heads:
        return
    d, qd = g.head_dim, g.group_size * g.head_dim
    index = _plan_index(keep)
    q_b = _rows([lm.q.bias], index, qd)[0] if lm.q.bias is not None else None
    _replace(lm.q, _rows([lm.q.weight], index, qd)[0], q_b)
    k_w, v_w = _rows([lm.k.weight, lm.v.weight], index, d)
    biases = [b for b in (lm.k.bias, lm.v.bias) if b is not None]
    kv_b = _rows(biases, index, d) if biases else []
    k_b = kv_b.pop(0) if lm.k.bias is not None else None
    v_b = kv_b.pop(0) if lm.v.bias is not None else None
    _replace(lm.k, k_w, k_b)
    _replace(lm.v, v_w, v_b)
    o_w = compact_groups(lm.o.weight, index, group_size=qd, dim=1, check_index=False)
    _replace(lm.o, o_w)  # o's bias spans hidden: kept
    adapter.set_kept_groups(lm, keep, g)


def _compact_mlp(lm: LayerModules, keep: list[int], g: Geometry) -> None:
    if len(keep) == g.intermediate_size:
        return
    index = _plan_index(keep)
    linears = [lm.gate, lm.up] if lm.gate is not None else [lm.up]
    weights = _rows([m.weight for m in linears], index, 1)
    has_bias = [m.bias is not None for m in linears]
    biases = _rows([m.bias for m in linears if m.bias is not None], index, 1) if any(has_bias) else []
    for m, w, b in zip(linears, weights, [biases.pop(0) if hb else None for hb in has_bias]):
        _replace(m, w, b)
    _replace(lm.down, compact(lm.down.weight, index, dim=1, check_index=False))  # down's bias spans hidden: kept
    if hasattr(lm.mlp, "intermediate_size"):
        lm.mlp.intermediate_size = len(keep)


@torch.no_grad()
def compact_model(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Prune ``model`` in place to the KV groups and MLP channels ``plan`` keeps; returns ``model``.

    Every prunable ``nn.Linear`` gets new Parameters (same dtype and device as before, gathered on
    that device by the nirvana kernels, requires_grad kept) and matching ``in_features`` /
    ``out_features``: q rows, k/v rows and biases, o columns of the kept KV groups; gate/up rows and
    down columns of the kept channels. Biases of o and down span the hidden size and stay whole.
    The attention modules get their new head counts, and the config the new sizes: for a uniform
    plan a stock config (smaller ``num_attention_heads``, ``num_key_value_heads``,
    ``intermediate_size``, explicit ``head_dim``); otherwise (or when transformers refuses those
    sizes) the dense sizes plus a ``config.nirvana`` block with every layer's widths, which
    :mod:`nirvana.checkpoint` saves. See :func:`nirvana.checkpoint.config_updates`.

    Args:
        model: a dense Hugging Face causal LM that :func:`nirvana.adapters.get_adapter` serves; pass a
            copy (``copy.deepcopy``) to keep the dense one.
        plan: made for this model's dense geometry; indices refer to the dense model.

    Raises:
        ValueError: if ``plan`` does not fit the model, or the model was compacted already.
    """
    adapter = get_adapter(model)
    layers = check_plan(model, plan, adapter)
    g = plan.geometry
    for lm, lp in zip(layers, plan.layers):
        for block, keep in zip((lm, lm.cross), lp.attention_blocks()):
            _compact_attention(block, keep, g, adapter)
        _compact_mlp(lm, lp.mlp_channels_kept, g)
    apply_config(model, adapter)
    return model


def pruned_indices(
    kept: list[int], total: int, group_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Row (or column) numbers, ascending, of every unit of ``total`` not in ``kept``, each unit
    spanning ``group_size`` consecutive rows; an int64 tensor on ``device`` (the default device if None)."""
    dropped = sorted(set(range(total)) - set(kept))
    units = torch.tensor(dropped, dtype=torch.int64, device=device)
    return (units[:, None] * group_size + torch.arange(group_size, device=device)).reshape(-1)


def _zero(t: torch.Tensor | None, dim: int, rows: torch.Tensor) -> None:
    if t is not None and rows.numel():
        t.index_fill_(dim, rows.to(t.device), 0)


@torch.no_grad()
def mask_model(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Zero, in place, every unit ``plan`` prunes, keeping the dense shapes; returns ``model``.

    A pruned KV group has its q, k, v rows, q/k/v bias entries and o columns zeroed; a pruned MLP
    channel its gate/up rows (and biases) and down column. The zero o columns and down columns are
    what make this equal to :func:`compact_model`: whatever a masked head computes (zero q and k rows
    give uniform attention, not zero output, and a zero-row v still returns its bias), the o_proj
    multiplies it by zero, so the layer output gets the same terms as the pruned model's, and the
    two differ only by float rounding from the order of accumulation. The other zeroed rows make
    the masked model's parameters match a pruned model padded with zeros.
    """
    adapter = get_adapter(model)
    layers = check_plan(model, plan, adapter)
    g = plan.geometry
    qd = g.group_size * g.head_dim
    for lm, lp in zip(layers, plan.layers):
        for block, keep in zip((lm, lm.cross), lp.attention_blocks()):
            dev = block.q.weight.device
            q_rows = pruned_indices(keep, g.num_kv_heads, qd, dev)
            kv_rows = pruned_indices(keep, g.num_kv_heads, g.head_dim, dev)
            for t, dim, rows in (
                (block.q.weight, 0, q_rows),
                (block.q.bias, 0, q_rows),
                (block.k.weight, 0, kv_rows),
                (block.k.bias, 0, kv_rows),
                (block.v.weight, 0, kv_rows),
                (block.v.bias, 0, kv_rows),
                (block.o.weight, 1, q_rows),
            ):
                _zero(t, dim, rows)
        ch = pruned_indices(lp.mlp_channels_kept, g.intermediate_size, 1, lm.up.weight.device)
        for m in (lm.gate, lm.up):
            if m is not None:
                _zero(m.weight, 0, ch)
                _zero(m.bias, 0, ch)
        _zero(lm.down.weight, 1, ch)
    return model


__all__ = [
    "check_dense",
    "check_plan",
    "compact_model",
    "dense_plan",
    "mask_model",
    "pruned_indices",
]
