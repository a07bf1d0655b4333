"""Checkpoints: save/load round trips through every load path, and atomic, careful saving."""

from __future__ import annotations

import ast
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers
import torch
import transformers
from safetensors import safe_open
from tokenizers import models, pre_tokenizers

import nirvana.checkpoint as checkpoint
from nirvana import _remote_modeling, output
from nirvana.adapters import get_adapter
from nirvana.checkpoint import layer_widths, load_plan, load_pruned, save_pruned
from nirvana.compaction import compact_model
from nirvana.plan import LayerPlan, PruningPlan
from tests.conftest import tree_digest
from tests.helpers import assert_bitwise_equal
from tests.tiny_models import tiny_batch, tiny_model

# Tiny models: 2 layers, 2 KV groups of G = 2 query heads, head_dim 8, 48 MLP channels.
NON_UNIFORM = [([1], list(range(0, 48, 3))), ([0, 1], list(range(5, 40)))]
UNIFORM = [([1], list(range(0, 48, 2))), ([0], list(range(1, 48, 2)))]
ROUND_TRIP_ARCHS = ("llama", "qwen2", "qwen3", "gemma2")
EAGER = {"attn_implementation": "eager"}  # as tiny_model uses, so logits can be compared bit for bit


def make_plan(model, layers, **meta) -> PruningPlan:
    geometry = get_adapter(model).geometry(model.config)
    kept = [LayerPlan(list(g), list(c)) for g, c in layers]
    return PruningPlan(model.config.architectures[0], geometry, kept, meta=dict(meta))


def pruned_model(arch: str = "llama", layers=NON_UNIFORM, **overrides):
    model = tiny_model(arch, **overrides)
    plan = make_plan(model, layers, method="test")
    return compact_model(model, plan), plan


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {f"w{i}": i for i in range(127)} | {"[UNK]": 127}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def logits(model, x=None) -> torch.Tensor:
    with torch.no_grad():
        return model(tiny_batch() if x is None else x).logits


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.mark.parametrize("arch", ROUND_TRIP_ARCHS, ids=ROUND_TRIP_ARCHS)
def test_non_uniform_round_trip_through_both_load_paths(arch, tokenizer, tmp_path):
    model, plan = pruned_model(arch)
    want = logits(model)
    report = {"sparsity": {"target": 0.3, "achieved": plan.achieved_sparsity()}}
    out = save_pruned(model, tokenizer, plan, tmp_path / "ckpt", report=report)

    assert out == tmp_path / "ckpt"
    files = listing(out)
    assert {"config.json", "model.safetensors", "plan.json", "report.json", "modeling_nirvana.py"} <= files
    assert {"tokenizer.json", "tokenizer_config.json"} <= files
    config = json.loads((out / "config.json").read_text())
    base = model.config.architectures[0]
    assert config["architectures"] == [base]
    assert config["auto_map"] == {"AutoModelForCausalLM": f"modeling_nirvana.Nirvana{base}"}
    assert config["nirvana"] == {
        "version": 1,
        "base_architecture": base,
        "layers": [
            {"num_heads": 2, "num_kv_heads": 1, "intermediate_size": 16},
            {"num_heads": 4, "num_kv_heads": 2, "intermediate_size": 35},
        ],
    }
    assert load_plan(out).to_dict() == plan.to_dict()
    assert json.loads((out / "report.json").read_text()) == report

    ours = load_pruned(out, **EAGER)
    remote = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, **EAGER)
    for name, loaded in (("load_pruned", ours), ("trust_remote_code", remote)):
        assert type(loaded).__name__ == f"Nirvana{base}", name
        assert isinstance(loaded, getattr(transformers, base)), name
        assert layer_widths(loaded) == config["nirvana"]["layers"], name
        assert_bitwise_equal(logits(loaded), want, name=f"{arch} logits via {name}")

    # AutoTokenizer would pick the tokenizer class of the model type (Qwen2Tokenizer, ...), which this
    # made-up word-level vocabulary is not; the files themselves must round-trip.
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    assert tok("w1 w7 unknown")["input_ids"] == tokenizer("w1 w7 unknown")["input_ids"] == [1, 7, 127]


