"""Checking safetensors checkpoints before anything trusts them: headers, shard indices, and the tensors a model needs.

A safetensors file is an 8-byte little-endian header length, a UTF-8 JSON header (tensor name ->
dtype, shape and byte range in the data area; an optional ``__metadata__`` str -> str map), then the
data area. :func:`read_header` parses the header from the bytes and checks it as the ``safetensors``
library does (a header of at most 100 MB inside the file, known dtypes, non-negative shapes, byte
ranges that match each tensor's size and tile the whole data area without gaps or overlaps), plus
duplicate names, which the library lets the last one win. :func:`check_folder` does that for a
checkpoint folder (``model.safetensors``, or the shards a ``model.safetensors.index.json`` lists, which
must stay inside the folder and agree with the shards' headers). :func:`check_tensors` compares what a
checkpoint holds with what a model built on the meta device expects (:func:`expected_tensors`).

Every failure is a one-line ValueError naming the file (or tensor) and what is wrong, so that the
CLI refuses a corrupt or tampered checkpoint before a model is built or a byte is written.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from torch import nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
METADATA_KEY = "__metadata__"
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
# Bits per element of every dtype safetensors 0.8 knows.
DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header; ``data_offsets`` are relative to the data area."""

    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.data_offsets[1] - self.data_offsets[0]


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


class _Duplicate(Exception):
    pass


def _bad(label: str, path, why: str) -> ValueError:
    return ValueError(f"{label}: {str(path)!r} is not a valid safetensors file ({why})")


