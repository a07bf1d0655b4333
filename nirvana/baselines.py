"""Compatibility: the scoring methods moved to :mod:`nirvana.methods`, one small module per method.

Everything this module offered is re-exported from there unchanged.
"""

from __future__ import annotations

from .methods import (
    DATA_FREE,
    INPUTS,
    METHODS,
    NEEDS_ACTIVATIONS,
    ActivationStats,
    activation_statistics,
    apply_flap_compensation,
    flap_scores,
    load_statistics,
    method_scores,
    save_statistics,
    standardize_per_layer,
    stock_bias_flags,
    taylor_scores,
    wanda_sp_scores,
)
from .sources.activations import STATS_FORMAT, STATS_VERSION

__all__ = [
    "DATA_FREE",
    "INPUTS",
    "METHODS",
    "NEEDS_ACTIVATIONS",
    "STATS_FORMAT",
    "STATS_VERSION",
    "ActivationStats",
    "activation_statistics",
    "apply_flap_compensation",
    "flap_scores",
    "load_statistics",
    "method_scores",
    "save_statistics",
    "standardize_per_layer",
    "stock_bias_flags",
    "taylor_scores",
    "wanda_sp_scores",
]
