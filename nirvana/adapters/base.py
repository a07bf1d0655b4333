"""What every architecture adapter provides: where the prunable linears live, and the geometry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import nn

from ..plan import Geometry


@dataclass
class LayerModules:
    """The prunable linears of one decoder layer, and the modules that own them."""

    attn: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    mlp: nn.Module
    up: nn.Linear
    down: nn.Linear
    gate: nn.Linear | None = None


class Adapter(ABC):
    """One model family. Subclasses list the architectures (config ``architectures`` names) they serve."""

    architectures: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()

    @abstractmethod
    def geometry(self, config) -> Geometry:
        """The dense geometry read from a (transformers) config."""

    @abstractmethod
    def layers(self, model: nn.Module) -> list[LayerModules]:
        """The prunable modules of every decoder layer, in order."""

    @abstractmethod
    def set_layer_heads(self, layer: LayerModules, num_heads: int, num_kv_heads: int) -> None:
        """Record new head counts on the attention module after its linears were compacted."""
