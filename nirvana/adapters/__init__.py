"""Architecture adapters. Adding an architecture means adding one adapter to ``ADAPTERS``."""

from __future__ import annotations

from .base import Adapter, AttentionModules, LayerModules, architecture_names, attention_blocks, text_config
from .llama import LlamaLikeAdapter
from .t5 import T5Adapter

ADAPTERS: tuple[Adapter, ...] = (LlamaLikeAdapter(), T5Adapter())


def get_adapter(model_or_config) -> Adapter:
    """The adapter for a model or its config; a ValueError names an architecture nobody serves."""
    config = getattr(model_or_config, "config", model_or_config)
    names = architecture_names(model_or_config)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if any(n in adapter.architectures for n in names) or model_type in adapter.model_types:
            return adapter
    known = ", ".join(a for ad in ADAPTERS for a in ad.architectures)
    raise ValueError(f"architecture: {'/'.join(names) or model_type!r} is not supported (known: {known})")


__all__ = [
    "ADAPTERS",
    "Adapter",
    "AttentionModules",
    "LayerModules",
    "architecture_names",
    "attention_blocks",
    "get_adapter",
    "text_config",
]
