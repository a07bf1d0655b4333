"""From saliency scores to a pruning plan: how many KV groups and MLP channels go, and which ones.

Sparsity ``s`` is the share of the prunable parameters (attention + MLP linears, see ``Geometry``) removed.
``gamma`` is the ratio of the MLP fraction pruned to the attention fraction pruned. With
``A = geometry.attn_params_per_group`` and ``M = geometry.mlp_params_per_channel``, per layer ``H`` KV groups
and ``I`` channels::

    f_mlp  = s * (H*A + I*M) / (H*A/gamma + I*M)
    f_attn = f_mlp / gamma

so that ``f_attn*H*A + f_mlp*I*M = s*(H*A + I*M)``. An encoder-decoder has more attention blocks than
layers (each decoder layer adds a cross-attention, see ``Geometry``); ``H`` then counts the KV groups of
all attention blocks per layer on average, ``H * num_attention_blocks / num_layers``. A fraction above 1 cannot be
pruned: ``prune_fractions`` raises ``ValueError`` rather than clamping, since clamping would silently change gamma.

Global allocation ranks every KV group of every attention block together (and separately every MLP channel), lowest
score pruned first, ties broken by (row, index), and then applies the per-layer rules. For an encoder-decoder that
means one ranking over the heads of all three attention kinds (encoder self-attention, decoder self-attention,
decoder cross-attention): the simplest choice that needs no per-kind budget, at the price of trusting that the
objective's gradients make the kinds' scores comparable. The rules:

1. Each attention block keeps its best KV group (the one that comes last in the ranking). The groups this rule saves are
   made up on the MLP side: the MLP budget is whatever brings the total pruned parameters nearest to ``s * P``.
2. Each layer's MLP width is a multiple of ``round_to``, or the dense width. The allowed widths cut each layer's
   channels (sorted by rank) into blocks: the first ``I % round_to`` channels (or ``round_to`` of them when that
   is 0), then blocks of ``round_to``. A block is ranked by its best channel, the last one pruned. Taking blocks
   in that order is exactly "bottom-k channels, then round each width up by sparing that layer's best
   candidates, then prune the next lowest-ranked blocks elsewhere to make up the count". The number of blocks is
   the one whose channel total is nearest the budget.

Uniform allocation prunes the same counts in every attention block and every layer (each one's own bottom-k), so
every layer ends up with identical widths.

Three options change the rules (all off by default, which gives exactly the plan above):

* ``protect_layers=N``: the first ``N`` layers (an encoder-decoder's layer list starts with its encoder) keep every
  KV group, cross-attention included, and every MLP channel. The formula's counts are unchanged, so the target is
  met from the other layers (uniform allocation raises their per-layer counts to match). LLM-Pruner prunes only
  layers 4 to 30 of its 32.
* ``min_kv_groups=K``: every attention block keeps at least ``K`` KV groups (its ``K`` best; the default keeps
  one). The groups this spares are made up on the MLP side, as the keep-one rule's are; ``K = num_kv_heads``
  prunes no attention at all.
* ``normalize="mean"|"median"`` (global allocation only: it cannot change a per-layer order): before the ranking,
  each attention row's KV-group scores are divided by that row's mean (or median), and each layer's MLP-channel
  scores by that layer's, so that the ranking compares units by how they stand within their own layer.

The achieved sparsity is recorded in the plan's ``meta``; if the model's units are too coarse to come within
0.5 percentage points of the target a ``RuntimeWarning`` says so.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch

from .plan import Geometry, LayerPlan, PruningPlan

ALLOCATIONS = ("global", "uniform")
NORMALIZATIONS = ("none", "mean", "median")
SPARSITY_TOLERANCE = 0.005  # achieved vs target sparsity, as a fraction (0.5 percentage points)


def _check_fraction_args(geometry: Geometry, sparsity: float, gamma: float) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity: must be a number in [0, 1), got {sparsity!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not 0.0 < gamma < math.inf:
        raise ValueError(f"gamma: must be a finite number > 0, got {gamma!r}")
    for name in ("num_layers", "num_kv_heads", "intermediate_size", "hidden_size", "head_dim"):
        value = getattr(geometry, name)
        if value < 1:
            raise ValueError(f"geometry.{name}: must be >= 1, got {value!r}")


def divide_per_row(x: torch.Tensor, stat: torch.Tensor) -> torch.Tensor:
    """``x`` [R, N] divided row by row by ``stat`` [R, 1]; a row whose ``stat`` is not > 0 is left as it is.

    Shared by per-layer normalisations (:func:`normalize_per_layer`, FLAP's z-score): a zero statistic carries no
    scale to divide out, and a negative one would reverse the row's order.
    """
    return x / torch.where(stat > 0, stat, torch.ones_like(stat))


def normalize_per_layer(x: torch.Tensor, how: str) -> torch.Tensor:
    """float64 [R, N]: each row of ``x`` divided by its mean or median (``how``), or ``x`` unchanged for "none".

    A row whose statistic is 0 (or negative: scores of other methods than NIRVANA can be) keeps its raw scores
    (:func:`divide_per_row`). The median is the midpoint of the two middle values for an even count.
    """
    if how not in NORMALIZATIONS:
        raise ValueError(f"normalize: must be one of {', '.join(NORMALIZATIONS)}, got {how!r}")
    x = x.to(torch.float64)
    if how == "none":
        return x
    stat = x.mean(dim=1, keepdim=True) if how == "mean" else torch.quantile(x, 0.5, dim=1, keepdim=True)
    return divide_per_row(x, stat)


def check_rules(
    geometry: Geometry, *, protect_layers: int = 0, min_kv_groups: int = 0, normalize: str = "none"
) -> None:
    """A one-line ValueError for allocation options this geometry cannot take (see the module docstring)."""
    for name, value in (("protect_layers", protect_layers), ("min_kv_groups", min_kv_groups)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: must be a non-negative integer, got {value!r}")
    if protect_layers >= geometry.num_layers:
        raise ValueError(
            f"protect_layers: {protect_layers} protects every layer of this model ({geometry.num_layers} layers); "
            "nothing would be left to prune"
        )
    if min_kv_groups > geometry.num_kv_heads:
        raise ValueError(
            f"min_kv_groups: {min_kv_groups} is more than the model's {geometry.num_kv_heads} KV groups per layer"
        )
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize: must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")


def _protected_rows(g: Geometry, protect_layers: int) -> torch.Tensor:
    """bool [num_attention_blocks]: the attention rows of the first ``protect_layers`` layers."""
    first_cross = g.num_layers - g.cross_attention_layers
    layer_of_row = torch.cat([torch.arange(g.num_layers), first_cross + torch.arange(g.cross_attention_layers)])
    return layer_of_row < protect_layers


def prune_fractions(geometry: Geometry, sparsity: float, gamma: float) -> tuple[float, float]:
    """``(f_attn, f_mlp)``: the shares of KV groups and of MLP channels to prune for ``sparsity`` and ``gamma``.

    Raises ``ValueError`` when either share would exceed 1, saying which and by how much.
    """
    _check_fraction_args(geometry, sparsity, gamma)
    # Blocks per layer is exactly 1.0 for decoder-only models, so their fractions are unchanged bit for bit.
    blocks_per_layer = geometry.num_attention_blocks / geometry.num_layers
    attn = blocks_per_layer * geometry.num_kv_heads * geometry.attn_params_per_group
    mlp = geometry.intermediate_size * geometry.mlp_params_per_channel
    f_mlp = sparsity * (attn + mlp) / (attn / gamma + mlp)
    f_attn = f_mlp / gamma
    for name, f in (("f_mlp", f_mlp), ("f_attn", f_attn)):
        if f > 1.0:
            raise ValueError(
                f"sparsity: {sparsity!r} with gamma {gamma!r} needs {name} = {f:.6g}, {f - 1.0:.6g} more than "
                "everything; lower sparsity or bring gamma closer to 1"
            )
    return f_attn, f_mlp


def _nearest_int(x: float) -> int:
    """Round half up: the count nearest ``x`` (the published Llama-3.1-8B counts come out the same floored)."""
    return math.floor(x + 0.5)


def prune_counts(geometry: Geometry, sparsity: float, gamma: float) -> tuple[int, int]:
    """``(kv_groups, mlp_channels)`` the formula prunes over the whole model, before any per-layer rule.

    Each is the nearest integer to its fraction times the model's total (``R*H`` groups over the ``R``
    attention blocks, ``L*I`` channels).
    """
    f_attn, f_mlp = prune_fractions(geometry, sparsity, gamma)
    g = geometry
    return _nearest_int(f_attn * g.num_attention_blocks * g.num_kv_heads), _nearest_int(
        f_mlp * g.num_layers * g.intermediate_size
    )


def _first_block(intermediate_size: int, round_to: int) -> int:
    """The fewest channels a layer can prune: from the dense width down to the next multiple of ``round_to``."""
    return min(intermediate_size % round_to or round_to, intermediate_size)


def allowed_pruned_counts(intermediate_size: int, round_to: int) -> list[int]:
    """MLP channels one layer may prune so its width is a multiple of ``round_to`` or the dense width.

    Ascending: ``0``, then ``I % round_to`` (or ``round_to`` when that is 0), then steps of ``round_to`` up to ``I``.
    """
    return [0, *range(_first_block(intermediate_size, round_to), intermediate_size + 1, round_to)]


def _floor_allowed(pruned: torch.Tensor, first: int, round_to: int) -> torch.Tensor:
    """The largest allowed pruned count <= ``pruned`` (int64, any shape): the width rounded up."""
    steps = torch.div(pruned - first, round_to, rounding_mode="floor")
    return torch.where(pruned < first, torch.zeros_like(pruned), first + steps * round_to)


def _check_scores(name: str, scores, shape: tuple[int, int], what: str) -> torch.Tensor:
    scores = torch.as_tensor(scores)  # a tensor, or anything torch turns into one (array, nested lists)
    if tuple(scores.shape) != shape:
        raise ValueError(f"{name}: shape {tuple(scores.shape)} does not match the geometry's {shape} ({what})")
    if scores.is_complex() or scores.dtype == torch.bool:
        raise ValueError(f"{name}: expected real scores, got dtype {scores.dtype}")
    # float64 holds every float32/float16/bfloat16 value exactly, so the ranking is unchanged.
    out = scores.detach().to("cpu", torch.float64)
    bad = ~torch.isfinite(out)
    if bad.any():
        layer = int(bad.any(dim=1).nonzero()[0, 0])
        count = int(bad[layer].sum())
        raise ValueError(f"{name}: layer {layer} has {count} non-finite score(s) (NaN or inf)")
    return out


def _kept_lists(pruned_mask: torch.Tensor) -> list[list[int]]:
    """Sorted kept indices per row of a [L, N] bool mask of pruned units."""
    keep = ~pruned_mask
    return [row.nonzero().flatten().tolist() for row in keep]


def _global_kv_groups(
    attn: torch.Tensor, n_prune: int, keep: int = 1, frozen: torch.Tensor | None = None
) -> torch.Tensor:
    """[L, H] bool: the ``n_prune`` lowest (score, layer, index) groups (or as many as there are candidates),
    skipping each row's ``keep`` best ones and every group of the rows ``frozen`` (bool [L]) marks."""
    num_layers, num_groups = attn.shape
    order = torch.sort(attn.flatten(), stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    best = rank.view(num_layers, num_groups).topk(keep, dim=1).indices  # ranks are distinct: keep best per row
    protected = torch.zeros(num_layers, num_groups, dtype=torch.bool)
    protected.scatter_(1, best, True)
    if frozen is not None:
        protected[frozen] = True
    candidates = order[~protected.flatten()[order]]
    pruned = torch.zeros(num_layers * num_groups, dtype=torch.bool)
    pruned[candidates[:n_prune]] = True
    return pruned.view(num_layers, num_groups)


def _sortable_key(x: torch.Tensor) -> torch.Tensor:
    """int64 keys of float64 values, in the same order (an involution: it maps keys back to values too)."""
    bits = x.view(torch.int64)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)


