"""Argument checks shared by the kernel modules; every failure is a ValueError naming the argument."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def tensor(name: str, value, *, ndim: int | tuple[int, ...] | None = 2, floating: bool = True) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if dims is not None and value.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name}: expected a {want} tensor, got shape {tuple(value.shape)}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: dtype must be float32, float16 or bfloat16, got {value.dtype}")
    return value


def same(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor, *, dtype: bool = True) -> None:
    """``value`` must match ``ref`` in shape, device and (unless ``dtype=False``) dtype."""
    if value.shape != ref.shape:
        raise ValueError(f"{name}: shape {tuple(value.shape)} does not match {ref_name} {tuple(ref.shape)}")
    if value.device != ref.device:
        raise ValueError(f"{name}: device {value.device} does not match {ref_name} on {ref.device}")
    if dtype and value.dtype != ref.dtype:
        raise ValueError(f"{name}: dtype {value.dtype} does not match {ref_name} {ref.dtype}")


def dim(value) -> int:
    if isinstance(value, bool) or value not in (0, 1):
        raise ValueError(f"dim: must be 0 or 1, got {value!r}")
    return int(value)


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    return value


def divides(name: str, value: int, extent_name: str, extent: int) -> None:
    if extent % value:
        raise ValueError(f"{name}: {value} does not divide {extent_name} = {extent}")


def eps(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"eps: must be a finite number >= 0, got {value!r}")
    return float(value)


def index(
    name: str, value, *, extent: int, extent_name: str, device: torch.device, check_values: bool = True
) -> torch.Tensor:
    """A 1-D int32/int64 index, strictly increasing, inside ``[0, extent)``, moved to ``device``.

    Type, rank and dtype are always checked: they are metadata. The order and range need the values:
    for a CPU index that costs nothing on any device, so it is checked there and then copied over
    without blocking; a CUDA index costs one host synchronisation (an unsorted or repeated index would
    silently duplicate or reorder units in a pruned model, which is worse). ``check_values=False``
    skips the values, for callers that built the index from data they already validated; nothing on
    this path reads a device tensor back, so a launch that follows stays free of syncs.
    """
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor, got shape {tuple(value.shape)}")
    if value.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name}: dtype must be int32 or int64, got {value.dtype}")
    if check_values and value.numel():
        _index_values(name, value, extent, extent_name)
    return to_device(value, device)


def _index_values(name: str, value: torch.Tensor, extent: int, extent_name: str) -> None:
    # One read-back for all three facts (a sync only if value is on a GPU); details only on failure.
    lo, hi, unsorted = torch.stack(
        [value.min().long(), value.max().long(), (value[1:] <= value[:-1]).any().long()]
    ).tolist()
    if lo < 0 or hi >= extent:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name}: value {bad} is out of range for {extent_name} = {extent}")
    if unsorted:
        pos = int((value[1:] <= value[:-1]).nonzero()[0, 0]) + 1
        raise ValueError(
            f"{name}: must be strictly increasing, but {name}[{pos}] = {int(value[pos])} follows {int(value[pos - 1])}"
        )


def to_device(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``value`` on ``device``; a host tensor goes to a GPU through pinned memory, so the copy is
    queued on the stream instead of making the host wait for it."""
    if value.device == device:
        return value
    if value.device.type == "cpu" and device.type == "cuda":
        return value.pin_memory().to(device, non_blocking=True)
    return value.to(device)
