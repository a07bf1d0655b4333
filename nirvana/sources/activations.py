"""The activation-statistics source, which ``wanda-sp`` and ``flap`` read: running float64 sums of ``x`` and ``x**2``.

The sums are per input channel of each layer's prunable linears, gathered by forward pre-hooks during
plain no-grad forward passes, one micro-batch at a time: no activation outlives its micro-batch. Every
hook is removed and every flag restored afterwards, also on error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..objective import is_encoder_decoder, split_window
from ..plan import Geometry
from .common import check_micro_batch, check_windows, dense_layers, hooks, model_device, progress_bar, scoring_state

# What ActivationStats holds statistics of: the inputs of q/k/v, o_proj, gate/up and down_proj.
INPUTS = ("attn", "o", "mlp", "down")
# An encoder-decoder's too, one row per cross-attention: the inputs of its q (the decoder's hidden state),
# of its k/v (the encoder's output) and of its o.
CROSS_INPUTS = ("cross_q", "cross_kv", "cross_o")
STATS_FORMAT = "nirvana-activation-stats"
STATS_VERSION = 1


@dataclass
class ActivationStats:
    """Per-channel sums over the calibration tokens of the inputs of each layer's prunable linears.

    Attributes:
        geometry: the dense geometry the channels index into.
        tokens: how many token positions were summed (windows times window length); an encoder-decoder's
            encoder positions (each window's first ``T // 2`` tokens, see :func:`nirvana.objective.split_window`).
        sums: for each name in :data:`INPUTS`, float64 ``[num_layers, channels]`` on the CPU: ``sum_t x``.
            Channels are ``hidden_size`` for ``attn`` and ``mlp``, ``num_heads * head_dim`` for ``o``,
            ``intermediate_size`` for ``down``. An encoder-decoder also has :data:`CROSS_INPUTS`,
            ``[cross_attention_layers, channels]`` (``hidden_size`` for ``cross_q`` and ``cross_kv``,
            ``num_heads * head_dim`` for ``cross_o``).
        squares: the same shapes: ``sum_t x**2``.
        decoder_tokens: an encoder-decoder's decoder positions (``T - T // 2`` per window), which its decoder
            layers and the cross-attentions' q/o inputs summed; None for a decoder-only model.
    """

    geometry: Geometry
    tokens: int
    sums: dict[str, torch.Tensor]
    squares: dict[str, torch.Tensor]
    decoder_tokens: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            raise ValueError(f"tokens: must be a positive integer, got {self.tokens!r}")
        cross = bool(self.geometry.cross_attention_layers)
        if cross != (self.decoder_tokens is not None):
            raise ValueError(
                f"decoder_tokens: {self.decoder_tokens!r} does not fit a geometry with "
                f"{self.geometry.cross_attention_layers} cross-attention layers"
            )
        if cross and (
            isinstance(self.decoder_tokens, bool) or not isinstance(self.decoder_tokens, int) or self.decoder_tokens < 1
        ):
            raise ValueError(f"decoder_tokens: must be a positive integer, got {self.decoder_tokens!r}")
        shapes = _stat_shapes(self.geometry)
        for field_name in ("sums", "squares"):
            table = getattr(self, field_name)
            if not isinstance(table, dict) or set(table) != set(shapes):
                got = sorted(table) if isinstance(table, dict) else type(table).__name__
                raise ValueError(f"{field_name}: expected the keys {list(shapes)}, got {got}")
            for name, t in table.items():
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != shapes[name] or t.dtype != torch.float64:
                    desc = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"{field_name}[{name!r}]: expected float64 {shapes[name]}, got {desc}")

    def _tokens(self, name: str):
        """The positions each row of ``name`` summed: ``tokens``, or per row for an encoder-decoder."""
        if self.decoder_tokens is None or name == "cross_kv":
            return self.tokens
        if name in CROSS_INPUTS:
            return self.decoder_tokens
        counts = torch.full((self.geometry.num_layers, 1), float(self.tokens), dtype=torch.float64)
        counts[self.geometry.encoder_layers :] = float(self.decoder_tokens)
        return counts

    def mean(self, name: str) -> torch.Tensor:
        """float64 ``[num_layers, channels]``: each channel's mean over the tokens."""
        return self.sums[_input_name(name)] / self._tokens(name)

    def norm(self, name: str) -> torch.Tensor:
        """float64 ``[num_layers, channels]``: each channel's 2-norm over the tokens."""
        return self.squares[_input_name(name)].sqrt()

    def variance(self, name: str) -> torch.Tensor:
        """float64 ``[num_layers, channels]``: each channel's unbiased variance over the tokens (0 for one token)."""
        n, s, sq = self._tokens(_input_name(name)), self.sums[name], self.squares[name]
        if (n.min() if isinstance(n, torch.Tensor) else n) < 2:
            return torch.zeros_like(s)
        # The float64 sums keep the cancellation error far below any variance that matters for ranking;
        # clamping removes the tiny negative values it can leave for a constant channel.
        return ((sq - s * s / n) / (n - 1)).clamp_min(0.0)


def _input_name(name: str) -> str:
    if name not in INPUTS + CROSS_INPUTS:
        raise ValueError(f"name: must be one of {INPUTS + CROSS_INPUTS}, got {name!r}")
    return name


def _stat_shapes(g: Geometry) -> dict[str, tuple[int, int]]:
    shapes = {
        "attn": (g.num_layers, g.hidden_size),
        "o": (g.num_layers, g.num_heads * g.head_dim),
        "mlp": (g.num_layers, g.hidden_size),
        "down": (g.num_layers, g.intermediate_size),
    }
    if g.cross_attention_layers:
        c = g.cross_attention_layers
        shapes |= {
            "cross_q": (c, g.hidden_size),
            "cross_kv": (c, g.hidden_size),
            "cross_o": (c, g.num_heads * g.head_dim),
        }
    return shapes


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
    if stats.decoder_tokens is not None:
        metadata["decoder_tokens"] = str(stats.decoder_tokens)
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
    geometry = Geometry.from_dict(json.loads(metadata["geometry"]))
    names = list(_stat_shapes(geometry))
    expected = {f"{kind}.{k}" for kind in ("sum", "square") for k in names}
    if set(tensors) != expected:
        raise ValueError(f"path: {str(path)!r} holds tensors {sorted(tensors)}, expected {sorted(expected)}")
    decoder_tokens = metadata.get("decoder_tokens")
    return ActivationStats(
        geometry,
        int(metadata["tokens"]),
        {k: tensors[f"sum.{k}"] for k in names},
        {k: tensors[f"square.{k}"] for k in names},
        None if decoder_tokens is None else int(decoder_tokens),
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
    seq2seq = is_encoder_decoder(model)
    windows = check_windows(model, windows, 2 if seq2seq else 1, "an encoder-decoder")
    geometry, layers = dense_layers(model)
    names = list(_stat_shapes(geometry))
    sums: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    squares: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    seen = [0, 0]  # positions through the first layer, and through the first decoder layer
    first_decoder = geometry.encoder_layers

    def adder(name: str, i: int):
        def hook(_module, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            sums[name][i] += x.sum(dim=0)
            squares[name][i] += x.square().sum(dim=0)
            if name == "attn" and i == 0:
                seen[0] += x.shape[0]
            if seq2seq and name == "attn" and i == first_decoder:
                seen[1] += x.shape[0]

        return hook

    def forward(ids: torch.Tensor) -> None:
        if seq2seq:
            parts = split_window(model, ids)
            del parts["labels"]
            model(**parts, use_cache=False)
        else:
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    def watch(name: str, i: int, module: nn.Linear) -> None:
        zeros = torch.zeros(module.in_features, dtype=torch.float64, device=module.weight.device)
        sums[name].append(zeros)
        squares[name].append(zeros.clone())
        handles.append(module.register_forward_pre_hook(adder(name, i)))

    device = model_device(model)
    starts = range(0, windows.shape[0], mbs)
    bar = progress_bar(len(starts), progress, "activation statistics")
    with scoring_state(model, ()), torch.no_grad(), hooks() as handles:
        for i, lm in enumerate(layers):
            for name, module in (("attn", lm.q), ("o", lm.o), ("mlp", lm.up), ("down", lm.down)):
                watch(name, i, module)
        for j, cross in enumerate(lm.cross for lm in layers if lm.cross is not None):
            for name, module in (("cross_q", cross.q), ("cross_kv", cross.k), ("cross_o", cross.o)):
                watch(name, j, module)
        for s in starts:
            forward(windows[s : s + mbs].to(device))
            bar.update(1)
    bar.close()
    n, t = windows.shape
    expected = (n * (t // 2), n * (t - t // 2)) if seq2seq else (windows.numel(), 0)
    if tuple(seen) != expected:
        raise ValueError(f"model: its first layer saw {seen[0]} tokens of the {expected[0]} given")
    return ActivationStats(
        geometry,
        seen[0],
        {k: torch.stack([t.cpu() for t in v]) for k, v in sums.items()},
        {k: torch.stack([t.cpu() for t in v]) for k, v in squares.items()},
        seen[1] if seq2seq else None,
    )


def merge_statistics(parts) -> ActivationStats:
    """The statistics of several calibration draws' windows pooled, as if gathered in one pass (the sums and
    token counts add). A ValueError, one line, for no parts or parts of different geometries."""
    parts = list(parts)
    if not parts:
        raise ValueError("parts: at least one ActivationStats is needed")
    first = check_stats(parts[0], getattr(parts[0], "geometry", None))
    if len(parts) == 1:
        return first
    for p in parts[1:]:
        check_stats(p, first.geometry)
    decoder = None if first.decoder_tokens is None else sum(p.decoder_tokens for p in parts)
    return ActivationStats(
        first.geometry,
        sum(p.tokens for p in parts),
        {k: sum(p.sums[k] for p in parts) for k in first.sums},
        {k: sum(p.squares[k] for p in parts) for k in first.squares},
        decoder,
    )


def check_stats(stats, geometry: Geometry) -> ActivationStats:
    """``stats``; a ValueError unless it is an :class:`ActivationStats` gathered for ``geometry``."""
    if not isinstance(stats, ActivationStats):
        raise ValueError(f"stats: expected an ActivationStats, got {type(stats).__name__}")
    if stats.geometry != geometry:
        raise ValueError(f"stats: gathered for {stats.geometry}, not this model's {geometry}")
    return stats


__all__ = [
    "CROSS_INPUTS",
    "INPUTS",
    "STATS_FORMAT",
    "STATS_VERSION",
    "ActivationStats",
    "activation_statistics",
    "check_stats",
    "load_statistics",
    "merge_statistics",
    "save_statistics",
]
