"""NirvanaImportance inside Torch-Pruning's own MetaPruner, on a tiny GQA Llama (4 query heads, 2 KV groups)."""

import copy
from types import SimpleNamespace

import pytest
import torch

tp = pytest.importorskip("torch_pruning", reason="torch-pruning is not installed (pip install '.[torch-pruning]')")

from nirvana.compaction import mask_model  # noqa: E402
from nirvana.integrations.torch_pruning import NirvanaImportance  # noqa: E402
from tests.test_compaction import make_plan  # noqa: E402
from tests.tiny_models import tiny_model  # noqa: E402


def dense_and_importance():
    model = tiny_model("llama")
    model.config.use_cache = False  # with the cache on, Torch-Pruning's tracing never finishes
    windows = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    return model, windows, NirvanaImportance(model, windows, micro_batch_size=2)


@pytest.mark.parametrize("ratios", [(0.25, 0.5), (0.5, 0.0)], ids=["quarter-half", "half-none"])
def test_metapruner_removes_nirvanas_lowest_mlp_channels_and_matches_the_masked_model(ratios):
    model, windows, importance = dense_and_importance()
    dense = copy.deepcopy(model)
    layers = model.model.layers
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs=windows[:1],
        importance=importance,
        pruning_ratio=0.0,
        pruning_ratio_dict={lyr.mlp.gate_proj: r for lyr, r in zip(layers, ratios)},
        ignored_layers=[model.lm_head] + [lyr.self_attn for lyr in layers],
    )
    gates = {id(lyr.mlp.gate_proj): i for i, lyr in enumerate(layers)}
    removed = {i: [] for i in range(len(layers))}
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            if id(dep.target.module) in gates and dep.handler == tp.prune_linear_out_channels:
                removed[gates[id(dep.target.module)]] += [int(getattr(i, "idx", i)) for i in idxs]
        group.prune()

    width = dense.config.intermediate_size
    mlp = importance.computed.mlp
    for i, r in enumerate(ratios):
        assert len(removed[i]) == width - int(width * (1 - r))
        assert layers[i].mlp.gate_proj.out_features == width - len(removed[i])
        lowest = mlp[i].argsort()[: len(removed[i])].tolist()
        assert sorted(removed[i]) == sorted(lowest)

    kv = dense.config.num_key_value_heads
    plan = make_plan(dense, [(range(kv), sorted(set(range(width)) - set(removed[i]))) for i in range(len(layers))])
    masked = mask_model(dense, plan)
    with torch.no_grad():
        got, want = model(windows).logits, masked(windows).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def item(module, handler, idxs):
    """One (dep, idxs) entry shaped like a Torch-Pruning group's root: what the importance reads."""
    dep = SimpleNamespace(target=SimpleNamespace(module=module), handler=handler)
    return SimpleNamespace(dep=dep, idxs=list(idxs))


def test_groups_map_to_nirvanas_scores():
    model, _, importance = dense_and_importance()
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    scores, head_dim = importance.scores(), model.config.head_dim
    got = importance([item(attn.k_proj, tp.prune_linear_out_channels, range(attn.k_proj.out_features))])
    assert torch.equal(got, scores.attention[1].repeat_interleave(head_dim))
    # o_proj's columns, the root MetaPruner uses for heads: each query head gets its KV group's score.
    got = importance([item(attn.o_proj, tp.prune_linear_in_channels, range(attn.o_proj.in_features))])
    assert torch.equal(got, scores.attention[1].repeat_interleave(2 * head_dim))
    got = importance([item(mlp.down_proj, tp.prune_linear_in_channels, [5, 0, 7])])
    assert torch.equal(got, scores.mlp[1, [5, 0, 7]])
    # The hidden size is no nirvana unit: MetaPruner skips a group scored None.
    assert importance([item(mlp.down_proj, tp.prune_linear_out_channels, [0, 1])]) is None


def test_a_group_of_an_already_pruned_module_is_refused():
    model, _, importance = dense_and_importance()
    gate = model.model.layers[0].mlp.gate_proj
    tp.prune_linear_out_channels(gate, [0, 1])
    with pytest.raises(ValueError, match="gate_proj of layer 0 is 46 wide"):
        importance([item(gate, tp.prune_linear_out_channels, [0])])
