"""Compact a checkpoint on disk, one tensor at a time (``nirvana apply PLAN --model SRC --out DST``).

:func:`apply_plan` reads a safetensors checkpoint (``model.safetensors``, or shards listed by
``model.safetensors.index.json``) lazily, gathers the kept rows and columns of each prunable tensor
with the nirvana kernels (on the GPU when there is one), copies every other tensor through, and
writes sharded safetensors with the pruned ``config.json``, ``plan.json``, ``modeling_nirvana.py``
when the widths differ per layer, and the tokenizer and generation files (regular files only, never
through a link, with modes no wider than the source's). The tensors are those
:func:`nirvana.compaction.compact_model` followed by :func:`nirvana.checkpoint.save_pruned` writes,
bit for bit, and so is ``config.json``.

Each output shard's header is written first (every output shape follows from the source header and
the plan), then each tensor as soon as it is gathered, so the process holds one source tensor (a
lazily read memory map) and its compacted copy at a time: a model pruned on a cluster can be
compacted on any machine with room for a few of its largest tensors. Only decoder-only models the
Llama-like adapter serves are supported; the tensor names come from the adapter, read off a model
built on the meta device from the checkpoint's config.

Nothing is written before the source is checked: every safetensors header and the shard index
(:mod:`nirvana.tensorfile`), that the checkpoint holds exactly the tensors of that meta model (so the
output never lacks one), that a plan made with a bias compensation (FLAP's, ``--compensate bias``)
has its calibration means file (``compensation.safetensors``, which ``nirvana prune`` writes beside the
plan; the biases are recomputed from it and the dense weights, one tensor at a time), and that the
device exists.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import stat
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from nirvana_kernels import compact_groups

from . import _remote_modeling as remote
from .adapters import get_adapter
from .checkpoint import CONFIG_FILE, PLAN_FILE, base_architecture, config_updates, plan_widths, rewrite_config
from .compaction import check_plan
from .compensation import MEANS_FILE, load_means, plan_compensates, streamed_biases
from .output import check_target, real_path, staged
from .plan import PruningPlan
from .tensorfile import INDEX_FILE, WEIGHTS_FILE, check_folder, check_tensors, expected_tensors, read_config

DEFAULT_MAX_SHARD_SIZE = "5GB"
# Files beside the weights that describe the tokenizer or generation; copied as they are.
SIDE_FILES = (
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.tiktoken",
    "spiece.model",
    "chat_template*",
)
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_FLOAT_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
_SAFETENSORS_NAMES = {getattr(torch, v): k for k, v in _FLOAT_NAMES.items()}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Gather:
    """Which slices of one tensor survive: units of ``unit`` rows (``dim=0``) or columns (``dim=1``)."""

    dim: int
    unit: int
    keep: tuple[int, ...]


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor: where it comes from, what it becomes."""

    name: str
    source: Path  # the source shard holding it
    dtype: str  # safetensors dtype name ("BF16", ...)
    shape: tuple[int, ...]  # after compaction
    gather: Gather | None  # None: copied through unchanged
    # A tensor that is not in the source (FLAP's compensation biases): written as it is, on the CPU.
    value: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        n = _ITEMSIZE[self.dtype]
        for s in self.shape:
            n *= s
        return n


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or text like ``"5GB"`` (10**9), ``"500MiB"`` (2**20), ``"20KB"``."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"max_shard_size: expected bytes or a size like '5GB', got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        m = _SIZE.match(size)
        if not m:
            raise ValueError(f"max_shard_size: expected bytes or a size like '5GB', got {size!r}")
        power = " KMGT".index(m.group(2).upper() or " ")
        value = int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)
    if value <= 0:
        raise ValueError(f"max_shard_size: must be positive, got {size!r}")
    return value


def read_plan(plan: PruningPlan | str | os.PathLike) -> PruningPlan:
    """A plan given as itself, a ``plan.json`` path, or a folder holding one (a pruned checkpoint)."""
    if isinstance(plan, PruningPlan):
        plan.validate()
        return plan
    if not isinstance(plan, (str, os.PathLike)) or not str(plan):
        raise ValueError(f"plan: expected a PruningPlan or a plan.json path, got {plan!r}")
    path = Path(plan)
    if path.is_dir():
        path = path / PLAN_FILE
    if not path.is_file():
        raise ValueError(f"plan: {os.fspath(plan)!r} is not a plan.json file (or a folder holding one)")
    return PruningPlan.load(path)  # a one-line ValueError naming the file for anything malformed


