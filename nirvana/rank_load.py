"""Rank-local loading for ``--distributed fsdp``: each rank reads only the rows it holds.

:func:`load_sharded` builds the decoder from its config with every parameter and buffer on the meta
device (nothing allocated), shards it with :func:`nirvana.sources.fsdp.shard_for_scoring` (one FSDP2
unit per decoder layer, the embeddings, final norm and lm_head in the root), allocates each rank's
local shards (``to_empty``) and fills them in place from the safetensors files: rank ``r`` of ``W``
reads rows ``[r*c, min((r+1)*c, rows))``, ``c = ceil(rows / W)``, of every parameter. A row range of
a row-major tensor is one contiguous byte range of its file, read with one ``pread``
(:func:`read_rows`): the same bytes ``safe_open(...).get_slice(name)[start:stop]`` returns, without
the whole-tensor view over the memory map that safetensors builds first. No rank ever holds a dense
copy of a parameter (the root unit included); tied embeddings stay one parameter, read once.

Non-persistent buffers (the rotary ``inv_freq``) are computed by the model class itself: the module
holding them (which holds no parameter) is rebuilt from its config on the CPU
(:func:`computed_buffers`), and its buffers are put in place after ``to_empty`` (which leaves every
tensor uninitialised). Persistent buffers are read whole from the checkpoint. Float buffers are cast
to the model dtype, as :func:`nirvana.models.load_model` casts them.

Sources: a local folder with ``model.safetensors`` or a ``model.safetensors.index.json`` and its
shards (``"smollm2"`` resolves to such a folder in the cache). A GGUF file or a hub name is refused
in one line that says to convert it first (``nirvana convert SRC --out DIR``, :mod:`nirvana.convert`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .sources.fsdp import local_rows, shard_for_scoring
from .tensorfile import TensorInfo, check_folder, check_tensors, expected_tensors, has_safetensors, read_config

# safetensors dtype names -> torch dtypes (every dtype a Hugging Face checkpoint stores).
DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


@dataclass
class LoadRecord:
    """What one rank read: tensor name -> ``(first row, stop row, bytes)``, and the total bytes read."""

    rank: int
    world_size: int
    reads: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    @property
    def bytes_read(self) -> int:
        return sum(n for _, _, n in self.reads.values())

    def to_dict(self) -> dict:
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "bytes_read": self.bytes_read,
            "reads": {k: list(v) for k, v in self.reads.items()},
        }


def check_source(source: str | os.PathLike) -> None:
    """The cheap part of :func:`checkpoint_folder`, before any process group exists: a one-line ValueError
    for a file (a GGUF), a name that is no local folder (a hub name), or a folder without safetensors."""
    from .models import DEFAULT_MODEL

    text = os.fspath(source)
    if text == DEFAULT_MODEL:
        return
    path = Path(text).expanduser()
    hint = f"convert it first: nirvana convert {text} --out DIR"
    if path.is_file():
        raise ValueError(f"model: {text!r} is a file; --distributed reads row ranges of safetensors, so {hint}")
    if not path.is_dir():
        raise ValueError(
            f"model: {text!r} is not a local folder (a hub name?); --distributed reads local safetensors, so {hint}"
        )
    if not has_safetensors(path):
        raise ValueError(f"model: {text!r} holds no safetensors weights; --distributed reads row ranges, so {hint}")


def checkpoint_folder(source: str | os.PathLike) -> Path:
    """The safetensors folder ``source`` names, for rank-local loading; a one-line ValueError otherwise.

    ``"smollm2"`` is its converted folder in the cache. A ``.gguf`` file, a hub name, a folder without
    safetensors weights or a quantized one are refused (:func:`check_source`): each rank must be able
    to read row ranges of plain tensors, so the source is converted once first.
    """
    from .models import DEFAULT_MODEL, default_model_dir

    if os.fspath(source) == DEFAULT_MODEL:
        return default_model_dir()
    check_source(source)
    text = os.fspath(source)
    path = Path(text).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"model: {text!r} is a folder but holds no config.json (not a HF model)")
    if "quantization_config" in read_config(path, label="model"):
        raise ValueError(f"model: {text!r} is quantized; --distributed loads plain float safetensors")
    return path


def meta_skeleton(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``folder``'s config, every parameter and buffer on the meta device (tied weights tied)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"model: {str(folder)!r} is an encoder-decoder; --distributed fsdp scores decoder-only models "
            "(score a T5 in one process)"
        )
    # Under the meta device nothing is allocated at all: accelerate's init_empty_weights would still
    # allocate each parameter on the CPU before moving it to meta.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.name_or_path = str(folder)
    return model.eval()


def computed_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The non-persistent buffers of ``model`` (built on meta), computed as the model class computes them.

    Each module holding one (the rotary embedding's ``inv_freq``) is rebuilt from its ``config`` on the
    CPU, which is cheap since it holds no parameter; its buffers (and the plain attributes computed
    with them, such as ``attention_scaling``) are taken from that copy. A buffer its module also keeps
    as a number in ``scalar_<name>`` (Gemma's scaled embedding) is ``torch.tensor`` of that number,
    as the class makes it.

    Raises:
        ValueError: a module with such a buffer also holds parameters or has no ``config``, so it
            cannot be rebuilt alone; the message names the buffer.
    """
    out = {}
    for name, module in model.named_modules():
        own = [b for b in module._non_persistent_buffers_set if module._buffers.get(b) is not None]
        if not own:
            continue
        where = f"{name}.{own[0]}" if name else own[0]
        # A scaled embedding (Gemma) keeps the scalar its buffer was made from: torch.tensor(scalar).
        scalars = {b: getattr(module, f"scalar_{b}", None) for b in own}
        if all(isinstance(v, (int, float)) for v in scalars.values()):
            out.update({f"{name}.{b}" if name else b: torch.tensor(v) for b, v in scalars.items()})
            continue
        if next(module.parameters(), None) is not None or getattr(module, "config", None) is None:
            raise ValueError(
                f"model: buffer {where!r} ({type(module).__name__}) is computed by a module that cannot be "
                "rebuilt alone; --distributed cannot load this architecture rank-locally"
            )
        with torch.device("cpu"):
            fresh = type(module)(config=module.config)
        for b in own:
            out[f"{name}.{b}" if name else b] = fresh._buffers[b]
        for attr, value in vars(fresh).items():
            if not attr.startswith("_") and attr not in ("config", "training"):
                setattr(module, attr, value)
    return out


