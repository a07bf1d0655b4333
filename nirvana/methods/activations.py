"""Activation statistics, the source ``wanda-sp`` and ``flap`` read: running float64 sums of ``x`` and ``x**2``.

The sums are per input channel of each layer's prunable linears, gathered by forward pre-hooks during
plain no-grad forward passes, one micro-batch at a time: no activation outlives its micro-batch. Every
hook is removed and every flag restored afterwards, also on error.
"""

from __future__ import annotations

import abc
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..plan import Geometry
from ..saliency import Scores, model_device, scoring_state
from .base import ACTIVATIONS, Method
from .common import check_micro_batch, check_windows, dense_layers, hooks, progress_bar, with_window_meta
from .reductions import DENSE_WEIGHTS, WeightReductions

# What ActivationStats holds statistics of: the inputs of q/k/v, o_proj, gate/up and down_proj.
INPUTS = ("attn", "o", "mlp", "down")
STATS_FORMAT = "nirvana-activation-stats"
STATS_VERSION = 1


@dataclass
class ActivationStats:
    """Per-channel sums over the calibration tokens of the inputs of each layer's prunable linears.

    Attributes:
        geometry: the dense geometry the channels index into.
        tokens: how many token positions were summed (windows times window length).
        sums: for each name in :data:`INPUTS`, float64 ``[num_layers, channels]`` on the CPU: ``sum_t x``.
            Channels are ``hidden_size`` for ``attn`` and ``mlp``, ``num_heads * head_dim`` for ``o``,
            ``intermediate_size`` for ``down``.
        squares: the same shapes: ``sum_t x**2``.
    """

    geometry: Geometry
    tokens: int
    sums: dict[str, torch.Tensor]
    squares: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            raise ValueError(f"tokens: must be a positive integer, got {self.tokens!r}")
        shapes = _stat_shapes(self.geometry)
        for field_name in ("sums", "squares"):
            table = getattr(self, field_name)
            if not isinstance(table, dict) or set(table) != set(INPUTS):
                got = sorted(table) if isinstance(table, dict) else type(table).__name__
                raise ValueError(f"{field_name}: expected the keys {list(INPUTS)}, got {got}")
            for name, t in table.items():
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != shapes[name] or t.dtype != torch.float64:
                    desc = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"{field_name}[{name!r}]: expected float64 {shapes[name]}, got {desc}")

    def mean(self, name: str) -> torch.Tensor:
        """float64 ``[num_layers, channels]``: each channel's mean over the tokens."""
        return self.sums[_input_name(name)] / self.tokens

    def norm(self, name: str) -> torch.Tensor:
        """float64 ``[num_layers, channels]``: each channel's 2-norm over the tokens."""
        return self.squares[_input_name(name)].sqrt()

    def variance(self, name: str) -> torch.Tensor:
        """float64 ``[num_layers, channels]``: each channel's unbiased variance over the tokens (0 for one token)."""
        n, s, sq = self.tokens, self.sums[_input_name(name)], self.squares[name]
        if n < 2:
            return torch.zeros_like(s)
        # The float64 sums keep the cancellation error far below any variance that matters for ranking;
        # clamping removes the tiny negative values it can leave for a constant channel.
        return ((sq - s * s / n) / (n - 1)).clamp_min(0.0)


def _input_name(name: str) -> str:
    if name not in INPUTS:
        raise ValueError(f"name: must be one of {INPUTS}, got {name!r}")
    return name


def _stat_shapes(g: Geometry) -> dict[str, tuple[int, int]]:
    return {
        "attn": (g.num_layers, g.hidden_size),
        "o": (g.num_layers, g.num_heads * g.head_dim),
        "mlp": (g.num_layers, g.hidden_size),
        "down": (g.num_layers, g.intermediate_size),
    }


def save_statistics(stats: ActivationStats, path: str | Path) -> Path:
    """Write ``stats`` as a safetensors file (tensors ``sum.<name>``/``square.<name>``); returns the path.

    With it, FLAP's compensation can be applied at another sparsity without a second calibration pass.
    """
    from safetensors.torch import save_file

    if not isinstance(stats, ActivationStats):
        raise ValueError(f"stats: expected an ActivationStats, got {type(stats).__name__}")
    tensors = {f"sum.{k}": v.contiguous() for k, v in stats.sums.items()}
    tensors |= {f"square.{k}": v.contiguous() for k, v in stats.squares.items()}
    metadata = {
        "format": STATS_FORMAT,
        "version": str(STATS_VERSION),
        "geometry": json.dumps(stats.geometry.to_dict(), sort_keys=True),
        "tokens": str(stats.tokens),
    }
    save_file(tensors, str(path), metadata=metadata)
    return Path(path)


