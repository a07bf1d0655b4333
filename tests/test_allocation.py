"""nirvana.allocation: from scores and geometry to a PruningPlan."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from nirvana.allocation import allocate, allowed_pruned_counts, prune_counts, prune_fractions
from nirvana.plan import Geometry, PruningPlan

SMOLLM2 = Geometry(num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536)
LLAMA8B = Geometry(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336)
TINY = Geometry(num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=512)
# tests/tiny_models.py's shape: one KV group is 10% of the prunable parameters, far too coarse for 0.5 pp.
COARSE = Geometry(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48)
GEOMETRIES = {"smollm2": SMOLLM2, "llama8b": LLAMA8B, "tiny": TINY}

_SCORES: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def random_scores(g: Geometry, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive float32 scores of the saliency kernels' shapes: [L, H_kv] and [L, I]."""
    gen = torch.Generator().manual_seed(seed)
    attn = torch.rand(g.num_layers, g.num_kv_heads, generator=gen) + 1e-3
    mlp = torch.rand(g.num_layers, g.intermediate_size, generator=gen) + 1e-3
    return attn, mlp


def cached_scores(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name not in _SCORES:
        _SCORES[name] = random_scores(GEOMETRIES[name])
    return _SCORES[name]


def widths(plan: PruningPlan) -> list[tuple[int, int]]:
    return [(len(lp.kv_groups_kept), len(lp.mlp_channels_kept)) for lp in plan.layers]


def pruned_mask(plan: PruningPlan, attr: str, size: int) -> torch.Tensor:
    """[L, size] bool: True where the plan drops the unit."""
    mask = torch.ones(len(plan.layers), size, dtype=torch.bool)
    for i, lp in enumerate(plan.layers):
        mask[i, getattr(lp, attr)] = False
    return mask


def assert_plan_invariants(plan: PruningPlan, round_to: int) -> None:
    g = plan.geometry
    plan.validate()
    for i, (kv, ch) in enumerate(widths(plan)):
        assert kv >= 1, f"layer {i} keeps no KV group"
        assert ch % round_to == 0 or ch == g.intermediate_size, (
            f"layer {i}: MLP width {ch} not a multiple of {round_to}"
        )
    m = plan.meta
    assert m["achieved_sparsity"] == pytest.approx(plan.achieved_sparsity(), abs=1e-12)
    assert m["kv_groups_pruned"] == g.num_layers * g.num_kv_heads - sum(kv for kv, _ in widths(plan))
    assert m["mlp_channels_pruned"] == g.num_layers * g.intermediate_size - sum(ch for _, ch in widths(plan))
    # before rounding - spared by rounding + added by re-balancing = what the plan prunes
    rounding = m["mlp_channels_budget"] - m["mlp_channels_spared_by_rounding"]
    assert rounding + m["mlp_channels_added_by_rebalance"] == m["mlp_channels_pruned"]


# ---------------------------------------------------------------------------------------------------------
# The formula


def test_published_llama8b_counts():
    """Llama-3.1-8B at s=0.5, gamma=3.36: 44 of 256 KV groups and 265,197 of 458,752 channels (the paper)."""
    assert LLAMA8B.num_layers * LLAMA8B.num_kv_heads == 256
    assert LLAMA8B.num_layers * LLAMA8B.intermediate_size == 458_752
    assert prune_counts(LLAMA8B, 0.5, 3.36) == (44, 265_197)
    attn, mlp = cached_scores("llama8b")
    plan = allocate(attn, mlp, LLAMA8B, sparsity=0.5, gamma=3.36)
    assert plan.meta["kv_groups_pruned_formula"] == 44
    assert plan.meta["mlp_channels_pruned_formula"] == 265_197
    assert plan.meta["kv_groups_pruned"] == 44  # 8 groups per layer: keep-one never binds here
    # 44 groups is 0.044 of a group more than the formula's share; the MLP budget makes up those parameters.
    f_attn, _ = prune_fractions(LLAMA8B, 0.5, 3.36)
    extra = (f_attn * 256 - 44) * LLAMA8B.attn_params_per_group / LLAMA8B.mlp_params_per_channel
    assert plan.meta["mlp_channels_budget"] == round(prune_fractions(LLAMA8B, 0.5, 3.36)[1] * 458_752 + extra)
    assert abs(plan.achieved_sparsity() - 0.5) <= 0.005


def test_llama8b_fractions_by_hand():
    a = 2 * (4 + 1) * 128 * 4096  # one KV group: 4 q heads, k, v, and 4 o_proj heads
    m = 3 * 4096
    f_mlp = 0.5 * (8 * a + 14336 * m) / (8 * a / 3.36 + 14336 * m)
    f_attn, got_mlp = prune_fractions(LLAMA8B, 0.5, 3.36)
    assert got_mlp == pytest.approx(f_mlp, rel=1e-12)
    assert f_attn == pytest.approx(f_mlp / 3.36, rel=1e-12)


@pytest.mark.parametrize("gamma", [0.8, 1.0, 3.0, 3.36], ids=lambda x: f"gamma{x}")
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.7], ids=lambda x: f"s{x}")
@pytest.mark.parametrize("name", ["smollm2", "llama8b", "tiny"])
def test_fractions_remove_sparsity_share_in_gamma_ratio(name, sparsity, gamma):
    g = GEOMETRIES[name]
    f_attn, f_mlp = prune_fractions(g, sparsity, gamma)
    removed = f_attn * g.num_kv_heads * g.attn_params_per_group + f_mlp * g.intermediate_size * g.mlp_params_per_channel
    assert removed * g.num_layers == pytest.approx(sparsity * g.prunable_params, rel=1e-12, abs=1e-9)
    if sparsity:
        assert f_mlp / f_attn == pytest.approx(gamma, rel=1e-12)


