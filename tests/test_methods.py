"""The scorer registry: every name resolves to a method that says what it needs, and unknown names are refused."""

import argparse

import pytest
import torch

from nirvana import baselines, methods
from nirvana.cli import build_parser
from nirvana.methods import DATA_FREE, METHODS, NEEDS, NEEDS_ACTIVATIONS, Method, get_method

from .tiny_models import tiny_batch, tiny_model, tiny_tokenizer


def cli_method_choices() -> tuple:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    prune = sub.choices["prune"]
    return tuple(next(a for a in prune._actions if a.dest == "method").choices)


def test_registry_order_is_the_cli_choices():
    assert METHODS == ("nirvana", "magnitude", "random", "taylor", "wanda-sp", "flap")
    assert cli_method_choices() == METHODS


@pytest.mark.parametrize("name", METHODS, ids=METHODS)
def test_every_name_resolves_and_declares_what_it_needs(name):
    method = get_method(name)
    assert isinstance(method, Method)
    assert method.name == name
    assert method.needs in NEEDS
    assert method.data_free == (name in DATA_FREE)
    assert method.compensates == (name in NEEDS_ACTIVATIONS)
    # Only a method that reads activation statistics can compensate from them.
    assert not method.compensates or method.uses_statistics
    assert set(method.settings) <= {"objective", "saliency"}


def test_what_the_registry_derives():
    assert DATA_FREE == ("magnitude", "random")
    assert NEEDS_ACTIVATIONS == frozenset({"flap"})
    assert {n: get_method(n).needs for n in METHODS} == {
        "nirvana": "gradients",
        "magnitude": "weights only",
        "random": "weights only",
        "taylor": "per-window gradients",
        "wanda-sp": "activations",
        "flap": "activations",
    }
    # The compatibility module hands out the registry's own objects.
    assert baselines.METHODS is methods.METHODS and baselines.NEEDS_ACTIVATIONS is methods.NEEDS_ACTIVATIONS


@pytest.mark.parametrize("name", ["lasso", "", "FLAP", None, 3], ids=["unknown", "empty", "case", "none", "int"])
def test_unknown_names_are_refused_in_one_line(name):
    with pytest.raises(ValueError, match=r"^method: must be one of .*, got ") as err:
        get_method(name)
    assert "\n" not in str(err.value) and repr(name) in str(err.value)


def test_a_setting_the_method_does_not_take_is_refused():
    with pytest.raises(ValueError, match=r"^saliency: method 'taylor' takes no such setting"):
        get_method("taylor").scores(tiny_model("llama"), tiny_batch(2, 6), saliency="adam", progress=False)


@pytest.mark.parametrize("name", METHODS, ids=METHODS)
def test_scores_through_the_object_equal_method_scores(name):
    model, ids = tiny_model("llama"), tiny_batch(3, 8)
    method = get_method(name)
    stats = method.statistics(model, ids, micro_batch_size=2, progress=False)
    assert (stats is None) == (not method.uses_statistics)
    got = method.scores(model, ids, micro_batch_size=2, progress=False, stats=stats)
    want = methods.method_scores(model, ids, name, micro_batch_size=2, progress=False)
    assert got.meta["method"] == name
    assert torch.equal(got.attention, want.attention) and torch.equal(got.mlp, want.mlp)


def test_the_documented_surface_scores_allocates_and_compacts_like_prune(tmp_path):
    """nirvana.score -> nirvana.allocate -> nirvana.compact_model gives prune()'s scores, plan and model."""
    import nirvana
    from nirvana.pruning import count_params, prune

    from .test_pruning import settings

    cfg = settings(tmp_path, saliency="adam", gamma=2.0, round_to=1, out=None)
    tok = tiny_tokenizer()
    result = prune(cfg, model=tiny_model("llama"), tokenizer=tok, progress=False)

    model = tiny_model("llama")
    ids = cfg.calibration_windows(tok, cfg.seed, model, progress=False)
    scores = nirvana.score(model, ids, "nirvana", micro_batch_size=2, progress=False, saliency="adam")
    assert torch.equal(scores.attention, result.scores.attention) and torch.equal(scores.mlp, result.scores.mlp)
    plan = nirvana.allocate(scores.attention, scores.mlp, scores.geometry, sparsity=0.3, gamma=2.0, round_to=1)
    assert plan.layers == result.plan.layers
    nirvana.compact_model(model, plan)
    assert count_params(model) == count_params(result.model)
    assert torch.equal(model(ids[:2]).logits, result.model(ids[:2]).logits)


def test_score_refuses_a_setting_the_method_does_not_take_before_any_work():
    import nirvana

    with pytest.raises(ValueError, match=r"^objective: method 'wanda-sp' takes no such setting"):
        nirvana.score(tiny_model("llama"), tiny_batch(2, 6), "wanda-sp", objective="ce", progress=False)
