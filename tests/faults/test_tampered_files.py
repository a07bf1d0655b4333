"""Corrupt or tampered checkpoint files as the source of prune, apply and eval: one line, exit 2, nothing written.

Each case copies the ``dense_dir`` fixture (which checks that the original is never touched), tampers
with the copy, and runs the command as a user would. The tampered copy must come out as it went in.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from nirvana.apply import apply_plan
from nirvana.checkpoint import load_pruned
from tests.conftest import tree_digest
from tests.helpers import one_line_error, prune_args
from tests.test_apply import dense_folder, make_plan
from tests.test_cli import run
from tests.test_pruning import write_text


def _split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _edit_entries(change):
    def tamper(path: Path) -> None:
        header, data = _split(path)
        change({k: v for k, v in header.items() if k != "__metadata__"})
        _join(path, header, data)

    return tamper


def _length(value):
    def tamper(path: Path) -> None:
        raw = path.read_bytes()
        path.write_bytes(struct.pack("<Q", value(len(raw))) + raw[8:])

    return tamper


def _last(entries: dict) -> dict:
    return max(entries.values(), key=lambda e: e["data_offsets"])


def _reverse(entries: dict) -> None:
    entry = entries["model.norm.weight"]
    entry["data_offsets"] = entry["data_offsets"][::-1]


def _overlap(entries: dict) -> None:
    # Same shape and dtype, so each entry is self-consistent: only the overlap gives it away.
    entries["model.layers.1.self_attn.q_proj.weight"]["data_offsets"] = list(
        entries["model.layers.0.self_attn.q_proj.weight"]["data_offsets"]
    )


def _garble_header(path: Path) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    path.write_bytes(raw[:8] + b"#" * n + raw[8 + n :])


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


TAMPER = {
    "huge-header-length": _length(lambda size: 1 << 62),
    "header-past-end": _length(lambda size: size),
    "offsets-out-of-range": _edit_entries(lambda e: _last(e)["data_offsets"].__setitem__(1, 10**9)),
    "reversed-offsets": _edit_entries(_reverse),
    "overlapping-offsets": _edit_entries(_overlap),
    "bad-dtype": _edit_entries(lambda e: e["model.norm.weight"].__setitem__("dtype", "F99")),
    "non-json-header": _garble_header,
    "truncated": _truncate,
    "empty": lambda path: path.write_bytes(b""),
}
COMMANDS = ("prune", "apply", "eval")


@pytest.fixture
def plan_path(dense_dir, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(dense_dir)
    path = tmp_path / "plan.json"
    make_plan(model, "global").save(path)
    return path


def _argv(command: str, model: Path, tmp_path: Path, plan_path: Path) -> list:
    out = tmp_path / "out"
    if command == "prune":
        return prune_args(model, write_text(tmp_path / "calib.txt"), out)
    if command == "apply":
        return ["apply", plan_path, "--model", model, "--out", out, "--device", "cpu"]
    return ["eval", model, "--text", write_text(tmp_path / "eval.txt", n_words=200), "--device", "cpu"]


def _refused(argv, capsys, tmp_path: Path, folder: Path, *needles: str) -> str:
    digest = tree_digest(folder)
    code, stdout, err = run(argv, capsys)
    line = one_line_error(code, err, *needles, stdout=stdout)
    assert not (tmp_path / "out").exists(), "an output folder was written"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "a temporary folder was left behind"
    assert tree_digest(folder) == digest, f"{folder} changed"
    return line


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", list(TAMPER), ids=list(TAMPER))
def test_tampered_weights_are_one_line_naming_the_file(case, command, dense_dir, plan_path, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(dense_dir, bad)
    TAMPER[case](bad / "model.safetensors")
    argv = _argv(command, bad, tmp_path, plan_path)
    _refused(argv, capsys, tmp_path, bad, f"{bad / 'model.safetensors'}", "is not a valid safetensors file")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    ("content", "why"),
    [(b'{"model_type": "llama", "x": "\xff\xfe"}', "is not UTF-8 text"), (b'{"model_type": "llama",', "is not JSON")],
    ids=["non-utf8", "not-json"],
)
def test_corrupt_config_json_is_one_line_naming_it(content, why, command, dense_dir, plan_path, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(dense_dir, bad)
    (bad / "config.json").write_bytes(content)
    _refused(_argv(command, bad, tmp_path, plan_path), capsys, tmp_path, bad, str(bad / "config.json"), why)


@pytest.fixture
def pruned_dir(dense_dir, plan_path, tmp_path):
    """A pruned checkpoint with per-layer widths (so its config.json has a nirvana block), written by apply."""
    folder = apply_plan(plan_path, dense_dir, tmp_path / "pruned", device="cpu")
    assert "nirvana" in json.loads((folder / "config.json").read_text())
    return folder


def _edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def _narrower_mlp(config):
    config["nirvana"]["layers"][0]["intermediate_size"] -= 1


def _qwen2_block(config):
    config["nirvana"]["base_architecture"] = "Qwen2ForCausalLM"
    config["architectures"] = ["Qwen2ForCausalLM"]


def _qwen2_everywhere(config):
    _qwen2_block(config)
    config["model_type"] = "qwen2"  # now only the weights tell: Llama has no q/k/v biases


BLOCK_FAULTS = {
    "widths-disagree-with-weights": (_narrower_mlp, "model.layers.0.mlp.gate_proj.weight", "has shape"),
    "qwen2-block-on-llama-config": (_qwen2_block, "model_type 'llama'", "'Qwen2ForCausalLM' is a 'qwen2' model"),
    "qwen2-config-on-llama-weights": (_qwen2_everywhere, "has no tensor 'model.layers.0.self_attn.q_proj.bias'", ""),
    "base-disagrees-with-architectures": (
        lambda c: c["nirvana"].__setitem__("base_architecture", "Qwen2ForCausalLM"),
        "base_architecture 'Qwen2ForCausalLM'",
        "LlamaForCausalLM",
    ),
    "too-few-layers": (lambda c: c["nirvana"]["layers"].pop(), "config.json", "expected 3 entries"),
    "not-a-model-class": (lambda c: c["nirvana"].__setitem__("base_architecture", "os"), "'os'", ""),
    "non-utf8-config": (None, "is not UTF-8 text", "config.json"),
}


@pytest.mark.parametrize("case", list(BLOCK_FAULTS), ids=list(BLOCK_FAULTS))
def test_a_config_that_disagrees_with_the_weights_is_refused(case, pruned_dir, tmp_path, capsys):
    change, *needles = BLOCK_FAULTS[case]
    if change is None:
        (pruned_dir / "config.json").write_bytes((pruned_dir / "config.json").read_bytes() + b"\xff")
    else:
        if case == "not-a-model-class":
            _edit_config(pruned_dir, lambda c: c.__setitem__("architectures", ["os"]))
        _edit_config(pruned_dir, change)
    needles = [n for n in needles if n]
    with pytest.raises(ValueError) as info:
        load_pruned(pruned_dir)
    assert all(n in str(info.value) for n in needles) and "\n" not in str(info.value), str(info.value)
    # The same through the CLI, as eval reaches it.
    argv = ["eval", pruned_dir, "--text", write_text(tmp_path / "eval.txt", n_words=200), "--device", "cpu"]
    _refused(argv, capsys, tmp_path, pruned_dir, *needles)


def test_the_untampered_pruned_folder_loads(pruned_dir):
    assert load_pruned(pruned_dir) is not None


def test_the_console_prints_one_line_for_a_block_on_the_wrong_weights(pruned_dir, tmp_path):
    """Through a real process: transformers' own warnings go to the real stderr, which capsys does not see."""
    _edit_config(pruned_dir, _qwen2_everywhere)
    text = write_text(tmp_path / "eval.txt", n_words=200)
    argv = [sys.executable, "-m", "nirvana", "eval", str(pruned_dir), "--text", str(text), "--device", "cpu"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "q_proj.bias" in lines[0], done.stderr


def _drop_norm(folder: Path) -> None:
    header, data = _split(folder / "model.safetensors")
    entry = header.pop("model.norm.weight")
    begin, end = entry["data_offsets"]
    for other in header.values():  # close the gap, so that the file itself stays valid
        if isinstance(other.get("data_offsets"), list) and other["data_offsets"][0] >= end:
            other["data_offsets"] = [o - (end - begin) for o in other["data_offsets"]]
    _join(folder / "model.safetensors", header, data[:begin] + data[end:])


@pytest.mark.parametrize("command", COMMANDS)
def test_a_valid_file_that_lacks_a_tensor_is_refused(command, dense_dir, plan_path, tmp_path, capsys):
    """transformers would fill the missing norm with its initial values and only warn: prune and eval refuse."""
    bad = tmp_path / "bad"
    shutil.copytree(dense_dir, bad)
    _drop_norm(bad)
    _refused(_argv(command, bad, tmp_path, plan_path), capsys, tmp_path, bad, str(bad), "no tensor 'model.norm.weight'")


@pytest.mark.parametrize("command", ("prune", "eval"))
def test_a_shard_index_leading_outside_is_refused(command, plan_path, tmp_path, capsys):
    bad = dense_folder(tmp_path, "llama", sharded=True)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    shutil.copyfile(bad / shard, tmp_path / "x.safetensors")
    index["weight_map"] = {k: "../x.safetensors" if v == shard else v for k, v in index["weight_map"].items()}
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(_argv(command, bad, tmp_path, plan_path), capsys, tmp_path, bad, "'../x.safetensors'", "outside the model")