def test_non_gated_mlp_uses_two_matrices_per_channel():
    g = Geometry(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=256)
    plain = Geometry(**{**g.to_dict(), "gated": False})
    f_gated = prune_fractions(g, 0.4, 2.0)[1]
    f_plain = prune_fractions(plain, 0.4, 2.0)[1]
    a = 2 * 3 * 16 * 64
    for f, m in ((f_gated, 3 * 64), (f_plain, 2 * 64)):
        assert f == pytest.approx(0.4 * (2 * a + 256 * m) / (2 * a / 2.0 + 256 * m), rel=1e-12)


@pytest.mark.parametrize(
    ("sparsity", "gamma", "which"),
    [(0.9, 3.36, "f_mlp"), (0.5, 0.2, "f_attn")],
    ids=["mlp_over_1", "attn_over_1"],
)
def test_fraction_above_one_raises_saying_which(sparsity, gamma, which):
    g = LLAMA8B if which == "f_mlp" else SMOLLM2
    with pytest.raises(ValueError, match=rf"^sparsity: .*{which} = [0-9.]+, [0-9.]+ more than everything"):
        prune_fractions(g, sparsity, gamma)
    attn, mlp = random_scores(g)
    with pytest.raises(ValueError, match=which):
        allocate(attn, mlp, g, sparsity=sparsity, gamma=gamma)


# ---------------------------------------------------------------------------------------------------------
# Global allocation


