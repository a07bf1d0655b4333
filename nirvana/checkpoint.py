"""Save a compacted model as a Hugging Face checkpoint, and load it back.

A checkpoint folder holds the safetensors weights, ``config.json``, ``generation_config.json``, the
tokenizer's files, ``plan.json`` (the :class:`~nirvana.plan.PruningPlan`), ``report.json`` when one is
given, and any extra files. When every layer has the same widths, ``config.json`` is a stock config
with the smaller sizes and stock ``from_pretrained`` loads it. Otherwise it also carries a ``nirvana``
block (base architecture and each layer's ``num_heads``, ``num_kv_heads``, ``intermediate_size``) and
an ``auto_map`` naming the class in ``modeling_nirvana.py``, a self-contained copy of
:mod:`nirvana._remote_modeling` saved beside the weights, so that
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` (``AutoModelForSeq2SeqLM`` for a
T5, whose checkpoints always carry the block) works without nirvana;
:func:`load_pruned` reaches the same classes without remote code. The same config values describe a
model in memory: :func:`nirvana.compaction.compact_model` sets them with :func:`apply_config` (see
:func:`config_updates`).

Saving is atomic (:func:`nirvana.output.staged`): everything is written into a temporary folder beside
the destination, which is renamed into place only when complete, so an interrupted save leaves no
half-written model. The destination is checked first (:func:`nirvana.output.check_target`): never the
model's own folder (symbolic links resolved), never inside or around it, and with ``overwrite`` only
a folder that nirvana wrote.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import transformers
from torch import nn

from . import _remote_modeling as remote
from . import output
from .adapters import Adapter, get_adapter, text_config
from .plan import Geometry, PruningPlan
from .tensorfile import check_weights, has_safetensors, read_config

CONFIG_FILE = "config.json"
PLAN_FILE = "plan.json"
REPORT_FILE = "report.json"
AUTO_CLASS = "AutoModelForCausalLM"
SEQ2SEQ_AUTO_CLASS = "AutoModelForSeq2SeqLM"


def auto_class_name(config) -> str:
    """The transformers Auto class that loads this config's model: seq2seq for encoder-decoders (T5)."""
    is_enc_dec = (
        config.get("is_encoder_decoder") if isinstance(config, dict) else getattr(config, "is_encoder_decoder", False)
    )
    return SEQ2SEQ_AUTO_CLASS if is_enc_dec else AUTO_CLASS


def _sources(model: nn.Module) -> list[str]:
    """The local folder or file the model was loaded from, if any: the output must keep clear of it."""
    source = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
    return [source] if isinstance(source, str) and source and os.path.exists(source) else []


def _check_model_matches_plan(model: nn.Module, plan: PruningPlan) -> None:
    if not isinstance(plan, PruningPlan):
        # The house rule makes every bad argument a ValueError, wrong types included.
        raise ValueError(f"plan: expected a PruningPlan, got {type(plan).__name__}")
    plan.validate()
    widths = layer_widths(model)
    expected = plan_widths(plan)
    if len(widths) != len(expected):
        raise ValueError(f"plan: {len(expected)} layers for a model of {len(widths)}")
    for i, (have, want) in enumerate(zip(widths, expected)):
        if have != want:
            raise ValueError(
                f"model: layer {i} has widths {have} but the plan keeps {want}; "
                "compact the model with nirvana.compaction.compact_model(model, plan) before saving"
            )


def _check_extra_files(extra_files) -> dict[str, object]:
    if extra_files is None:
        return {}
    if not isinstance(extra_files, Mapping):
        kind = type(extra_files).__name__
        raise ValueError(f"extra_files: expected a mapping of file name to contents, got {kind}")
    reserved = {CONFIG_FILE, PLAN_FILE, REPORT_FILE, remote.MODELING_FILE, output.MARKER_FILE, output.OWNER_FILE}
    for name, content in extra_files.items():
        if (
            not isinstance(name, str)
            or not name
            or name in reserved
            or name != os.path.basename(name)
            or name in (".", "..")
            # the weight shards and their index (model.safetensors, model-00001-of-00002.safetensors, ...)
            or (name.startswith("model") and name.endswith((".safetensors", ".safetensors.index.json")))
        ):
            raise ValueError(f"extra_files: {name!r} is not a free plain file name in a checkpoint folder")
        if not isinstance(content, (str, bytes, os.PathLike)):
            kind = type(content).__name__
            raise ValueError(f"extra_files[{name!r}]: expected str, bytes or a path to copy, got {kind}")
        if isinstance(content, os.PathLike) and not os.path.isfile(content):
            raise ValueError(f"extra_files[{name!r}]: {os.fspath(content)!r} is not a file")
    return dict(extra_files)