def source_tensors(src: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, every header and the index checked.

    The single ``model.safetensors`` when there is one (as transformers loads it), else the shards of
    ``model.safetensors.index.json``; see :func:`nirvana.tensorfile.check_folder` for what is refused.
    """
    return {name: path for name, (path, _) in check_folder(src, label="model").items()}


def check_source(src: Path, model: nn.Module) -> dict[str, Path]:
    """:func:`source_tensors`, after checking that they are exactly the tensors ``model`` (on meta) needs.

    A tensor the architecture has but the checkpoint lacks, one of another shape, or one the
    architecture does not have, is refused: the output would otherwise lack it (and loading would fill
    it with random values) or carry something no model reads.
    """
    found = check_folder(src, label="model")
    arch = type(model).__name__
    check_tensors(expected_tensors(model), found, folder=src, what=f"the {arch} of its {CONFIG_FILE}")
    return {name: path for name, (path, _) in found.items()}


def gathers(model: nn.Module, plan: PruningPlan) -> dict[str, Gather]:
    """Parameter name -> its :class:`Gather`, for every prunable tensor of ``model`` (dense, any device).

    The slices are those :func:`nirvana.compaction.compact_model` takes: q rows (and bias) and o
    columns in units of ``G * head_dim``, k/v rows (and biases) in units of ``head_dim``, gate/up
    rows (and biases) and down columns one channel each. A layer that keeps everything still gets
    its entries, so that its shapes are checked.
    """
    adapter = get_adapter(model)
    names = {id(m): name for name, m in model.named_modules()}
    g = plan.geometry
    qd = g.group_size * g.head_dim
    out: dict[str, Gather] = {}
    for lm, lp in zip(adapter.layers(model), plan.layers):
        groups, channels = tuple(lp.kv_groups_kept), tuple(lp.mlp_channels_kept)
        for linear, dim, unit, keep in (
            (lm.q, 0, qd, groups),
            (lm.k, 0, g.head_dim, groups),
            (lm.v, 0, g.head_dim, groups),
            (lm.o, 1, qd, groups),
            (lm.gate, 0, 1, channels),
            (lm.up, 0, 1, channels),
            (lm.down, 1, 1, channels),
        ):
            if linear is None:
                continue
            out[f"{names[id(linear)]}.weight"] = Gather(dim, unit, keep)
            if dim == 0 and linear.bias is not None:  # o's and down's biases span the hidden size: kept
                out[f"{names[id(linear)]}.bias"] = Gather(0, unit, keep)
    return out


def tensor_specs(files: dict[str, Path], model: nn.Module, plan: PruningPlan) -> list[TensorSpec]:
    """Every output tensor, in source order (file, then name), with its compacted shape.

    Raises:
        ValueError: a prunable tensor is missing from the checkpoint or has other than its dense shape.
    """
    wanted = gathers(model, plan)
    dense = dict(model.named_parameters())
    missing = sorted(set(wanted) - set(files))
    if missing:
        raise ValueError(f"model: the checkpoint has no tensor {missing[0]!r} ({len(missing)} prunable ones missing)")
    specs = []
    for path in sorted(set(files.values())):
        with safe_open(path, framework="pt") as f:
            for name in sorted(n for n in f.keys() if files.get(n) == path):
                view = f.get_slice(name)
                dtype, shape = view.get_dtype(), tuple(view.get_shape())
                if dtype not in _ITEMSIZE:
                    raise ValueError(f"model: tensor {name!r} has dtype {dtype}, which nirvana cannot copy")
                gather = wanted.get(name)
                if gather is not None:
                    if shape != tuple(dense[name].shape):
                        raise ValueError(
                            f"model: tensor {name!r} has shape {list(shape)}, not the dense "
                            f"{list(dense[name].shape)}; a plan applies to the dense checkpoint (pruned already?)"
                        )
                    if len(gather.keep) * gather.unit == shape[gather.dim]:
                        gather = None  # everything kept
                    else:
                        shape = tuple(
                            len(gather.keep) * gather.unit if d == gather.dim else s for d, s in enumerate(shape)
                        )
                specs.append(TensorSpec(name, path, dtype, shape, gather))
    return specs


def shard(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive runs of ``specs`` of at most ``max_bytes`` each; a larger tensor gets a shard of its own."""
    shards: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        if not shards or size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(specs: list[TensorSpec]) -> tuple[bytes, list[TensorSpec]]:
    """The safetensors header for a shard, and the order in which its tensors' bytes follow it."""
    # Wider dtypes first, so that every tensor starts at a multiple of its element size.
    order = sorted(specs, key=lambda s: -_ITEMSIZE[s.dtype])
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in order:
        entries[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # the data then starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text, order


def output_tensor(spec: TensorSpec, device: torch.device) -> torch.Tensor:
    """The tensor ``spec`` describes, on the CPU: read from its source shard, then gathered on ``device``.

    A float tensor whose source dtype differs from ``spec.dtype`` is cast first (as ``from_pretrained``
    with a ``dtype`` casts it before compaction; a cast commutes with a gather bit for bit).
    """
    if spec.value is not None:
        return spec.value
    with safe_open(spec.source, framework="pt") as f:
        # Backed by the file's memory map, which lives as long as the tensor: its pages are read as
        # they are touched and dropped with it, so copying it through costs no second buffer.
        tensor = f.get_tensor(spec.name)
    if spec.dtype in _FLOAT_NAMES and tensor.dtype != getattr(torch, _FLOAT_NAMES[spec.dtype]):
        tensor = tensor.to(getattr(torch, _FLOAT_NAMES[spec.dtype]))
    if spec.gather is not None:
        g = spec.gather
        # Built on the host from the plan, validated when the specs were made: the kernel copies it
        # over without blocking and skips its own value check, which would read a device index back.
        index = torch.tensor(g.keep, dtype=torch.int64)
        tensor = compact_groups(tensor.to(device), index, group_size=g.unit, dim=g.dim, check_index=False).cpu()
    if tuple(tensor.shape) != spec.shape:
        raise RuntimeError(f"{spec.name}: compacted to {tuple(tensor.shape)}, expected {spec.shape}")
    return tensor


def write_shard(path: Path, specs: list[TensorSpec], device: torch.device, bar=None) -> None:
    """Write one safetensors file: its header, then each tensor as soon as it is gathered.

    ``bar``: a tqdm bar counting bytes, advanced after each tensor (None: no progress shown).
    """
    header, order = _header(specs)
    with open(path, "wb") as out:
        out.write(header)
        for spec in order:
            tensor = output_tensor(spec, device)
            if spec.nbytes:
                out.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            del tensor  # freed before the next one is read
            if bar is not None:
                bar.update(spec.nbytes)


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return [WEIGHTS_FILE]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _write_config(
    folder: Path, config, model: nn.Module, plan: PruningPlan, specs: list[TensorSpec], biases: list[str] = ()
) -> None:
    """The config.json :func:`nirvana.checkpoint.save_pruned` writes for the compacted model."""
    # save_pretrained records the dtype of the model's first floating parameter.
    dtypes = {s.name: s.dtype for s in specs}
    first = next((dtypes[n] for n, _ in model.named_parameters() if dtypes.get(n) in _FLOAT_NAMES), None)
    if first is not None:
        config.dtype = _FLOAT_NAMES[first]
    base = base_architecture(model)
    sizes, block = config_updates(config, plan_widths(plan), base, plan.geometry.head_dim, biases)
    config.save_pretrained(folder)
    rewrite_config(folder, sizes, block, base)


def side_files(src: Path) -> list[Path]:
    """The tokenizer and generation files of ``src`` that apply copies: regular files only.

    Raises:
        ValueError: one of them is a symbolic link (or not a regular file). Copying through a link would
            publish the target's contents, which may live elsewhere and be private, under the link's name;
            dropping it would silently lose a tokenizer file. The user replaces the link with a copy.
    """
    files = []
    for path in sorted(src.iterdir()):
        if not any(fnmatch.fnmatch(path.name, p) for p in SIDE_FILES):
            continue
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            raise ValueError(
                f"model: {str(path)!r} is a symbolic link (to {os.readlink(path)!r}); nirvana apply copies "
                "only regular files beside the weights, so replace the link with a copy of its file"
            )
        if not stat.S_ISREG(mode):
            if stat.S_ISDIR(mode):
                continue  # a folder that happens to match a pattern is no tokenizer file
            raise ValueError(f"model: {str(path)!r} is not a regular file; nirvana apply copies only regular files")
        files.append(path)
    return files


def copy_file(path: Path, dest: Path) -> None:
    """Copy the regular file ``path`` to new ``dest``: never through a link, mode no wider than the source's."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as err:
        if os.path.islink(path):  # swapped for a link since side_files looked
            raise ValueError(
                f"model: {str(path)!r} is a symbolic link; nirvana apply copies only regular files"
            ) from None
        raise err
    with os.fdopen(fd, "rb") as source:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # checked on the open file, whatever the name pointed to before
            raise ValueError(f"model: {str(path)!r} is not a regular file; nirvana apply copies only regular files")
        # O_CREAT applies the umask to these bits, so the copy is as private as the source, or more.
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, stat.S_IMODE(mode) & 0o777)
        with os.fdopen(out, "wb") as target:
            shutil.copyfileobj(source, target, 1 << 20)


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} asked for, but no CUDA GPU is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def compensation_means(plan: PruningPlan, given, where) -> Path | None:
    """The means file a compensated ``plan`` needs (``given``, else the one beside the plan ``where``
    came from), or None for a plan without compensation; a one-line ValueError when it cannot be found."""
    if not plan_compensates(plan):
        if given is not None:
            raise ValueError(f"compensation: the plan was made without a bias compensation, got {os.fspath(given)!r}")
        return None
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise ValueError(f"compensation: {os.fspath(given)!r} is not a file")
        return real_path(path)
    if isinstance(where, (str, os.PathLike)):
        folder = Path(where) if Path(where).is_dir() else Path(where).parent
        if (folder / MEANS_FILE).is_file():
            return real_path(folder / MEANS_FILE)
    compensate = plan.meta.get("compensate")
    how = f"--compensate {compensate}" if compensate else f"method {plan.meta.get('method')}"
    raise ValueError(
        f"plan: made with {how}, whose biases need the calibration means in {MEANS_FILE}, and none is beside "
        f"the plan; pass --compensation FILE (nirvana prune writes it into the pruned folder)"
    )


def _compensated_biases(src: Path, plan: PruningPlan, means_path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    files = source_tensors(src)
    _, meta = meta_model(src)

    def read(name: str) -> torch.Tensor | None:
        if name not in files:
            return None
        with safe_open(files[name], framework="pt") as f:
            return f.get_tensor(name)

    return streamed_biases(meta, plan, load_means(means_path, plan), read)


def meta_model(src: Path):
    """``(config, model)`` for the dense checkpoint folder ``src``, the model built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (src / CONFIG_FILE).is_file():
        raise ValueError(f"model: {str(src)!r} is not a checkpoint folder (no {CONFIG_FILE})")
    if remote.BLOCK_KEY in read_config(src, label="model"):
        raise ValueError(f"model: {str(src)!r} was pruned already (its config has a {remote.BLOCK_KEY} block)")
    config = AutoConfig.from_pretrained(src)
    get_adapter(config)  # names an unsupported architecture before any model is built
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"model: {str(src)!r} is an encoder-decoder; nirvana apply streams decoder-only checkpoints "
            "(prune a T5 in memory with nirvana prune)"
        )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.name_or_path = str(src)  # so that the out-folder check knows which folder to protect
    return config, model


@dataclass
class Stream:
    """Everything a streamed checkpoint needs, checked before anything is written (:func:`prepare_stream`)."""

    config: object  # the dense config (transformers PretrainedConfig), edited for extra biases
    meta: nn.Module  # the dense model on the meta device
    specs: list[TensorSpec]
    sides: list[Path]
    biases: list[str]  # extra-bias paths inside a decoder layer for config.json's nirvana block


def bias_specs(
    meta: nn.Module, config, plan: PruningPlan, biases: dict[str, torch.Tensor], dtype: torch.dtype
) -> tuple[list[TensorSpec], list[str]]:
    """FLAP's compensation biases as output tensors, and the extra-bias paths config.json then lists.

    ``biases``: parameter name -> the full o_proj / down_proj bias of every layer (any float dtype,
    float64 from the compensation), written in ``dtype``. As
    :func:`nirvana.methods.flap.apply_flap_compensation` does in memory, a config with Llama's
    ``attention_bias`` / ``mlp_bias`` flags gets both set, and every q/k/v/gate/up linear without a bias
    a zero one of its compacted width; ``meta`` gets meta-device biases where it now has them, so that
    :func:`nirvana.checkpoint.extra_biases` can compare it with the stock class.
    """
    from .adapters import text_config
    from .checkpoint import extra_biases
    from .methods.flap import stock_bias_flags

    adapter = get_adapter(meta)
    names = {id(m): name for name, m in meta.named_modules()}
    g = plan.geometry
    qd = g.group_size * g.head_dim
    flags = stock_bias_flags(config)
    if flags:
        c = text_config(config)
        c.attention_bias, c.mlp_bias = True, True
    wanted = {}
    for lm, lp in zip(adapter.layers(meta), plan.layers):
        for linear in (lm.o, lm.down):
            name = f"{names[id(linear)]}.bias"
            if name not in biases:
                raise ValueError(f"biases: no compensation bias {name!r}")
            wanted[name] = biases[name].detach().to("cpu", dtype)
            linear.bias = nn.Parameter(torch.empty(linear.out_features, device="meta"), requires_grad=False)
        if not flags:
            continue
        widths = (
            (lm.q, len(lp.kv_groups_kept) * qd),
            (lm.k, len(lp.kv_groups_kept) * g.head_dim),
            (lm.v, len(lp.kv_groups_kept) * g.head_dim),
            (lm.gate, len(lp.mlp_channels_kept)),
            (lm.up, len(lp.mlp_channels_kept)),
        )
        for linear, width in widths:
            if linear is not None and linear.bias is None:
                wanted[f"{names[id(linear)]}.bias"] = torch.zeros(width, dtype=dtype)
                linear.bias = nn.Parameter(torch.empty(linear.out_features, device="meta"), requires_grad=False)
    kind = _SAFETENSORS_NAMES[dtype]
    specs = [TensorSpec(n, Path(), kind, tuple(v.shape), None, v) for n, v in sorted(wanted.items())]
    return specs, extra_biases(meta, adapter)


def prepare_stream(
    src: Path, plan: PruningPlan, *, dtype: torch.dtype | None = None, biases: dict[str, torch.Tensor] | None = None
) -> Stream:
    """Check the dense folder ``src`` against ``plan`` and list every output tensor; nothing is written.

    ``dtype``: cast every float tensor to it (what loading with that dtype and compacting gives);
    None keeps the checkpoint's. ``biases``: FLAP's compensation (see :func:`bias_specs`), added to
    the stream after the source's tensors; a source tensor of the same name is replaced.
    """
    config, meta = meta_model(src)
    check_plan(meta, plan, get_adapter(meta))
    specs = tensor_specs(check_source(src, meta), meta, plan)
    if dtype is not None:
        if dtype not in _SAFETENSORS_NAMES:
            raise ValueError(f"dtype: {dtype} is not a float dtype a checkpoint holds")
        kind = _SAFETENSORS_NAMES[dtype]
        specs = [replace(s, dtype=kind) if s.dtype in _FLOAT_NAMES else s for s in specs]
    paths: list[str] = []
    if biases:
        by_name = {s.name: s for s in specs}
        bias_dtype = dtype or getattr(torch, _FLOAT_NAMES[by_name[next(iter(gathers(meta, plan)))].dtype])
        extra, paths = bias_specs(meta, config, plan, biases, bias_dtype)
        new = {s.name for s in extra}
        specs = [s for s in specs if s.name not in new] + extra
    return Stream(config, meta, specs, side_files(src), paths)


def write_stream(
    stream: Stream, plan: PruningPlan, tmp: Path, *, max_bytes: int, device: torch.device, progress: bool = False
) -> None:
    """Write the checkpoint ``stream`` describes into the new folder ``tmp``: shards, index, side files,
    config.json and plan.json, one tensor at a time (see the module docstring)."""
    shards = shard(stream.specs, max_bytes)
    names = _shard_names(len(shards))
    total = sum(s.nbytes for s in stream.specs)
    # A 70B checkpoint takes minutes to write: a byte count on stderr, unless asked for quiet.
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=not progress, file=sys.stderr)
    with bar, torch.no_grad():
        for name, specs_in in zip(names, shards):
            write_shard(tmp / name, specs_in, device, bar)
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": total},
                "weight_map": {s.name: name for name, group in zip(names, shards) for s in group},
            }
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        for path in stream.sides:
            copy_file(path, tmp / path.name)
        _write_config(tmp, stream.config, stream.meta, plan, stream.specs, stream.biases)
        plan.save(tmp / PLAN_FILE)


