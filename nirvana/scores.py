"""Scores, the plain data every scorer produces, and its file format (``scores.safetensors``).

A :class:`Scores` holds one float32 score per KV group (``[num_attention_blocks, num_kv_heads]``) and
per MLP channel (``[num_layers, intermediate_size]``) of a dense model, higher meaning more important,
with the geometry they index into and what made them (``meta``). Saved beside a pruned checkpoint, they
let ``nirvana prune --scores`` re-plan at another sparsity without a second calibration pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .plan import Geometry
from .tensorfile import read_header

SCORES_FILE = "scores.safetensors"
SCORES_FORMAT = "nirvana-scores"
SCORES_VERSION = 1


@dataclass
class Scores:
    """Per-unit saliency of a dense model.

    Attributes:
        attention: float32 ``[num_attention_blocks, num_kv_heads]`` on the CPU, one score per KV group
            (``num_attention_blocks`` is ``num_layers`` but for encoder-decoders, see ``Geometry``).
        mlp: float32 ``[num_layers, intermediate_size]`` on the CPU, one score per MLP channel.
        geometry: the dense geometry the scores index into.
        meta: JSON-serialisable settings: objective, saliency, micro_batch_size, num_windows, ...
    """

    attention: torch.Tensor
    mlp: torch.Tensor
    geometry: Geometry
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        g = self.geometry
        for name, t, shape in (
            ("attention", self.attention, (g.num_attention_blocks, g.num_kv_heads)),
            ("mlp", self.mlp, (g.num_layers, g.intermediate_size)),
        ):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")  # noqa: TRY004
            if tuple(t.shape) != shape:
                raise ValueError(f"{name}: shape {tuple(t.shape)} does not match the geometry's {shape}")
            if t.dtype != torch.float32:
                raise ValueError(f"{name}: dtype must be float32, got {t.dtype}")


def stack_scores(att_rows, mlp_rows, geometry: Geometry, meta: dict, *, inputs: str = "weights or gradients") -> Scores:
    """Per-block score rows (any float dtype, any device) stacked into float32 :class:`Scores` on the CPU.

    Rows come one by one because each block is scored where it lives (under a device_map, on its own
    GPU). A ValueError names the first layer with a NaN or infinite score, blaming ``inputs``.
    """
    attention = torch.stack([r.detach().cpu() for r in att_rows]).to(torch.float32)
    mlp = torch.stack([r.detach().cpu() for r in mlp_rows]).to(torch.float32)
    check_finite_scores(attention, mlp, inputs=inputs)
    return Scores(attention, mlp, geometry, meta)


def mean_scores(draws) -> Scores:
    """The mean of several :class:`Scores` of one geometry (e.g. of K calibration draws), as one ``Scores``.

    Each unit's score is averaged over the draws, every draw weighted alike (this is not the score of the
    pooled gradient: ``|W * G|`` is not linear in ``G``). Averaged in float64, returned float32 on the CPU. ``meta`` is
    the first draw's, with ``draws`` (how many) and ``calibration_seeds`` (each draw's seed, where recorded).
    A one-line ValueError for no draws, a non-Scores, or a geometry that differs from the first's.
    """
    draws = list(draws)
    if not draws:
        raise ValueError("draws: at least one Scores is needed")
    for i, d in enumerate(draws):
        if not isinstance(d, Scores):
            raise ValueError(f"draws[{i}]: expected a Scores, got {type(d).__name__}")  # noqa: TRY004
        if d.geometry != draws[0].geometry:
            raise ValueError(f"draws[{i}]: its geometry differs from draws[0]'s; scores of one model only")
    attention = torch.stack([d.attention.to(torch.float64) for d in draws]).mean(dim=0)
    mlp = torch.stack([d.mlp.to(torch.float64) for d in draws]).mean(dim=0)
    meta = dict(draws[0].meta, draws=len(draws))
    meta["calibration_seeds"] = [d.meta.get("calibration_seed") for d in draws]
    return Scores(attention.to(torch.float32), mlp.to(torch.float32), draws[0].geometry, meta)


def check_finite_scores(attention: torch.Tensor, mlp: torch.Tensor, *, inputs: str = "weights or gradients") -> None:
    """A ValueError naming the first layer with a NaN or infinite attention or MLP score."""
    for name, t in (("attention", attention), ("mlp", mlp)):
        bad = (~torch.isfinite(t)).any(dim=1)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"scores: layer {i} has non-finite {name} scores (NaN or inf in its {inputs})")


def scores_path(path: str | Path) -> Path:
    """``path`` itself, or the :data:`SCORES_FILE` inside it when it is a folder."""
    path = Path(path)
    return path / SCORES_FILE if path.is_dir() else path


def save_scores(scores: Scores, path: str | Path) -> Path:
    """Write ``scores.safetensors``: the two tensors, with format, geometry and meta as JSON metadata.

    ``path`` is the file, or an existing directory to write :data:`SCORES_FILE` into. Returns the file.
    """
    from safetensors.torch import save_file

    if not isinstance(scores, Scores):
        raise ValueError(f"scores: expected a Scores, got {type(scores).__name__}")  # noqa: TRY004
    file = scores_path(path)
    try:
        meta = json.dumps(scores.meta, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"scores.meta: must be JSON-serialisable ({e})") from None
    metadata = {
        "format": SCORES_FORMAT,
        "version": str(SCORES_VERSION),
        "geometry": json.dumps(scores.geometry.to_dict(), sort_keys=True),
        "meta": meta,
    }
    tensors = {"attention": scores.attention.detach().cpu().contiguous(), "mlp": scores.mlp.detach().cpu().contiguous()}
    save_file(tensors, str(file), metadata=metadata)
    return file


def load_scores(path: str | Path) -> Scores:
    """Read what :func:`save_scores` wrote (a file, or a directory holding :data:`SCORES_FILE`).

    Anything else (not safetensors, another tool's tensors, a broken metadata block, wrong shapes or
    dtypes) is a one-line ValueError that names the file.
    """
    from safetensors import SafetensorError, safe_open

    file = scores_path(path)
    if not file.is_file():
        raise ValueError(f"path: no scores file at {str(file)!r}")
    read_header(file, label="path")  # a tampered header is named here, before the library parses it
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != SCORES_FORMAT:
                raise ValueError(
                    f"path: {str(file)!r} is not a nirvana scores file (format {metadata.get('format')!r})"
                )
            if metadata.get("version") != str(SCORES_VERSION):
                raise ValueError(f"path: scores version {metadata.get('version')!r}, expected {SCORES_VERSION}")
            keys = set(f.keys())
            if keys != {"attention", "mlp"}:
                raise ValueError(f"path: {str(file)!r} holds tensors {sorted(keys)}, expected ['attention', 'mlp']")
            attention, mlp = f.get_tensor("attention"), f.get_tensor("mlp")
    except (SafetensorError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"path: {str(file)!r} is not a readable safetensors file ({reason})") from None
    try:
        geometry = Geometry.from_dict(json.loads(metadata["geometry"]))
        meta = json.loads(metadata["meta"])
        if not isinstance(meta, dict):
            raise TypeError(f"meta is a {type(meta).__name__}, not an object")
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"path: {str(file)!r} has a broken metadata block ({type(e).__name__}: {e})") from None
    try:
        return Scores(attention, mlp, geometry, meta)
    except ValueError as e:
        raise ValueError(f"path: {str(file)!r}: {e}") from None


__all__ = [
    "SCORES_FILE",
    "SCORES_FORMAT",
    "SCORES_VERSION",
    "Scores",
    "check_finite_scores",
    "load_scores",
    "mean_scores",
    "save_scores",
    "scores_path",
    "stack_scores",
]