def load_statistics(path: str | Path) -> ActivationStats:
    """Read what :func:`save_statistics` wrote."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise ValueError(f"path: no statistics file at {str(path)!r}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != STATS_FORMAT or metadata.get("version") != str(STATS_VERSION):
            raise ValueError(f"path: {str(path)!r} is not a version {STATS_VERSION} {STATS_FORMAT} file")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    expected = {f"{kind}.{k}" for kind in ("sum", "square") for k in INPUTS}
    if set(tensors) != expected:
        raise ValueError(f"path: {str(path)!r} holds tensors {sorted(tensors)}, expected {sorted(expected)}")
    return ActivationStats(
        Geometry.from_dict(json.loads(metadata["geometry"])),
        int(metadata["tokens"]),
        {k: tensors[f"sum.{k}"] for k in INPUTS},
        {k: tensors[f"square.{k}"] for k in INPUTS},
    )


def activation_statistics(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    micro_batch_size: int = 8,
    progress: bool = True,
) -> ActivationStats:
    """Per-channel ``sum x`` and ``sum x**2`` of the inputs of every layer's prunable linears.

    Forward pre-hooks on q_proj (whose input k/v share), o_proj, up_proj (shared by gate) and down_proj
    add each micro-batch's ``[B*T, channels]`` input, widened to float64, into running sums on the
    layer's device; nothing else is kept. The forward runs under ``no_grad`` in eval mode and asks for
    the last position's logits only.

    Args:
        windows: integer ``[N, T]`` token ids (any device; moved to the model's).
        micro_batch_size: windows per forward pass.

    Returns:
        :class:`ActivationStats` over ``N * T`` tokens, on the CPU.
    """
    mbs = check_micro_batch(micro_batch_size)
    windows = check_windows(model, windows)
    geometry, layers = dense_layers(model)
    sums: dict[str, list[torch.Tensor]] = {k: [] for k in INPUTS}
    squares: dict[str, list[torch.Tensor]] = {k: [] for k in INPUTS}
    seen = [0]

    def adder(name: str, i: int):
        def hook(_module, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            sums[name][i] += x.sum(dim=0)
            squares[name][i] += x.square().sum(dim=0)
            if name == "attn" and i == 0:
                seen[0] += x.shape[0]

        return hook

    device = model_device(model)
    starts = range(0, windows.shape[0], mbs)
    bar = progress_bar(len(starts), progress, "activation statistics")
    with scoring_state(model, ()), torch.no_grad(), hooks() as handles:
        for i, lm in enumerate(layers):
            for name, module in (("attn", lm.q), ("o", lm.o), ("mlp", lm.up), ("down", lm.down)):
                zeros = torch.zeros(module.in_features, dtype=torch.float64, device=module.weight.device)
                sums[name].append(zeros)
                squares[name].append(zeros.clone())
                handles.append(module.register_forward_pre_hook(adder(name, i)))
        for s in starts:
            model(input_ids=windows[s : s + mbs].to(device), use_cache=False, logits_to_keep=1)
            bar.update(1)
    bar.close()
    if seen[0] != windows.numel():
        raise ValueError(f"model: its first layer saw {seen[0]} tokens of the {windows.numel()} given")
    return ActivationStats(
        geometry,
        seen[0],
        {k: torch.stack([t.cpu() for t in v]) for k, v in sums.items()},
        {k: torch.stack([t.cpu() for t in v]) for k, v in squares.items()},
    )


def check_stats(stats, geometry: Geometry) -> ActivationStats:
    """``stats``; a ValueError unless it is an :class:`ActivationStats` gathered for ``geometry``."""
    if not isinstance(stats, ActivationStats):
        raise ValueError(f"stats: expected an ActivationStats, got {type(stats).__name__}")
    if stats.geometry != geometry:
        raise ValueError(f"stats: gathered for {stats.geometry}, not this model's {geometry}")
    return stats


class FromStatistics(Method):
    """A method that scores from activation statistics: :meth:`from_statistics` is its formula."""

    needs = ACTIVATIONS
    uses_statistics = True

    def statistics(self, model: nn.Module, windows: torch.Tensor, *, micro_batch_size: int, progress: bool):
        """This method's :class:`ActivationStats` of ``windows``."""
        return activation_statistics(model, windows, micro_batch_size=micro_batch_size, progress=progress)

    @abc.abstractmethod
    def from_statistics(self, model: nn.Module, stats, weights: WeightReductions = DENSE_WEIGHTS) -> Scores:
        """The scores from ``stats`` (an :class:`~nirvana.methods.activations.ActivationStats`); ``weights`` reads
        the weights (whole by default; :class:`nirvana.shards.ShardedWeights` on an FSDP2-sharded model)."""

    def scores(self, model, windows, *, micro_batch_size=8, seed=0, progress=True, stats=None, **settings) -> Scores:
        """:meth:`from_statistics`, gathering the statistics first unless ``stats`` holds them."""
        self.check_settings(settings)
        if stats is None:
            stats = self.statistics(model, windows, micro_batch_size=micro_batch_size, progress=progress)
        return with_window_meta(self.from_statistics(model, stats), windows, micro_batch_size)


__all__ = [
    "FromStatistics",
    "INPUTS",
    "STATS_FORMAT",
    "STATS_VERSION",
    "ActivationStats",
    "activation_statistics",
    "check_stats",
    "load_statistics",
    "save_statistics",
]
