"""`nirvana prune MODEL --scores FILE`: re-pruning from an earlier run's scores, with no backward pass."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from nirvana import pruning, replan
from nirvana.checkpoint import load_pruned
from nirvana.plan import Geometry, PruningPlan
from nirvana.pruning import PruneSettings, prune
from nirvana.scores import SCORES_FILE, SCORES_FORMAT, Scores, load_scores, save_scores
from tests.helpers import prune_args
from tests.test_cli import run
from tests.test_pruning import write_text
from tests.tiny_models import tiny_batch

# dense_dir (tests/conftest.py) is 3 layers, 8 KV heads, 64 MLP channels.
DENSE_SHAPES = "attention [3, 8] and mlp [3, 64]"


@pytest.fixture
def calib(tmp_path):
    return write_text(tmp_path / "calib.txt")


def settings(dense_dir, calib, out, **kw):
    base = dict(
        model=str(dense_dir),
        sparsity=0.3,
        calib=str(calib),
        num_samples=4,
        seq_len=16,
        heldout_samples=4,
        micro_batch_size=2,
        draws=1,  # saved scores are one draw's: re-planning them matches a one-draw prune
        device="cpu",
        round_to=2,
        out=str(out),
    )
    return PruneSettings(**(base | kw))


def kept(folder) -> list[dict]:
    return json.loads((folder / "plan.json").read_text())["layers"]


def no_scoring(monkeypatch):
    """Make any calibration draw or scoring pass fail the test: --scores must need neither."""

    def fail(*args, **kw):
        raise AssertionError("--scores ran calibration or scoring")

    monkeypatch.setattr(pruning, "_method_scores", fail)
    monkeypatch.setattr(pruning.calibration, "calibration_windows", fail)


@pytest.fixture
def original(dense_dir, calib, tmp_path):
    """A first run's output folder (gamma 3, sparsity 0.3)."""
    return prune(settings(dense_dir, calib, tmp_path / "first"), progress=False).out


@pytest.mark.parametrize("target", ["file", "folder"], ids=["file", "folder"])
def test_same_settings_give_the_same_plan(dense_dir, calib, tmp_path, original, monkeypatch, target):
    no_scoring(monkeypatch)
    source = original / SCORES_FILE if target == "file" else original
    again = prune(settings(dense_dir, calib, tmp_path / "again", scores=str(source)), progress=False)
    assert kept(again.out) == kept(original)
    plan_a, plan_b = (json.loads((f / "plan.json").read_text()) for f in (original, again.out))
    assert plan_b["meta"] == plan_a["meta"]  # method, seed and calib come from the scores file
    report = json.loads((again.out / "report.json").read_text())
    assert report["scores_from"]["file"] == str((original / SCORES_FILE).resolve())
    assert report["scores_from"]["method"] == "nirvana" and report["scores_from"]["calibration_seed"] == 0
    assert "saliency" not in report["timings_s"] and "calibration" not in report["timings_s"]
    # The output carries the same scores on, so it can be re-pruned in turn.
    first, carried = load_scores(original), load_scores(again.out)
    assert torch.equal(first.attention, carried.attention) and torch.equal(first.mlp, carried.mlp)
    assert carried.meta == first.meta


def test_gamma_auto_selects_by_heldout_kl_from_saved_scores(dense_dir, calib, tmp_path, monkeypatch):
    first = prune(settings(dense_dir, calib, tmp_path / "first", gamma="auto"), progress=False)
    no_scoring(monkeypatch)
    again = prune(settings(dense_dir, calib, tmp_path / "again", gamma="auto", scores=str(first.out)), progress=False)
    assert kept(again.out) == kept(first.out)
    assert again.report["selection"]["gamma"] == first.report["selection"]["gamma"]
    assert [t["kl"] for t in again.report["selection"]["trials"]] == pytest.approx(
        [t["kl"] for t in first.report["selection"]["trials"]], rel=1e-6
    )


