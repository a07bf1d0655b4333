"""``nirvana apply`` on sources it must refuse: incomplete or inconsistent shards, escaping paths, linked side
files, FLAP plans, devices that are not there. Each: exit 2, one line naming the tensor or file, no output folder,
and the source as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nirvana.apply import apply_plan
from tests.conftest import tree_digest
from tests.helpers import one_line_error
from tests.test_apply import dense_folder, make_plan
from tests.test_cli import run
from tests.tiny_models import tiny_model

INDEX = "model.safetensors.index.json"
FIRST, SECOND, THIRD = (f"model-0000{i}-of-00004.safetensors" for i in (1, 2, 3))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A sharded dense Llama (four shards: model.norm.weight in the third) and a plan for it."""
    tmp = tmp_path_factory.mktemp("apply-faults")
    src = dense_folder(tmp, "llama", sharded=True)
    weight_map = json.loads((src / INDEX).read_text())["weight_map"]
    assert weight_map["model.embed_tokens.weight"] == FIRST and weight_map["model.norm.weight"] == THIRD
    plan = make_plan(tiny_model("llama"), "global")
    plan.save(tmp / "plan.json")
    return src, tmp / "plan.json"


@pytest.fixture
def source(pristine, tmp_path):
    """A fresh copy of the sharded source to tamper with, and the plan."""
    src = tmp_path / "models" / "dense"
    shutil.copytree(pristine[0], src)
    return src, pristine[1]


def edit_index(src: Path, change) -> None:
    index = json.loads((src / INDEX).read_text())
    change(index["weight_map"])
    (src / INDEX).write_text(json.dumps(index))


def edit_shard(src: Path, name: str, change) -> None:
    tensors = load_file(src / name)
    change(tensors)
    save_file(tensors, src / name, metadata={"format": "pt"})


def drop(name: str, shard: str, *, from_index: bool = True):
    def tamper(src: Path, tmp: Path) -> None:
        edit_shard(src, shard, lambda t: t.pop(name))
        if from_index:
            edit_index(src, lambda m: m.pop(name))

    return tamper


def _index_names_a_file_outside(src: Path, tmp: Path) -> None:
    shutil.copyfile(src / SECOND, src.parent / "x.safetensors")
    edit_index(src, lambda m: m.update({k: "../x.safetensors" for k, v in list(m.items()) if v == SECOND}))


def _index_names_an_absolute_path(src: Path, tmp: Path) -> None:
    edit_index(src, lambda m: m.update({k: str(src / SECOND) for k, v in list(m.items()) if v == SECOND}))


def _in_two_shards(src: Path, tmp: Path) -> None:
    embed = load_file(src / FIRST)["model.embed_tokens.weight"]
    edit_shard(src, THIRD, lambda t: t.update({"model.embed_tokens.weight": embed}))


def _unexpected(src: Path, tmp: Path) -> None:
    edit_shard(src, THIRD, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(3)}))
    edit_index(src, lambda m: m.update({"model.layers.0.extra.weight": THIRD}))


def _linked_side_file(src: Path, tmp: Path) -> None:
    secret = tmp / "secret.json"
    secret.write_text("{}")
    secret.chmod(0o600)
    (src / "tokenizer_config.json").unlink()
    (src / "tokenizer_config.json").symlink_to(secret)


def _flap_plan(plan: Path, tmp: Path) -> Path:
    data = json.loads(plan.read_text())
    data["meta"]["method"] = "flap"
    (tmp / "flap.json").write_text(json.dumps(data))
    return tmp / "flap.json"


# name -> (how to tamper with the source copy, what the one line must name)
SOURCE_FAULTS = {
    "index-maps-a-tensor-to-the-wrong-file": (
        lambda src, tmp: edit_index(src, lambda m: m.update({"model.layers.0.mlp.up_proj.weight": THIRD})),
        ["'model.layers.0.mlp.up_proj.weight'", f"'{THIRD}'", f"'{SECOND}'"],
    ),
    "norm-missing": (drop("model.norm.weight", THIRD), ["has no tensor 'model.norm.weight'"]),
    "embed-tokens-missing": (drop("model.embed_tokens.weight", FIRST), ["has no tensor 'model.embed_tokens.weight'"]),
    "mlp-weight-missing": (
        drop("model.layers.1.mlp.down_proj.weight", THIRD),
        ["has no tensor 'model.layers.1.mlp.down_proj.weight'"],
    ),
    "lm-head-missing": (drop("lm_head.weight", "model-00004-of-00004.safetensors"), ["has no tensor 'lm_head.weight'"]),
    "indexed-tensor-missing-from-its-shard": (
        drop("model.norm.weight", THIRD, from_index=False),
        [f"'{THIRD}', whose header lacks it", "'model.norm.weight'"],
    ),
    "index-names-a-parent-path": (_index_names_a_file_outside, ["'../x.safetensors'", "outside the model folder"]),
    "index-names-an-absolute-path": (_index_names_an_absolute_path, [SECOND, "outside the model folder"]),
    "tensor-in-two-shards": (_in_two_shards, ["'model.embed_tokens.weight' is in two shards", FIRST, THIRD]),
    "unexpected-tensor": (_unexpected, ["'model.layers.0.extra.weight'", "is not one the LlamaForCausalLM"]),
    "wrong-shape": (
        lambda src, tmp: edit_shard(src, THIRD, lambda t: t.update({"model.norm.weight": torch.ones(7)})),
        ["'model.norm.weight'", "has shape [7], but"],
    ),
    "symlinked-side-file": (_linked_side_file, ["tokenizer_config.json", "is a symbolic link", "secret.json"]),
}