def _entry(name: str, entry, data_size: int, bad) -> TensorInfo:
    if not isinstance(entry, dict):
        raise bad(f"tensor {name!r} has entry {entry!r:.80} instead of dtype, shape and data_offsets")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise bad(f"tensor {name!r} has an unknown dtype {dtype!r:.40}")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise bad(f"tensor {name!r} has shape {shape!r:.80}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise bad(f"tensor {name!r} has data_offsets {offsets!r:.80}, not two non-negative integers")
    begin, end = offsets
    if end < begin:
        raise bad(f"tensor {name!r} data_offsets [{begin}, {end}] are reversed")
    if end > data_size:
        raise bad(
            f"tensor {name!r} data_offsets [{begin}, {end}] run past the end of the {data_size} data bytes; truncated?"
        )
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8:
        raise bad(f"tensor {name!r} of {dtype} {shape} does not fill whole bytes")
    if end - begin != bits // 8:
        raise bad(f"tensor {name!r} of {dtype} {shape} needs {bits // 8} bytes, but data_offsets span {end - begin}")
    return TensorInfo(dtype, tuple(shape), (begin, end))


def read_header(path: str | os.PathLike, *, label: str = "model") -> dict[str, TensorInfo]:
    """The tensors of the safetensors file at ``path``, after checking its header against the file.

    Reads only the header, never the data. ``label`` starts every error message (``"model"``, ``"path"``).

    Raises:
        ValueError: the file is empty, truncated, or its header is malformed or disagrees with the file's size.
        OSError: the file cannot be read.
    """
    path = Path(path)

    def bad(why: str) -> ValueError:
        return _bad(label, path, why)

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise bad("the file is empty")
        if size < 8:
            raise bad(f"the file is truncated: {size} bytes, fewer than the 8-byte header length")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise bad(f"its header length {n} is over the {MAX_HEADER_BYTES}-byte limit")
        if 8 + n > size:
            raise bad(f"its header length {n} runs past the end of the {size}-byte file; truncated?")
        raw = f.read(n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise bad(f"its header is not UTF-8 (byte {err.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except _Duplicate as dup:
        raise bad(f"its header names {dup.args[0]!r} twice") from None
    except json.JSONDecodeError as err:
        raise bad(f"its header is not JSON: {err.msg} at byte {err.pos}") from None
    if not isinstance(header, dict):
        raise bad(f"its header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop(METADATA_KEY, None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):  # JSON keys are always strings
        raise bad(f"its {METADATA_KEY} is {metadata!r:.80}, not a map of strings to strings")
    data_size = size - 8 - n
    tensors = {name: _entry(name, entry, data_size, bad) for name, entry in header.items()}
    # The byte ranges must tile the data area: every byte belongs to exactly one tensor.
    end, previous = 0, None
    for name, info in sorted(tensors.items(), key=lambda item: item[1].data_offsets):
        begin = info.data_offsets[0]
        if begin < end:
            raise bad(f"tensor {name!r} data_offsets {list(info.data_offsets)} overlap those of {previous!r}")
        if begin > end:
            raise bad(f"tensor {name!r} data_offsets {list(info.data_offsets)} leave bytes [{end}, {begin}) unused")
        end, previous = info.data_offsets[1], name
    if end != data_size:
        raise bad(f"its tensors cover {end} of the {data_size} data bytes")
    return tensors


def has_safetensors(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds safetensors weights (``model.safetensors`` or an index) to check."""
    folder = Path(folder)
    return (folder / WEIGHTS_FILE).is_file() or (folder / INDEX_FILE).is_file()


def _shard_path(folder: Path, file, index: Path, label: str) -> Path:
    if not isinstance(file, str) or not file:
        raise ValueError(f"{label}: {str(index)!r} names a shard {file!r:.80}, not a file name")
    parts = Path(file).parts
    if os.path.isabs(file) or ".." in parts:
        raise ValueError(f"{label}: {str(index)!r} names the shard {file!r}, which is outside the model folder")
    # A shard may be a link (a Hugging Face cache snapshot links each one into ../../blobs): it is only
    # read, and its header is checked like any other. What the index names must stay in the folder.
    path = folder / file
    if not path.is_file():
        raise ValueError(f"{label}: {str(index)!r} names the shard {file!r}, which is not a file in {str(folder)!r}")
    return path


def read_index(folder: str | os.PathLike, *, label: str = "model") -> dict[str, Path]:
    """Tensor name -> shard path from ``folder``'s ``model.safetensors.index.json``, each shard inside the folder."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    try:
        data = json.loads(index.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _Duplicate as dup:
        raise ValueError(f"{label}: {str(index)!r} names {dup.args[0]!r} twice") from None
    except UnicodeDecodeError:
        raise ValueError(f"{label}: {str(index)!r} is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{label}: {str(index)!r} is not JSON ({err.msg} at byte {err.pos})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{label}: {str(index)!r} has no weight_map object of tensor name -> shard file")
    shards = {}
    for file in weight_map.values():
        if not isinstance(file, str) or file not in shards:  # a non-string raises in _shard_path
            shards[file] = _shard_path(folder, file, index, label)
    return {name: shards[file] for name, file in weight_map.items()}


def check_folder(folder: str | os.PathLike, *, label: str = "model") -> dict[str, tuple[Path, TensorInfo]]:
    """Tensor name -> (file, info) for the safetensors weights of ``folder``, every header and the index checked.

    A single ``model.safetensors`` is used when present (as transformers does), else the shards of
    ``model.safetensors.index.json``: every shard must be a file named inside ``folder`` (no absolute
    path, no ``..``; a shard that is a link, as in a Hugging Face cache snapshot, is read), and the
    index must list exactly the tensors of each shard's header, none in two shards.

    Raises:
        ValueError: no safetensors weights, or any of the above is wrong; the message names the file
            or tensor.
    """
    folder = Path(folder)
    if (folder / WEIGHTS_FILE).is_file():
        path = folder / WEIGHTS_FILE
        return {name: (path, info) for name, info in read_header(path, label=label).items()}
    if not (folder / INDEX_FILE).is_file():
        raise ValueError(f"{label}: {str(folder)!r} holds neither {WEIGHTS_FILE} nor {INDEX_FILE}")
    index = folder / INDEX_FILE
    mapping = read_index(folder, label=label)
    out: dict[str, tuple[Path, TensorInfo]] = {}
    for path in sorted(set(mapping.values())):
        for name, info in read_header(path, label=label).items():
            if name in out:
                raise ValueError(
                    f"{label}: tensor {name!r} is in two shards of {str(folder)!r}, "
                    f"{out[name][0].name!r} and {path.name!r}"
                )
            if name not in mapping:
                raise ValueError(f"{label}: tensor {name!r} of {str(path)!r} is missing from {str(index)!r}")
            if mapping[name] != path:
                raise ValueError(
                    f"{label}: {str(index)!r} puts tensor {name!r} in {mapping[name].name!r}, "
                    f"but it is in {path.name!r}"
                )
            out[name] = (path, info)
    for name, path in mapping.items():
        if name not in out:
            raise ValueError(f"{label}: {str(index)!r} puts tensor {name!r} in {path.name!r}, whose header lacks it")
    return out


def expected_tensors(model: nn.Module, *, parameters_only: bool = False) -> list[dict[str, tuple[int, ...]]]:
    """What a checkpoint of ``model`` (built on the meta device, say) holds: one name -> shape map per tensor.

    Names that share one tensor (a tied ``lm_head.weight`` and ``embed_tokens.weight``) form one map,
    since ``save_pretrained`` writes only one of them; non-persistent buffers are left out, and with
    ``parameters_only`` every buffer (which transformers rebuilds when a checkpoint lacks it).
    """
    parameters = {id(p) for p in model.parameters()}
    groups: dict[int, dict[str, tuple[int, ...]]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not parameters_only or id(tensor) in parameters:
            groups.setdefault(id(tensor), {})[name] = tuple(tensor.shape)
    return list(groups.values())


def check_tensors(
    expected: list[dict[str, tuple[int, ...]]],
    found: dict[str, tuple[Path, TensorInfo]],
    *,
    folder: str | os.PathLike,
    what: str,
    label: str = "model",
    allow_unexpected: bool = False,
    optional_prefix: str = "",
) -> None:
    """Refuse a checkpoint that lacks a tensor ``expected`` names or has one of another shape.

    ``found`` is what :func:`check_folder` returned for ``folder``; ``what`` names the model in the
    message. Unless ``allow_unexpected``, a checkpoint tensor the model does not have is refused too.
    With ``optional_prefix`` (``"model."``), a checkpoint name may lack that prefix, as one saved from
    the base model does and transformers accepts.

    Raises:
        ValueError: naming the first tensor that is missing, of the wrong shape, or unexpected.
    """
    used = set()
    for group in expected:
        present = {}
        for name in group:
            short = name[len(optional_prefix) :] if optional_prefix and name.startswith(optional_prefix) else None
            for candidate in (name, short):
                if candidate is not None and candidate in found:
                    present[name] = candidate
                    break
        if not present:
            name = next(iter(group))
            raise ValueError(f"{label}: {str(folder)!r} has no tensor {name!r}, which {what} needs")
        for name, candidate in present.items():
            used.add(candidate)
            path, info = found[candidate]
            if info.shape != group[name]:
                raise ValueError(
                    f"{label}: tensor {candidate!r} in {str(path)!r} has shape {list(info.shape)}, "
                    f"but {what} has {list(group[name])}"
                )
    if not allow_unexpected:
        extra = sorted(set(found) - used)
        if extra:
            more = f" ({len(extra)} such tensors)" if len(extra) > 1 else ""
            raise ValueError(f"{label}: tensor {extra[0]!r} in {str(found[extra[0]][0])!r} is not one {what} has{more}")


def _renames_keys(model: nn.Module) -> bool:
    """Whether transformers renames checkpoint keys when loading ``model`` (then names cannot be compared)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping

        return bool(get_model_conversion_mapping(model, add_legacy=False))
    except Exception:  # an internal API of transformers: when it moves, assume renaming and check less
        return True


def check_weights(folder: str | os.PathLike, model: nn.Module, *, label: str = "model", exact: bool = True) -> None:
    """Check ``folder``'s safetensors files, and that they hold every tensor ``model`` needs, each of its shape.

    ``model`` is the one that will be loaded from ``folder``, built on the meta device from its config.
    ``exact`` (for checkpoints nirvana wrote, whose names are the model's own): a tensor the model
    lacks is refused too. Otherwise the check follows transformers' loading: extra tensors are allowed
    (transformers ignores them), names may lack the base model's prefix, and for models whose
    checkpoint keys transformers renames only the files themselves are checked.

    Raises:
        ValueError: a malformed file or index, or a missing or misshapen tensor, named.
    """
    found = check_folder(folder, label=label)
    if not exact and _renames_keys(model):
        return
    prefix = getattr(model, "base_model_prefix", "")
    check_tensors(
        expected_tensors(model, parameters_only=not exact),
        found,
        folder=folder,
        what=f"the {type(model).__name__} of its {CONFIG_FILE}",
        label=label,
        allow_unexpected=not exact,
        optional_prefix="" if exact or not prefix else prefix + ".",
    )


def read_config(folder: str | os.PathLike, *, label: str = "model") -> dict:
    """``folder``'s ``config.json`` as a dict: UTF-8 JSON holding an object, else a one-line ValueError naming it."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{label}: {str(folder)!r} is not a checkpoint folder (no {CONFIG_FILE})")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{label}: {str(path)!r} is not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{label}: {str(path)!r} is not JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{label}: {str(path)!r} holds a JSON {type(config).__name__}, not an object")
    return config


__all__ = [
    "CONFIG_FILE",
    "DTYPE_BITS",
    "INDEX_FILE",
    "MAX_HEADER_BYTES",
    "WEIGHTS_FILE",
    "TensorInfo",
    "check_folder",
    "check_tensors",
    "check_weights",
    "expected_tensors",
    "has_safetensors",
    "read_config",
    "read_header",
    "read_index",
]