def test_new_sparsity_gives_another_valid_plan(dense_dir, calib, tmp_path, original, monkeypatch):
    no_scoring(monkeypatch)
    # Layer 0 unprotected: with it whole, 3 tiny layers cannot reach 50% (the keep-one rule spares too much).
    half = settings(dense_dir, calib, tmp_path / "half", sparsity=0.5, scores=str(original), protect_layers=0)
    result = prune(half, progress=False)
    plan = PruningPlan.load(result.out / "plan.json")  # validates
    assert kept(result.out) != kept(original)
    assert abs(plan.achieved_sparsity() - 0.5) <= 0.01
    first = PruningPlan.load(original / "plan.json")
    assert plan.kept_params() < first.kept_params()
    loaded = load_pruned(result.out)
    with torch.no_grad():
        logits = loaded(tiny_batch(seq=10)).logits
    assert torch.isfinite(logits).all()


def test_cli_replan_matches_the_original(dense_dir, calib, tmp_path, capsys):
    first, again = tmp_path / "first", tmp_path / "again"
    code, _, err = run(prune_args(dense_dir, calib, first), capsys)
    assert code == 0, err
    code, text, err = run(prune_args(dense_dir, calib, again, "--scores", first / SCORES_FILE), capsys)
    assert code == 0, err
    assert err == "", "--quiet shows no bars or status lines"
    assert f"saved to {again}" in text
    assert kept(again) == kept(first)
    assert json.loads((again / "report.json").read_text())["settings"]["scores"] == str(first / SCORES_FILE)


def other_geometry_scores(path, **change) -> None:
    g = Geometry(**(dict(num_layers=3, hidden_size=32, num_heads=16, num_kv_heads=8, head_dim=8) | change))
    gen = torch.Generator().manual_seed(0)
    att = torch.rand(g.num_attention_blocks, g.num_kv_heads, generator=gen)
    save_scores(Scores(att, torch.rand(g.num_layers, g.intermediate_size, generator=gen), g), path)


GEOMETRY = [
    ("layers", dict(num_layers=4, intermediate_size=64), "holds attention [4, 8] and mlp [4, 64], "),
    ("kv-heads", dict(num_kv_heads=4, intermediate_size=64), "holds attention [3, 4] and mlp [3, 64], "),
    ("mlp", dict(intermediate_size=48), "holds attention [3, 8] and mlp [3, 48], "),
    (
        "encoder-decoder",
        dict(intermediate_size=64, encoder_layers=1, cross_attention_layers=2),
        "holds attention [5, 8] and mlp [3, 64] (1 encoder layers, 2 cross-attentions), ",
    ),
    ("hidden", dict(intermediate_size=64, hidden_size=48), f"needs {DENSE_SHAPES} (hidden_size 48 vs 32);"),
]


