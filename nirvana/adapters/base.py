"""What every architecture adapter provides: where the prunable linears live, and the geometry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import nn

from ..plan import Geometry


@dataclass
class AttentionModules:
    """One attention block's projections and the module that owns them."""

    attn: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear


@dataclass
class LayerModules:
    """The prunable linears of one layer, and the modules that own them.

    ``attn``/``q``/``k``/``v``/``o`` are the self-attention (so a LayerModules is also an attention
    block, duck-typed like :class:`AttentionModules`); ``cross`` is an encoder-decoder's cross-attention.
    """

    attn: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    mlp: nn.Module
    up: nn.Linear
    down: nn.Linear
    gate: nn.Linear | None = None
    cross: AttentionModules | None = None

    def linears(self) -> list[nn.Linear]:
        """Every prunable linear of the layer: q, k, v, o, (the cross-attention's q, k, v, o), (gate), up, down."""
        cross = [] if self.cross is None else [self.cross.q, self.cross.k, self.cross.v, self.cross.o]
        gate = [] if self.gate is None else [self.gate]
        return [self.q, self.k, self.v, self.o, *cross, *gate, self.up, self.down]


def text_config(config):
    """The config that holds the decoder's sizes (a multimodal wrapper, e.g. Gemma 3, keeps them in ``text_config``)."""
    return getattr(config, "text_config", None) or config


def architecture_names(model_or_config) -> list[str]:
    """The config's ``architectures`` names, or the object's class name when the config lists none."""
    config = getattr(model_or_config, "config", model_or_config)
    return list(getattr(config, "architectures", None) or []) or [type(model_or_config).__name__]


def attention_blocks(layers: list[LayerModules]) -> list:
    """The attention blocks in the order of the attention score rows: every layer's self-attention
    (the LayerModules itself), then every cross-attention (see :class:`nirvana.plan.Geometry`)."""
    return [*layers, *(lm.cross for lm in layers if lm.cross is not None)]


class Adapter(ABC):
    """One model family. Subclasses list the architectures (config ``architectures`` names) they serve."""

    architectures: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()

    @abstractmethod
    def geometry(self, config) -> Geometry:
        """The dense geometry read from a (transformers) config."""

    @abstractmethod
    def layers(self, model: nn.Module) -> list[LayerModules]:
        """The prunable modules of every layer, in order (an encoder-decoder's encoder layers first)."""

    @abstractmethod
    def set_layer_heads(self, layer: LayerModules, num_heads: int, num_kv_heads: int) -> None:
        """Record new head counts on the attention module after its linears were compacted."""

    def set_kept_groups(self, attention, kept: list[int], geometry: Geometry) -> None:
        """After compaction: the attention block (a LayerModules or AttentionModules) now holds the dense
        KV groups ``kept``. By default only the head counts matter."""
        self.set_layer_heads(attention, len(kept) * geometry.group_size, len(kept))

    def kept_heads(self, attention) -> list[int] | None:
        """The dense query heads an attention block holds, for architectures whose layers need to know
        (T5 slices its shared position bias with them); None where only the counts matter."""
        return None

    def uniform_sizes(self, config, widths: dict, head_dim: int) -> dict | None:
        """Config values that make a stock config describe layers that all have ``widths``; None if none can."""
        return {
            "num_attention_heads": widths["num_heads"],
            "num_key_value_heads": widths["num_kv_heads"],
            "intermediate_size": widths["intermediate_size"],
            "head_dim": head_dim,
        }