@pytest.mark.parametrize("gamma", [1.0, 3.0, 3.36], ids=lambda x: f"gamma{x}")
@pytest.mark.parametrize("sparsity", [0.1, 0.2, 0.3, 0.5, 0.7], ids=lambda x: f"s{x}")
@pytest.mark.parametrize("name", ["smollm2", "llama8b", "tiny"])
def test_global_achieves_target_within_half_a_point(name, sparsity, gamma):
    attn, mlp = cached_scores(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "too coarse" warning either
        plan = allocate(attn, mlp, GEOMETRIES[name], sparsity=sparsity, gamma=gamma, architecture="LlamaForCausalLM")
    assert abs(plan.achieved_sparsity() - sparsity) <= 0.005, plan.meta
    assert_plan_invariants(plan, 8)
    m = plan.meta
    assert (m["target_sparsity"], m["gamma"], m["allocation"], m["round_to"]) == (sparsity, gamma, "global", 8)
    assert (m["f_attn"], m["f_mlp"]) == prune_fractions(GEOMETRIES[name], sparsity, gamma)
    assert m["kv_groups_pruned"] + m["kv_groups_spared_by_keep_one"] == m["kv_groups_pruned_formula"]
    assert plan.architecture == "LlamaForCausalLM"


def _literal_reference(attn, mlp, g: Geometry, sparsity: float, gamma: float, round_to: int):
    """The rules as written, one unit at a time: bottom-k, keep-one, round widths up, then re-balance."""
    num_layers, heads, width = g.num_layers, g.num_kv_heads, g.intermediate_size
    a, m = g.attn_params_per_group, g.mlp_params_per_channel
    f_mlp = sparsity * (heads * a + width * m) / (heads * a / gamma + width * m)
    n_attn = math.floor(f_mlp / gamma * num_layers * heads + 0.5)

    best = {layer: max(range(heads), key=lambda i: (attn[layer][i], i)) for layer in range(num_layers)}
    groups = sorted((attn[layer][i], layer, i) for layer in range(num_layers) for i in range(heads) if i != best[layer])
    pruned_groups = {(layer, i) for _, layer, i in groups[:n_attn]}

    budget = (sparsity * g.prunable_params - len(pruned_groups) * a) / m
    n_plain = min(max(math.floor(budget + 0.5), 0), num_layers * width)
    channels = sorted((mlp[layer][i], layer, i) for layer in range(num_layers) for i in range(width))
    per_layer = [0] * num_layers
    for _, layer, _ in channels[:n_plain]:
        per_layer[layer] += 1
    allowed = allowed_pruned_counts(width, round_to)
    plain = list(per_layer)
    per_layer = [max(x for x in allowed if x <= p) for p in per_layer]  # widths rounded up
    counts = {
        "mlp_channels_budget": n_plain,
        "mlp_channels_spared_by_rounding": sum(plain) - sum(per_layer),
    }
    order = [sorted(range(width), key=lambda i, layer=layer: (mlp[layer][i], i)) for layer in range(num_layers)]
    total = sum(per_layer)
    while True:  # re-balance: the lowest-ranked next block anywhere, while it brings the total nearer the budget
        options = []
        for layer in range(num_layers):
            if per_layer[layer] < width:
                nxt = min(x for x in allowed if x > per_layer[layer])
                end = order[layer][nxt - 1]
                options.append(((mlp[layer][end], layer, end), layer, nxt))
        if not options:
            break
        _, layer, nxt = min(options)
        grown = total + nxt - per_layer[layer]
        if abs(grown - budget) >= abs(total - budget):
            break
        total, per_layer[layer] = grown, nxt
    kv_kept = [[i for i in range(heads) if (layer, i) not in pruned_groups] for layer in range(num_layers)]
    mlp_kept = [sorted(order[layer][per_layer[layer] :]) for layer in range(num_layers)]
    counts["mlp_channels_added_by_rebalance"] = total - (n_plain - counts["mlp_channels_spared_by_rounding"])
    return kv_kept, mlp_kept, counts


@pytest.mark.parametrize("round_to", [1, 3, 8], ids=lambda r: f"round{r}")
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("seed", [0, 1, 2], ids=lambda s: f"seed{s}")
def test_global_matches_literal_reference(seed, ties, round_to):
    """The vectorised blocks agree with the rules applied one unit at a time, ties included."""
    g = Geometry(num_layers=5, hidden_size=16, num_heads=6, num_kv_heads=3, head_dim=4, intermediate_size=20)
    gen = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values, so ties straddle every threshold
        attn = torch.randint(0, 3, (5, 3), generator=gen).float()
        mlp = torch.randint(0, 4, (5, 20), generator=gen).float()
    else:
        attn, mlp = torch.rand(5, 3, generator=gen), torch.rand(5, 20, generator=gen)
    for sparsity, gamma in ((0.2, 1.0), (0.45, 3.0), (0.6, 0.7)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # this little geometry may be too coarse; fine here
            plan = allocate(attn, mlp, g, sparsity=sparsity, gamma=gamma, round_to=round_to)
        kv_kept, mlp_kept, counts = _literal_reference(attn.tolist(), mlp.tolist(), g, sparsity, gamma, round_to)
        assert [lp.kv_groups_kept for lp in plan.layers] == kv_kept, (sparsity, gamma)
        assert [lp.mlp_channels_kept for lp in plan.layers] == mlp_kept, (sparsity, gamma)
        assert {key: plan.meta[key] for key in counts} == counts, (sparsity, gamma)
        assert_plan_invariants(plan, round_to)


@pytest.mark.parametrize("round_to", [1, 8], ids=lambda r: f"round{r}")
def test_all_tied_scores_prune_exactly_k_lowest_layer_then_index(round_to):
    """With every score equal, bottom-k takes units in (layer, index) order, exactly k of them."""
    g = SMOLLM2
    attn = torch.ones(g.num_layers, g.num_kv_heads)
    mlp = torch.ones(g.num_layers, g.intermediate_size)
    plan = allocate(attn, mlp, g, sparsity=0.3, gamma=3.0, round_to=round_to)
    n_attn = plan.meta["kv_groups_pruned"]
    assert n_attn == prune_counts(g, 0.3, 3.0)[0]
    # Each layer's best group is its last one (latest in the ranking); the rest go in (layer, index) order.
    candidates = [(layer, i) for layer in range(g.num_layers) for i in range(g.num_kv_heads - 1)]
    expected = torch.zeros(g.num_layers, g.num_kv_heads, dtype=torch.bool)
    for layer, i in candidates[:n_attn]:
        expected[layer, i] = True
    assert torch.equal(pruned_mask(plan, "kv_groups_kept", g.num_kv_heads), expected)

    n_mlp = plan.meta["mlp_channels_pruned"]
    budget = (0.3 * g.prunable_params - n_attn * g.attn_params_per_group) / g.mlp_params_per_channel
    assert n_mlp == (round(budget) if round_to == 1 else round(budget / 8) * 8)
    assert torch.equal(
        pruned_mask(plan, "mlp_channels_kept", g.intermediate_size).flatten(),
        torch.arange(g.num_layers * g.intermediate_size) < n_mlp,
    )


def test_ties_at_threshold_prune_exactly_the_budget():
    """Half the channels share the threshold score: a threshold would prune all of them, bottom-k only k."""
    g = SMOLLM2
    gen = torch.Generator().manual_seed(3)
    mlp = torch.where(torch.rand(g.num_layers, g.intermediate_size, generator=gen) < 0.5, 0.25, 1.0)
    mlp[:, :10] = 0.0  # some clearly below
    attn = torch.rand(g.num_layers, g.num_kv_heads, generator=gen)
    plan = allocate(attn, mlp, g, sparsity=0.2, gamma=3.0, round_to=1)
    pruned = pruned_mask(plan, "mlp_channels_kept", g.intermediate_size)
    budget = (0.2 * g.prunable_params - plan.meta["kv_groups_pruned"] * g.attn_params_per_group) / (
        g.mlp_params_per_channel
    )
    assert int(pruned.sum()) == round(budget)
    assert 0 < int((mlp[pruned] == 0.25).sum()) < int((mlp == 0.25).sum())  # the tied value was split
    assert bool((mlp[pruned] <= 0.25).all()) and bool((mlp[~pruned] >= 0.25).all())


def test_keep_one_group_keeps_the_best_of_a_terrible_layer():
    g = SMOLLM2
    attn, mlp = random_scores(g, seed=4)
    attn[7] = torch.tensor([-1000.0, -998.0, -999.0])  # all three below every other group; index 1 is best
    plan = allocate(attn, mlp, g, sparsity=0.3, gamma=3.0)
    assert plan.layers[7].kv_groups_kept == [1]
    n_attn = prune_counts(g, 0.3, 3.0)[0]
    assert plan.meta["kv_groups_pruned"] == n_attn  # other layers had candidates to spare
    assert plan.meta["kv_groups_spared_by_keep_one"] == 0
    # The rest are the lowest-scored candidates elsewhere.
    others = attn.clone()
    others[7] = math.inf
    expected = torch.zeros(g.num_layers * g.num_kv_heads, dtype=torch.bool)
    expected[torch.argsort(others.flatten(), stable=True)[: n_attn - 2]] = True
    expected = expected.view(g.num_layers, g.num_kv_heads)
    assert not expected.all(dim=1).any()  # with this seed the rule binds in layer 7 only
    expected[7] = torch.tensor([True, False, True])
    assert torch.equal(pruned_mask(plan, "kv_groups_kept", g.num_kv_heads), expected)


def test_keep_one_group_shortfall_is_made_up_on_the_mlp_side():
    """gamma 0.5 asks for 80% of SmolLM2's 3 KV groups per layer; only 2 of 3 may go."""
    g = SMOLLM2
    attn, mlp = cached_scores("smollm2")
    assert prune_fractions(g, 0.5, 0.5)[0] > 2 / 3
    plan = allocate(attn, mlp, g, sparsity=0.5, gamma=0.5)
    assert all(kv == 1 for kv, _ in widths(plan))
    assert plan.meta["kv_groups_spared_by_keep_one"] == prune_counts(g, 0.5, 0.5)[0] - 60
    assert plan.meta["mlp_channels_pruned"] > prune_counts(g, 0.5, 0.5)[1]
    assert abs(plan.achieved_sparsity() - 0.5) <= 0.005
    assert_plan_invariants(plan, 8)


@pytest.mark.parametrize("intermediate", [1536, 1540, 5], ids=["multiple", "remainder4", "below_round_to"])
def test_widths_are_multiples_of_round_to_or_dense(intermediate):
    g = Geometry(**{**SMOLLM2.to_dict(), "intermediate_size": intermediate})
    attn, mlp = random_scores(g, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 5 channels: coarse on purpose
        plan = allocate(attn, mlp, g, sparsity=0.4, gamma=1.0)  # gamma 1: 5 channels cannot take 3x the share
    assert_plan_invariants(plan, 8)
    assert {ch for _, ch in widths(plan)} - {intermediate} <= set(range(0, intermediate, 8))
    assert any(ch < intermediate for _, ch in widths(plan))


def test_rounding_spares_the_best_candidates_of_the_layer():
    """A layer's kept channels are always its highest-ranked ones: rounding spares from the top of the pruned."""
    g = SMOLLM2
    attn, mlp = cached_scores("smollm2")
    plan = allocate(attn, mlp, g, sparsity=0.5, gamma=3.0)
    for layer, lp in enumerate(plan.layers):
        kept = mlp[layer, lp.mlp_channels_kept]
        dropped = pruned_mask(plan, "mlp_channels_kept", g.intermediate_size)[layer]
        if dropped.any() and lp.mlp_channels_kept:
            assert kept.min() >= mlp[layer, dropped].max(), f"layer {layer}"
    assert plan.meta["mlp_channels_spared_by_rounding"] > 0
    assert plan.meta["mlp_channels_added_by_rebalance"] > 0


@pytest.mark.parametrize(
    ("intermediate", "round_to", "expected"),
    [(16, 8, [0, 8, 16]), (20, 8, [0, 4, 12, 20]), (5, 8, [0, 5]), (3, 1, [0, 1, 2, 3])],
    ids=["multiple", "remainder", "narrower", "round1"],
)
def test_allowed_pruned_counts(intermediate, round_to, expected):
    assert allowed_pruned_counts(intermediate, round_to) == expected


def test_deterministic_and_dtype_independent():
    g = SMOLLM2
    gen = torch.Generator().manual_seed(6)
    attn = torch.randint(0, 5, (g.num_layers, g.num_kv_heads), generator=gen).float()
    mlp = torch.randint(0, 50, (g.num_layers, g.intermediate_size), generator=gen).float()  # many ties
    first = allocate(attn, mlp, g, sparsity=0.35, gamma=3.0).to_dict()
    assert allocate(attn.clone(), mlp.clone(), g, sparsity=0.35, gamma=3.0).to_dict() == first
    assert allocate(attn.double(), mlp.double(), g, sparsity=0.35, gamma=3.0).to_dict() == first
    assert allocate(attn.half(), mlp.half(), g, sparsity=0.35, gamma=3.0).to_dict() == first


def test_sparsity_zero_keeps_everything():
    g = Geometry(**{**SMOLLM2.to_dict(), "intermediate_size": 1540})  # dense width not a multiple of 8
    attn, mlp = random_scores(g)
    for allocation in ("global", "uniform"):
        plan = allocate(attn, mlp, g, sparsity=0.0, allocation=allocation)
        assert all(lp.kv_groups_kept == list(range(3)) for lp in plan.layers)
        assert all(lp.mlp_channels_kept == list(range(1540)) for lp in plan.layers)
        assert plan.achieved_sparsity() == 0.0


def test_coarse_geometry_warns_but_plans():
    attn, mlp = random_scores(COARSE)
    with pytest.warns(RuntimeWarning, match="too coarse"):
        plan = allocate(attn, mlp, COARSE, sparsity=0.33, gamma=3.0)
    assert_plan_invariants(plan, 8)
    assert plan.meta["achieved_sparsity"] > 0.0


# ---------------------------------------------------------------------------------------------------------
# Uniform allocation


UNIFORM_CASES = [("smollm2", s, gamma) for s in (0.1, 0.3, 0.5, 0.7) for gamma in (1.0, 3.36)] + [
    ("llama8b", 0.5, 3.36),
    ("llama8b", 0.2, 1.0),
]


@pytest.mark.parametrize(
    ("name", "sparsity", "gamma"), UNIFORM_CASES, ids=[f"{n}-s{s}-gamma{gm}" for n, s, gm in UNIFORM_CASES]
)
def test_uniform_same_widths_everywhere(name, sparsity, gamma):
    g = GEOMETRIES[name]
    attn, mlp = cached_scores(name)
    plan = allocate(attn, mlp, g, sparsity=sparsity, gamma=gamma, allocation="uniform")
    assert plan.is_uniform()
    assert plan.meta["allocation"] == "uniform"
    assert_plan_invariants(plan, 8)
    assert abs(plan.achieved_sparsity() - sparsity) <= 0.005, plan.meta
    # Each layer drops its own lowest-scored units.
    kv_pruned, ch_pruned = g.num_kv_heads - widths(plan)[0][0], g.intermediate_size - widths(plan)[0][1]
    expected_kv = torch.zeros_like(attn, dtype=torch.bool).scatter_(
        1, attn.argsort(dim=1, stable=True)[:, :kv_pruned], True
    )
    expected_ch = torch.zeros_like(mlp, dtype=torch.bool).scatter_(
        1, mlp.argsort(dim=1, stable=True)[:, :ch_pruned], True
    )
    assert torch.equal(pruned_mask(plan, "kv_groups_kept", g.num_kv_heads), expected_kv)
    assert torch.equal(pruned_mask(plan, "mlp_channels_kept", g.intermediate_size), expected_ch)


def test_uniform_ignores_cross_layer_differences():
    """One layer far less important than the rest: global concentrates pruning there, uniform does not."""
    g = SMOLLM2
    attn, mlp = random_scores(g, seed=7)
    mlp[3] -= 10.0
    global_plan = allocate(attn, mlp, g, sparsity=0.3, gamma=3.0)
    uniform_plan = allocate(attn, mlp, g, sparsity=0.3, gamma=3.0, allocation="uniform")
    assert widths(global_plan)[3][1] < min(ch for i, (_, ch) in enumerate(widths(global_plan)) if i != 3)
    assert len({ch for _, ch in widths(uniform_plan)}) == 1


# ---------------------------------------------------------------------------------------------------------
# Inputs, output format, speed


def _bad(**changes):
    attn, mlp = random_scores(SMOLLM2)
    kw = {"attn_scores": attn, "mlp_scores": mlp, "geometry": SMOLLM2, "sparsity": 0.5, "gamma": 3.0}
    kw.update(changes)
    return kw


def _with_nonfinite(which: str, layer: int, value: float):
    attn, mlp = random_scores(SMOLLM2)
    (attn if which == "attn_scores" else mlp)[layer, 1] = value
    return {"attn_scores": attn, "mlp_scores": mlp}


BAD_INPUTS = {
    "sparsity_negative": (_bad(sparsity=-0.1), r"^sparsity: .*-0\.1"),
    "sparsity_one": (_bad(sparsity=1.0), r"^sparsity: .*1\.0"),
    "sparsity_nan": (_bad(sparsity=float("nan")), r"^sparsity: .*nan"),
    "sparsity_string": (_bad(sparsity="0.5"), r"^sparsity: .*'0\.5'"),
    "gamma_zero": (_bad(gamma=0.0), r"^gamma: .*0\.0"),
    "gamma_negative": (_bad(gamma=-3.0), r"^gamma: .*-3\.0"),
    "gamma_nan": (_bad(gamma=float("nan")), r"^gamma: .*nan"),
    "gamma_inf": (_bad(gamma=float("inf")), r"^gamma: .*inf"),
    "allocation": (_bad(allocation="layerwise"), r"^allocation: .*'layerwise'"),
    "round_to_zero": (_bad(round_to=0), r"^round_to: .*0"),
    "round_to_float": (_bad(round_to=8.0), r"^round_to: .*8\.0"),
    "attn_too_few_layers": (_bad(attn_scores=torch.rand(29, 3)), r"^attn_scores: shape \(29, 3\) .*\(30, 3\)"),
    "attn_wrong_groups": (_bad(attn_scores=torch.rand(30, 9)), r"^attn_scores: shape \(30, 9\)"),
    "attn_flat": (_bad(attn_scores=torch.rand(90)), r"^attn_scores: shape \(90,\)"),
    "mlp_wrong_width": (_bad(mlp_scores=torch.rand(30, 1535)), r"^mlp_scores: shape \(30, 1535\) .*\(30, 1536\)"),
    "mlp_complex": (_bad(mlp_scores=torch.rand(30, 1536, dtype=torch.complex64)), r"^mlp_scores: .*complex"),
    "attn_nan_layer5": (_bad(**_with_nonfinite("attn_scores", 5, float("nan"))), r"^attn_scores: layer 5 .*"),
    "mlp_inf_layer12": (_bad(**_with_nonfinite("mlp_scores", 12, float("inf"))), r"^mlp_scores: layer 12 .*"),
    "mlp_neg_inf_layer0": (_bad(**_with_nonfinite("mlp_scores", 0, -float("inf"))), r"^mlp_scores: layer 0 .*"),
    "geometry_no_layers": (
        _bad(geometry=Geometry(0, 576, 9, 3, 64, 1536), attn_scores=torch.rand(0, 3), mlp_scores=torch.rand(0, 1536)),
        r"^geometry\.num_layers: .*0",
    ),
}


@pytest.mark.parametrize(("kwargs", "pattern"), list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_it(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        allocate(**kwargs)


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_plan_json_round_trip(allocation, tmp_path):
    attn, mlp = cached_scores("smollm2")
    plan = allocate(attn, mlp, SMOLLM2, sparsity=0.4, gamma=3.36, allocation=allocation, architecture="Llama")
    again = PruningPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    assert again.achieved_sparsity() == plan.achieved_sparsity()
    plan.save(tmp_path / "plan.json")
    assert PruningPlan.load(tmp_path / "plan.json") == plan


def test_70b_shape_allocates_within_tolerance():
    """80 layers, 8 KV groups, 28,672 channels (Llama-70B's shape); its speed is in benchmarks/."""
    g = Geometry(num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8, head_dim=128, intermediate_size=28672)
    attn, mlp = random_scores(g)
    plan = allocate(attn, mlp, g, sparsity=0.5, gamma=3.36)
    assert abs(plan.achieved_sparsity() - 0.5) <= 0.005
    assert all(len(lp.mlp_channels_kept) % 8 == 0 for lp in plan.layers)


# ---------------------------------------------------------------------------------------------------------
# Allocation rules: protect_layers, min_kv_groups, normalize


def _masks(plan: PruningPlan) -> tuple[torch.Tensor, torch.Tensor]:
    g = plan.geometry
    kv = pruned_mask(plan, "kv_groups_kept", g.num_kv_heads)
    return kv, pruned_mask(plan, "mlp_channels_kept", g.intermediate_size)


@pytest.mark.parametrize("allocation", ["global", "uniform"])
@pytest.mark.parametrize("sparsity", [0.2, 0.4], ids=lambda s: f"s{s}")
def test_default_rules_are_todays_plan(sparsity, allocation):
    attn, mlp = cached_scores("smollm2")
    plain = allocate(attn, mlp, SMOLLM2, sparsity=sparsity, gamma=3.0, allocation=allocation)
    rules = allocate(
        attn, mlp, SMOLLM2, sparsity=sparsity, gamma=3.0, allocation=allocation,
        protect_layers=0, min_kv_groups=0, normalize="none",
    )  # fmt: skip
    keep_one = allocate(attn, mlp, SMOLLM2, sparsity=sparsity, gamma=3.0, allocation=allocation, min_kv_groups=1)
    for other in (rules, keep_one):
        for a, b in zip(_masks(plain), _masks(other)):
            assert torch.equal(a, b)
    assert plain.meta | {"min_kv_groups": 1} == keep_one.meta
    assert plain.meta["protect_layers"] == 0 and plain.meta["normalize"] == "none"


@pytest.mark.parametrize("allocation", ["global", "uniform"])
@pytest.mark.parametrize("protect", [1, 4], ids=lambda n: f"protect{n}")
def test_protected_layers_keep_everything_and_the_target_is_met_elsewhere(protect, allocation):
    g = SMOLLM2
    attn, mlp = random_scores(g, seed=5)
    attn[:protect] -= 10.0  # the lowest scores of the model: pruned first without protection
    mlp[:protect] -= 10.0
    unprotected = allocate(attn, mlp, g, sparsity=0.3, gamma=3.0, allocation=allocation)
    assert any(kv < g.num_kv_heads or ch < g.intermediate_size for kv, ch in widths(unprotected)[:protect])
    plan = allocate(attn, mlp, g, sparsity=0.3, gamma=3.0, allocation=allocation, protect_layers=protect)
    for lp in plan.layers[:protect]:
        assert lp.kv_groups_kept == list(range(g.num_kv_heads))
        assert lp.mlp_channels_kept == list(range(g.intermediate_size))
    assert abs(plan.achieved_sparsity() - 0.3) <= 0.005
    assert plan.meta["protect_layers"] == protect
    assert_plan_invariants(plan, 8)
    if allocation == "uniform":
        assert len(set(widths(plan)[protect:])) == 1  # the others alike


def test_protected_layers_of_an_encoder_decoder_include_their_cross_attention():
    g = Geometry(8, 64, 4, 4, 16, 256, encoder_layers=4, cross_attention_layers=4)  # cross rows 8..11: layers 4..7
    gen = torch.Generator().manual_seed(0)
    attn = torch.rand(g.num_attention_blocks, g.num_kv_heads, generator=gen) + 1e-3
    mlp = torch.rand(g.num_layers, g.intermediate_size, generator=gen) + 1e-3
    attn[8] -= 10.0  # layer 4's cross-attention: the lowest groups
    assert allocate(attn, mlp, g, sparsity=0.15, gamma=3.0).layers[4].cross_kv_groups_kept != list(range(4))
    plan = allocate(attn, mlp, g, sparsity=0.15, gamma=3.0, protect_layers=5)
    assert [len(lp.kv_groups_kept) for lp in plan.layers[:5]] == [4] * 5
    assert plan.layers[4].cross_kv_groups_kept == list(range(4))
    assert all(len(lp.mlp_channels_kept) == 256 for lp in plan.layers[:5])
    assert abs(plan.achieved_sparsity() - 0.15) <= 0.005


def test_min_kv_groups_keeps_the_best_k_and_makes_up_on_the_mlp_side():
    g = SMOLLM2
    attn, mlp = random_scores(g, seed=4)
    attn[7] = torch.tensor([-1000.0, -998.0, -999.0])  # all three below every other group; index 1 is best
    plan = allocate(attn, mlp, g, sparsity=0.3, gamma=3.0, min_kv_groups=2)
    assert plan.layers[7].kv_groups_kept == [1, 2]  # the two best
    assert all(kv >= 2 for kv, _ in widths(plan))
    assert abs(plan.achieved_sparsity() - 0.3) <= 0.005
    assert plan.meta["min_kv_groups"] == 2
    # gamma 0.5 asks for more than one group per layer: the spared groups are made up in channels.
    floor = allocate(attn, mlp, g, sparsity=0.5, gamma=0.5, min_kv_groups=2)
    assert all(kv == 2 for kv, _ in widths(floor))
    assert floor.meta["kv_groups_spared_by_keep_one"] == prune_counts(g, 0.5, 0.5)[0] - 30
    assert abs(floor.achieved_sparsity() - 0.5) <= 0.005
    everything = allocate(attn, mlp, g, sparsity=0.3, gamma=3.0, min_kv_groups=3)
    assert everything.meta["kv_groups_pruned"] == 0 and abs(everything.achieved_sparsity() - 0.3) <= 0.005


@pytest.mark.parametrize("how", ["mean", "median"])
def test_normalize_divides_out_each_layers_scale(how):
    g = TINY
    attn, mlp = random_scores(g, seed=2)
    attn, mlp = attn.double(), mlp.double()
    scale = torch.tensor([2.0**-12, 1.0, 2.0**5, 2.0**-3], dtype=torch.float64)[:, None]  # exact in float64
    scaled = allocate(attn * scale, mlp * scale, g, sparsity=0.3, gamma=3.0, normalize=how)
    unscaled = allocate(attn, mlp, g, sparsity=0.3, gamma=3.0, normalize=how)
    for a, b in zip(_masks(scaled), _masks(unscaled)):
        assert torch.equal(a, b)
    raw = allocate(attn * scale, mlp * scale, g, sparsity=0.3, gamma=3.0)
    assert widths(raw)[0][1] < widths(scaled)[0][1]  # unnormalised, the tiny layer 0 loses most
    # By hand: the normalised ranking is the ranking of x / stat(x) per layer.
    stat = (lambda x: x.mean(1, keepdim=True)) if how == "mean" else (lambda x: x.quantile(0.5, dim=1, keepdim=True))
    by_hand = allocate(attn / stat(attn), mlp / stat(mlp), g, sparsity=0.3, gamma=3.0)
    for a, b in zip(_masks(by_hand), _masks(unscaled)):
        assert torch.equal(a, b)
    assert scaled.meta["normalize"] == how


def test_normalize_keeps_a_zero_layer_raw():
    from nirvana.allocation import normalize_per_layer

    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 6.0], [-1.0, -1.0, 1.0, 0.0]])
    got = normalize_per_layer(x, "mean")
    assert torch.equal(got[0], x[0].double()) and torch.equal(got[2], x[2].double())  # mean 0, mean < 0: raw
    assert torch.equal(got[1], torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64) / 3.0)
    assert torch.equal(normalize_per_layer(x, "median")[1], torch.tensor([0.4, 0.8, 1.2, 2.4], dtype=torch.float64))
    plan = allocate(torch.zeros(4, 2).index_fill_(0, torch.tensor([1, 2, 3]), 1.0), torch.rand(4, 512), TINY,
                    sparsity=0.3, gamma=3.0, normalize="mean")  # fmt: skip
    assert len(plan.layers[0].kv_groups_kept) == 1  # the zero layer's raw scores are the lowest


RULE_REFUSALS = {
    "protect_all": ({"protect_layers": 30}, r"^protect_layers: 30 protects every layer of this model \(30 layers\)"),
    "protect_negative": ({"protect_layers": -1}, r"^protect_layers: must be a non-negative integer, got -1$"),
    "protect_float": ({"protect_layers": 1.0}, r"^protect_layers: must be a non-negative integer, got 1\.0$"),
    "floor_too_high": ({"min_kv_groups": 4}, r"^min_kv_groups: 4 is more than the model's 3 KV groups per layer$"),
    "normalize_name": ({"normalize": "zscore"}, r"^normalize: must be one of none, mean, median, got 'zscore'$"),
    "normalize_uniform": ({"normalize": "mean", "allocation": "uniform"}, r"^normalize: 'mean' changes nothing"),
}


@pytest.mark.parametrize(("changes", "pattern"), list(RULE_REFUSALS.values()), ids=list(RULE_REFUSALS))
def test_rule_refusals_are_one_line(changes, pattern):
    with pytest.raises(ValueError, match=pattern) as err:
        allocate(**_bad(**changes))
    assert "\n" not in str(err.value)
