"""Export a pruned checkpoint folder to one GGUF file that llama.cpp runs.

A folder whose layers all keep the same widths is written as llama.cpp's ``llama`` architecture, which
every llama.cpp build runs. Layers of different widths are written as ``deci`` (the architecture of
Nemotron-NAS models): llama.cpp reads ``head_count``, ``head_count_kv`` and ``feed_forward_length`` as
per-layer arrays for every architecture, but only ``deci`` builds its tensors and graph from each
layer's own values (``llama`` uses layer 0's for all, and refuses the file).

Families: Llama, Mistral and SmolLM (a Llama): RMSNorm, SwiGLU, RoPE, no biases. The tokenizer comes
from the folder's ``tokenizer.json``, through the ``gguf`` package's vocab helpers, so that llama.cpp
tokenises as transformers does; a pre-tokenizer llama.cpp is not known to reproduce is refused rather
than approximated. Quantisation runs llama.cpp's own quantiser (``llama_cpp.llama_model_quantize``,
from ``pip install llama-cpp-python==0.3.36``) on the float file.

The output is written beside its final name and linked into place only when complete, never over an
existing file, so an interrupted export leaves no half-written model.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from . import output
from ._remote_modeling import BLOCK_KEY
from .checkpoint import CONFIG_FILE, layer_widths, load_pruned
from .tensorfile import read_config

# transformers class -> llama.cpp architecture for a uniform plan (a non-uniform one is always deci).
FAMILIES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}
NON_UNIFORM_ARCH = "deci"
DTYPES = ("f32", "f16", "bf16")
# llama.cpp's quantisation types that need no importance matrix.
QUANT_TYPES = (
    "q8_0",
    "q6_k",
    "q5_k_m",
    "q5_k_s",
    "q5_1",
    "q5_0",
    "q4_k_m",
    "q4_k_s",
    "q4_1",
    "q4_0",
    "q3_k_l",
    "q3_k_m",
    "q3_k_s",
    "q2_k",
)
LLAMA_CPP_REQUIREMENT = "llama-cpp-python==0.3.36"
TOKENIZER_FILE = "tokenizer.json"
WRITTEN_BY_KEY = "nirvana.written_by"  # what lets --overwrite replace a GGUF file: only one nirvana wrote

# tokenizers' pre-tokenizer (as tokenizer.json spells it) -> llama.cpp's name for the same split.
_LLAMA3_PATTERN = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


def require_llama_cpp(what: str):
    """The ``llama_cpp`` module, or a one-line ValueError saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise ValueError(f"{what} needs llama.cpp's Python binding: pip install {LLAMA_CPP_REQUIREMENT}") from None
    return llama_cpp


# --------------------------------------------------------------------------------------------------
# What llama.cpp can run: checked on config.json before any weight is read
# --------------------------------------------------------------------------------------------------


def _base_architecture(config: dict) -> str:
    block = config.get(BLOCK_KEY)
    if isinstance(block, dict) and isinstance(block.get("base_architecture"), str):
        return block["base_architecture"]
    names = config.get("architectures")
    return names[0] if isinstance(names, list) and names and isinstance(names[0], str) else "?"


