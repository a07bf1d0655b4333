"""Compaction: a compacted model computes what the dense model computes with the same units masked.

"Masked" (``mask_model``) means: for each pruned KV group, its q rows, k rows, v rows, their bias
entries and its o_proj columns are zero; for each pruned MLP channel, its gate/up rows and its
down_proj column are zero. The zero o_proj (and down_proj) columns are what make the equivalence
exact in real arithmetic: a masked head still attends (zero q/k rows give uniform attention weights,
and v of a zero row is its bias, not zero), but whatever it produces is multiplied by zero before it
reaches the residual stream. Zeroing only q/k rows would not remove a group. The pruned and masked
models then sum the same non-zero terms in a different order, so they agree to float32 rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nirvana.adapters import get_adapter
from nirvana.checkpoint import config_updates, layer_widths, plan_widths
from nirvana.compaction import compact_model, mask_model
from nirvana.plan import LayerPlan, PruningPlan
from tests.helpers import assert_bitwise_equal, assert_close
from tests.tiny_models import ARCHITECTURES, tiny_batch, tiny_model

# Tiny models: 2 layers, 2 KV groups of G = 2 query heads, head_dim 8, 48 MLP channels.
PLANS = {
    # Layer 0 loses KV group 0 and two thirds of its channels; layer 1 keeps both groups.
    "drop-first-group": [([1], list(range(0, 48, 3))), ([0, 1], list(range(5, 40)))],
    # Layer 0 keeps everything; layer 1 loses group 1 and its channels are scattered.
    "drop-last-group": [([0, 1], list(range(48))), ([0], [2, 3, 7, 11, 19, 20, 31, 46, 47])],
    # A layer may keep no MLP channel at all: its MLP then adds nothing.
    "empty-mlp": [([0], []), ([1], list(range(24, 48)))],
}
UNIFORM = [([1], list(range(0, 48, 2))), ([0], list(range(1, 48, 2)))]


def make_plan(model, layers) -> PruningPlan:
    geometry = get_adapter(model).geometry(model.config)
    return PruningPlan(model.config.architectures[0], geometry, [LayerPlan(list(g), list(c)) for g, c in layers])


def pruned_and_masked(arch: str, layers, **overrides):
    dense = tiny_model(arch, **overrides)
    plan = make_plan(dense, layers)
    masked = mask_model(copy.deepcopy(dense), plan)
    pruned = compact_model(copy.deepcopy(dense), plan)
    return dense, masked, pruned, plan


def kept_rows(kept: list[int], width: int) -> torch.Tensor:
    """Rows (or columns) of kept units that span ``width`` rows each, in order."""
    return torch.tensor([u * width + r for u in kept for r in range(width)], dtype=torch.int64)


@pytest.mark.parametrize("plan_name", list(PLANS), ids=list(PLANS))
@pytest.mark.parametrize("arch", ARCHITECTURES, ids=ARCHITECTURES)
def test_compacted_logits_match_masked_dense_model(arch, plan_name):
    dense, masked, pruned, _ = pruned_and_masked(arch, PLANS[plan_name])
    x = tiny_batch()
    with torch.no_grad():
        want = masked(x).logits
        got = pruned(x).logits
        before = dense(x).logits
    # The plan really changes the model, so agreeing with the masked model is not vacuous.
    assert (before - want).abs().max() > 1e-3
    assert_close(got, want, rtol=1e-5, atol=1e-5, name=f"{arch} pruned logits")


def sorted_subset(n: int, min_size: int):
    return st.sets(st.integers(0, n - 1), min_size=min_size, max_size=n).map(sorted)


layer_plans = st.tuples(sorted_subset(2, 1), sorted_subset(48, 0))


# function_scoped_fixture: the autouse one_thread fixture only sets the thread count, which is the
# same for every example.
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arch=st.sampled_from(["llama", "qwen2", "gemma3"]), layers=st.lists(layer_plans, min_size=2, max_size=2))
def test_any_plan_matches_the_masked_model(arch, layers):
    dense, masked, pruned, _ = pruned_and_masked(arch, layers)
    x = tiny_batch(seq=6)
    with torch.no_grad():
        assert_close(pruned(x).logits, masked(x).logits, rtol=1e-5, atol=1e-5, name=f"{arch} pruned logits")


@pytest.mark.parametrize(
    ("heads", "kv_heads", "kept_groups"),
    [(9, 3, ([0, 2], [1])), (4, 4, ([0, 3], [1, 2])), (4, 1, ([0], [0]))],
    ids=["G3-like-smollm2", "G1-multi-head", "G4-single-group"],
)
def test_group_sizes(heads, kv_heads, kept_groups):
    layers = [(kept_groups[0], list(range(0, 48, 2))), (kept_groups[1], list(range(30)))]
    _, masked, pruned, _ = pruned_and_masked(
        "llama",
        layers,
        hidden_size=8 * heads,  # transformers wants hidden_size % num_attention_heads == 0
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=True,
    )
    x = tiny_batch()
    with torch.no_grad():
        assert_close(pruned(x).logits, masked(x).logits, rtol=1e-5, atol=1e-5, name="pruned logits")
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight


def test_the_flow_skips_the_kernels_index_check(monkeypatch):
    # The plan is validated once; checking its indices again in each launch would read a device
    # index back (a host sync per tensor). qwen2 has k/v biases, so every launch of the flow runs.
    import nirvana_kernels._checks as checks

    def refuse(*_a):
        raise AssertionError("the flow asked the kernels to check an index it built from the plan")

    dense = tiny_model("qwen2")
    plan = make_plan(dense, PLANS["drop-first-group"])
    monkeypatch.setattr(checks, "_index_values", refuse)
    pruned = compact_model(copy.deepcopy(dense), plan)
    assert layer_widths(pruned) == plan_widths(plan)


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=ARCHITECTURES)
def test_compacted_weights_are_the_kept_slices(arch):
    dense, _, pruned, plan = pruned_and_masked(arch, PLANS["drop-first-group"])
    g = plan.geometry
    qd, d = g.group_size * g.head_dim, g.head_dim
    adapter = get_adapter(dense)
    for i, (lp, old, new) in enumerate(zip(plan.layers, adapter.layers(dense), adapter.layers(pruned))):
        q_rows, kv_rows = kept_rows(lp.kv_groups_kept, qd), kept_rows(lp.kv_groups_kept, d)
        ch = torch.tensor(lp.mlp_channels_kept, dtype=torch.int64)
        expected = [
            ("q", new.q.weight, old.q.weight.index_select(0, q_rows)),
            ("k", new.k.weight, old.k.weight.index_select(0, kv_rows)),
            ("v", new.v.weight, old.v.weight.index_select(0, kv_rows)),
            ("o", new.o.weight, old.o.weight.index_select(1, q_rows)),
            ("gate", new.gate.weight, old.gate.weight.index_select(0, ch)),
            ("up", new.up.weight, old.up.weight.index_select(0, ch)),
            ("down", new.down.weight, old.down.weight.index_select(1, ch)),
        ]
        for name, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
            old_bias, new_bias = getattr(old, name).bias, getattr(new, name).bias
            assert (old_bias is None) == (new_bias is None), f"layer {i} {name} bias lost or invented"
            if old_bias is not None:
                expected.append((f"{name}.bias", new_bias, old_bias.index_select(0, rows)))
        for name, got, want in expected:
            assert_bitwise_equal(got, want, name=f"layer {i} {name}")
        for m in (new.q, new.k, new.v, new.o, new.gate, new.up, new.down):
            assert (m.out_features, m.in_features) == tuple(m.weight.shape)


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=ARCHITECTURES)
def test_forward_backward_and_generate_work(arch):
    _, _, pruned, plan = pruned_and_masked(arch, PLANS["drop-first-group"])
    x = tiny_batch()
    loss = pruned(x, labels=x).loss
    loss.backward()
    for name, p in pruned.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
        assert torch.isfinite(p.grad).all(), name
    attn = get_adapter(pruned).layers(pruned)[0].attn
    assert attn.num_key_value_groups == plan.geometry.group_size

    prompt = x[:, :5]
    mask = torch.ones_like(prompt)
    kw = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = pruned.generate(prompt, **kw)
    # Without a KV cache every step recomputes from scratch: the cache must hold the same K/V widths.
    fresh = pruned.generate(prompt, **kw, use_cache=False)
    assert cached.shape == (2, 11)
    assert torch.equal(cached, fresh)


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=ARCHITECTURES)
def test_uniform_plan_gives_a_stock_config(arch):
    _, _, pruned, _ = pruned_and_masked(arch, UNIFORM)
    c = pruned.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.head_dim) == (2, 1, 24, 8)
    assert not hasattr(c, "nirvana")
    # A stock model built from the new config has exactly the pruned model's shapes.
    stock = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(c))
    want = {k: tuple(v.shape) for k, v in stock.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in pruned.state_dict().items()}
    assert got == want


def test_non_uniform_plan_records_every_layer():
    _, _, pruned, _ = pruned_and_masked("qwen2", PLANS["drop-first-group"])
    c = pruned.config
    assert c.nirvana == {
        "version": 1,
        "base_architecture": "Qwen2ForCausalLM",
        "layers": [
            {"num_heads": 2, "num_kv_heads": 1, "intermediate_size": 16},
            {"num_heads": 4, "num_kv_heads": 2, "intermediate_size": 35},
        ],
    }
    # Global sizes stay the dense model's (always valid for transformers); head_dim stays explicit.
    assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.head_dim) == (4, 2, 48, 8)
    assert layer_widths(pruned) == c.nirvana["layers"]


def test_uniform_sizes_transformers_refuses_fall_back_to_per_layer_widths():
    # 8 heads of width 4 in groups of 2; keeping 3 of 4 groups leaves 6 heads, and Llama's config
    # refuses hidden_size 32 % 6 != 0 even with an explicit head_dim: a stock config cannot say it.
    layers = [([0, 1, 3], list(range(40))), ([1, 2, 3], list(range(8, 48)))]
    _, masked, pruned, _ = pruned_and_masked("llama", layers, num_attention_heads=8, num_key_value_heads=4, head_dim=4)
    c = pruned.config
    assert c.nirvana["layers"] == [{"num_heads": 6, "num_kv_heads": 3, "intermediate_size": 40}] * 2
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (8, 4, 4)
    x = tiny_batch()
    with torch.no_grad():
        assert_close(pruned(x).logits, masked(x).logits, rtol=1e-5, atol=1e-5, name="pruned logits")


def test_config_updates():
    config = tiny_model("llama").config
    widths = [
        {"num_heads": 2, "num_kv_heads": 1, "intermediate_size": 10},
        {"num_heads": 4, "num_kv_heads": 2, "intermediate_size": 7},
    ]
    sizes, block = config_updates(config, widths, "LlamaForCausalLM", 8)
    assert sizes == {"head_dim": 8}
    assert block == {"version": 1, "base_architecture": "LlamaForCausalLM", "layers": widths}
    sizes, block = config_updates(config, widths[:1] * 2, "LlamaForCausalLM", 8)
    assert block is None
    assert sizes == {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 10, "head_dim": 8}
    with pytest.raises(ValueError, match="widths"):
        config_updates(config, [], "LlamaForCausalLM", 8)


def test_keeps_dtype_device_requires_grad_and_counts_params():
    dense = tiny_model("llama", dtype=torch.bfloat16)
    plan = make_plan(dense, PLANS["drop-first-group"])
    layer0 = get_adapter(dense).layers(dense)[0]
    layer0.q.weight.requires_grad_(False)
    layer0.down.weight.requires_grad_(False)
    before = sum(p.numel() for p in dense.parameters())
    pruned = compact_model(dense, plan)
    assert pruned is dense  # in place
    after = sum(p.numel() for p in pruned.parameters())
    # Llama has no q/k/v biases, so the geometry's count of pruned parameters is exact.
    assert before - after == plan.geometry.prunable_params - plan.kept_params()
    layers = get_adapter(pruned).layers(pruned)
    assert not layers[0].q.weight.requires_grad and not layers[0].down.weight.requires_grad
    assert layers[0].k.weight.requires_grad and layers[1].q.weight.requires_grad
    assert {p.dtype for p in pruned.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in pruned.parameters()} == {"cpu"}


def test_mask_model_zeroes_exactly_the_pruned_units():
    dense = tiny_model("qwen2")
    plan = make_plan(dense, PLANS["drop-last-group"])
    masked = mask_model(copy.deepcopy(dense), plan)
    g = plan.geometry
    qd, d = g.group_size * g.head_dim, g.head_dim
    old, new = get_adapter(dense).layers(dense)[1], get_adapter(masked).layers(masked)[1]
    # Layer 1 keeps KV group 0: group 1 owns q rows / o columns [16, 32) and k/v rows [8, 16).
    for got, want, zero in (
        (new.q.weight, old.q.weight, slice(qd, 2 * qd)),
        (new.q.bias, old.q.bias, slice(qd, 2 * qd)),
        (new.k.weight, old.k.weight, slice(d, 2 * d)),
        (new.v.bias, old.v.bias, slice(d, 2 * d)),
        (new.o.weight.T, old.o.weight.T, slice(qd, 2 * qd)),
    ):
        assert (got[zero] == 0).all()
        assert torch.equal(got[: zero.start], want[: zero.start])
    kept = PLANS["drop-last-group"][1][1]
    dropped = [c for c in range(48) if c not in kept]
    assert (new.up.weight[dropped] == 0).all() and (new.down.weight[:, dropped] == 0).all()
    assert torch.equal(new.gate.weight[kept], old.gate.weight[kept])
    # Layer 0 keeps everything and is untouched.
    for a, b in zip(dense.model.layers[0].parameters(), masked.model.layers[0].parameters()):
        assert torch.equal(a, b)


def _other_geometry_plan(model):
    other = tiny_model("llama", intermediate_size=64)
    return make_plan(other, [([0], [0]), ([1], [1])])


BAD_PLANS = {
    "not-a-plan": (lambda m: {"layers": []}, "plan:"),
    "other-geometry": (_other_geometry_plan, "plan.geometry:"),
    "other-architecture": (
        lambda m: PruningPlan("Qwen3ForCausalLM", make_plan(m, UNIFORM).geometry, make_plan(m, UNIFORM).layers),
        "plan.architecture:",
    ),
    "out-of-range": (lambda m: make_plan(m, [([0, 2], [0]), ([1], [1])]), "kv_groups_kept"),
    "no-group": (lambda m: make_plan(m, [([], [0]), ([1], [1])]), "kv_groups_kept"),
}


@pytest.mark.parametrize("fn", [compact_model, mask_model], ids=["compact_model", "mask_model"])
@pytest.mark.parametrize("case", list(BAD_PLANS), ids=list(BAD_PLANS))
def test_bad_plans_raise_value_error(case, fn):
    model = tiny_model("llama")
    make_bad, message = BAD_PLANS[case]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        fn(model, make_bad(model))
    # A refused plan leaves the model as it was.
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_compacting_twice_is_refused():
    # Uniform: the config now has the smaller sizes, so the dense plan's geometry no longer matches.
    model = tiny_model("llama")
    plan = make_plan(model, UNIFORM)
    compact_model(model, plan)
    with pytest.raises(ValueError, match="plan.geometry"):
        compact_model(model, plan)
    # Non-uniform: the config keeps the dense sizes, and the layers' own widths give it away.
    plan = make_plan(tiny_model("llama"), PLANS["drop-first-group"])
    model = compact_model(tiny_model("llama"), plan)
    for fn in (compact_model, mask_model):
        with pytest.raises(ValueError, match="compacted already"):
            fn(model, plan)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CI has none")
@pytest.mark.parametrize("arch", ["llama", "qwen2"], ids=["llama", "qwen2"])
def test_compaction_on_cuda_matches_masked(arch):
    dense = tiny_model(arch).cuda()
    plan = make_plan(dense, PLANS["drop-first-group"])
    masked = mask_model(copy.deepcopy(dense), plan)
    pruned = compact_model(copy.deepcopy(dense), plan)
    assert {p.device.type for p in pruned.parameters()} == {"cuda"}
    x = tiny_batch().cuda()
    with torch.no_grad():
        assert_close(pruned(x).logits, masked(x).logits, rtol=1e-5, atol=1e-5, name="cuda pruned logits")
