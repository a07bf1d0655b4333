"""Re-pruning from saved scores: ``nirvana prune MODEL --scores FILE``.

Every pruned folder holds ``scores.safetensors``: one score per KV group and MLP channel of the dense
model. Allocation (sparsity, gamma, allocation, round-to) needs only those, so pruning the same dense
model again at another setting runs no calibration and no forward or backward pass. The dense model is
still loaded, to be compacted. ``--gamma auto`` still picks gamma by held-out KL, which takes forward
passes over the held-out windows of ``--calib``.

Refused, each in one line before the model loads: ``--select-calib K > 1`` (a file holds one set of
scores), ``--method flap`` (its bias compensation needs the calibration set's activation statistics,
which a scores file does not hold), ``--distributed`` (nothing left to distribute), a file that is not a
scores file, and scores made by another method than ``--method``. After the model loads, scores whose
geometry differs from the model's are refused, naming both. With the settings of the original run, the
plan is the original plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .plan import Geometry
from .scores import SCORES_FILE, Scores, load_scores

# Scores written before files recorded their method came from the NIRVANA flow (the baselines always did).
DEFAULT_METHOD = "nirvana"


@dataclass
class SavedScores:
    """A scores file read for re-pruning, with what made it."""

    file: Path
    scores: Scores

    @property
    def method(self) -> str:
        return str(self.scores.meta.get("method", DEFAULT_METHOD))

    @property
    def seed(self) -> int | None:
        """The calibration seed the scores were computed with; None in files that do not record it."""
        seed = self.scores.meta.get("calibration_seed")
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None

    @property
    def calib(self):
        return self.scores.meta.get("calib")

    def report(self) -> dict:
        """What report.json records under ``scores_from``."""
        return {"file": str(self.file), "method": self.method, "calibration_seed": self.seed, "calib": self.calib}


def scores_file(path: str | Path) -> Path:
    """The scores file ``path`` names: the file itself, or a (pruned) folder's :data:`SCORES_FILE`."""
    path = Path(path).expanduser()
    return (path / SCORES_FILE if path.is_dir() else path).resolve()


def read_scores(path: str | Path) -> SavedScores:
    """The scores at ``path``; a one-line ValueError naming the file when it is missing or not a scores file."""
    file = scores_file(path)
    if not file.is_file():
        raise ValueError(f"scores: {str(path)!r} is not a scores file or a folder holding {SCORES_FILE}")
    return SavedScores(file, load_scores(file))


def check_settings(settings) -> None:
    """The cheap checks of ``settings.scores`` (a :class:`nirvana.pruning.PruneSettings`), before any model loads."""
    if settings.select_calib != 1:
        raise ValueError(
            f"select_calib: {settings.select_calib} candidate calibration sets, but --scores holds one set of "
            "scores; drop --select-calib or --scores"
        )
    if settings.draws not in (None, 1):
        raise ValueError(
            f"draws: {settings.draws} calibration draws, but --scores holds scores already made; drop --draws "
            "or --scores"
        )
    if settings.method == "flap":
        raise ValueError(
            "method: 'flap' needs its calibration set's activation statistics for the bias compensation, "
            "which a scores file does not hold; prune without --scores"
        )
    if settings.distributed is not None:
        raise ValueError("distributed: --scores runs no backward pass, so there is nothing to distribute")
    saved = read_scores(settings.scores)
    if saved.method != settings.method:
        raise ValueError(
            f"scores: {str(saved.file)!r} holds {saved.method!r} scores, not {settings.method!r}; "
            f"pass --method {saved.method}"
        )


def describe(g: Geometry) -> str:
    """The shape of a geometry's scores, in words."""
    text = f"attention [{g.num_attention_blocks}, {g.num_kv_heads}] and mlp [{g.num_layers}, {g.intermediate_size}]"
    if g.encoder_layers or g.cross_attention_layers:
        text += f" ({g.encoder_layers} encoder layers, {g.cross_attention_layers} cross-attentions)"
    return text


def load_matching(path: str | Path, geometry: Geometry, method: str) -> SavedScores:
    """:func:`read_scores`, refusing scores made for another geometry or by another method than ``method``."""
    saved = read_scores(path)
    theirs = saved.scores.geometry
    if theirs != geometry:
        text = f"scores: {str(saved.file)!r} holds {describe(theirs)}, the model needs {describe(geometry)}"
        if describe(theirs) == describe(geometry):
            a, b = theirs.to_dict(), geometry.to_dict()
            text += " (" + ", ".join(f"{k} {a.get(k)} vs {b.get(k)}" for k in sorted(a | b) if a.get(k) != b.get(k))
            text += ")"
        raise ValueError(text + "; these scores were computed for another model")
    if saved.method != method:
        raise ValueError(f"scores: {str(saved.file)!r} holds {saved.method!r} scores, not {method!r}")
    return saved


__all__ = ["SavedScores", "check_settings", "describe", "load_matching", "read_scores", "scores_file"]
