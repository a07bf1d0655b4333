"""GGUF export: the file's layout read back with gguf's reader, and llama.cpp's logits and tokens against transformers'.

The llama.cpp tests need ``llama_cpp`` (``pip install llama-cpp-python==0.3.36``, or the prebuilt wheel in
``../shared/wheels``, which ``make setup`` installs when it is there) and skip with that reason otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys

import gguf
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from nirvana import cli
from nirvana.adapters import get_adapter
from nirvana.checkpoint import load_pruned, save_pruned
from nirvana.compaction import compact_model
from nirvana.export import LLAMA_CPP_REQUIREMENT, export_gguf, llama3_rope_factors, written_by_nirvana
from nirvana.plan import LayerPlan, PruningPlan
from tests.helpers import nirvana_as_user, one_line_error, prune_args
from tests.test_cli import run
from tests.test_pruning import write_text
from tests.tiny_models import tiny_model, tiny_tokenizer

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(
    not HAS_LLAMA_CPP,
    reason=f"llama_cpp is not installed (pip install {LLAMA_CPP_REQUIREMENT}, or make setup with ../shared/wheels)",
)

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife.\n\nChapter 12: in 1811, Sir Walter Elliot, of Kellynch-hall, in Somersetshire, was a man who, "
    "for his own amusement, never took up any book but the Baronetage!  THEY'RE here; it's 3.14159 o'clock.\t"
    "Café, naïve, résumé, 😀 — “quoted” text.\n"
)
WORDS = "the lady of bath walked and said that it was a fine day "  # what tests.test_pruning's calibration text says
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
LLAMA3_PATTERN = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
# llama.cpp's name for the split -> the same split in tokenizers' terms.
PRE_TOKENIZERS = {
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    ),
    "llama-bpe": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    ),
}
VOCAB = 320  # more rows than the 300 tokens: the padding rows get placeholder tokens
SMALL = dict(vocab_size=VOCAB, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # wavelengths 6 to 6300 at head_dim 8: some kept, some blended, some divided by the factor
    "original_max_position_embeddings": 64,
}
# 4 KV groups of G = 2 query heads, head_dim 8, 48 MLP channels; (kv groups kept, channels kept) per layer.
NON_UNIFORM = [([1, 3], list(range(0, 48, 3))), ([0], list(range(5, 40))), ([0, 1, 2], list(range(40)))]
UNIFORM = [([0, 2], list(range(0, 48, 2))), ([1, 3], list(range(1, 48, 2))), ([2, 3], list(range(24)))]
CASES = {
    "non-uniform": ("llama", NON_UNIFORM, {}),
    "uniform-llama3-rope": ("llama", UNIFORM, {"rope_parameters": LLAMA3_ROPE}),
    "tied-non-uniform": ("llama", NON_UNIFORM, {"tie_word_embeddings": True}),
    "mistral-uniform": ("mistral", UNIFORM, {}),
    # deci would drop this layer's attention output; export gives it one zero channel instead.
    "no-mlp-layer": ("llama", [([1, 3], []), *NON_UNIFORM[1:]], {}),
}


@functools.cache
def _trained_tokenizer_json(pre: str) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT * 4, WORDS * 50], trainer)
    return tok.to_str()


def bpe_tokenizer(pre: str = "gpt-2"):
    """A byte-level BPE trained on a few sentences, with the given pre-tokenizer, specials and a chat template."""
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(pre)),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def make_plan(model, layers) -> PruningPlan:
    geometry = get_adapter(model).geometry(model.config)
    return PruningPlan(model.config.architectures[0], geometry, [LayerPlan(g, c) for g, c in layers], meta={})


def pruned_folder(tmp_path, case: str, pre: str = "gpt-2"):
    arch, layers, overrides = CASES[case]
    model = tiny_model(arch, **{**SMALL, **overrides})
    plan = make_plan(model, layers)
    return save_pruned(compact_model(model, plan), bpe_tokenizer(pre), plan, tmp_path / f"pruned-{case}"), plan


def transformers_logits(folder, ids: list[int]) -> np.ndarray:
    model = load_pruned(folder, attn_implementation="eager")
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def tensors(reader: gguf.GGUFReader) -> dict:
    return {t.name: t for t in reader.tensors}


def gguf_shape(tensor) -> tuple[int, ...]:
    """(rows, cols) as torch spells a weight: GGUF lists its dimensions innermost first."""
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


# --------------------------------------------------------------------------------------------------
# The file, read back (no llama.cpp needed)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_layout_read_back(case, tmp_path):
    folder, plan = pruned_folder(tmp_path, case)
    info = export_gguf(folder, tmp_path / "model.gguf")
    reader = gguf.GGUFReader(info["path"])
    uniform = plan.is_uniform()
    arch = "llama" if uniform else "deci"
    assert info["architecture"] == arch and field(reader, "general.architecture") == arch
    heads = [2 * len(g) for g, _ in CASES[case][1]]
    kv = [len(g) for g, _ in CASES[case][1]]
    ffn = [max(1, len(c)) for _, c in CASES[case][1]]
    if uniform:
        assert field(reader, f"{arch}.attention.head_count") == heads[0]
        assert field(reader, f"{arch}.attention.head_count_kv") == kv[0]
        assert field(reader, f"{arch}.feed_forward_length") == ffn[0]
    else:
        assert field(reader, f"{arch}.attention.head_count") == heads
        assert field(reader, f"{arch}.attention.head_count_kv") == kv
        assert field(reader, f"{arch}.feed_forward_length") == ffn
    assert field(reader, f"{arch}.block_count") == 3
    assert field(reader, f"{arch}.attention.key_length") == 8
    assert field(reader, f"{arch}.context_length") == 128
    assert abs(field(reader, f"{arch}.attention.layer_norm_rms_epsilon") - 1e-6) < 1e-12
    t = tensors(reader)
    for i in range(3):
        assert gguf_shape(t[f"blk.{i}.attn_q.weight"]) == (heads[i] * 8, 32)
        assert gguf_shape(t[f"blk.{i}.attn_k.weight"]) == (kv[i] * 8, 32)
        assert gguf_shape(t[f"blk.{i}.attn_output.weight"]) == (32, heads[i] * 8)
        assert gguf_shape(t[f"blk.{i}.ffn_gate.weight"]) == (ffn[i], 32)
        assert gguf_shape(t[f"blk.{i}.ffn_down.weight"]) == (32, ffn[i])
        assert t[f"blk.{i}.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    tied = case.startswith("tied")
    assert ("output.weight" in t) is not tied  # llama.cpp reads token_embd as the output when it is absent
    assert ("rope_freqs.weight" in t) is ("llama3" in case)
    if "llama3" in case:
        expected = llama3_rope_factors(8, {**LLAMA3_ROPE, "theta": 10000.0})
        assert np.array_equal(np.asarray(t["rope_freqs.weight"].data), expected)
        assert expected[0] == 1.0 and expected[-1] == 8.0 and 1.0 < expected[1] < 8.0
    # The tokenizer, padded to the embedding's rows, with its specials and chat template.
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == VOCAB and tokens[-1] == f"[PAD{VOCAB - 1}]"
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[1] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.UNUSED
    assert field(reader, "tokenizer.ggml.bos_token_id") == 1 and field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert len(field(reader, "tokenizer.ggml.merges")) == 300 - 256 - 3
    assert field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE
    assert written_by_nirvana(info["path"]) and not written_by_nirvana(folder / "config.json")


def test_q_and_k_rows_are_in_llama_cpps_rope_order(tmp_path):
    folder, _ = pruned_folder(tmp_path, "non-uniform")
    model = load_pruned(folder)
    reader = gguf.GGUFReader(export_gguf(folder, tmp_path / "model.gguf")["path"])
    t = tensors(reader)
    for i, layer in enumerate(model.model.layers):
        for proj, name in ((layer.self_attn.q_proj, "attn_q"), (layer.self_attn.k_proj, "attn_k")):
            hf = proj.weight.detach().numpy()
            out = np.asarray(t[f"blk.{i}.{name}.weight"].data)
            for h in range(hf.shape[0] // 8):
                # transformers pairs dimension j with j + 4; llama.cpp pairs 2j with 2j + 1.
                for j in range(4):
                    assert np.array_equal(out[h * 8 + 2 * j], hf[h * 8 + j])
                    assert np.array_equal(out[h * 8 + 2 * j + 1], hf[h * 8 + 4 + j])
        v = layer.self_attn.v_proj.weight.detach().numpy()
        assert np.array_equal(np.asarray(t[f"blk.{i}.attn_v.weight"].data), v)


@pytest.mark.parametrize(
    "dtype,qtype,tol",
    [("f16", gguf.GGMLQuantizationType.F16, 2e-3), ("bf16", gguf.GGMLQuantizationType.BF16, 1e-2)],
    ids=["f16", "bf16"],
)
def test_half_dtypes_keep_norms_in_f32(dtype, qtype, tol, tmp_path):
    folder, _ = pruned_folder(tmp_path, "non-uniform")
    info = export_gguf(folder, tmp_path / "model.gguf", dtype=dtype)
    t = tensors(gguf.GGUFReader(info["path"]))
    assert t["blk.1.ffn_up.weight"].tensor_type == qtype and t["token_embd.weight"].tensor_type == qtype
    assert t["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    up = gguf.quants.dequantize(t["blk.1.ffn_up.weight"].data, qtype)
    expected = load_pruned(folder).model.layers[1].mlp.up_proj.weight.detach().numpy()
    assert up.shape == expected.shape and np.abs(up - expected).max() <= tol * np.abs(expected).max()


@pytest.mark.parametrize(
    "pre", [p for p in PRE_TOKENIZERS if p != "gpt-2"], ids=[p for p in PRE_TOKENIZERS if p != "gpt-2"]
)
def test_pre_tokenizer_is_named_for_llama_cpp(pre, tmp_path):
    folder, _ = pruned_folder(tmp_path, "mistral-uniform", pre)
    reader = gguf.GGUFReader(export_gguf(folder, tmp_path / "model.gguf")["path"])
    assert field(reader, "tokenizer.ggml.pre") == pre


# --------------------------------------------------------------------------------------------------
# Bad input: one line, before any weight is read, and nothing left behind
# --------------------------------------------------------------------------------------------------


def _qwen2(tmp_path):
    model = tiny_model("qwen2")
    plan = make_plan(model, [([1], list(range(24))), ([0, 1], list(range(48)))])
    return save_pruned(compact_model(model, plan), bpe_tokenizer(), plan, tmp_path / "qwen2")


def _word_level(tmp_path):
    model = tiny_model("llama")
    plan = make_plan(model, [([1], list(range(24))), ([0, 1], list(range(48)))])
    return save_pruned(compact_model(model, plan), tiny_tokenizer(), plan, tmp_path / "wordlevel")


def _no_tokenizer(tmp_path):
    model = tiny_model("llama", vocab_size=VOCAB)
    plan = make_plan(model, [([1], list(range(24))), ([0, 1], list(range(48)))])
    return save_pruned(compact_model(model, plan), None, plan, tmp_path / "notok")


def _good(tmp_path):
    return pruned_folder(tmp_path, "non-uniform")[0]


BAD = {
    "other-family": (_qwen2, "model.gguf", {}, ["Qwen2ForCausalLM", "LlamaForCausalLM"]),
    "word-level-tokenizer": (_word_level, "model.gguf", {}, ["WordLevel", "byte-level BPE"]),
    "no-tokenizer": (_no_tokenizer, "model.gguf", {}, ["tokenizer.json"]),
    "not-gguf-suffix": (_good, "model.bin", {}, ["model.bin", ".gguf"]),
    "inside-source": (_good, "pruned-non-uniform/model.gguf", {}, ["inside the model's source folder"]),
    "bad-dtype": (_good, "model.gguf", {"dtype": "f8"}, ["dtype", "'f8'"]),
    "bad-quantize": (_good, "model.gguf", {"quantize": "q3_z"}, ["quantize", "'q3_z'"]),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_one_line(case, tmp_path, capsys):
    make, out, kwargs, needles = BAD[case]
    folder = make(tmp_path)
    capsys.readouterr()  # saving the folder printed transformers' progress bars
    with pytest.raises(ValueError) as err:
        export_gguf(folder, tmp_path / out, **kwargs)
    message = str(err.value)
    assert "\n" not in message and all(n in message for n in needles), message
    assert not (tmp_path / out).exists()
    flags = [f"--{k}={v}" for k, v in kwargs.items()]
    code, text, stderr = run(["export", folder, "--format", "gguf", "--out", tmp_path / out, *flags], capsys)
    if kwargs:  # argparse refuses an unknown choice itself, in one line
        assert code == 2 and len(stderr.strip().splitlines()) == 1 and kwargs.popitem()[1] in stderr, stderr
    else:
        one_line_error(code, stderr, *needles, stdout=text)


def test_existing_file_is_never_replaced(tmp_path, capsys):
    folder = _good(tmp_path)
    capsys.readouterr()
    out = tmp_path / "model.gguf"
    out.write_bytes(b"someone else's file")
    code, text, stderr = run(["export", folder, "--out", out], capsys)
    one_line_error(code, stderr, str(out), "already exists", stdout=text)
    assert out.read_bytes() == b"someone else's file"


def test_quantize_without_llama_cpp_says_how_to_install(tmp_path, monkeypatch, capsys):
    folder = _good(tmp_path)
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    code, text, stderr = run(["export", folder, "--out", tmp_path / "q.gguf", "--quantize", "q8_0"], capsys)
    one_line_error(code, stderr, f"pip install {LLAMA_CPP_REQUIREMENT}", stdout=text)
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    folder = _good(tmp_path)

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(folder, tmp_path / "model.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # no file, no temporary folder


# --------------------------------------------------------------------------------------------------
# llama.cpp runs the file as transformers runs the folder
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def llama(path, **kw):
    import llama_cpp

    llm = llama_cpp.Llama(os.fspath(path), n_ctx=128, n_batch=128, n_threads=1, verbose=False, **kw)
    try:
        yield llm
    finally:
        llm.close()


def llama_cpp_logits(path, ids: list[int]) -> np.ndarray:
    with llama(path, logits_all=True) as llm:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])


def assert_logits_match(path, folder, text: str = TEXT) -> None:
    ids = bpe_tokenizer()(text, add_special_tokens=False).input_ids[:100]
    ours, theirs = llama_cpp_logits(path, ids), transformers_logits(folder, ids)
    assert ours.shape == theirs.shape
    relative = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert relative <= 1e-3, f"llama.cpp's logits differ from transformers' by {relative:.3g} of their largest"
    assert np.array_equal(ours.argmax(-1), theirs.argmax(-1)), "the argmax differs at some position"


@needs_llama_cpp
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_llama_cpp_logits_match_transformers(case, tmp_path):
    folder, _ = pruned_folder(tmp_path, case)
    assert_logits_match(export_gguf(folder, tmp_path / "model.gguf")["path"], folder)


@needs_llama_cpp
@pytest.mark.parametrize("pre", list(PRE_TOKENIZERS), ids=list(PRE_TOKENIZERS))
def test_llama_cpp_tokenizes_as_transformers(pre, tmp_path):
    folder, _ = pruned_folder(tmp_path, "non-uniform", pre)
    path = export_gguf(folder, tmp_path / "model.gguf")["path"]
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    with llama(path, vocab_only=True) as llm:
        for text in (TEXT, TEXT.upper(), "  leading spaces\n\n\nand 12345678 digits"):
            expected = hf(text, add_special_tokens=False).input_ids
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == expected, text
            assert llm.detokenize(expected).decode() == text
        assert llm.metadata["tokenizer.chat_template"] == CHAT_TEMPLATE


@needs_llama_cpp
def test_q8_0_export_loads_and_generates(tmp_path):
    folder, _ = pruned_folder(tmp_path, "non-uniform")
    info = export_gguf(folder, tmp_path / "q8.gguf", quantize="q8_0")
    float_size = export_gguf(folder, tmp_path / "f32.gguf")["bytes"]
    assert info["bytes"] < float_size / 2
    t = tensors(gguf.GGUFReader(info["path"]))
    assert t["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert written_by_nirvana(info["path"])  # llama.cpp's quantiser keeps the metadata
    with llama(info["path"]) as llm:
        result = llm("It is a truth", max_tokens=8, temperature=0.0)
    assert result["usage"]["completion_tokens"] >= 1
    ids = bpe_tokenizer()(TEXT, add_special_tokens=False).input_ids[:100]
    quantized, exact = llama_cpp_logits(info["path"], ids), transformers_logits(folder, ids)
    assert np.abs(quantized - exact).max() <= 0.05 * np.abs(exact).max()


# --------------------------------------------------------------------------------------------------
# The command line, end to end: prune, export, run
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_pruned(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    dense = root / "dense"
    tiny_model("llama", **SMALL, intermediate_size=64).save_pretrained(dense)
    bpe_tokenizer().save_pretrained(dense)
    out = root / "pruned"
    code = cli.main([str(a) for a in prune_args(dense, write_text(root / "calib.txt"), out)])
    assert code == 0
    return out


def test_cli_prune_then_export(cli_pruned, tmp_path, capsys):
    out = tmp_path / "model.gguf"
    code, text, err = run(["export", cli_pruned, "--format", "gguf", "--out", out, "--dtype", "f16"], capsys)
    assert code == 0, err
    assert f"wrote {out}" in text and "f16" in text
    reader = gguf.GGUFReader(out)
    widths = load_pruned(cli_pruned).config
    assert field(reader, "general.architecture") in ("llama", "deci")
    assert field(reader, f"{field(reader, 'general.architecture')}.block_count") == widths.num_hidden_layers


@needs_llama_cpp
def test_cli_pruned_model_runs_in_llama_cpp(cli_pruned, tmp_path, capsys):
    out = tmp_path / "model.gguf"
    code, _, err = run(["export", cli_pruned, "--out", out], capsys)
    assert code == 0, err
    assert_logits_match(out, cli_pruned)


# --------------------------------------------------------------------------------------------------
# nirvana eval FILE.gguf --engine llama.cpp: the same perplexity as transformers on the same windows
# --------------------------------------------------------------------------------------------------


@needs_llama_cpp
def test_llama_cpp_perplexity_matches_transformers(tmp_path, capsys):
    from nirvana.evaluation import gguf_perplexity, perplexity

    folder, _ = pruned_folder(tmp_path, "non-uniform")
    path = export_gguf(folder, tmp_path / "model.gguf")["path"]
    text = TEXT * 3
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = load_pruned(folder, attn_implementation="eager")
    expected = perplexity(model, tokenizer, text, seq_len=32, max_windows=5, progress=False)
    # llama.cpp's own tokenizer, and the folder's: the same windows, so the same perplexity.
    for given in (None, tokenizer):
        ppl = gguf_perplexity(path, text, seq_len=32, max_windows=5, tokenizer=given, progress=False)
        assert abs(ppl - expected) <= 1e-3 * expected, (ppl, expected)
    (tmp_path / "text.txt").write_text(text)
    capsys.readouterr()
    argv = ["eval", path, "--engine", "llama.cpp", "--text", tmp_path / "text.txt", "--seq-len", "32"]
    code, out, err = run([*argv, "--max-windows", "5"], capsys)
    assert code == 0, err
    assert abs(float(out.strip().rsplit(" ", 1)[1]) - expected) <= 1e-3 * expected + 1e-3, out


ENGINE_ERRORS = {
    "folder": (lambda gguf_file, folder: [folder, "--text", "persuasion"], [".gguf file"]),
    "tasks": (lambda gguf_file, folder: [gguf_file, "--tasks", "hellaswag"], ["--tasks", "transformers"]),
    "no-text": (lambda gguf_file, folder: [gguf_file], ["--text"]),
}


@pytest.mark.parametrize("case", list(ENGINE_ERRORS), ids=list(ENGINE_ERRORS))
def test_llama_cpp_engine_bad_input_is_one_line(case, tmp_path, capsys):
    folder = _good(tmp_path)
    path = export_gguf(folder, tmp_path / "model.gguf")["path"]
    capsys.readouterr()
    argv, needles = ENGINE_ERRORS[case]
    code, out, err = run(["eval", *argv(path, folder), "--engine", "llama.cpp"], capsys)
    one_line_error(code, err, *needles, stdout=out)


def test_llama_cpp_engine_without_llama_cpp_says_how_to_install(tmp_path, monkeypatch, capsys):
    folder = _good(tmp_path)
    path = export_gguf(folder, tmp_path / "model.gguf")["path"]
    (tmp_path / "text.txt").write_text(TEXT)
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    code, out, err = run(["eval", path, "--engine", "llama.cpp", "--text", tmp_path / "text.txt"], capsys)
    one_line_error(code, err, f"pip install {LLAMA_CPP_REQUIREMENT}", stdout=out)


# --------------------------------------------------------------------------------------------------
# The real SmolLM2, pruned at 20%: llama.cpp's perplexity is transformers'
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_llama_cpp
def test_real_smollm2_pruned_export_keeps_its_perplexity_in_llama_cpp(tmp_path):
    nirvana = nirvana_as_user  # as a CPU user runs it

    out = tmp_path / "pruned"
    argv = ["--sparsity", "0.2", "--num-samples", "8", "--draws", "1", "--device", "cpu", "--quiet", "--out", out]
    nirvana("prune", "smollm2", *argv)
    window = ["--text", "persuasion", "--seq-len", "512", "--max-windows", "2"]

    def ppl(model, *engine):
        return float(nirvana("eval", model, *window, *engine).rsplit(":", 1)[1])

    reference = ppl(out, "--device", "cpu")
    for kind, flags, tolerance in (("f32", [], 0.01), ("q8_0", ["--quantize", "q8_0"], 0.03)):
        path = tmp_path / f"pruned-{kind}.gguf"
        nirvana("export", out, "--format", "gguf", "--out", path, *flags)
        measured = ppl(path, "--engine", "llama.cpp")
        assert abs(measured - reference) <= tolerance * reference, (kind, measured, reference)


def test_demo_refuses_a_foreign_gguf_beside_its_folder_before_it_loads_anything(tmp_path, capsys, monkeypatch):
    import nirvana.models

    foreign = tmp_path / "results.gguf"  # the demo exports --out DIR to DIR.gguf
    foreign.write_bytes(b"someone's own model")

    def refuse(*args, **kwargs):
        raise AssertionError("the demo loaded its model before checking its GGUF output")

    monkeypatch.setattr(nirvana.models, "load_model", refuse)
    monkeypatch.setattr(nirvana.models, "default_model_dir", refuse)
    code, out, err = run(["demo", "--out", tmp_path / "results"], capsys)
    one_line_error(code, err, str(foreign), "not a GGUF file nirvana wrote", stdout=out)
    assert foreign.read_bytes() == b"someone's own model"


def test_tokenizer_is_copied_from_a_gguf_source(tmp_path, capsys):
    source = export_gguf(pruned_folder(tmp_path, "non-uniform")[0], tmp_path / "source.gguf")["path"]
    folder = _no_tokenizer(tmp_path)  # a folder without tokenizer.json: its tokenizer comes from the source
    capsys.readouterr()
    out = tmp_path / "copied.gguf"
    code, text, err = run(["export", folder, "--out", out, "--tokenizer-from", source], capsys)
    assert code == 0, err
    want, got = gguf.GGUFReader(source), gguf.GGUFReader(out)
    keys = [k for k in want.fields if k.startswith("tokenizer.")]
    assert "tokenizer.ggml.merges" in keys and "tokenizer.chat_template" in keys
    assert keys == [k for k in got.fields if k.startswith("tokenizer.")]
    for key in keys:
        assert field(got, key) == field(want, key), key
    # A source whose vocabulary is not the model's is refused in one line.
    small = save_pruned(*_compacted(tiny_model("llama")), tmp_path / "small")
    capsys.readouterr()
    code, text, err = run(["export", small, "--out", tmp_path / "x.gguf", "--tokenizer-from", source], capsys)
    one_line_error(code, err, "320 tokens", "128 embedding rows", stdout=text)


def _compacted(model):
    plan = make_plan(model, [([1], list(range(24))), ([0, 1], list(range(48)))])
    return compact_model(model, plan), None, plan