def refused(argv, capsys, tmp_path: Path, src: Path, needles) -> str:
    digest = tree_digest(src)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, err = run(argv, capsys)
    line = one_line_error(code, err, *needles, stdout=stdout)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "apply wrote something"
    assert tree_digest(src) == digest, "the source changed"
    return line


@pytest.mark.parametrize("case", list(SOURCE_FAULTS), ids=list(SOURCE_FAULTS))
def test_a_faulty_source_is_refused(case, source, tmp_path, capsys):
    src, plan = source
    tamper, needles = SOURCE_FAULTS[case]
    tamper(src, tmp_path)
    argv = ["apply", plan, "--model", src, "--out", tmp_path / "out", "--device", "cpu"]
    refused(argv, capsys, tmp_path, src, needles)


def test_a_flap_plan_without_its_means_file_is_refused(source, tmp_path, capsys):
    """Its biases come from calibration means: writing without them would be wrong."""
    src, plan = source
    flap = _flap_plan(plan, tmp_path)
    argv = ["apply", flap, "--model", src, "--out", tmp_path / "out", "--device", "cpu"]
    refused(argv, capsys, tmp_path, src, ["method flap", "compensation.safetensors", "--compensation FILE"])


def test_a_plan_made_with_compensate_bias_without_its_means_file_is_refused(source, tmp_path, capsys):
    src, plan = source
    data = json.loads(plan.read_text())
    data["meta"]["compensate"] = "bias"
    compensated = tmp_path / "compensated.json"
    compensated.write_text(json.dumps(data))
    argv = ["apply", compensated, "--model", src, "--out", tmp_path / "out", "--device", "cpu"]
    refused(argv, capsys, tmp_path, src, ["--compensate bias", "compensation.safetensors", "--compensation FILE"])


def test_a_means_file_for_a_plan_without_compensation_is_refused(source, tmp_path, capsys):
    src, plan = source
    means = tmp_path / "means.safetensors"
    means.write_bytes(b"")
    argv = ["apply", plan, "--model", src, "--out", tmp_path / "out", "--compensation", means, "--device", "cpu"]
    refused(argv, capsys, tmp_path, src, ["compensation: the plan was made without a bias compensation"])


DEVICES = {
    "banana": ["device: expected 'cpu', 'cuda' or 'cuda:N', got 'banana'"],
    "meta": ["device: expected 'cpu', 'cuda' or 'cuda:N', got 'meta'"],
}
if not torch.cuda.is_available():
    DEVICES |= {"cuda": ["device: 'cuda' asked for, but no CUDA GPU is available"], "cuda:1": ["'cuda:1' asked for"]}
else:
    _beyond = f"cuda:{torch.cuda.device_count()}"
    DEVICES |= {_beyond: [f"device: {_beyond!r} asked for, but this machine has {torch.cuda.device_count()} GPU(s)"]}


@pytest.mark.parametrize("device", list(DEVICES), ids=list(DEVICES))
def test_a_device_that_is_not_there_is_refused(device, source, tmp_path, capsys):
    src, plan = source
    argv = ["apply", plan, "--model", src, "--out", tmp_path / "out", "--device", device]
    refused(argv, capsys, tmp_path, src, DEVICES[device])


def test_side_files_are_copied_as_regular_files_no_wider_than_their_source(source, tmp_path):
    src, plan = source
    (src / "tokenizer_config.json").chmod(0o600)
    (src / "tokenizer.json").chmod(0o640)
    digest = tree_digest(src)
    out = apply_plan(plan, src, tmp_path / "out", device="cpu")
    umask = os.umask(0)
    os.umask(umask)
    for name in ("tokenizer_config.json", "tokenizer.json", "generation_config.json"):
        copy = out / name
        assert not copy.is_symlink() and stat.S_ISREG(copy.lstat().st_mode), name
        assert copy.read_bytes() == (src / name).read_bytes(), name
        source_mode = stat.S_IMODE((src / name).stat().st_mode)
        assert stat.S_IMODE(copy.stat().st_mode) == source_mode & ~umask, name
    assert stat.S_IMODE((out / "tokenizer_config.json").stat().st_mode) & 0o077 == 0
    assert tree_digest(src) == digest


def test_copy_file_never_follows_a_link_that_appeared_after_the_check(tmp_path):
    """side_files looked first; a link swapped in before the copy is still refused, not followed."""
    from nirvana.apply import copy_file

    secret = tmp_path / "secret"
    secret.write_text("private")
    secret.chmod(0o600)
    (tmp_path / "tokenizer.json").symlink_to(secret)
    with pytest.raises(ValueError, match="is a symbolic link"):
        copy_file(tmp_path / "tokenizer.json", tmp_path / "copy.json")
    assert not (tmp_path / "copy.json").exists()


def test_linked_shards_of_a_cache_snapshot_apply_as_their_files(source, tmp_path):
    """A Hugging Face cache snapshot links every shard into ../../blobs: read through, same output bits."""
    src, plan = source
    want = apply_plan(plan, src, tmp_path / "from-files", device="cpu")
    blobs = src.parent / "blobs"
    blobs.mkdir()
    for shard in sorted(src.glob("model-*.safetensors")):
        shard.rename(blobs / shard.name)
        shard.symlink_to(Path("..") / "blobs" / shard.name)
    got = apply_plan(plan, src, tmp_path / "from-links", device="cpu")
    for path in sorted(want.glob("*.safetensors")):
        assert (got / path.name).read_bytes() == path.read_bytes(), path.name
        assert not (got / path.name).is_symlink()