def _bottom_k_per_layer(sorted_scores: torch.Tensor, k: int) -> torch.Tensor:
    """int64[L]: how many of the ``k`` lowest (score, layer, index) entries each layer holds.

    sorted_scores: float64[L, N] of finite values, each row ascending. Entries tied with the k-th go to the
    earliest layers first. The k-th value is found by bisecting the float64 order (64 steps of L binary
    searches), which is much cheaper than a selection over all L*N entries.
    """
    num_layers = sorted_scores.shape[0]
    if k == 0:
        return torch.zeros(num_layers, dtype=torch.int64)

    def at_most(key: int) -> torch.Tensor:
        value = _sortable_key(torch.tensor([key], dtype=torch.int64)).view(torch.float64)
        return torch.searchsorted(sorted_scores, value.expand(num_layers, 1).contiguous(), right=True).flatten()

    lo = int(_sortable_key(sorted_scores[:, 0].min().reshape(1))[0])  # count(<= lo) may be < k
    hi = int(_sortable_key(sorted_scores[:, -1].max().reshape(1))[0])  # count(<= hi) = L*N >= k
    while lo < hi:  # the smallest key whose value has at least k entries at or below it: the k-th value
        mid = (lo + hi) // 2
        if int(at_most(mid).sum()) >= k:
            hi = mid
        else:
            lo = mid + 1
    kth = _sortable_key(torch.tensor([lo], dtype=torch.int64)).view(torch.float64).expand(num_layers, 1).contiguous()
    # Compare values, not keys: -0.0 and 0.0 have different keys but are the same score.
    below = torch.searchsorted(sorted_scores, kth).flatten()
    upto = torch.searchsorted(sorted_scores, kth, right=True).flatten()
    tied = upto - below
    short = k - int(below.sum())
    tied_before = tied.cumsum(0) - tied
    return below + (short - tied_before).clamp(min=0).minimum(tied)


