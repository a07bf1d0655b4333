"""Recovery fine-tuning: LoRA and full runs lower the loss, keep the pruned shapes, never touch the source."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from nirvana.adapters import get_adapter
from nirvana.checkpoint import layer_widths, load_plan, load_pruned, save_pruned
from nirvana.compaction import compact_model
from nirvana.finetune import finetune
from nirvana.plan import LayerPlan, PruningPlan
from tests.tiny_models import tiny_model, tiny_tokenizer

# Tiny models: 2 layers, 2 KV groups of 2 query heads, head_dim 8, 48 MLP channels, a 128-character vocabulary.
NON_UNIFORM = [([1], list(range(0, 48, 3))), ([0, 1], list(range(5, 40)))]
TEXT = "the quick brown fox jumps over the lazy dog. " * 60  # 2,700 character tokens, highly predictable
FAST = dict(seq_len=32, batch_size=4, progress=False)
SOURCE_REPORT = {"sparsity": {"target": 0.3}, "model": "tiny"}


def make_source(folder: Path, arch: str = "llama", layers=NON_UNIFORM, dtype=torch.float32) -> Path:
    # At the default init (std 0.02) the tiny layers barely touch the residual stream, so adapters on them
    # could move the loss only a little; std 0.1 makes the projections matter, as in a trained model.
    model = tiny_model(arch, dtype=dtype, initializer_range=0.1)
    geometry = get_adapter(model).geometry(model.config)
    plan = PruningPlan(model.config.architectures[0], geometry, [LayerPlan(list(g), list(c)) for g, c in layers])
    compact_model(model, plan)
    extra = {"notes.txt": "pruned for a test\n"}
    return save_pruned(model, tiny_tokenizer(), plan, folder, report=SOURCE_REPORT, extra_files=extra)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def weight_shapes(folder: Path) -> dict[str, tuple]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def text_loss(folder: Path, text: str = TEXT[:200]) -> float:
    model = load_pruned(folder)
    ids = torch.tensor([[ord(c) for c in text]])
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_source(tmp_path_factory.mktemp("src") / "pruned")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(TEXT)
    return path


@pytest.mark.parametrize("full, lr", [(False, 1e-2), (True, 3e-3)], ids=["lora", "full"])
def test_training_lowers_the_loss_and_keeps_the_pruned_checkpoint(source, text_file, tmp_path, full, lr):
    before = snapshot(source)
    out = tmp_path / "tuned"
    summary = finetune(source, text_file, steps=30, out=out, full=full, lr=lr, **FAST)

    assert summary["method"] == ("full" if full else "lora")
    assert summary["steps"] == 30 and summary["out"] == str(out)
    # The random tiny model starts above ln(128) = 4.85 nats; 30 steps on a repeated sentence must cut that clearly.
    assert summary["loss_end"] < summary["loss_start"] - 1.0, summary
    assert summary["heldout_loss_end"] < summary["heldout_loss_start"] - 1.0, summary
    assert summary["last_step_loss"] < summary["first_step_loss"]

    # The saved weights are the trained ones: the loaded output predicts the text better than the source.
    assert text_loss(out) < text_loss(source) - 1.0
    # Same tensors and shapes as the source (LoRA merged away: no adapter weights), same per-layer widths.
    assert weight_shapes(out) == weight_shapes(source)
    assert layer_widths(load_pruned(out)) == layer_widths(load_pruned(source))
    assert load_plan(out).to_dict() == load_plan(source).to_dict()
    # The tokenizer and other files are copied byte for byte; the source is left exactly as it was.
    after = snapshot(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "notes.txt"):
        assert after[name] == before[name], name
    assert snapshot(source) == before

    report = json.loads((out / "report.json").read_text())
    assert {k: report[k] for k in SOURCE_REPORT} == SOURCE_REPORT
    block = report["finetune"]
    assert block["method"] == summary["method"] and block["lr"] == lr and block["seq_len"] == 32
    assert block["source"] == str(source) and len(block["step_losses"]) == 30
    assert block["loss_end"] == summary["loss_end"]
    assert ("lora_rank" in block) is not full


def test_lora_changes_every_adapted_projection_and_nothing_else(source, text_file, tmp_path):
    out = tmp_path / "tuned"
    finetune(source, text_file, steps=3, out=out, lr=1e-2, **FAST)
    with safe_open(str(source / "model.safetensors"), "pt") as a, safe_open(str(out / "model.safetensors"), "pt") as b:
        for key in a.keys():
            changed = not torch.equal(a.get_tensor(key), b.get_tensor(key))
            adapted = key.endswith("proj.weight")
            assert changed == adapted, key


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"], ids=["qwen2-biases", "gemma2"])
def test_other_families_fine_tune_with_lora(tmp_path, text_file, arch):
    src = make_source(tmp_path / "src", arch)
    summary = finetune(src, text_file, steps=15, out=tmp_path / "out", lr=1e-2, **FAST)
    assert summary["loss_end"] < summary["loss_start"]
    assert weight_shapes(tmp_path / "out") == weight_shapes(src)


def test_a_layer_without_mlp_and_a_bfloat16_checkpoint(tmp_path, text_file):
    # Layer 0 keeps no MLP channel (0-wide linears, which LoRA must skip); the checkpoint is bfloat16.
    layers = [([0], []), ([0, 1], list(range(0, 48, 2)))]
    src = make_source(tmp_path / "src", layers=layers, dtype=torch.bfloat16)
    summary = finetune(src, text_file, steps=10, out=tmp_path / "out", lr=1e-2, **FAST)
    assert summary["loss_end"] < summary["loss_start"]
    model = load_pruned(tmp_path / "out")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert layer_widths(model)[0]["intermediate_size"] == 0
    assert weight_shapes(tmp_path / "out") == weight_shapes(src)


def test_fine_tuning_twice_keeps_the_first_record_and_overwrite_replaces(source, text_file, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    finetune(source, text_file, steps=2, out=first, **FAST)
    finetune(first, text_file, steps=3, out=second, full=True, **FAST)
    block = json.loads((second / "report.json").read_text())["finetune"]
    assert block["method"] == "full" and block["steps"] == 3
    assert block["previous"]["method"] == "lora" and block["previous"]["steps"] == 2

    finetune(source, text_file, steps=2, out=second, overwrite=True, seed=1, **FAST)
    block = json.loads((second / "report.json").read_text())["finetune"]
    assert block["seed"] == 1 and "previous" not in block


def test_same_seed_same_result(source, text_file, tmp_path):
    a = finetune(source, text_file, steps=3, out=tmp_path / "a", lr=1e-2, **FAST)
    b = finetune(source, text_file, steps=3, out=tmp_path / "b", lr=1e-2, **FAST)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a["loss_end"] == b["loss_end"]


BAD = [
    ("missing-folder", lambda src, out: dict(pruned_dir=src.parent / "nope", out=out), "pruned_dir"),
    ("not-a-checkpoint", lambda src, out: dict(pruned_dir=src.parent, out=out), "pruned_dir"),
    ("steps-0", lambda src, out: dict(steps=0), "steps"),
    ("steps-bool", lambda src, out: dict(steps=True), "steps"),
    ("steps-float", lambda src, out: dict(steps=2.5), "steps"),
    ("lr-negative", lambda src, out: dict(lr=-1e-3), "lr"),
    ("lr-nan", lambda src, out: dict(lr=float("nan")), "lr"),
    ("seq-len-1", lambda src, out: dict(seq_len=1), "seq_len"),
    ("batch-0", lambda src, out: dict(batch_size=0), "batch_size"),
    ("rank-0", lambda src, out: dict(lora_rank=0), "lora_rank"),
    ("out-is-source", lambda src, out: dict(out=src, overwrite=True), "out"),
    ("out-inside-source", lambda src, out: dict(out=src / "sub"), "out"),
    ("out-is-a-file", lambda src, out: dict(out=out.parent / "a-file", overwrite=True), "out"),
    ("missing-text", lambda src, out: dict(text_source=src.parent / "nope.txt"), "text_source"),
    ("text-too-short", lambda src, out: dict(seq_len=3000), "text_source"),
    ("device-banana", lambda src, out: dict(device="banana"), "device"),
    ("device-cuda-n", lambda src, out: dict(device="cuda:x"), "device"),
]


@pytest.mark.parametrize("case, kwargs, name", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_naming_the_argument(source, text_file, tmp_path, case, kwargs, name):
    before = snapshot(source)
    (tmp_path / "a-file").write_text("not a folder")
    args = dict(pruned_dir=source, text_source=text_file, steps=2, out=tmp_path / "out", **FAST)
    args.update(kwargs(source, tmp_path / "out"))
    with pytest.raises(ValueError, match=rf"^{name}: "):
        finetune(**args)
    assert snapshot(source) == before
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")], ids=["cuda", "cuda-0", "torch-device"])
def test_cuda_without_a_gpu_is_refused_before_loading(source, text_file, tmp_path, monkeypatch, device):
    import nirvana.finetune

    monkeypatch.setattr(nirvana.finetune, "load_pruned", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match=r"^device: 'cuda(:0)?' asked for, but no CUDA GPU is available$"):
        finetune(source, text_file, steps=1, out=tmp_path / "out", device=device)


def test_existing_out_without_overwrite_is_left_alone(source, text_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"^out: .*overwrite"):
        finetune(source, text_file, steps=2, out=out, **FAST)
    assert snapshot(out) == {"keep.txt": b"mine"}


def test_lora_without_peft_says_how_to_get_it(source, text_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(ValueError, match=r"^full: .*pip install peft"):
        finetune(source, text_file, steps=2, out=tmp_path / "out", **FAST)
    assert not (tmp_path / "out").exists()
