"""nirvana.plan: plan.json read back exactly, and every mistyped field refused in one line naming it."""

from __future__ import annotations

import copy
import json

import pytest

from nirvana.plan import Geometry, LayerPlan, PruningPlan

GEOMETRY = Geometry(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48)


def plan_dict() -> dict:
    layers = [LayerPlan([0, 1], list(range(40))), LayerPlan([1], list(range(0, 48, 2)))]
    return PruningPlan("LlamaForCausalLM", GEOMETRY, layers, meta={"method": "nirvana"}).to_dict()


def test_a_saved_plan_loads_back_equal(tmp_path):
    plan = PruningPlan.from_dict(plan_dict())
    plan.save(tmp_path / "plan.json")
    assert PruningPlan.load(tmp_path / "plan.json") == plan


def _set(path, value):
    def change(d):
        *parents, last = path
        for key in parents:
            d = d[key]
        d[last] = value

    return change


def _drop(path):
    def change(d):
        *parents, last = path
        for key in parents:
            d = d[key]
        del d[last]

    return change


# (change to a valid plan dict, what the message must say)
BAD = {
    "float-indices": (_set(("layers", 1, "kv_groups_kept"), [0.0, 1.5]), "layers[1].kv_groups_kept: index 0.0"),
    "whole-float-index": (_set(("layers", 0, "kv_groups_kept"), [0, 1.0]), "layers[0].kv_groups_kept: index 1.0"),
    "bool-index": (_set(("layers", 0, "mlp_channels_kept"), [True, 2]), "layers[0].mlp_channels_kept: index True"),
    "string-index": (_set(("layers", 0, "kv_groups_kept"), ["0", "1"]), "layers[0].kv_groups_kept: index '0'"),
    "indices-not-a-list": (_set(("layers", 0, "kv_groups_kept"), 2), "layers[0].kv_groups_kept: expected a list"),
    "indices-a-string": (_set(("layers", 0, "kv_groups_kept"), "01"), "layers[0].kv_groups_kept: expected a list"),
    "indices-missing": (_drop(("layers", 1, "mlp_channels_kept")), "layers[1].mlp_channels_kept: missing"),
    "layer-not-an-object": (_set(("layers", 1), [0, 1]), "layers[1]: expected a JSON object"),
    "layers-not-a-list": (_set(("layers",), {"0": {}}), "plan.layers: expected a list"),
    "geometry-string": (_set(("geometry", "num_layers"), "2"), "geometry.num_layers: expected an integer, got '2'"),
    "geometry-float": (_set(("geometry", "hidden_size"), 32.0), "geometry.hidden_size: expected an integer, got 32.0"),
    "geometry-bool": (_set(("geometry", "num_kv_heads"), True), "geometry.num_kv_heads: expected an integer"),
    "geometry-zero": (_set(("geometry", "head_dim"), 0), "geometry.head_dim: must be a positive integer"),
    "geometry-missing": (_drop(("geometry", "intermediate_size")), "geometry.intermediate_size: missing"),
    "geometry-gated-int": (_set(("geometry", "gated"), 1), "geometry.gated: expected true or false, got 1"),
    "geometry-negative-encoder": (_set(("geometry", "encoder_layers"), -1), "geometry.encoder_layers: must be"),
    "geometry-not-an-object": (_set(("geometry",), [2, 32]), "plan.geometry: expected a JSON object"),
    "architecture-number": (_set(("architecture",), 7), "plan.architecture: expected a string, got 7"),
    "meta-list": (_set(("meta",), []), "plan.meta: expected a JSON object"),
    "version-bool": (_set(("version",), True), "plan version: expected 1, got True"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_mistyped_fields_are_refused_naming_them(case, tmp_path):
    change, message = BAD[case]
    d = copy.deepcopy(plan_dict())
    change(d)
    with pytest.raises(ValueError) as err:
        PruningPlan.from_dict(d)
    assert message in str(err.value)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError) as err:
        PruningPlan.load(path)
    text = str(err.value)
    assert "\n" not in text and repr(str(path)) in text and message in text


def test_validate_refuses_a_float_index_in_a_plan_built_in_python():
    plan = PruningPlan.from_dict(plan_dict())
    plan.layers[0].mlp_channels_kept = [0, 1.5, 3]
    with pytest.raises(ValueError, match=r"layers\[0\]\.mlp_channels_kept: index 1.5 is not an integer"):
        plan.validate()


BAD_FILES = {
    "not-utf8": (b"\xff\xfe{\x00}", "is not UTF-8 text"),
    "not-json": (b'{"version": 1,', "is not JSON"),
    "empty": (b"", "is not JSON"),
    "json-list": (b"[1, 2]", "expected a JSON object, got list"),
    "deeply-nested": (b"[" * 100_000, "nested too deeply"),
}


@pytest.mark.parametrize("case", list(BAD_FILES), ids=list(BAD_FILES))
def test_a_corrupt_plan_file_is_one_line_naming_it(case, tmp_path):
    data, message = BAD_FILES[case]
    path = tmp_path / "plan.json"
    path.write_bytes(data)
    with pytest.raises(ValueError) as err:
        PruningPlan.load(path)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"plan: {str(path)!r}") and message in text


def test_a_missing_plan_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json' does not exist"):
        PruningPlan.load(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="is a folder"):
        PruningPlan.load(tmp_path)
