"""Rank-local loading for ``--distributed fsdp``: each rank reads only the rows it holds.

:func:`load_sharded` builds the decoder from its config with every parameter on the meta device,
shards it with :func:`nirvana.sources.fsdp.shard_for_scoring` (one FSDP2 unit per decoder layer, the
embeddings, final norm and lm_head in the root), allocates each rank's local shards
(``to_empty``) and fills them in place from the safetensors files: rank ``r`` of ``W`` reads rows
``[r*c, min((r+1)*c, rows))``, ``c = ceil(rows / W)``, of every parameter with
``safe_open(...).get_slice(name)[start:stop]``, which reads those rows and nothing else. No rank
ever holds a dense copy of a parameter (the root unit included); tied embeddings stay one parameter.

Non-persistent buffers (the rotary ``inv_freq``) are computed by the model class itself: the
skeleton is built with accelerate's ``init_empty_weights(include_buffers=False)``, which puts only
the parameters on the meta device, and the buffers are put back after ``to_empty`` (which would
leave them uninitialised). Persistent buffers are read whole from the checkpoint.

Sources: a local folder with ``model.safetensors`` or a ``model.safetensors.index.json`` and its
shards (``"smollm2"`` resolves to such a folder in the cache). A GGUF file or a hub name is refused
in one line that says to convert it first (``nirvana convert SRC --out DIR``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .sources.fsdp import local_rows, shard_for_scoring
from .tensorfile import check_folder, check_tensors, expected_tensors, read_config


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


def checkpoint_folder(source: str | os.PathLike) -> Path:
    """The safetensors folder ``source`` names, for rank-local loading; a one-line ValueError otherwise.

    ``"smollm2"`` is its converted folder in the cache. A ``.gguf`` file, a hub name, a folder without
    safetensors weights or a quantized one are refused: each rank must be able to read row ranges of
    plain tensors, so the source is converted once first (``nirvana convert SRC --out DIR``).
    """
    from .models import DEFAULT_MODEL, default_model_dir

    text = os.fspath(source)
    if text == DEFAULT_MODEL:
        return default_model_dir()
    path = Path(text).expanduser()
    if path.is_file():
        raise ValueError(
            f"model: {text!r} is a file; --distributed reads row ranges of safetensors, so convert it first: "
            f"nirvana convert {text} --out DIR"
        )
    if not path.is_dir():
        raise ValueError(
            f"model: {text!r} is not a local folder (a hub name?); --distributed reads row ranges of local "
            f"safetensors, so convert it first: nirvana convert {text} --out DIR"
        )
    if not (path / "config.json").is_file():
        raise ValueError(f"model: {text!r} is a folder but holds no config.json (not a HF model)")
    config = read_config(path, label="model")
    if "quantization_config" in config:
        raise ValueError(f"model: {text!r} is quantized; --distributed loads plain float safetensors")
    return path


def meta_skeleton(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``folder``'s config: parameters on the meta device, buffers real, tied weights tied."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"model: {str(folder)!r} is an encoder-decoder; --distributed fsdp scores decoder-only models "
            "(score a T5 in one process)"
        )
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # init_empty_weights registers each parameter anew, which unties lm_head from the embeddings.
    model.tie_weights()
    model.name_or_path = str(folder)
    return model.eval()


def _read_rows(handles: dict, path: Path, name: str, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of tensor ``name``: only their bytes are read from the file."""
    if path not in handles:
        handles[path] = safe_open(path, framework="pt")
    return handles[path].get_slice(name)[start:stop]


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
    buffers = {name: b for name, b in model.named_buffers() if b.device.type != "meta"}
    root = shard_for_scoring(model, device)
    root.to_empty(device=device)
    record = LoadRecord(dist.get_rank(), dist.get_world_size())
    handles: dict = {}
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied parameter is listed once, by its first name
            start, local = local_rows(param.data)
            stop = start + local.shape[0]
            path = found[name][0] if name in found else None
            if path is None:
                raise ValueError(f"model: the checkpoint of {str(folder)!r} has no tensor {name!r}")
            if stop > start:
                rows = _read_rows(handles, path, name, start, stop)
                record.reads[name] = (start, stop, rows.numel() * rows.element_size())
                local.copy_(rows)
            else:
                record.reads[name] = (start, stop, 0)
        persistent = set(model.state_dict())
        for name, value in buffers.items():
            module_name, _, attr = name.rpartition(".")
            if name in persistent and name in found:  # small: read whole
                path = found[name][0]
                handles.setdefault(path, safe_open(path, framework="pt"))
                value = handles[path].get_tensor(name)
                record.reads[name] = (0, value.shape[0] if value.dim() else 1, value.numel() * value.element_size())
            model.get_submodule(module_name)._buffers[attr] = value.to(device)
    return root, record


__all__ = ["LoadRecord", "checkpoint_folder", "load_sharded", "meta_skeleton"]
