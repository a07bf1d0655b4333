"""The scorer registry: every name resolves to a method that says what it needs, and unknown names are refused."""

import argparse
import dataclasses

import pytest
import torch

from nirvana import baselines, methods
from nirvana.cli import build_parser
from nirvana.methods import DATA_FREE, METHODS, NEEDS, NEEDS_ACTIVATIONS, Method, get_method
from nirvana.pruning import PruneSettings

from .helpers import prune_args
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
    assert set(method.settings) <= {"objective", "saliency", "adam_steps", "window_weight", "trim"}
    # prune() passes each setting from PruneSettings by name.
    assert set(method.settings) <= {f.name for f in dataclasses.fields(PruneSettings)}


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
    # allocate() is the plain ranking: prune()'s defaults beyond it (NIRVANA keeps layer 0 whole) are passed.
    protect = nirvana.get_method("nirvana").protect_layers
    plan = nirvana.allocate(
        scores.attention, scores.mlp, scores.geometry, sparsity=0.3, gamma=2.0, round_to=1, protect_layers=protect
    )
    assert protect == 1 and plan.meta["protect_layers"] == result.plan.meta["protect_layers"] == 1
    assert plan.layers == result.plan.layers
    nirvana.compact_model(model, plan)
    assert count_params(model) == count_params(result.model)
    assert torch.equal(model(ids[:2]).logits, result.model(ids[:2]).logits)


def test_score_refuses_a_setting_the_method_does_not_take_before_any_work():
    import nirvana

    with pytest.raises(ValueError, match=r"^objective: method 'wanda-sp' takes no such setting"):
        nirvana.score(tiny_model("llama"), tiny_batch(2, 6), "wanda-sp", objective="ce", progress=False)


# --------------------------------------------------------------------------------------------------
# Each method's own allocation (its paper's), which --allocation overrides
# --------------------------------------------------------------------------------------------------

OWN_ALLOCATION = {
    "nirvana": "global",
    "magnitude": "uniform",
    "random": "uniform",
    "taylor": "uniform",
    "wanda-sp": "uniform",
    "flap": "global",
}


def test_every_method_declares_its_papers_allocation():
    from nirvana.allocation import ALLOCATIONS

    assert {name: get_method(name).allocation for name in METHODS} == OWN_ALLOCATION
    for name in METHODS:
        method = get_method(name)
        assert method.resolve_allocation(None) == OWN_ALLOCATION[name]
        for allocation in ALLOCATIONS:
            assert method.resolve_allocation(allocation) == allocation
            # A method's own allocation is never the one it warns about.
            assert method.allocation_warning(method.allocation) is None
    line = get_method("wanda-sp").allocation_warning("global")
    assert line.startswith("allocation: 'global' with method 'wanda-sp'") and "\n" not in line
    assert get_method("wanda-sp").allocation_warning("uniform") is None


def test_prune_settings_default_to_the_methods_allocation():
    from nirvana.pruning import PruneSettings

    for name in METHODS:
        assert PruneSettings(method=name).allocation is None
        assert PruneSettings(method=name).resolved_allocation == OWN_ALLOCATION[name]
        assert PruneSettings(method=name, allocation="global").resolved_allocation == "global"
    with pytest.raises(ValueError, match=r"^allocation: must be one of global, uniform .*got 'layer'$"):
        PruneSettings(allocation="layer").check()


OWN_SEQ_LEN = {"nirvana": 512, "magnitude": 128, "random": 128, "taylor": 128, "wanda-sp": 128, "flap": 128}


def test_every_method_declares_its_calibration_window_length():
    assert {name: get_method(name).seq_len for name in METHODS} == OWN_SEQ_LEN
    for name in METHODS:
        assert get_method(name).resolve_seq_len(None) == OWN_SEQ_LEN[name]
        assert get_method(name).resolve_seq_len(64) == 64


@pytest.mark.parametrize(
    "given, seq_len, micro_batch",
    [
        ({}, 512, 2),
        ({"method": "flap"}, 128, 8),
        ({"seq_len": 128}, 128, 8),
        ({"seq_len": 2048}, 2048, 1),
        ({"seq_len": 16, "micro_batch_size": 3}, 16, 3),
        ({"method": "taylor", "seq_len": 512}, 512, 2),
    ],
    ids=["nirvana", "flap", "nirvana-128", "longer-than-the-budget", "both-given", "taylor-512"],
)
def test_prune_settings_fill_in_the_methods_window_length_and_a_micro_batch_of_the_same_tokens(
    given, seq_len, micro_batch
):
    """None is the method's own length, and a micro-batch of MICRO_BATCH_TOKENS, so activation memory per pass
    stays that of 8 x 128 tokens; for_geometry writes both into the settings report.json records."""
    from nirvana.pruning import MICRO_BATCH_TOKENS, PruneSettings

    settings = PruneSettings(**given)
    settings.check()
    assert (settings.resolved_seq_len, settings.resolved_micro_batch_size) == (seq_len, micro_batch)
    filled = settings.for_geometry(_geometry())
    assert (filled.seq_len, filled.micro_batch_size) == (seq_len, micro_batch)
    if "micro_batch_size" not in given and seq_len <= MICRO_BATCH_TOKENS:
        assert micro_batch * seq_len == MICRO_BATCH_TOKENS


def _geometry():
    from nirvana.adapters import get_adapter

    model = tiny_model("llama")
    return get_adapter(model).geometry(model.config)


@pytest.mark.parametrize(
    ("method", "extra", "used", "warns"),
    [
        ("wanda-sp", (), "uniform", False),
        ("taylor", (), "uniform", False),
        ("flap", (), "global", False),
        ("nirvana", (), "global", False),
        ("wanda-sp", ("--allocation", "global"), "global", True),
        ("nirvana", ("--allocation", "uniform"), "uniform", False),
    ],
    ids=["wanda-sp", "taylor", "flap", "nirvana", "wanda-sp-global-warns", "nirvana-uniform"],
)
def test_cli_prunes_with_the_methods_allocation_unless_told(method, extra, used, warns, dense_dir, tmp_path, capsys):
    import json

    from nirvana import cli
    from nirvana.checkpoint import load_plan

    from .test_pruning import write_text

    calib, out = write_text(tmp_path / "calib.txt"), tmp_path / "pruned"
    code = cli.main([str(a) for a in prune_args(dense_dir, calib, out, "--method", method, *extra)])
    _, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["allocation"] == used
    plan = load_plan(out)
    assert plan.meta["allocation"] == used
    if used == "uniform":
        assert plan.is_uniform()
    warning = [line for line in err.splitlines() if line.startswith("nirvana: warning: allocation:")]
    assert len(warning) == int(warns), err
    if warns:
        assert "'wanda-sp'" in warning[0] and "its own is 'uniform'" in warning[0]