@pytest.mark.parametrize("case,change,theirs", GEOMETRY, ids=[g[0] for g in GEOMETRY])
def test_geometry_mismatch_is_one_line_naming_both(dense_dir, calib, tmp_path, capsys, case, change, theirs):
    file = tmp_path / "other.safetensors"
    other_geometry_scores(file, **change)
    code, _, err = run(prune_args(dense_dir, calib, tmp_path / "out", "--scores", file), capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert theirs in err, err
    assert f"the model needs {DENSE_SHAPES}" in err and str(file) in err, err
    assert not (tmp_path / "out").exists()


def _not_safetensors(path):
    path.write_text("hello, not a tensor file")


def _foreign_tensors(path):
    save_file({"weight": torch.zeros(2, 2)}, str(path))


def _scores_metadata(geometry=None, meta="{}"):
    g = geometry or {
        "num_layers": 3,
        "hidden_size": 32,
        "num_heads": 16,
        "num_kv_heads": 8,
        "head_dim": 8,
        "intermediate_size": 64,
    }
    return {"format": SCORES_FORMAT, "version": "1", "geometry": json.dumps(g), "meta": meta}


def _wrong_dtype(path):
    save_file(
        {"attention": torch.zeros(3, 8, dtype=torch.float64), "mlp": torch.zeros(3, 64)}, str(path), _scores_metadata()
    )


def _wrong_shape(path):
    save_file({"attention": torch.zeros(3, 7), "mlp": torch.zeros(3, 64)}, str(path), _scores_metadata())


def _missing_tensor(path):
    save_file({"attention": torch.zeros(3, 8)}, str(path), _scores_metadata())


def _broken_metadata(path):
    save_file({"attention": torch.zeros(3, 8), "mlp": torch.zeros(3, 64)}, str(path), _scores_metadata(meta="{oops"))


def _truncated(path):
    other_geometry_scores(path, intermediate_size=64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


NOT_SCORES = [
    ("missing", None, "is not a scores file or a folder holding scores.safetensors"),
    ("text", _not_safetensors, "is not a valid safetensors file"),
    ("truncated", _truncated, "is not a valid safetensors file"),
    ("foreign", _foreign_tensors, "is not a nirvana scores file"),
    ("dtype", _wrong_dtype, "attention: dtype must be float32"),
    ("shape", _wrong_shape, "attention: shape (3, 7) does not match the geometry's (3, 8)"),
    ("missing-tensor", _missing_tensor, "holds tensors ['attention'], expected ['attention', 'mlp']"),
    ("metadata", _broken_metadata, "has a broken metadata block"),
]


@pytest.mark.parametrize("case,make,message", NOT_SCORES, ids=[n[0] for n in NOT_SCORES])
def test_a_file_that_is_not_scores_is_refused_before_the_model_loads(
    dense_dir, calib, tmp_path, capsys, monkeypatch, case, make, message
):
    import nirvana.models

    def no_load(*args, **kw):
        raise AssertionError("the model loaded before the scores file was checked")

    monkeypatch.setattr(nirvana.models, "load_model", no_load)
    file = tmp_path / "scores.safetensors"
    if make is not None:
        make(file)
    code, _, err = run(prune_args(dense_dir, calib, tmp_path / "out", "--scores", file), capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("nirvana: error: "), err
    assert message in err and str(file) in err, err


REFUSED = [
    ("select-calib", ["--select-calib", "2"], "select_calib: 2 candidate calibration sets, but --scores holds one"),
    ("draws", ["--draws", "2"], "draws: 2 calibration draws, but --scores holds scores already made"),
    ("flap", ["--method", "flap"], "method: 'flap' needs its calibration set's activation statistics"),
    ("other-method", ["--method", "taylor"], "holds 'nirvana' scores, not 'taylor'; pass --method nirvana"),
]


@pytest.mark.parametrize("case,extra,message", REFUSED, ids=[r[0] for r in REFUSED])
def test_settings_that_cannot_use_saved_scores_are_refused(
    dense_dir, calib, tmp_path, original, capsys, case, extra, message
):
    code, _, err = run(prune_args(dense_dir, calib, tmp_path / "out", "--scores", original, *extra), capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert message in err, err
    assert not (tmp_path / "out").exists()


def test_baseline_scores_remember_their_method(dense_dir, calib, tmp_path, capsys):
    first = tmp_path / "taylor"
    code, _, err = run(prune_args(dense_dir, calib, first, "--method", "taylor"), capsys)
    assert code == 0, err
    assert replan.read_scores(first).method == "taylor"
    code, _, err = run(prune_args(dense_dir, calib, tmp_path / "as-nirvana", "--scores", first), capsys)
    assert code == 2 and "holds 'taylor' scores, not 'nirvana'; pass --method taylor" in err, err
    again = tmp_path / "again"
    code, _, err = run(prune_args(dense_dir, calib, again, "--scores", first, "--method", "taylor"), capsys)
    assert code == 0, err
    assert kept(again) == kept(first)


def test_progress_false_prints_no_bars_and_true_shows_each_slow_step(dense_dir, calib, tmp_path, capsys):
    quiet = settings(dense_dir, calib, tmp_path / "quiet", select_calib=2)
    prune(quiet, progress=False)
    assert capsys.readouterr().err == ""
    prune(settings(dense_dir, calib, tmp_path / "loud", select_calib=2), progress=True)
    err = capsys.readouterr().err
    for step in ("calibration sets", "saliency", "KL selection", "saving the pruned model to"):
        assert step in err, (step, err)