def _data_start(path: Path, cache: dict) -> int:
    if path not in cache:
        with open(path, "rb") as f:
            cache[path] = 8 + int.from_bytes(f.read(8), "little")
    return cache[path]


def read_rows(path: Path, info: TensorInfo, start: int, stop: int, cache: dict | None = None) -> torch.Tensor:
    """Rows ``[start, stop)`` of the tensor ``info`` describes in safetensors file ``path``, reading only their bytes.

    A row-major tensor's rows are one contiguous byte range: one ``os.pread`` of
    ``(stop - start) * row bytes`` at the tensor's offset. Returns a new CPU tensor of ``info``'s dtype,
    shape ``[stop - start, *info.shape[1:]]`` (a 0-d tensor is one row).
    """
    cache = {} if cache is None else cache
    shape = tuple(info.shape) or (1,)
    row_bytes = info.nbytes // shape[0] if shape[0] else 0
    offset = _data_start(path, cache) + info.data_offsets[0] + start * row_bytes
    size = (stop - start) * row_bytes
    buffer = bytearray(size)
    fd = os.open(path, os.O_RDONLY)
    try:
        view, done = memoryview(buffer), 0
        while done < size:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise ValueError(f"model: {str(path)!r} ended inside tensor rows (truncated?)")
            done += n
    finally:
        os.close(fd)
    flat = torch.frombuffer(buffer, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
    out = flat.view(DTYPES[info.dtype]).reshape(stop - start, *shape[1:])
    return out if info.shape else out.reshape(())


def load_sharded(source: str | os.PathLike, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, LoadRecord]:
    """The FSDP2 root of ``source`` with this rank's shards read from disk, and what was read; collective.

    Every rank calls it (the process group initialised). Returns ``(root, record)``: ``root`` is what
    :func:`nirvana.sources.fsdp.shard_for_scoring` returns (``root.lm`` the decoder), every parameter a
    DTensor whose local rows were read from the checkpoint and cast to ``dtype`` on ``device``.

    Raises:
        ValueError: a source that is not a local safetensors folder (see :func:`checkpoint_folder`), or
            whose tensors are not exactly the model's (missing, extra or misshapen).
    """
    import torch.distributed as dist

    folder = checkpoint_folder(source)
    found = check_folder(folder, label="model")
    model = meta_skeleton(folder, dtype)
    check_tensors(expected_tensors(model), found, folder=folder, what=f"the {type(model).__name__} of its config.json")
    buffers: dict[str, torch.Tensor | None] = dict(computed_buffers(model))
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    buffers.update(dict.fromkeys(n for n in model.state_dict() if n not in params))  # persistent: read below
    root = shard_for_scoring(model, device)
    root.to_empty(device=device)
    record = LoadRecord(dist.get_rank(), dist.get_world_size())
    cache: dict = {}
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied parameter is listed once, by its first name
            if name not in found:
                raise ValueError(f"model: the checkpoint of {str(folder)!r} has no tensor {name!r}")
            start, local = local_rows(param.data)
            stop = start + local.shape[0]
            path, info = found[name]
            rows = read_rows(path, info, start, stop, cache)
            record.reads[name] = (start, stop, rows.numel() * rows.element_size())
            local.copy_(rows)
        for name, value in buffers.items():
            module_name, _, attr = name.rpartition(".")
            if value is None:  # a persistent buffer: small, read whole
                path, info = found[name]
                value = read_rows(path, info, 0, info.shape[0] if info.shape else 1, cache)
                record.reads[name] = (0, info.shape[0] if info.shape else 1, info.nbytes)
            # Cast like the rest, as nirvana.models.load_model's .to(dtype) casts every float buffer.
            value = value.to(device, dtype) if value.is_floating_point() else value.to(device)
            model.get_submodule(module_name)._buffers[attr] = value
    return root, record


def checkpoint_bytes(folder: Path) -> int:
    """Bytes of tensor data in the safetensors checkpoint ``folder`` (headers not counted)."""
    return sum(info.nbytes for _, info in check_folder(folder, label="model").values())


def checkpoint_params(folder: Path) -> int:
    """Elements in the checkpoint's tensors (a tied lm_head is stored, and counted, once)."""
    return sum(math.prod(info.shape) for _, info in check_folder(folder, label="model").values())


__all__ = [
    "DTYPES",
    "LoadRecord",
    "check_source",
    "checkpoint_bytes",
    "checkpoint_folder",
    "checkpoint_params",
    "computed_buffers",
    "load_sharded",
    "meta_skeleton",
    "read_rows",
]