@pytest.mark.parametrize("arch", ROUND_TRIP_ARCHS, ids=ROUND_TRIP_ARCHS)
def test_uniform_round_trip_is_a_stock_checkpoint(arch, tmp_path):
    model, plan = pruned_model(arch, UNIFORM)
    want = logits(model)
    out = save_pruned(model, None, plan, tmp_path / "ckpt")

    assert "modeling_nirvana.py" not in listing(out)
    config = json.loads((out / "config.json").read_text())
    assert "nirvana" not in config and "auto_map" not in config
    sizes = [config[k] for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim")]
    assert sizes == [2, 1, 24, 8]
    # No remote code: the stock class reads the smaller sizes from the config.
    stock = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False, **EAGER)
    assert type(stock) is type(model)
    assert_bitwise_equal(logits(stock), want, name=f"{arch} logits via stock from_pretrained")
    ours = load_pruned(out, **EAGER)
    assert type(ours) is type(model)
    assert_bitwise_equal(logits(ours), want, name=f"{arch} logits via load_pruned")


def test_non_uniform_checkpoint_is_not_loaded_silently_without_remote_code(tmp_path):
    model, plan = pruned_model("llama")
    out = save_pruned(model, None, plan, tmp_path / "ckpt")
    # The config's sizes are the dense model's, so a stock model cannot take the pruned weights.
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)


def test_uniform_sizes_that_transformers_refuses_save_with_per_layer_widths(tmp_path):
    # 6 heads do not divide hidden_size 32, which Llama's config refuses: saved as per-layer widths.
    layers = [([0, 1, 3], list(range(40))), ([1, 2, 3], list(range(8, 48)))]
    model, plan = pruned_model("llama", layers, num_attention_heads=8, num_key_value_heads=4, head_dim=4)
    want = logits(model)
    out = save_pruned(model, None, plan, tmp_path / "ckpt")
    assert "nirvana" in json.loads((out / "config.json").read_text())
    assert_bitwise_equal(logits(load_pruned(out, **EAGER)), want, name="logits via load_pruned")


