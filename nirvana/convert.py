"""``nirvana convert SRC --out DIR``: any model source ``load_model`` takes, written as a safetensors folder.

What ``--distributed fsdp`` needs: each rank reads row ranges of plain safetensors tensors, which a
GGUF file (quantized blocks) or a hub name (nothing local yet) do not offer. The source is loaded
once with :func:`nirvana.models.load_model` (a GGUF file is dequantized as transformers does), and
saved with ``save_pretrained`` (safetensors, sharded at ``max_shard_size``) with its tokenizer, into a
folder staged beside ``out`` and renamed into place (:func:`nirvana.output.staged`).
"""

from __future__ import annotations

import os
from pathlib import Path

from .output import check_target, staged

DEFAULT_MAX_SHARD_SIZE = "5GB"


def convert(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str | None = None,
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> Path:
    """Write ``source`` (a ``.gguf`` file, a hub name, a model folder or ``"smollm2"``) as a safetensors
    folder ``out``; returns its path.

    Args:
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; None keeps float32 (what a GGUF
            dequantizes to on the CPU).
        max_shard_size: the largest safetensors shard, as ``save_pretrained`` takes it.
        overwrite: replace an ``out`` that nirvana wrote, once the new one is complete.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is False.
        ValueError: a bad ``out`` (inside the source, say) or ``dtype``; what ``load_model`` refuses.
    """
    from .models import load_model, looks_like_path

    text = os.fspath(source)
    local = Path(text).expanduser()
    sources = [local] if local.exists() or looks_like_path(text) else []
    target = check_target(out, sources=sources, overwrite=overwrite, name="out")
    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype: must be float32, bfloat16 or float16, got {dtype!r}")
    model, tokenizer = load_model(source, device="cpu", dtype=dtype or "float32")
    with staged(target, overwrite=overwrite, sources=sources, name="out") as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
    return target


__all__ = ["DEFAULT_MAX_SHARD_SIZE", "convert"]
