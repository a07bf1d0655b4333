"""NIRVANA structured pruning for Hugging Face decoders.

The stages are plain functions over plain data, each in its own module (calibration, saliency,
allocation, selection, compaction, checkpoint, evaluation); ``prune`` runs them all.
"""

from .allocation import allocate
from .checkpoint import load_pruned, save_pruned
from .compaction import compact_model, mask_model
from .plan import Geometry, LayerPlan, PruningPlan
from .pruning import PruneResult, PruneSettings, prune
from .saliency import compute_scores
from .scores import Scores, load_scores, save_scores

__all__ = [
    "Geometry",
    "LayerPlan",
    "PruneResult",
    "PruneSettings",
    "PruningPlan",
    "Scores",
    "allocate",
    "compact_model",
    "compute_scores",
    "load_pruned",
    "load_scores",
    "mask_model",
    "prune",
    "save_pruned",
    "save_scores",
]
