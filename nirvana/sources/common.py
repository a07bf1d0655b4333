"""What every source shares: checking the windows and micro-batch size, the scoring state, bars, hooks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..adapters import LayerModules, get_adapter
from ..compaction import check_dense
from ..plan import Geometry


def check_windows(model: nn.Module, windows, min_length: int = 1, needs: str = "this source") -> torch.Tensor:
    """``windows`` as int64 token ids; a ValueError unless it is a non-empty integer ``[N, T]`` tensor of
    ids inside the model's vocabulary with ``T >= min_length`` (``needs`` says who asks for that)."""
    if not isinstance(windows, torch.Tensor):
        raise ValueError(f"windows: expected a torch.Tensor of token ids, got {type(windows).__name__}")  # noqa: TRY004
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 1:
        raise ValueError(f"windows: expected a non-empty [N, T] tensor, got shape {tuple(windows.shape)}")
    if windows.dtype.is_floating_point or windows.dtype.is_complex or windows.dtype == torch.bool:
        raise ValueError(f"windows: dtype must be an integer type, got {windows.dtype}")
    if windows.shape[1] < min_length:
        raise ValueError(
            f"windows: {needs} needs T >= {min_length} tokens per window, got shape {tuple(windows.shape)}"
        )
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    lo, hi = int(windows.min()), int(windows.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise ValueError(f"windows: token id {lo if lo < 0 else hi} is outside the vocabulary [0, {vocab})")
    return windows.long()


def check_micro_batch(micro_batch_size) -> int:
    """``micro_batch_size``; a ValueError unless it is a positive integer."""
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size: must be a positive integer, got {micro_batch_size!r}")
    return micro_batch_size


def model_device(model: nn.Module) -> torch.device:
    """The device the model's input embeddings (else its first parameter) live on: where windows go."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


@contextlib.contextmanager
def scoring_state(model: nn.Module, trainable: Sequence[nn.Parameter]) -> Iterator[None]:
    """Only ``trainable`` requires grad, every module is in eval mode; both restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    keep = {id(p) for p in trainable}
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in keep)
        model.eval()
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def dense_layers(model: nn.Module) -> tuple[Geometry, list[LayerModules]]:
    """The dense geometry and the layers; a ValueError if any layer was compacted."""
    adapter = get_adapter(model)
    geometry = check_dense(model, adapter, "scores need the dense model")
    return geometry, adapter.layers(model)


@contextlib.contextmanager
def hooks() -> Iterator[list]:
    """A list to append hook handles to; every one is removed on exit, also after an error."""
    handles: list = []
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


def progress_bar(total: int, enabled: bool, desc: str = "saliency"):
    """A tqdm bar over ``total`` micro-batches, hidden unless ``enabled``."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="micro-batch", disable=not enabled)


__all__ = [
    "check_micro_batch",
    "check_windows",
    "dense_layers",
    "hooks",
    "model_device",
    "progress_bar",
    "scoring_state",
]
