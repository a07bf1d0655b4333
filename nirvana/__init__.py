"""NIRVANA structured pruning for Hugging Face decoders.

The stages are plain functions over plain data, each in its own module (calibration, sources and
methods, allocation, selection, compaction, checkpoint, evaluation); ``prune`` runs them all.

The stable surface for other libraries: :func:`score` (any registered method, ``Scores`` out),
:func:`allocate` (``Scores`` to a ``PruningPlan``), :func:`compact_model` (the plan applied in place)
and :func:`mask_model`, plus the kernel ops in :mod:`nirvana_kernels`.
"""

from .allocation import allocate
from .checkpoint import load_pruned, save_pruned
from .compaction import compact_model, mask_model
from .methods import METHODS, get_method, score
from .plan import Geometry, LayerPlan, PruningPlan
from .pruning import PruneResult, PruneSettings, prune
from .saliency import compute_scores
from .scores import Scores, load_scores, save_scores

__all__ = [
    "METHODS",
    "Geometry",
    "LayerPlan",
    "PruneResult",
    "PruneSettings",
    "PruningPlan",
    "Scores",
    "allocate",
    "compact_model",
    "compute_scores",
    "get_method",
    "load_pruned",
    "load_scores",
    "mask_model",
    "prune",
    "save_pruned",
    "save_scores",
    "score",
]