def rewrite_config(folder: Path, sizes: dict, block: dict | None, base: str) -> None:
    """Make the saved config.json describe the per-layer widths, with remote code only when needed."""
    path = folder / CONFIG_FILE
    config = json.loads(path.read_text())
    target = config["text_config"] if isinstance(config.get("text_config"), dict) else config
    target.update(sizes)
    # save_pretrained names the class it was called on, which for a reloaded pruned model is the
    # Nirvana subclass; the config names the transformers class so stock tools recognise it.
    config["architectures"] = [base]
    if block is None:
        config.pop(remote.BLOCK_KEY, None)
        config.pop("auto_map", None)
        (folder / remote.MODELING_FILE).unlink(missing_ok=True)
    else:
        config[remote.BLOCK_KEY] = block
        config["auto_map"] = {auto_class_name(config): f"{Path(remote.MODELING_FILE).stem}.{remote.CLASS_PREFIX}{base}"}
        shutil.copyfile(remote.__file__, folder / remote.MODELING_FILE)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------
# The config that describes a model of given per-layer widths (in memory, and in config.json)
# --------------------------------------------------------------------------------------------------


def base_architecture(model: nn.Module) -> str:
    """The transformers class the model is (or derives from), e.g. ``"LlamaForCausalLM"``.

    A model loaded through the per-layer-width subclass (``NirvanaLlamaForCausalLM``) names its base.
    """
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers.") and cls.__name__.endswith(("ForCausalLM", "Generation")):
            return cls.__name__
    names = list(getattr(getattr(model, "config", None), "architectures", None) or [])
    if names:
        return names[0].removeprefix(remote.CLASS_PREFIX)
    raise ValueError(f"model: cannot tell which transformers architecture {type(model).__name__} is")


def layer_widths(model: nn.Module, adapter: Adapter | None = None) -> list[dict]:
    """Each layer's ``num_heads``, ``num_kv_heads`` and ``intermediate_size``, read from its linears.

    An encoder-decoder's layers also name the dense heads they keep: ``heads`` (self-attention) and,
    for a layer with a cross-attention, ``cross_heads`` (see :func:`plan_widths`).
    """
    adapter = adapter or get_adapter(model)
    g = adapter.geometry(model.config)
    out = []
    for lm in adapter.layers(model):
        w = {
            "num_heads": lm.q.out_features // g.head_dim,
            "num_kv_heads": lm.k.out_features // g.head_dim,
            "intermediate_size": lm.down.in_features,
        }
        if _names_heads(g):
            w["heads"] = adapter.kept_heads(lm)
            if lm.cross is not None:
                w["cross_heads"] = adapter.kept_heads(lm.cross)
        out.append(w)
    return out


def _names_heads(g: Geometry) -> bool:
    # T5 shares one position bias across its layers, so its widths must say which heads remain.
    return bool(g.encoder_layers or g.cross_attention_layers)


def _heads(groups: list[int], group_size: int) -> list[int]:
    return [j * group_size + t for j in groups for t in range(group_size)]


def plan_widths(plan: PruningPlan) -> list[dict]:
    """The per-layer widths a model compacted with ``plan`` has (what :func:`layer_widths` reads)."""
    g = plan.geometry
    out = []
    for lp in plan.layers:
        w = {
            "num_heads": len(lp.kv_groups_kept) * g.group_size,
            "num_kv_heads": len(lp.kv_groups_kept),
            "intermediate_size": len(lp.mlp_channels_kept),
        }
        if _names_heads(g):
            w["heads"] = _heads(lp.kv_groups_kept, g.group_size)
            if lp.cross_kv_groups_kept is not None:
                w["cross_heads"] = _heads(lp.cross_kv_groups_kept, g.group_size)
        out.append(w)
    return out


