"""nirvana.scores: the Scores data, and scores.safetensors written and read back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from nirvana.plan import Geometry
from nirvana.saliency import compute_scores
from nirvana.scores import SCORES_FILE, SCORES_FORMAT, Scores, load_scores, save_scores

from .helpers import assert_bitwise_equal
from .references import windows
from .tiny_models import tiny_model


def _scores(meta=None) -> Scores:
    g = Geometry(num_layers=3, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48)
    gen = torch.Generator().manual_seed(0)
    return Scores(torch.randn(3, 2, generator=gen), torch.randn(3, 48, generator=gen), g, meta or {"objective": "ce"})


@pytest.mark.parametrize("target", ["file", "directory"], ids=["file", "directory"])
def test_save_load_round_trip(tmp_path, target):
    scores = _scores({"objective": "maxlogit", "objective_value": 0.125, "micro_batch_size": 8, "nested": [1, "a"]})
    path = tmp_path / "x.safetensors" if target == "file" else tmp_path
    written = save_scores(scores, path)
    assert written == (path if target == "file" else tmp_path / SCORES_FILE) and written.is_file()
    back = load_scores(path)
    assert_bitwise_equal(back.attention, scores.attention, name="attention")
    assert_bitwise_equal(back.mlp, scores.mlp, name="mlp")
    assert back.geometry == scores.geometry
    assert back.meta == scores.meta


def test_computed_scores_round_trip(tmp_path):
    model = tiny_model("qwen3", num_hidden_layers=1)
    scores = compute_scores(model, windows(), progress=False)
    back = load_scores(save_scores(scores, tmp_path))
    assert_bitwise_equal(back.attention, scores.attention, name="attention")
    assert back.meta == scores.meta and back.geometry == scores.geometry


def test_load_rejects_foreign_or_mismatched_files(tmp_path):
    with pytest.raises(ValueError, match=r"path: no scores file"):
        load_scores(tmp_path / "missing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"attention": torch.zeros(3, 2)}, str(foreign))
    with pytest.raises(ValueError, match=r"path: .* is not a nirvana scores file"):
        load_scores(foreign)
    bad = tmp_path / "bad.safetensors"
    good = _scores()
    geometry = dict(good.geometry.to_dict(), intermediate_size=50)
    meta = {"format": SCORES_FORMAT, "version": "1", "geometry": json.dumps(geometry), "meta": "{}"}
    save_file({"attention": good.attention, "mlp": good.mlp}, str(bad), metadata=meta)
    with pytest.raises(ValueError, match=r"mlp: shape \(3, 48\) does not match the geometry's \(3, 50\)"):
        load_scores(bad)


def test_scores_validate_their_tensors():
    good = _scores()
    with pytest.raises(ValueError, match=r"attention: dtype must be float32"):
        Scores(good.attention.double(), good.mlp, good.geometry)
    with pytest.raises(ValueError, match=r"attention: shape \(2, 2\)"):
        Scores(good.attention[:2], good.mlp, good.geometry)
    with pytest.raises(ValueError, match=r"scores.meta: must be JSON-serialisable"):
        save_scores(_scores({"bad": object()}), "unused.safetensors")


def test_mean_scores_averages_each_unit():
    from nirvana.scores import mean_scores

    a, b, c = _scores({"calibration_seed": 0}), _scores({"calibration_seed": 5}), _scores({"calibration_seed": 10})
    b.attention, b.mlp = b.attention * 3 + 1, b.mlp.abs()
    c.attention, c.mlp = -c.attention, c.mlp * 0.5
    got = mean_scores([a, b, c])
    want_att = (a.attention.double() + b.attention.double() + c.attention.double()) / 3
    want_mlp = (a.mlp.double() + b.mlp.double() + c.mlp.double()) / 3
    assert_bitwise_equal(got.attention, want_att.float(), name="attention")
    assert_bitwise_equal(got.mlp, want_mlp.float(), name="mlp")
    assert got.meta["draws"] == 3 and got.meta["calibration_seeds"] == [0, 5, 10]
    assert_bitwise_equal(mean_scores([a]).mlp, a.mlp, name="one draw")


def test_mean_scores_refuses_nothing_or_another_model():
    from nirvana.scores import mean_scores

    with pytest.raises(ValueError, match=r"^draws: at least one Scores is needed$"):
        mean_scores([])
    other = _scores()
    g = other.geometry
    wide = Geometry(g.num_layers, g.hidden_size, g.num_heads, g.num_kv_heads, g.head_dim, 16)
    with pytest.raises(ValueError, match=r"^draws\[1\]: its geometry differs"):
        mean_scores([other, Scores(other.attention, torch.zeros(3, 16), wide)])
    with pytest.raises(ValueError, match=r"^draws\[0\]: expected a Scores, got dict$"):
        mean_scores([{}])
