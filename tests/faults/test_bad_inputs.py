"""Issue 9, bad input that must end in one line: exit 2, one line on stderr, no traceback, before heavy work.

Every case runs the real command line in-process on the ``dense_dir`` fixture (hashed before and after:
the source must come out unchanged) with the loaders replaced by a failing stub, so a case that got as
far as loading a model fails the test instead of passing slowly.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import nirvana.finetune
import nirvana.models
from nirvana.pruning import PruneSettings, prune
from tests.helpers import one_line_error, prune_args
from tests.test_cli import run
from tests.test_pruning import write_text
from tests.tiny_models import tiny_model, tiny_tokenizer

# The geometry of conftest's dense_dir: 3 Llama layers, 16 query heads over 8 KV heads of width 8, MLP 64.
GEOMETRY = dict(num_layers=3, hidden_size=32, num_heads=16, num_kv_heads=8, head_dim=8, intermediate_size=64)


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    """A real pruned folder (plan.json, report.json, scores), made once for the module."""
    tmp = tmp_path_factory.mktemp("pruned")
    model = tiny_model(
        "llama", num_hidden_layers=3, num_attention_heads=16, num_key_value_heads=8, intermediate_size=64
    )
    settings = PruneSettings(
        model="dense", sparsity=0.3, calib=str(write_text(tmp / "calib.txt")), num_samples=4, seq_len=16,
        round_to=2, device="cpu", out=str(tmp / "pruned"),
    )  # fmt: skip
    return prune(settings, model=model, tokenizer=tiny_tokenizer(), progress=False).out


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded: the check came after the heavy work")

    monkeypatch.setattr(nirvana.models, "load_model", refuse)
    monkeypatch.setattr(nirvana.finetune, "load_pruned", refuse)


def _plan(**changes) -> dict:
    layers = [{"kv_groups_kept": [0, 1, 2, 3], "mlp_channels_kept": list(range(32))} for _ in range(3)]
    plan = {"version": 1, "architecture": "LlamaForCausalLM", "geometry": dict(GEOMETRY), "layers": layers, "meta": {}}
    for path, value in changes.items():
        *parents, last = path.split("__")
        d = plan
        for key in parents:
            d = d[int(key)] if key.isdigit() else d[key]
        d[int(last) if last.isdigit() else last] = value
    return plan


def _file(tmp, name, data):
    path = tmp / name
    path.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    return path


def _folder(tmp, name, files):
    folder = tmp / name
    folder.mkdir()
    for file, text in files.items():
        (folder / file).write_text(text)
    return folder


# name -> (argv from (tmp_path, dense_dir, calib, pruned_dir), what the one line must say)
PRUNE = {
    "calib-missing": (lambda t, d, c, p: prune_args(d, t / "none.txt", t / "out"), "none.txt' does not exist"),
    "calib-empty": (lambda t, d, c, p: prune_args(d, _file(t, "e.txt", b""), t / "out"), "e.txt' is empty"),
    "calib-folder-without-txt": (
        lambda t, d, c, p: prune_args(d, _folder(t, "texts", {"a.md": "x"}), t / "out"),
        "holds no .txt files",
    ),
    "seed-negative": (lambda t, d, c, p: prune_args(d, c, t / "out", "--seed", "-1"), "seed: must be an integer in"),
    "seed-past-2-31": (
        lambda t, d, c, p: prune_args(d, c, t / "out", "--seed", str(2**31 - 1), "--select-calib", "2", draws=None),
        "with --select-calib 2 --draws 4 uses seeds up to 2150629376",  # NIRVANA's 4 draws, 2**20 apart
    ),
    "select-calib-huge": (
        lambda t, d, c, p: prune_args(d, c, t / "out", "--select-calib", "100000000"),
        "select_calib: at most 64 candidate sets, got 100000000",
    ),
    "self-num-samples-huge": (
        lambda t, d, c, p: prune_args(d, "self", t / "out", "--num-samples", "1000000"),
        "num_samples: at most 1024 with --calib self",
    ),
    "re-prune-a-pruned-folder": (
        lambda t, d, c, p: prune_args(p, c, t / "out"),
        "is a pruned checkpoint; prune the dense model it came from instead",
    ),
    "re-prune-a-pruned-config": (
        lambda t, d, c, p: prune_args(_stripped_copy(t, p), c, t / "out"),
        "is a pruned checkpoint",
    ),
}


def _stripped_copy(tmp, pruned):
    """A pruned folder that lost its plan.json: its config.json still has the nirvana block."""
    copy = tmp / "pruned-copy"
    shutil.copytree(pruned, copy)
    (copy / "plan.json").unlink()
    return copy


@pytest.mark.parametrize("case", list(PRUNE), ids=list(PRUNE))
def test_prune_refuses_in_one_line_before_loading(case, tmp_path, dense_dir, pruned_dir, no_loading, capsys):
    argv, message = PRUNE[case]
    calib = write_text(tmp_path / "calib.txt")
    code, out, err = run(argv(tmp_path, dense_dir, calib, pruned_dir), capsys)
    one_line_error(code, err, message, stdout=out)
    assert not (tmp_path / "out").exists()


def test_a_hub_name_goes_to_the_hub_and_an_unreachable_hub_is_one_line(tmp_path, dense_dir, monkeypatch, capsys):
    monkeypatch.setattr(nirvana.models, "hub_reachable", lambda: False)
    argv = prune_args("nirvana-test-org/no-such-model", write_text(tmp_path / "c.txt"), tmp_path / "out")
    code, out, err = run(argv, capsys)
    one_line_error(code, err, "source: 'nirvana-test-org/no-such-model' is not a local folder", stdout=out)
    assert "could not be reached" in err and "does not exist" not in err


BAD_PLANS = {
    "float-indices": (_plan(layers__1__kv_groups_kept=[0.0, 1.5]), "layers[1].kv_groups_kept: index 0.0 is not an"),
    "bool-index": (_plan(layers__0__mlp_channels_kept=[True, 3]), "layers[0].mlp_channels_kept: index True"),
    "geometry-as-strings": (_plan(geometry__num_layers="3"), "geometry.num_layers: expected an integer, got '3'"),
    "geometry-as-float": (_plan(geometry__head_dim=8.0), "geometry.head_dim: expected an integer, got 8.0"),
    "geometry-as-bool": (_plan(geometry__num_kv_heads=True), "geometry.num_kv_heads: expected an integer"),
    "layers-not-a-list": (_plan(layers={"0": []}), "plan.layers: expected a list"),
    "not-utf8": (b"\xff\xfe\x00{", "is not UTF-8 text"),
    "not-json": (b'{"version": 1, "layers": [', "is not JSON"),
}


@pytest.mark.parametrize("case", list(BAD_PLANS), ids=list(BAD_PLANS))
def test_apply_refuses_a_bad_plan_naming_the_file(case, tmp_path, dense_dir, capsys):
    data, message = BAD_PLANS[case]
    plan = _file(tmp_path, "plan.json", data)
    code, out, err = run(["apply", plan, "--model", dense_dir, "--out", tmp_path / "out"], capsys)
    one_line_error(code, err, message, stdout=out)
    assert repr(str(plan)) in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device", ["banana", "cuda:x", "cuda"], ids=["banana", "bad-index", "cuda"])
def test_finetune_refuses_a_bad_device_before_loading(device, tmp_path, pruned_dir, no_loading, capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("checks the message on a machine without CUDA")
    text = write_text(tmp_path / "t.txt")
    argv = ["finetune", pruned_dir, "--text", text, "--steps", "1", "--out", tmp_path / "out", "--device", device]
    code, out, err = run(argv, capsys)
    expected = "no CUDA GPU is available" if device == "cuda" else f"must be cpu, cuda or cuda:N, got {device!r}"
    one_line_error(code, err, expected, stdout=out)


def _report_copy(tmp, pruned, change):
    folder = tmp / "copy"
    shutil.copytree(pruned, folder)
    report = json.loads((folder / "report.json").read_text())
    change(report)
    (folder / "report.json").write_text(json.dumps(report))
    return folder


REPORTS = {
    "missing-sparsity": (lambda t, p: _report_copy(t, p, lambda r: r.pop("sparsity")), "missing key 'sparsity'"),
    "missing-achieved": (
        lambda t, p: _report_copy(t, p, lambda r: r["sparsity"].pop("achieved")),
        "missing key 'sparsity.achieved'",
    ),
    "missing-layer-width": (
        lambda t, p: _report_copy(t, p, lambda r: r["per_layer"][2].pop("kv_groups")),
        "missing key 'per_layer[2].kv_groups'",
    ),
    "not-json": (lambda t, p: _folder(t, "r", {"report.json": "{not json"}), "report.json' is not JSON"),
    "a-dense-folder": (lambda t, p: _folder(t, "d", {"config.json": "{}"}), "pass the --out folder of a prune run"),
}


@pytest.mark.parametrize("case", list(REPORTS), ids=list(REPORTS))
@pytest.mark.parametrize("raw", [False, True], ids=["summary", "json"])
def test_report_of_a_damaged_report_is_one_line(case, raw, tmp_path, pruned_dir, capsys):
    make, message = REPORTS[case]
    folder = make(tmp_path, pruned_dir)
    code, out, err = run(["report", folder, *(["--json"] if raw else [])], capsys)
    one_line_error(code, err, message, stdout=out)
    if case.startswith("missing"):
        assert repr(str(folder / "report.json")) in err