def config_updates(
    config, widths: list[dict], base: str, head_dim: int, biases: list[str] | tuple[str, ...] = ()
) -> tuple[dict, dict | None]:
    """The config values that describe a model of these per-layer widths (and extra biases).

    Returns ``(sizes, block)``, to set on the decoder's config and as ``config.nirvana``:

    - all layers alike, and a stock config of those sizes passes transformers' own validation:
      ``sizes`` holds the smaller ``num_attention_heads``, ``num_key_value_heads`` and
      ``intermediate_size``, and ``block`` is None, so stock ``from_pretrained`` loads the model;
    - otherwise ``sizes`` leaves the global sizes as they are (the dense model's) and ``block`` lists
      every layer's widths. Dense sizes always pass validation, which a smaller head count may not
      (Llama's config insists that ``hidden_size % num_attention_heads == 0``, ``head_dim`` or not).

    ``biases`` lists linears (paths inside a decoder layer, see :func:`extra_biases`) that carry a bias
    the stock class builds without; they go into the block as ``"bias"``, and force a block even for
    uniform widths, since a stock config cannot say them.

    ``head_dim`` is always set explicitly, since ``hidden_size // num_attention_heads`` stops giving it.
    """
    if not widths:
        raise ValueError("widths: a model needs at least one layer")
    if not biases and len({json.dumps(w, sort_keys=True) for w in widths}) == 1:
        sizes = get_adapter(config).uniform_sizes(config, widths[0], head_dim)
        if sizes is not None and _valid_with(config, sizes):
            return sizes, None
    block = {"version": remote.BLOCK_VERSION, "base_architecture": base, "layers": [dict(w) for w in widths]}
    if biases:
        block["bias"] = list(biases)
    return {"head_dim": head_dim}, block


def _valid_with(config, sizes: dict) -> bool:
    """Whether the config's class accepts these sizes (transformers >= 5 validates configs)."""
    trial = copy.deepcopy(config)
    target = text_config(trial)
    for key, value in sizes.items():
        setattr(target, key, value)
    validate = getattr(trial, "validate", None)
    if validate is None:
        return True
    try:
        validate()
    # huggingface_hub's StrictDataclassClassValidationError derives from Exception only; any
    # refusal means the same here: these sizes cannot be a stock config.
    except Exception:
        return False
    return True


def _stock_model(model: nn.Module) -> nn.Module:
    """The stock transformers class built from the model's config on the meta device (no memory)."""
    cls = getattr(transformers, base_architecture(model))
    config = copy.deepcopy(model.config)
    if hasattr(config, remote.BLOCK_KEY):
        delattr(config, remote.BLOCK_KEY)
    with torch.device("meta"):
        return cls(config)


def _path_in(layer: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in layer.named_modules() if m is module)


def extra_biases(model: nn.Module, adapter: Adapter | None = None) -> list[str]:
    """Paths, inside a decoder layer, of the o/down linears that carry a bias the stock class builds without.

    FLAP's compensation (:func:`nirvana.baselines.apply_flap_compensation`) gives every layer's
    o_proj and down_proj a bias; Mistral, Qwen and Gemma build those linears bias-free whatever the
    config says, so the checkpoint must list them for the loader to add. Only models that carry such a
    bias pay for building the stock model (on the meta device) to compare against.

    Raises:
        ValueError: some layers carry such a bias and others do not (a loader adds it to every layer).
    """
    adapter = adapter or get_adapter(model)
    layers = adapter.layers(model)
    roles = ("o", "down")
    if not any(getattr(lm, r).bias is not None for lm in layers for r in roles):
        return []
    stock = adapter.layers(_stock_model(model))
    blocks = remote.decoder_layers(model)
    paths = []
    for role in roles:
        extra = [getattr(lm, role).bias is not None and getattr(s, role).bias is None for lm, s in zip(layers, stock)]
        if any(extra) and not all(extra):
            i, j = extra.index(True), extra.index(False)
            raise ValueError(
                f"model: layer {i}'s {role} linear carries a bias the stock class lacks, layer {j}'s has none; "
                "a checkpoint lists such biases for every layer (give the others a zero bias)"
            )
        if all(extra):
            paths.append(_path_in(blocks[0], getattr(layers[0], role)))
    return paths


def model_config_updates(model: nn.Module, adapter: Adapter | None = None) -> tuple[dict, dict | None]:
    """:func:`config_updates` for the model's current per-layer widths and extra biases."""
    adapter = adapter or get_adapter(model)
    head_dim = adapter.geometry(model.config).head_dim
    widths = layer_widths(model, adapter)
    biases = extra_biases(model, adapter)
    return config_updates(model.config, widths, base_architecture(model), head_dim, biases)