def _global_mlp_channels(
    mlp: torch.Tensor, budget: float, round_to: int, frozen: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict]:
    """[L, I] bool of pruned channels (widths allowed, total nearest ``budget``) and the rounding counts;
    the layers ``frozen`` (bool [L]) marks keep every channel."""
    num_layers, width = mlp.shape
    first = _first_block(width, round_to)
    sorted_scores, per_layer_sorted = torch.sort(mlp, dim=1, stable=True)  # ties by index

    # Block j of a layer ends at sorted position ends[j]; it is ranked by that channel, its best. A stable sort
    # of the end scores, laid out layer by layer, orders blocks by their end's (score, layer, index): within a
    # layer, tied ends already come in index order.
    ends = torch.arange(first - 1, width, round_to)
    sizes = torch.full((ends.numel(),), round_to, dtype=torch.int64)
    sizes[0] = first
    block_order = torch.sort(sorted_scores[:, ends].flatten(), stable=True).indices
    if frozen is not None:
        block_order = block_order[~frozen[torch.div(block_order, ends.numel(), rounding_mode="floor")]]
    totals = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.repeat(num_layers)[block_order].cumsum(0)])
    # The prefix of blocks whose channel total is nearest the budget (ties: prune fewer).
    n_blocks = int(torch.argmin((totals.to(torch.float64) - budget).abs()))

    taken = torch.zeros(num_layers * ends.numel(), dtype=torch.int64)
    taken[block_order[:n_blocks]] = 1
    blocks_per_layer = taken.view(num_layers, -1).sum(dim=1)
    pruned_per_layer = torch.where(blocks_per_layer > 0, first + (blocks_per_layer - 1) * round_to, 0)

    pruned_sorted = torch.arange(width).expand(num_layers, width) < pruned_per_layer[:, None]
    pruned = torch.zeros(num_layers, width, dtype=torch.bool)
    pruned.scatter_(1, per_layer_sorted, pruned_sorted)

    # Diagnostics: plain bottom-k of the budget, its widths rounded up, and what re-balancing then added.
    free = torch.ones(num_layers, dtype=torch.bool) if frozen is None else ~frozen
    n_plain = min(max(_nearest_int(budget), 0), int(free.sum()) * width)
    plain_per_layer = torch.zeros(num_layers, dtype=torch.int64)
    plain_per_layer[free] = _bottom_k_per_layer(sorted_scores[free], n_plain)
    rounded_per_layer = _floor_allowed(plain_per_layer, first, round_to)
    counts = {
        "mlp_channels_budget": n_plain,
        "mlp_channels_spared_by_rounding": int((plain_per_layer - rounded_per_layer).sum()),
        "mlp_channels_added_by_rebalance": int(pruned_per_layer.sum() - rounded_per_layer.sum()),
    }
    return pruned, counts