def check_exportable(config: dict, where: str) -> str:
    """The transformers class of ``config`` (a config.json dict), once it is known that llama.cpp runs it.

    Raises:
        ValueError: one line naming what the model has that the llama/deci graphs lack.
    """
    base = _base_architecture(config)
    if base not in FAMILIES:
        raise ValueError(
            f"{where}: {base} cannot be exported to GGUF; export knows {', '.join(FAMILIES)} "
            "(RMSNorm, SwiGLU, RoPE, no biases)"
        )
    missing = []
    if config.get("hidden_act", "silu") != "silu":
        missing.append(f"hidden_act {config['hidden_act']!r} (llama.cpp's graph has SwiGLU with silu)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            missing.append(f"{key} true (the llama/deci graphs have no linear biases)")
    block = config.get(BLOCK_KEY)
    if isinstance(block, dict) and block.get("bias"):
        missing.append(f"extra biases on {block['bias']} (FLAP's compensation; the llama/deci graphs have none)")
    if missing:
        raise ValueError(f"{where}: cannot be exported to GGUF: it has {'; '.join(missing)}")
    rope_settings(config, where)
    return base


def rope_settings(config: dict, where: str) -> dict:
    """``{"theta", "type", ...}`` from a config.json dict, in either transformers' v4 or v5 spelling.

    ``type`` is ``default``, ``linear`` (with ``factor``) or ``llama3`` (with ``factor``,
    ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``).
    """
    params = config.get("rope_parameters")
    if not isinstance(params, dict):
        params = dict(config.get("rope_scaling") or {})
        params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(
            f"{where}: RoPE scaling {kind!r} cannot be exported to GGUF (export knows default, linear and llama3)"
        )
    return {**params, "theta": float(params["rope_theta"]), "type": kind}


def llama3_rope_factors(head_dim: int, rope: dict) -> np.ndarray:
    """float32[head_dim // 2]: the divisor llama.cpp applies to each RoPE frequency (its ``rope_freqs`` tensor).

    Llama 3 keeps high frequencies, divides low ones by ``factor`` and blends those between, as
    transformers' ``llama3`` rope does with its inverse frequencies.
    """
    factor = float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / rope["theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            out.append(1.0)
        elif wavelen > old_context / low:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# The tokenizer, through gguf's vocab helpers
# --------------------------------------------------------------------------------------------------


def _bpe_pre(pre_tokenizer, where: str) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, if it reproduces it exactly."""
    if isinstance(pre_tokenizer, dict) and pre_tokenizer.get("type") == "Sequence":
        steps = pre_tokenizer.get("pretokenizers") or []
    else:
        steps = [pre_tokenizer]
    kinds = [s.get("type") if isinstance(s, dict) else None for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if (
        kinds == ["Split", "ByteLevel"]
        and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_PATTERN
        and not steps[1].get("use_regex", True)
    ):
        return "llama-bpe"
    raise ValueError(
        f"{where}: its pre-tokenizer {json.dumps(pre_tokenizer)[:120]} is not one llama.cpp is known to reproduce "
        "(known: GPT-2's, SmolLM's, Llama 3's)"
    )


def tokenizer_metadata(folder: Path, n_vocab: int) -> dict:
    """The GGUF tokenizer fields for the Hugging Face tokenizer in ``folder``, padded to ``n_vocab`` tokens.

    Returns ``{"model" ("gpt2"), "pre", "tokens", "types", "special"}`` where ``special`` is
    a ``gguf.SpecialVocab`` (merges, special token ids, add_bos/add_eos, chat template).

    Raises:
        ValueError: no tokenizer.json, a tokenizer kind llama.cpp does not run, or more tokens than
            the model's vocabulary.
    """
    import gguf

    path = folder / TOKENIZER_FILE
    where = f"tokenizer: {str(path)!r}"
    if not path.is_file():
        raise ValueError(f"tokenizer: {str(folder)!r} holds no {TOKENIZER_FILE}; GGUF export needs the tokenizer")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{where} is not JSON ({err})") from None
    model = spec.get("model") or {}
    if (
        model.get("type") == "BPE"
        and not model.get("byte_fallback")
        and (spec.get("decoder") or {}).get("type") == "ByteLevel"
    ):
        if spec.get("normalizer") is not None:
            raise ValueError(f"{where}: a byte-level BPE with a normalizer, which llama.cpp does not apply")
        pre = _bpe_pre(spec.get("pre_tokenizer"), where)
        vocab = gguf.BpeVocab(folder)
    elif model.get("type") == "BPE" and model.get("byte_fallback"):
        # llama.cpp's SentencePiece tokenizer merges by token scores, which tokenizer.json does not hold.
        raise ValueError(
            f"{where}: a SentencePiece-style (byte-fallback) BPE; export converts byte-level BPE tokenizers only "
            "(GPT-2, SmolLM, Llama 3 style)"
        )
    else:
        raise ValueError(
            f"{where}: a {model.get('type')} tokenizer; export converts byte-level BPE tokenizers only "
            "(GPT-2, SmolLM, Llama 3 style)"
        )
    tokens, types = [], []
    for text, _score, token_type in vocab.all_tokens():
        tokens.append(text)
        types.append(int(token_type))
    # BpeVocab lists added tokens that are also in the vocab as normal ones; llama.cpp must know that a
    # special token is never produced from plain text.
    for added in spec.get("added_tokens") or []:
        i = added.get("id")
        if isinstance(i, int) and 0 <= i < len(types):
            types[i] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    if len(tokens) > n_vocab:
        raise ValueError(f"{where}: has {len(tokens)} tokens, more than the model's {n_vocab} embedding rows")
    for i in range(len(tokens), n_vocab):  # embedding rows without a token (padded vocabularies)
        tokens.append(f"[PAD{i}]")
        types.append(int(gguf.TokenType.UNUSED))
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types, "special": special}


def gguf_tokenizer_metadata(path: str | os.PathLike, n_vocab: int) -> dict:
    """``{"fields": [(key, value, type, array item type), ...]}``: every ``tokenizer.*`` key of a GGUF file.

    For a model pruned from a GGUF source: llama.cpp then tokenises as it did for the source.

    Raises:
        ValueError: not a GGUF file, no tokenizer in it, or a token count other than ``n_vocab``.
    """
    import gguf

    where = f"tokenizer_from: {os.fspath(path)!r}"
    if not os.fspath(path).endswith(".gguf") or not os.path.isfile(path):
        raise ValueError(f"{where} is not a .gguf file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # the reader raises several unrelated types for a damaged file
        raise ValueError(f"{where} is not a readable GGUF file ({type(err).__name__}: {err})") from None
    fields = [
        (key, f.contents(), f.types[0], f.types[1] if len(f.types) > 1 else None)
        for key, f in reader.fields.items()
        if key.startswith("tokenizer.")
    ]
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError(f"{where} holds no tokenizer (no tokenizer.ggml.tokens)")
    if len(tokens.data) != n_vocab:
        raise ValueError(f"{where} has {len(tokens.data)} tokens, but the model has {n_vocab} embedding rows")
    return {"fields": fields}


# --------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------


def interleave_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Tensor[n_heads * head_dim, in]: q/k rows reordered from transformers' RoPE layout to llama.cpp's.

    transformers rotates dimension ``i`` of a head with ``i + head_dim/2``; llama.cpp's ``llama`` and
    ``deci`` rotate ``2i`` with ``2i + 1``. Row ``2i`` of each head becomes old row ``i``, row ``2i + 1``
    old row ``i + head_dim/2``, so the dot products (and the logits) are unchanged.
    """
    if n_heads == 0:
        return weight
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _as_array(tensor: torch.Tensor, dtype: str):
    """(numpy data, gguf raw dtype or None): norms and other 1-D tensors stay float32, as llama.cpp expects."""
    import gguf

    data = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    if data.ndim < 2 or dtype == "f32":
        return data, None
    if dtype == "f16":
        return data.astype(np.float16), None
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16


def gguf_widths(widths: list[dict]) -> list[dict]:
    """The per-layer widths the GGUF file describes: those of ``widths``, with at least one MLP channel.

    llama.cpp's deci graph ends a layer whose ``feed_forward_length`` is 0 before adding its attention
    output to the residual; one zero channel (zero gate, up and down rows) adds exactly nothing instead.
    """
    return [{**w, "intermediate_size": max(1, w["intermediate_size"])} for w in widths]


def gguf_tensors(model: torch.nn.Module, widths: list[dict], tie: bool, arch: str):
    """(GGUF name, weight) for every tensor llama.cpp reads, in transformers' float values.

    A layer that keeps no MLP channel is given one zero channel (see :func:`gguf_widths`).
    """
    import gguf

    names = gguf.get_tensor_name_map(
        gguf.MODEL_ARCH.DECI if arch == NON_UNIFORM_ARCH else gguf.MODEL_ARCH.LLAMA, len(widths)
    )
    for name, tensor in model.state_dict().items():
        if tie and name == "lm_head.weight":
            continue  # llama.cpp reads the token embedding as the output when output.weight is absent
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"model: tensor {name!r} has no GGUF name; it cannot be exported")
        parts = name.split(".")
        if "layers" in parts:
            w = widths[int(parts[parts.index("layers") + 1])]
            if "mlp" in parts and tensor.numel() == 0:
                # deci skips the rest of a layer without an MLP, its attention's residual included, so a layer
                # that keeps no channel gets one zero channel instead: silu(0) * 0 through a zero row adds 0.
                tensor = torch.zeros(1, tensor.shape[1]) if tensor.shape[0] == 0 else torch.zeros(tensor.shape[0], 1)
            if name.endswith("self_attn.q_proj.weight"):
                tensor = interleave_rope_rows(tensor, w["num_heads"])
            elif name.endswith("self_attn.k_proj.weight"):
                tensor = interleave_rope_rows(tensor, w["num_kv_heads"])
        yield new, tensor


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def written_by_nirvana(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a GGUF file this module wrote (it carries :data:`WRITTEN_BY_KEY`)."""
    import gguf

    try:
        field = gguf.GGUFReader(path).fields.get(WRITTEN_BY_KEY)
        return field is not None and field.contents() == output.MARKER["written_by"]
    except Exception:  # not a GGUF file at all: the reader raises several unrelated types
        return False


def check_gguf_target(out, *, sources=()) -> Path:
    """The real path of the ``.gguf`` file ``out``, once it is known that export may write it there.

    Cheap, so it runs before any weight is read: ``out`` must end in ``.gguf``, must not exist (export
    never replaces a file) and must not lie inside a source folder.

    Raises:
        OutputExistsError: ``out`` exists (also a ValueError).
        ValueError: any other reason, in one line naming the path.
    """
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        raise ValueError(f"out: expected a .gguf file path, got {out!r}")
    if not os.fspath(out).endswith(".gguf"):
        raise ValueError(f"out: {os.fspath(out)!r} must end in .gguf")
    if os.path.lexists(output.real_path(out)):
        raise output.OutputExistsError(f"out: {os.fspath(out)!r} already exists; export never replaces a file")
    return output.check_target(out, sources=list(sources), name="out")


def _check_options(dtype, quantize) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if quantize is not None and quantize not in QUANT_TYPES:
        raise ValueError(f"quantize: {quantize!r} is not one of {', '.join(QUANT_TYPES)}")


def write_float_gguf(pruned_dir: Path, path: Path, dtype: str, config: dict, tokenizer: dict) -> dict:
    """Write the folder's model and ``tokenizer`` (:func:`tokenizer_metadata`) to ``path`` as a float GGUF.

    Returns ``{"architecture", "widths"}``.
    """
    import gguf

    model = load_pruned(pruned_dir, dtype=torch.float32)
    cfg = model.config
    widths = gguf_widths(layer_widths(model))
    uniform = len({(w["num_heads"], w["num_kv_heads"], w["intermediate_size"]) for w in widths}) == 1
    arch = FAMILIES[_base_architecture(config)] if uniform else NON_UNIFORM_ARCH
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = rope_settings(config, f"model: {str(pruned_dir)!r}")
    tie = bool(getattr(cfg, "tie_word_embeddings", False))
    context = cfg.max_position_embeddings
    window = getattr(cfg, "sliding_window", None)
    if window:  # Mistral: full attention within its window is what transformers computes there
        context = min(context, window)

    writer = gguf.GGUFWriter(path, arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_string(WRITTEN_BY_KEY, output.MARKER["written_by"])
    writer.add_name(pruned_dir.name)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
    writer.add_file_type(file_types.get(dtype, gguf.LlamaFileType.MOSTLY_BF16))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(context)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(len(widths))
    per_layer = {k: [w[k] for w in widths] for k in ("num_heads", "num_kv_heads", "intermediate_size")}
    pick = (lambda values: values[0]) if uniform else (lambda values: values)
    writer.add_head_count(pick(per_layer["num_heads"]))
    writer.add_head_count_kv(pick(per_layer["num_kv_heads"]))
    writer.add_feed_forward_length(pick(per_layer["intermediate_size"]))
    # Said explicitly: llama.cpp would derive them from hidden_size / layer 0's head count.
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope["theta"])
    if rope["type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))

    if "fields" in tokenizer:  # copied from a GGUF file as they are
        for key, value, vtype, sub_type in tokenizer["fields"]:
            writer.add_key_value(key, value, vtype, sub_type)
    else:
        writer.add_tokenizer_model(tokenizer["model"])
        writer.add_tokenizer_pre(tokenizer["pre"])
        writer.add_token_list(tokenizer["tokens"])
        writer.add_token_types(tokenizer["types"])
        tokenizer["special"].add_to_gguf(writer, quiet=True)

    if rope["type"] == "llama3":
        writer.add_tensor(
            gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(head_dim, rope)
        )
    for name, tensor in gguf_tensors(model, widths, tie, arch):
        data, raw = _as_array(tensor, dtype)
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": arch, "widths": widths}


def quantize_gguf(source: Path, target: Path, kind: str) -> None:
    """llama.cpp's own quantiser: ``source`` (a float GGUF) to ``target`` as ``kind`` (``"q8_0"``, ...)."""
    llama_cpp = require_llama_cpp(f"quantize {kind!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    params.nthread = os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(os.fsencode(source), os.fsencode(target), ctypes.byref(params))
    if status != 0 or not target.is_file():
        raise ValueError(f"quantize: llama.cpp's quantiser failed on {str(source)!r} as {kind} (status {status})")


def _publish_file(tmp: Path, out: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    try:
        os.link(tmp, out)  # fails if out appeared meanwhile: never replaces another writer's file
    except FileExistsError:
        raise output.OutputExistsError(f"out: {str(out)!r} appeared while exporting; it was left alone") from None
    dir_fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def export_gguf(
    pruned_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "f32",
    quantize=None,
    tokenizer_from: str | os.PathLike | None = None,
) -> dict:
    """Write the pruned (or dense) checkpoint folder ``pruned_dir`` as one GGUF file ``out`` for llama.cpp.

    Args:
        pruned_dir: a folder :func:`nirvana.checkpoint.save_pruned` wrote (or a stock Llama/Mistral
            folder), with its tokenizer.json.
        out: the ``.gguf`` file to write; must not exist, nor lie inside ``pruned_dir``.
        dtype: the 2-D weights' type in the float file: ``"f32"``, ``"f16"`` or ``"bf16"`` (norms stay f32).
        quantize: one of :data:`QUANT_TYPES` (``"q8_0"``, ``"q4_k_m"``, ...) to run llama.cpp's
            quantiser on the float file; needs ``llama_cpp``.
        tokenizer_from: a ``.gguf`` file (the model's GGUF source) whose ``tokenizer.*`` metadata is copied
            as it is, instead of building it from ``pruned_dir``'s tokenizer.json.

    Returns:
        ``{"path", "architecture" ("llama" or "deci"), "widths" (per layer), "dtype", "quantize", "bytes"}``.

    Raises:
        ValueError: one line: a bad argument, a family or tokenizer llama.cpp does not run, a missing
            ``llama_cpp`` for ``quantize``; :class:`nirvana.output.OutputExistsError` if ``out`` exists.
    """
    _check_options(dtype, quantize)
    if not isinstance(pruned_dir, (str, os.PathLike)) or not os.path.isdir(pruned_dir):
        raise ValueError(f"pruned_dir: {pruned_dir!r} is not a folder")
    folder = Path(pruned_dir)
    target = check_gguf_target(out, sources=[folder])
    config = read_config(folder, label="pruned_dir")
    check_exportable(config, f"pruned_dir: {str(folder / CONFIG_FILE)!r}")
    vocab_size = config.get("vocab_size")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"pruned_dir: {str(folder / CONFIG_FILE)!r} has vocab_size {vocab_size!r}")
    if tokenizer_from is not None:
        tokenizer = gguf_tokenizer_metadata(tokenizer_from, vocab_size)
    else:
        tokenizer = tokenizer_metadata(folder, vocab_size)
    if quantize is not None:
        require_llama_cpp(f"quantize {quantize!r}")
    with output.scratch(target, name="out") as tmp:
        float_file = tmp / ("float.gguf" if quantize else target.name)
        info = write_float_gguf(folder, float_file, dtype, config, tokenizer)
        final = float_file
        if quantize is not None:
            final = tmp / target.name
            quantize_gguf(float_file, final, quantize)
        _publish_file(final, target)
    return {**info, "path": target, "dtype": dtype, "quantize": quantize, "bytes": target.stat().st_size}


__all__ = [
    "DTYPES",
    "FAMILIES",
    "LLAMA_CPP_REQUIREMENT",
    "QUANT_TYPES",
    "WRITTEN_BY_KEY",
    "check_exportable",
    "check_gguf_target",
    "export_gguf",
    "gguf_tokenizer_metadata",
    "gguf_tensors",
    "gguf_widths",
    "interleave_rope_rows",
    "llama3_rope_factors",
    "quantize_gguf",
    "require_llama_cpp",
    "rope_settings",
    "tokenizer_metadata",
    "write_float_gguf",
    "written_by_nirvana",
]