def apply_config(model: nn.Module, adapter: Adapter | None = None) -> None:
    """Make ``model.config`` describe the model's current per-layer widths (see :func:`config_updates`)."""
    sizes, block = model_config_updates(model, adapter)
    target = text_config(model.config)
    for key, value in sizes.items():
        setattr(target, key, value)
    if block is not None:
        setattr(model.config, remote.BLOCK_KEY, block)
    elif hasattr(model.config, remote.BLOCK_KEY):
        delattr(model.config, remote.BLOCK_KEY)


def _write_extra(folder: Path, name: str, content) -> None:
    if (folder / name).exists():  # the tokenizer (or save_pretrained) wrote a file of that name
        raise ValueError(f"extra_files: {name!r} would replace a file of the checkpoint itself")
    if isinstance(content, str):
        (folder / name).write_text(content)
    elif isinstance(content, bytes):
        (folder / name).write_bytes(content)
    else:
        shutil.copyfile(content, folder / name)


def _quant_method(config) -> str | None:
    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return None if method is None else str(getattr(method, "value", method))


@contextlib.contextmanager
def _gguf_as_plain_weights(model: nn.Module) -> Iterator[None]:
    """Let save_pretrained write a model loaded from a GGUF file, restoring the model afterwards.

    transformers de-quantizes GGUF tensors while loading, so such a model holds plain float weights,
    yet it keeps the GGUF quantizer and refuses to save ("not serializable"). Without them the weights
    save as what they are, and the checkpoint loads without the GGUF file.
    """
    if _quant_method(model.config) != "gguf":
        yield
        return
    quantizer, config = getattr(model, "hf_quantizer", None), model.config.quantization_config
    model.hf_quantizer = None
    del model.config.quantization_config
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        model.config.quantization_config = config


def save_pruned(
    model: nn.Module,
    tokenizer,
    plan: PruningPlan,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    report: dict | None = None,
    extra_files: Mapping[str, str | bytes | os.PathLike] | None = None,
) -> Path:
    """Save a compacted model, its tokenizer and plan as a checkpoint folder; returns its path.

    Args:
        model: the model after :func:`nirvana.compaction.compact_model` with ``plan`` (its layer
            widths must be those ``plan`` keeps). Tied weights (lm_head = embed_tokens) stay tied. A
            model loaded from a GGUF file saves as the float weights transformers de-quantized.
        tokenizer: anything with ``save_pretrained(folder)``, or None to save no tokenizer.
        plan: written as ``plan.json``.
        out_dir: the checkpoint folder; must not exist unless ``overwrite``, and must not be, contain
            or lie inside the folder the model was loaded from (compared as real paths).
        overwrite: replace an existing ``out_dir`` that nirvana wrote; the old one is removed only
            after the new one is in place.
        report: JSON-serialisable, written as ``report.json``.
        extra_files: file name -> contents (str is written as text, bytes as is, a path is copied).

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False, or another writer created it
            during the save (:class:`nirvana.output.OutputExistsError`, also a ValueError).
        ValueError: for a model that does not match ``plan``, a bad ``out_dir`` (see
            :func:`nirvana.output.check_target`), ``report`` or ``extra_files``.
    """
    sources = _sources(model)
    out = output.check_target(out_dir, sources=sources, overwrite=overwrite, name="out_dir")
    _check_model_matches_plan(model, plan)
    report_text = None
    if report is not None:
        try:
            report_text = json.dumps(report, indent=1, sort_keys=True) + "\n"
        except (TypeError, ValueError) as err:
            raise ValueError(f"report: not JSON-serialisable ({err})") from err
    extras = _check_extra_files(extra_files)
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise ValueError(f"tokenizer: expected an object with save_pretrained(), got {type(tokenizer).__name__}")
    base = base_architecture(model)
    # Computed from the modules rather than trusted from model.config, which compact_model set but
    # another tool might not have.
    sizes, block = model_config_updates(model)

    with output.staged(out, overwrite=overwrite, sources=sources, name="out_dir") as tmp:
        # save_pretrained writes safetensors and de-duplicates tied tensors, which a plain
        # safetensors save_file refuses.
        with _gguf_as_plain_weights(model):
            model.save_pretrained(tmp)
        rewrite_config(tmp, sizes, block, base)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        plan.save(tmp / PLAN_FILE)
        if report_text is not None:
            (tmp / REPORT_FILE).write_text(report_text)
        for name, content in extras.items():
            _write_extra(tmp, name, content)
    return out


