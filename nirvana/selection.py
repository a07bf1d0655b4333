"""KL selection: among candidate calibration sets (and gammas), keep the one whose pruned model is
closest to the dense model on held-out text.

Every candidate is pruned from the same in-memory dense model and compared against the dense logits,
computed once. The pruned candidates share the dense model's unpruned tensors (embeddings, norms,
lm_head) instead of copying them, so a candidate costs only its own compacted linears.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import allocate
from .compaction import compact_model
from .evaluation import kl_to_model, window_logits
from .plan import PruningPlan
from .scores import Scores

# gamma="auto" tries these; 3.0 is the value the authors ship for Llama-3.2-3B.
GAMMA_GRID = (1.0, 2.0, 3.0, 4.0, 6.0)


@dataclass
class Candidate:
    """One calibration set's scores, with the seed it was drawn with."""

    seed: int
    scores: Scores


@dataclass
class Selection:
    """The chosen (candidate, gamma), its plan, and every trial's KL for the report."""

    seed: int
    gamma: float
    plan: PruningPlan
    kl: float
    trials: list[dict] = field(default_factory=list)


def pruned_copy(model: nn.Module, plan: PruningPlan, prepare: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """A compacted copy of ``model`` that shares every tensor the plan does not change.

    ``prepare`` runs on the dense copy just before compaction (FLAP's bias compensation); it must
    replace Parameters rather than write into them, since they are shared with ``model``.
    """
    # deepcopy with the parameters and buffers pre-seeded in the memo copies the module tree and the
    # config but no tensor data; compact_model then swaps in new Parameters on the copy only.
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    dense_copy = copy.deepcopy(model, memo)
    if prepare is not None:
        prepare(dense_copy)
    return compact_model(dense_copy, plan)


def select(
    model: nn.Module,
    candidates: Sequence[Candidate],
    heldout: torch.Tensor,
    *,
    sparsity: float,
    gammas: Sequence[float] = (3.0,),
    allocation: str = "global",
    round_to: int = 8,
    architecture: str = "",
    batch_size: int = 8,
    prepare: Callable[[nn.Module, PruningPlan, Candidate], None] | None = None,
    progress: bool = False,
    rules: Mapping | None = None,
) -> Selection:
    """Try every candidate at every gamma; return the lowest token-mean KL(dense || pruned) on ``heldout``.

    Gammas that cannot reach ``sparsity`` (the MLP share would exceed 100%) are skipped and reported.
    Ties go to the earlier candidate and gamma, so the result is deterministic. ``prepare(model, plan,
    candidate)`` runs on each dense copy before compaction (see :func:`pruned_copy`). ``progress`` shows a
    bar over the (candidate, gamma) trials on stderr. ``rules``: :func:`~nirvana.allocation.allocate`'s
    ``protect_layers``, ``min_kv_groups`` and ``normalize``, by name (none given: the defaults).
    """
    dense_logits = window_logits(model, heldout, batch_size=batch_size) if candidates and gammas else None

    def kl_of(plan: PruningPlan, cand: Candidate) -> float:
        hook = None if prepare is None else (lambda m: prepare(m, plan, cand))
        return kl_to_model(dense_logits, pruned_copy(model, plan, hook), heldout, batch_size=batch_size)

    return search(
        candidates, gammas, kl_of, sparsity=sparsity, allocation=allocation, round_to=round_to,
        architecture=architecture, progress=progress, rules=rules,
    )  # fmt: skip


def search(
    candidates: Sequence[Candidate],
    gammas: Sequence[float],
    kl_of: Callable[[PruningPlan, Candidate], float],
    *,
    sparsity: float,
    allocation: str = "global",
    round_to: int = 8,
    architecture: str = "",
    progress: bool = False,
    rules: Mapping | None = None,
) -> Selection:
    """The trial loop of :func:`select`, whatever measures a plan's KL: ``kl_of(plan, candidate)``.

    Every (candidate, gamma) pair is allocated and measured; a gamma that cannot reach ``sparsity`` is
    skipped and reported (raised when it is the only one). Ties go to the earlier candidate and gamma.
    One process measures a compacted copy (:func:`select`); ``--distributed`` masks the shards.
    """
    if not candidates:
        raise ValueError("candidates: at least one calibration set is needed")
    if not gammas:
        raise ValueError("gammas: at least one gamma is needed")
    best: Selection | None = None
    trials: list[dict] = []
    pairs = itertools.product(candidates, gammas)
    bar = tqdm(pairs, total=len(candidates) * len(gammas), desc="KL selection", unit="trial", disable=not progress)
    for cand, gamma in bar:
        try:
            plan = allocate(
                cand.scores.attention,
                cand.scores.mlp,
                cand.scores.geometry,
                sparsity=sparsity,
                gamma=gamma,
                allocation=allocation,
                round_to=round_to,
                architecture=architecture,
                **(rules or {}),
            )
        except ValueError as e:
            if len(gammas) == 1:
                raise
            trials.append({"seed": cand.seed, "gamma": gamma, "kl": None, "skipped": str(e)})
            continue
        kl = kl_of(plan, cand)
        trials.append({"seed": cand.seed, "gamma": gamma, "kl": kl, "achieved": plan.achieved_sparsity()})
        if best is None or kl < best.kl:
            best = Selection(cand.seed, gamma, plan, kl)
    bar.close()
    if best is None:
        raise ValueError(f"gamma: none of {list(gammas)} can reach sparsity {sparsity}")
    if not math.isfinite(best.kl):
        raise ValueError(f"kl: the best candidate's KL is {best.kl}; the scores or the model are broken")
    best.trials = trials
    return best