def _uniform_bottom_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[L, N] bool: each row's ``k`` lowest (score, index) entries."""
    num_rows, n = scores.shape
    idx = torch.sort(scores, dim=1, stable=True).indices
    pruned = torch.zeros(num_rows, n, dtype=torch.bool)
    pruned.scatter_(1, idx[:, :k], True)
    return pruned


def allocate(
    attn_scores: torch.Tensor,
    mlp_scores: torch.Tensor,
    geometry: Geometry,
    *,
    sparsity: float,
    gamma: float = 3.0,
    allocation: str = "global",
    round_to: int = 8,
    architecture: str = "",
    protect_layers: int = 0,
    min_kv_groups: int = 0,
    normalize: str = "none",
) -> PruningPlan:
    """The pruning plan that removes ``sparsity`` of the prunable parameters, lowest scores first.

    attn_scores: [num_attention_blocks, num_kv_heads] real (float32 from the saliency kernels), one score per KV group
    (``num_attention_blocks`` is ``num_layers`` but for encoder-decoders, see ``Geometry``).
    mlp_scores: [num_layers, intermediate_size] real, one score per MLP channel. Higher means more important.
    gamma: MLP fraction pruned / attention fraction pruned. allocation: "global" (rank across layers) or
    "uniform" (same widths in every layer). round_to: MLP widths are multiples of it, or the dense width.
    protect_layers: the first N layers keep everything. min_kv_groups: every attention block keeps at least K
    KV groups (0 and 1: the keep-one rule). normalize: "none", or per-layer "mean"/"median" scaling of the scores
    before a global ranking (see the module docstring). Deterministic: ties are broken by (layer, index).

    The plan's ``meta`` records: ``target_sparsity``, ``achieved_sparsity``, ``gamma``, ``f_attn``, ``f_mlp``,
    ``round_to``, ``allocation``; the formula's counts before any rounding or per-layer rule
    (``kv_groups_pruned_formula``, ``mlp_channels_pruned_formula``); ``kv_groups_spared_by_keep_one``;
    ``mlp_channels_budget``, the MLP count that makes up exactly what the attention side actually pruned
    (the formula count plus the spared groups and the count rounding, in channels); how many of those the
    width rounding spared (``mlp_channels_spared_by_rounding``) and re-balancing then pruned elsewhere
    (``mlp_channels_added_by_rebalance``); and the final ``kv_groups_pruned`` and ``mlp_channels_pruned``.
    ``kv_groups_spared_by_keep_one`` counts every group the per-layer rules spared: keep-one, ``min_kv_groups``
    and ``protect_layers``. The three options are recorded too (``protect_layers``, ``min_kv_groups``,
    ``normalize``).
    """
    f_attn, f_mlp = prune_fractions(geometry, sparsity, gamma)
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation: must be one of {ALLOCATIONS}, got {allocation!r}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to: must be an int >= 1, got {round_to!r}")
    g = geometry
    check_rules(g, protect_layers=protect_layers, min_kv_groups=min_kv_groups, normalize=normalize)
    rows = g.num_attention_blocks
    attn = _check_scores("attn_scores", attn_scores, (rows, g.num_kv_heads), "num_attention_blocks, num_kv_heads")
    mlp = _check_scores("mlp_scores", mlp_scores, (g.num_layers, g.intermediate_size), "num_layers, intermediate_size")
    n_attn, n_mlp = prune_counts(g, sparsity, gamma)
    a, m = g.attn_params_per_group, g.mlp_params_per_channel
    target = sparsity * g.prunable_params
    if normalize != "none" and allocation != "global":
        raise ValueError(f"normalize: {normalize!r} changes nothing under {allocation!r} allocation (per-layer order)")
    keep = max(1, min_kv_groups)  # groups every attention block keeps
    frozen_rows = _protected_rows(g, protect_layers) if protect_layers else None
    frozen_layers = torch.arange(g.num_layers) < protect_layers if protect_layers else None
    free_rows = rows - (0 if frozen_rows is None else int(frozen_rows.sum()))
    free_layers = g.num_layers - protect_layers

    if allocation == "global":
        attn, mlp = normalize_per_layer(attn, normalize), normalize_per_layer(mlp, normalize)
        attn_pruned = _global_kv_groups(attn, n_attn, keep, frozen_rows)
        spared_kv = n_attn - int(attn_pruned.sum())
        budget = (target - int(attn_pruned.sum()) * a) / m
        mlp_pruned, counts = _global_mlp_channels(mlp, budget, round_to, frozen_layers)
    else:
        # The whole model's share, taken from the free rows only (the same product when none is frozen).
        per_row = f_attn * g.num_kv_heads if frozen_rows is None else n_attn / free_rows
        k_attn_formula = _nearest_int(per_row)
        k_attn = min(k_attn_formula, g.num_kv_heads - keep)
        spared_kv = free_rows * (k_attn_formula - k_attn)
        budget = (target - free_rows * k_attn * a) / (free_layers * m)  # channels per free layer
        allowed = torch.tensor(allowed_pruned_counts(g.intermediate_size, round_to), dtype=torch.float64)
        k_mlp = int(allowed[torch.argmin((allowed - budget).abs())])  # ties: prune fewer
        attn_pruned = _uniform_bottom_k(attn, k_attn)
        mlp_pruned = _uniform_bottom_k(mlp, k_mlp)
        if frozen_rows is not None:
            attn_pruned[frozen_rows] = False
            mlp_pruned[frozen_layers] = False
        plain = min(max(_nearest_int(budget), 0), g.intermediate_size)
        rounded = int(_floor_allowed(torch.tensor(plain), _first_block(g.intermediate_size, round_to), round_to))
        counts = {
            "mlp_channels_budget": free_layers * plain,
            "mlp_channels_spared_by_rounding": free_layers * (plain - rounded),
            "mlp_channels_added_by_rebalance": free_layers * (k_mlp - rounded),
        }

    attn_kept = _kept_lists(attn_pruned)
    cross = [None] * (g.num_layers - g.cross_attention_layers) + attn_kept[g.num_layers :]
    layers = [
        LayerPlan(kv, ch, cr)
        for kv, ch, cr in zip(attn_kept[: g.num_layers], _kept_lists(mlp_pruned), cross, strict=True)
    ]
    plan = PruningPlan(architecture, g, layers)
    kv_pruned = int(attn_pruned.sum())
    achieved = plan.achieved_sparsity()
    plan.meta = {
        "method": "nirvana",
        "allocation": allocation,
        "target_sparsity": float(sparsity),
        "achieved_sparsity": achieved,
        "gamma": float(gamma),
        "f_attn": f_attn,
        "f_mlp": f_mlp,
        "round_to": round_to,
        "kv_groups_pruned_formula": n_attn,
        "mlp_channels_pruned_formula": n_mlp,
        "kv_groups_pruned": kv_pruned,
        "kv_groups_spared_by_keep_one": spared_kv,
        **counts,
        "mlp_channels_pruned": int(mlp_pruned.sum()),
        "protect_layers": protect_layers,
        "min_kv_groups": min_kv_groups,
        "normalize": normalize,
    }
    if abs(achieved - sparsity) > SPARSITY_TOLERANCE:
        warnings.warn(
            f"allocate: achieved sparsity {achieved:.4f} is {100 * abs(achieved - sparsity):.2f} percentage points "
            f"from the target {sparsity}: this geometry's KV groups and {round_to}-channel MLP blocks (round_to) "
            "are too coarse (or the MLP cannot absorb what the keep-one-group rule spares)",
            RuntimeWarning,
            stacklevel=2,
        )
    return plan