def _read_config(path: Path) -> dict:
    return read_config(path, label="path")


def load_pruned(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **from_pretrained_kwargs,
) -> nn.Module:
    """Load a checkpoint written by :func:`save_pruned` (or any causal LM or T5 folder), without remote code.

    A checkpoint with per-layer widths is built from :mod:`nirvana._remote_modeling`, the same classes
    its ``modeling_nirvana.py`` holds; a uniform one is a stock transformers model. Before any weight
    is read, the safetensors headers (and index) are checked, and so is that the weights are the
    tensors the config describes: for a ``nirvana`` block, exactly those of its base architecture at
    its per-layer widths, so that a block that disagrees with the weights is refused rather than
    loaded with random or missing tensors.

    Args:
        path: the checkpoint folder.
        device: where to place the weights (``"cpu"``, ``"cuda:0"``, ...); None leaves them on the CPU.
        dtype: the parameter dtype; None keeps the saved one.
        **from_pretrained_kwargs: passed on to ``from_pretrained`` (``attn_implementation="eager"``, ...).

    Returns:
        The model, in eval mode.

    Raises:
        ValueError: a bad argument, a missing or corrupt config.json, a malformed safetensors file or
            index, or weights that are not those the config describes.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"path: expected a checkpoint folder, got {path!r}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype: expected a torch.dtype, got {dtype!r}")
    folder = Path(path)
    config = _read_config(folder)
    kwargs = {"dtype": dtype if dtype is not None else "auto", **from_pretrained_kwargs}
    if device is not None:
        kwargs["device_map"] = torch.device(device)
    block = config.get(remote.BLOCK_KEY)
    if block is None:
        cls = getattr(transformers, auto_class_name(config))
    else:
        base = block.get("base_architecture") if isinstance(block, dict) else None
        if not isinstance(base, str):
            raise ValueError(f"path: {str(folder)!r} has a {remote.BLOCK_KEY} block without a base_architecture")
        architectures = config.get("architectures")
        if isinstance(architectures, list) and architectures and architectures[0] != base:
            raise ValueError(
                f"path: {str(folder / CONFIG_FILE)!r} has {remote.BLOCK_KEY}.base_architecture {base!r}, "
                f"but its architectures are {architectures!r}"
            )
        try:
            cls = remote.pruned_class(base)
        except ValueError as err:
            raise ValueError(f"path: {str(folder / CONFIG_FILE)!r}: {err}") from None
        model_type = getattr(cls.config_class, "model_type", "")
        if model_type and config.get("model_type") != model_type:
            raise ValueError(
                f"path: {str(folder / CONFIG_FILE)!r} has model_type {config.get('model_type')!r}, but its "
                f"{remote.BLOCK_KEY}.base_architecture {base!r} is a {model_type!r} model"
            )
    if has_safetensors(folder) and "quantization_config" not in config:
        if block is None:
            meta_config = transformers.AutoConfig.from_pretrained(folder)
            with torch.device("meta"):
                meta = cls.from_config(meta_config)
        else:
            meta_config = cls.config_class.from_pretrained(folder)
            try:
                with torch.device("meta"):
                    meta = cls(meta_config)  # resized to the block's widths as it is built
            except ValueError as err:  # a malformed block: say which file holds it
                raise ValueError(f"path: {str(folder / CONFIG_FILE)!r}: {err}") from None
        # nirvana wrote a checkpoint with a block under its own names: every tensor must be there, no other.
        check_weights(folder, meta, label="path", exact=block is not None)
    return cls.from_pretrained(folder, **kwargs).eval()


def load_plan(path: str | os.PathLike) -> PruningPlan:
    """The :class:`~nirvana.plan.PruningPlan` saved in a checkpoint folder."""
    return PruningPlan.load(Path(path) / PLAN_FILE)


__all__ = [
    "apply_config",
    "auto_class_name",
    "base_architecture",
    "config_updates",
    "extra_biases",
    "layer_widths",
    "load_plan",
    "load_pruned",
    "model_config_updates",
    "plan_widths",
    "rewrite_config",
    "save_pruned",
]