def apply_plan(
    plan: PruningPlan | str | os.PathLike,
    model: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = False,
    compensation: str | os.PathLike | None = None,
) -> Path:
    """Compact the dense checkpoint folder ``model`` with ``plan`` into ``out_dir``, tensor by tensor.

    Args:
        plan: a :class:`~nirvana.plan.PruningPlan`, a ``plan.json`` path, or a pruned folder holding one.
        model: a local Hugging Face checkpoint folder with safetensors weights (``model.safetensors``,
            which wins as it does for transformers, or shards and ``model.safetensors.index.json``);
            never modified.
        out_dir: the new checkpoint folder; must not exist unless ``overwrite``, and must not be,
            contain or lie inside ``model`` (compared as real paths). Written to a temporary folder
            beside it and renamed into place (:func:`nirvana.output.staged`).
        max_shard_size: the most bytes per output shard (``"5GB"``, ``"500MiB"``, or an int); a
            tensor larger than that gets a shard of its own.
        device: where to gather (``"cuda"``, ``"cpu"``); None picks the GPU when there is one.
            The output is the same bits either way.
        overwrite: replace an existing ``out_dir`` that nirvana wrote, only once the new one is complete.
        progress: show a bar of the bytes written on stderr.
        compensation: for a plan made with a bias compensation (``--method flap``, ``--compensate bias``),
            the calibration means file (:data:`nirvana.compensation.MEANS_FILE`); None: the one beside the
            plan. Its biases are recomputed from the dense weights, bit for bit what ``nirvana prune`` wrote,
            and the file is copied into ``out_dir``.

    Returns:
        The path of ``out_dir``.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        ValueError: a bad argument or device, a plan made for another geometry or architecture, a
            compensated plan without its means file, or a checkpoint that is not a dense, supported, complete
            safetensors model (a malformed header or index, a missing, extra or misshapen tensor, a
            shard outside the folder, a symbolic link among the side files).
    """
    if not isinstance(model, (str, os.PathLike)) or not str(model):
        raise ValueError(f"model: expected a checkpoint folder, got {model!r}")
    src = real_path(model)
    if not src.is_dir():
        raise ValueError(f"model: {str(model)!r} is not a folder")
    max_bytes = parse_size(max_shard_size)
    dev = _device(device)
    where = plan
    plan = read_plan(plan)
    means = compensation_means(plan, compensation, where)
    out = check_target(out_dir, sources=[src], overwrite=overwrite, name="out_dir")
    biases = None if means is None else _compensated_biases(src, plan, means)
    stream = prepare_stream(src, plan, biases=biases)
    with staged(out, overwrite=overwrite, sources=[src], name="out_dir") as tmp:
        write_stream(stream, plan, tmp, max_bytes=max_bytes, device=dev, progress=progress)
        if means is not None:
            copy_file(means, tmp / MEANS_FILE)
    return out


__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "Gather",
    "Stream",
    "TensorSpec",
    "apply_plan",
    "bias_specs",
    "compensation_means",
    "check_source",
    "copy_file",
    "gathers",
    "meta_model",
    "output_tensor",
    "parse_size",
    "prepare_stream",
    "read_plan",
    "shard",
    "side_files",
    "source_tensors",
    "tensor_specs",
    "write_shard",
    "write_stream",
]