def test_modeling_file_imports_only_torch_and_transformers():
    tree = ast.parse(Path(_remote_modeling.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import would need the nirvana package"
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "torch", "transformers"}


_NO_NIRVANA = """
import sys

class NoNirvana:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("nirvana", "nirvana_kernels"):
            raise ImportError("nirvana is not installed here: " + name)

sys.meta_path.insert(0, NoNirvana())
import torch, transformers

folder, inputs, result = sys.argv[1:]
model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager")
with torch.no_grad():
    torch.save(model(torch.load(inputs)).logits, result)
assert not [m for m in sys.modules if m.split(".")[0] in ("nirvana", "nirvana_kernels")]
"""


def test_remote_code_loads_where_nirvana_is_not_installed(tmp_path):
    model, plan = pruned_model("qwen2")  # q/k/v biases too
    x = tiny_batch()
    out = save_pruned(model, None, plan, tmp_path / "ckpt")
    torch.save(x, tmp_path / "x.pt")
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", _NO_NIRVANA, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_bitwise_equal(torch.load(tmp_path / "y.pt"), logits(model, x), name="logits without nirvana")


@pytest.mark.parametrize("layers", [NON_UNIFORM, UNIFORM], ids=["non-uniform", "uniform"])
def test_tied_embeddings_stay_tied(layers, tmp_path):
    # SmolLM2 ties lm_head to embed_tokens; safetensors refuses shared tensors unless de-duplicated.
    model, plan = pruned_model("llama", layers, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    want = logits(model)
    out = save_pruned(model, None, plan, tmp_path / "ckpt")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    loaders = [load_pruned]
    if layers is NON_UNIFORM:
        loaders.append(
            lambda p, **kw: transformers.AutoModelForCausalLM.from_pretrained(p, trust_remote_code=True, **kw)
        )
    for load in loaders:
        loaded = load(out, **EAGER)
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
        assert_bitwise_equal(logits(loaded), want, name="tied logits")


def test_model_loaded_from_gguf_saves_as_plain_weights(tmp_path):
    # As from_pretrained(folder, gguf_file=...) leaves it: de-quantized float weights, yet a GGUF
    # quantizer that makes save_pretrained refuse ("not serializable").
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    model, plan = pruned_model("llama", tie_word_embeddings=True)
    gguf = GgufConfig()
    model.config.quantization_config = gguf
    model.hf_quantizer = GgufHfQuantizer(gguf)
    want = logits(model)
    out = save_pruned(model, None, plan, tmp_path / "ckpt")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert_bitwise_equal(logits(load_pruned(out, **EAGER)), want, name="logits of the GGUF-loaded model")
    # The caller's model is left as it was.
    assert model.config.quantization_config is gguf and isinstance(model.hf_quantizer, GgufHfQuantizer)


def test_loaded_model_generates_and_resaves(tmp_path):
    model, plan = pruned_model("gemma2")
    prompt = tiny_batch()[:, :5]
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    want = model.generate(prompt, **kw)
    first = load_pruned(save_pruned(model, None, plan, tmp_path / "a"), **EAGER)
    assert torch.equal(first.generate(prompt, **kw), want)
    # Saving the reloaded (Nirvana subclass) model names the stock class again, and loads back the same.
    second = save_pruned(first, None, plan, tmp_path / "b")
    assert json.loads((second / "config.json").read_text())["architectures"] == ["Gemma2ForCausalLM"]
    assert torch.equal(load_pruned(second, **EAGER).generate(prompt, **kw), want)


def test_load_pruned_dtype_and_device(tmp_path):
    model, plan = pruned_model("qwen3")
    out = save_pruned(model, None, plan, tmp_path / "ckpt")
    loaded = load_pruned(out, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    assert not loaded.training
    assert {p.dtype for p in load_pruned(out).parameters()} == {torch.float32}  # the saved dtype


def test_existing_folder_is_refused_without_overwrite(tmp_path):
    model, plan = pruned_model()
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite=True") as err:
        save_pruned(model, None, plan, out)
    assert str(out) in str(err.value)
    assert listing(out) == {"keep.txt"} and listing(tmp_path) == {"ckpt"}


def test_overwrite_replaces_the_folder_and_leaves_nothing_behind(tmp_path):
    model, plan = pruned_model()
    out = tmp_path / "ckpt"
    save_pruned(model, None, plan, out)  # --overwrite replaces only a folder nirvana wrote
    (out / "keep.txt").write_text("old")
    save_pruned(model, None, plan, out, overwrite=True)
    assert "keep.txt" not in listing(out) and "model.safetensors" in listing(out)
    assert listing(tmp_path) == {"ckpt"}


def _fail(*args, **kwargs):
    raise OSError("simulated failure mid-save")


def _fail_after_weights(monkeypatch, model):
    real = model.save_pretrained

    def save_then_fail(folder, **kwargs):
        real(folder, **kwargs)  # the weights are on disk, then the disk fills up
        raise OSError("simulated failure mid-save")

    monkeypatch.setattr(model, "save_pretrained", save_then_fail)


FAILURES = {
    "after-weights": _fail_after_weights,
    "plan": lambda mp, model: mp.setattr(PruningPlan, "save", _fail),
    "extra-file": lambda mp, model: mp.setattr(checkpoint, "_write_extra", _fail),
    "final-rename": lambda mp, model: mp.setattr(output, "_renameat2", _fail),
}


@pytest.mark.parametrize("existing", [False, True], ids=["new-folder", "overwrite"])
@pytest.mark.parametrize("stage", list(FAILURES), ids=list(FAILURES))
def test_failure_mid_save_leaves_no_half_written_model(stage, existing, monkeypatch, tmp_path):
    model, plan = pruned_model()
    parent = tmp_path / "out"
    parent.mkdir()
    out = parent / "ckpt"
    if existing:
        save_pruned(model, None, plan, out)  # --overwrite replaces only a folder nirvana wrote
        (out / "keep.txt").write_text("old")
        before = tree_digest(out)
    FAILURES[stage](monkeypatch, model)
    with pytest.raises(OSError, match="simulated"):
        save_pruned(model, None, plan, out, overwrite=existing, extra_files={"notes.txt": "hi"})
    # No temporary folder is left, and the destination is either absent or exactly as it was.
    if existing:
        assert listing(parent) == {"ckpt"}
        assert tree_digest(out) == before and (out / "keep.txt").read_text() == "old"
    else:
        assert listing(parent) == set()


def test_source_folder_is_never_touched(tmp_path):
    dense = tiny_model("llama")
    source = tmp_path / "dense"
    dense.save_pretrained(source)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    model = transformers.AutoModelForCausalLM.from_pretrained(source, **EAGER)
    plan = make_plan(model, NON_UNIFORM)
    compact_model(model, plan)
    for target in (source, tmp_path):
        with pytest.raises(ValueError, match="source folder"):
            save_pruned(model, None, plan, target, overwrite=True)
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before
    assert listing(tmp_path) == {"dense"}


def test_model_that_does_not_match_the_plan_is_refused(tmp_path):
    dense = tiny_model("llama")
    plan = make_plan(dense, NON_UNIFORM)
    with pytest.raises(ValueError, match="compact_model"):
        save_pruned(dense, None, plan, tmp_path / "ckpt")
    other_plan = make_plan(tiny_model("llama"), UNIFORM)
    with pytest.raises(ValueError, match="model: layer 0"):
        save_pruned(compact_model(copy.deepcopy(dense), plan), None, other_plan, tmp_path / "ckpt")
    assert listing(tmp_path) == set()


BAD_ARGS = {
    "report": (dict(report={"x": object()}), "report"),
    "extra-name": (dict(extra_files={"../escape.txt": "x"}), "extra_files"),
    "extra-reserved": (dict(extra_files={"config.json": "{}"}), "extra_files"),
    "extra-weights": (dict(extra_files={"model.safetensors": b""}), "extra_files"),
    "extra-tokenizer-file": (dict(extra_files={"tokenizer.json": "{}"}), "extra_files"),
    "extra-content": (dict(extra_files={"a.txt": 3}), r"extra_files\['a.txt'\]"),
    "extra-missing": (dict(extra_files={"a.txt": Path("/nonexistent/file")}), r"extra_files\['a.txt'\]"),
    "tokenizer": (dict(tokenizer="gpt2"), "tokenizer"),
    "plan": (dict(plan={"layers": []}), "plan"),
}


@pytest.mark.parametrize("case", list(BAD_ARGS), ids=list(BAD_ARGS))
def test_bad_arguments_raise_value_error_and_write_nothing(case, tokenizer, tmp_path):
    model, plan = pruned_model()
    args = dict(tokenizer=tokenizer, plan=plan)
    kwargs, message = BAD_ARGS[case]
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        save_pruned(model, args.pop("tokenizer"), args.pop("plan"), tmp_path / "ckpt", **args)
    assert listing(tmp_path) == set()


def test_out_dir_that_is_a_file_is_refused(tmp_path):
    model, plan = pruned_model()
    (tmp_path / "ckpt").write_text("not a folder")
    with pytest.raises(ValueError, match="out_dir"):
        save_pruned(model, None, plan, tmp_path / "ckpt", overwrite=True)


def test_extra_files_are_written(tmp_path):
    model, plan = pruned_model()
    source = tmp_path / "plot.png"
    source.write_bytes(b"\x89PNG fake")
    out = save_pruned(
        model,
        None,
        plan,
        tmp_path / "ckpt",
        extra_files={"README.md": "# pruned\n", "scores.safetensors": b"\0\1", "p.png": source},
    )
    assert (out / "README.md").read_text() == "# pruned\n"
    assert (out / "scores.safetensors").read_bytes() == b"\0\1"  # only the weight shards' names are taken
    assert (out / "p.png").read_bytes() == b"\x89PNG fake"


def test_load_pruned_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="path"):
        load_pruned(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        load_pruned(tmp_path, dtype="float16")


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"version": 2, "base_architecture": "LlamaForCausalLM", "layers": []}, "version 1 block"),
        ({"version": 1, "base_architecture": "LlamaForCausalLM", "layers": []}, "expected 2 entries"),
        (
            {
                "version": 1,
                "base_architecture": "LlamaForCausalLM",
                "layers": [{"num_heads": 3, "num_kv_heads": 2}] * 2,
            },
            "expected integer widths",
        ),
        (
            {
                "version": 1,
                "base_architecture": "LlamaForCausalLM",
                "layers": [{"num_heads": 3, "num_kv_heads": 2, "intermediate_size": 4}] * 2,
            },
            "inconsistent widths",
        ),
        ({"version": 1, "base_architecture": "NoSuchForCausalLM", "layers": []}, "base_architecture"),
    ],
    ids=["version", "layer-count", "missing-width", "heads-not-multiple", "unknown-base"],
)
def test_malformed_nirvana_block_is_refused(block, message, tmp_path):
    model, plan = pruned_model("llama")
    out = save_pruned(model, None, plan, tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    config["nirvana"] = block
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_pruned(out)


def test_modeling_module_names_classes_for_auto_map():
    cls = _remote_modeling.NirvanaQwen3ForCausalLM
    assert cls is _remote_modeling.pruned_class("Qwen3ForCausalLM")  # made once, then reused
    assert cls.__bases__ == (transformers.Qwen3ForCausalLM,)
    with pytest.raises(AttributeError, match="NirvanaNoSuchModel"):
        _remote_modeling.NirvanaNoSuchModel  # noqa: B018
