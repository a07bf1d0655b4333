"""Distributed scoring with FSDP2: ``torchrun --nproc-per-node N -m nirvana prune ... --distributed fsdp``.

Every method runs sharded; the source it reads is sharded, not the method (:func:`method_scores_on_ranks`
picks the source by what the method ``needs``). What crosses the network, and why that is enough:

1. Every prunable linear is an FSDP2 unit (``fully_shard``), inside one unit per decoder layer (its
   norms); an untied embedding is a unit, and the final norm and lm_head form the root unit
   (:func:`nirvana.sources.fsdp.scoring_units`). Every parameter is a DTensor sharded on dim 0: rank
   ``r`` of ``W`` ranks holds rows
   ``[r * c, min((r + 1) * c, rows))`` with ``c = ceil(rows / W)`` (the last shards may be short or empty).
   See :mod:`nirvana.sources.fsdp`.
2. The calibration windows run in global steps (``nirvana.sources.fsdp.rank_steps``): step ``s`` covers windows
   ``[s*W*m, (s+1)*W*m)`` (``m = --micro-batch-size``), rank ``r`` takes the ``r``-th ``m`` of them, and
   the union over steps is the single-process set. So one global step is one single-process micro-batch
   of ``W*m`` windows. A rank whose slice is empty still runs the step (each is a collective), with
   weight zero.
3. Gradients (``nirvana``, ``adam``): every step's objective is divided by the global window count and
   each weight's gradient is reduce-scattered as a plain float32 SUM as soon as autograd has it
   (:func:`nirvana.sources.fsdp.reduced_gradients`), so each rank's local gradient shard is exactly the
   gradient of its rows (the traffic: FSDP's weight all-gathers, one reduce-scatter per weight). Each rank
   scores its local shards with ``nirvana_kernels.saliency``: per-row sums of ``|W * G|`` for
   q/k/v/gate/up and the q/k/v biases (a row lies wholly on one rank, so these are final), per-column
   partial sums over the local rows of o_proj/down_proj. Rows are mapped to their KV group or MLP channel
   with the shard's global row offset. One ``all_reduce(SUM)`` of ``L * (H_kv + I)`` float32 values
   (``4 * (H_kv + I)`` bytes per layer, never a weight or a gradient) gives every rank the full scores.
4. Activation statistics (``wanda-sp``, ``flap``): forward pre-hooks on the sharded layers see each
   rank's full activations; the float64 sums of ``x`` and ``x**2`` and the token count are all-reduced
   (``nirvana.sources.fsdp.sharded_statistics``). The methods read the weights only through three reductions
   (``|W| @ v`` per row, ``sum |W|`` and ``sum W**2`` per column), which ``nirvana.sources.fsdp.ShardedWeights``
   computes from the local rows with one all_reduce each. Every rank holds the statistics; FLAP's
   compensation ``b + W[:, R] @ mu[R]`` is computed row-locally on the shards (:func:`flap_biases_on_ranks`).
5. Per-window gradients (``taylor``): :func:`nirvana.methods.taylor.sharded_taylor_scores` forms each
   window's ``dCE_s/dW = dY_s^T X_s`` in hooks that run while FSDP has the layer unsharded, adds its
   per-row / per-column ``|W * dCE_s/dW|`` sums on the rank that ran the window, and all-reduces them once.
6. ``magnitude`` reads the local shards only (``|W * 1|``); ``random`` draws from the seed, as one process.

What equals one process, and what does not:

* ``nirvana`` (``--saliency taylor``, the default, ``magnitude`` or ``random``), the methods ``magnitude``,
  ``random``, ``taylor``, ``wanda-sp`` and ``flap`` (with its compensation biases), and ``--saliency adam``
  with an optimizer's state (Python API: :func:`fsdp_scores` with ``optimizer=``, an Adam/AdamW built
  over the sharded parameters, whose ``exp_avg_sq`` are DTensors sharded like them; each rank reads its
  rows): equal to one process at the same settings up to float32 rounding (``random`` bit for bit).
  None of these depends on the micro-batching, so ``W`` and ``m`` do not matter.
* Micro-batch Adam (``--saliency adam`` without an optimizer): ``V`` is the share-weighted mean of each
  micro-batch's squared gradient, and the micro-batch is the global step. Under ``W`` ranks with
  ``--micro-batch-size m`` it equals one process with ``--micro-batch-size W*m`` (same windows per
  micro-batch, in the same order) up to float32 rounding, and NOT one process with ``m``; the scores'
  ``meta["global_micro_batch_size"]`` records ``W*m``.
* ``taylor`` (per-window) equals one process: each window's gradient is its own on whichever rank ran it.
* Everywhere: sums run in a different order than on one process, so agreement is to float32 rounding.
* ``--select-calib K`` and ``--gamma auto``: every rank allocates each trial's plan from the same
  scores, masks the sharded model with it (:func:`masked_on_ranks`: the pruned rows and columns of
  each local shard zeroed, FLAP's biases added by hooks) and the KL to the dense logits on the
  held-out windows one process draws is summed over ranks (:func:`select_on_ranks`): the same choice.

Loading and writing. No rank ever holds the dense model: each builds it on the meta device, shards it
and reads only its own rows of the safetensors files (:func:`nirvana.rank_load.load_sharded`). After
scoring and selection the sharded model is dropped; rank 0 writes ``plan.json``, ``scores.safetensors``,
``report.json`` and the pruned checkpoint, streamed tensor by tensor from the dense safetensors on disk
by :func:`nirvana.apply.write_stream` (FLAP's biases added to the stream), and broadcasts the plan; the
other ranks wait for that broadcast and exit. The dense model is never reloaded.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import nirvana_kernels

from .adapters import architecture_names, get_adapter
from .methods import get_method
from .methods.base import ACTIVATIONS, GRADIENTS, PER_WINDOW_GRADIENTS, WEIGHTS_ONLY
from .methods.common import with_window_meta
from .methods.taylor import sharded_taylor_scores
from .objective import check_objective
from .plan import Geometry, PruningPlan
from .rank_load import LoadRecord
from .saliency import ADAM_EPS, SALIENCIES, as_grad_dtype, check_dense_layers, ones_view
from .scores import Scores, check_finite_scores
from .sources.common import check_micro_batch, progress_bar, scoring_state
from .sources.fsdp import (
    LOGITS,
    SHARDED_WEIGHTS,
    local_rows,
    rank_steps,
    reduced_gradients,
    shard_for_scoring,
    sharded_statistics,
)
from .sources.gradients import check_gradient_windows, optimizer_second_moments, prunable_parameters

STRATEGIES = ("fsdp",)
# Every saliency: "adam" reads an optimizer's local-shard state, or (micro-batch Adam) each global
# step's gradient, which is one single-process micro-batch of world_size * micro_batch_size windows.
DISTRIBUTED_SALIENCIES = SALIENCIES
# What a method may read under --distributed: the sources this module shards.
DISTRIBUTED_NEEDS = (WEIGHTS_ONLY, ACTIVATIONS, GRADIENTS, PER_WINDOW_GRADIENTS)
# Per-window gradients are formed by each method's own hooks, so each such method has its sharded twin.
PER_WINDOW_SCORERS = {"taylor": sharded_taylor_scores}
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Ranks other than 0 wait in one collective while rank 0 compacts and saves; that can take long for
# a large model, and NCCL's default timeout (10 minutes) would kill them.
SAVE_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the job: ``rank`` of ``world_size``, and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


# --------------------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------------------


def check_launch(strategy, device: str | None = None) -> None:
    """ValueError unless ``strategy`` is known and this process was started by torchrun (or alike)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed: must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    missing = [name for name in LAUNCH_ENV if not os.environ.get(name)]
    if missing and not dist.is_initialized():
        raise ValueError(
            f"distributed: --distributed {strategy} needs a torchrun launch ({', '.join(missing)} not set); "
            "run: torchrun --nproc-per-node N -m nirvana prune ..."
        )
    if device is not None and device.startswith("cuda:"):
        raise ValueError(f"device: {device!r}; under --distributed every rank uses cuda:LOCAL_RANK, pass cuda")


# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_LARGE_ALLOCATION = 1 << 20


def _return_large_frees_to_the_os() -> None:
    """Every host allocation of 1 MiB or more gets its own mapping, unmapped when freed.

    glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB), so the
    gathered layers' and gradients' host buffers below that end up in the heap, and memory freed
    there mostly stays in the process: on the CPU that was 0.6 to 0.9 GB per rank above the buffers
    actually alive, on a 1.5 GB model (``benchmarks/distributed_memory.py``). Fixing the threshold
    keeps a rank's resident memory at what it holds. A no-op where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, _LARGE_ALLOCATION)
    mallopt(_M_TRIM_THRESHOLD, _LARGE_ALLOCATION)


def init(device: str | None = None) -> RankInfo:
    """Join (or reuse) the default process group: NCCL on CUDA, gloo on the CPU.

    ``device``: ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when present). On CUDA each rank computes on
    ``cuda:LOCAL_RANK``.
    """
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if device == "cuda" and not use_cuda:
        raise ValueError("device: 'cuda' asked for, but no CUDA GPU is available")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    _return_large_frees_to_the_os()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=SAVE_TIMEOUT)
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return RankInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


# --------------------------------------------------------------------------------------------------
# Local partial sums
# --------------------------------------------------------------------------------------------------


def _row_sums(w: torch.Tensor, g: torch.Tensor, v: torch.Tensor | None, eps: float) -> torch.Tensor:
    """float32 ``sum |w * g|`` (``/ (sqrt(v) + eps)`` with ``v``) per local row; a 1-D bias is one element a row."""
    if w.dim() == 1:
        w, g = w.unsqueeze(1), g.unsqueeze(1)
        v = None if v is None else v.unsqueeze(1)
    if w.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float32, device=w.device)
    return nirvana_kernels.saliency(w, g, dim=1, exp_avg_sq=v, eps=eps)


def _col_sums(w: torch.Tensor, g: torch.Tensor, v: torch.Tensor | None, eps: float) -> torch.Tensor:
    """float32 ``sum |w * g|`` (``/ (sqrt(v) + eps)`` with ``v``) per column over the local rows only: a partial sum."""
    if w.shape[0] == 0:
        return torch.zeros(w.shape[1], dtype=torch.float32, device=w.device)
    return nirvana_kernels.saliency(w, g, dim=0, exp_avg_sq=v, eps=eps)


def _add_rows(out: torch.Tensor, start: int, sums: torch.Tensor, rows_per_unit: int) -> None:
    units = torch.arange(start, start + sums.shape[0], device=sums.device) // rows_per_unit
    out.index_add_(0, units, sums)


def layer_partial_scores(
    geometry: Geometry,
    attn: Sequence[tuple],
    mlp: Sequence[tuple],
    eps: float = ADAM_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's partial float32 ``[num_kv_heads]`` and ``[intermediate_size]`` scores from local shards.

    ``attn`` holds ``(first global row, local weight, local grad)`` for q, k, v, o (then the q, k, v
    biases, if any), ``mlp`` for up, down (then gate), in the order of ``saliency.prunable_parameters``;
    each weight and its grad share a dtype. A fourth entry, the local second moment ``V`` (Adam), makes
    each term ``|w * g| / (sqrt(V) + eps)``. Summed over all ranks the results are the full scores.
    """
    kv, d = geometry.num_kv_heads, geometry.head_dim
    q_rows = geometry.group_size * d
    device = attn[0][1].device

    def parts(entry):
        start, w, g, *v = entry
        return start, w, g, (v[0] if v else None)

    att = torch.zeros(kv, dtype=torch.float32, device=device)
    for entry, rows_per_group in zip(attn, (q_rows, d, d, None, q_rows, d, d)):
        start, w, g, v = parts(entry)
        if rows_per_group is None:  # o_proj: its columns are the q heads, grouped like q's rows
            att += _col_sums(w, g, v, eps).view(kv, q_rows).sum(dim=1)
        else:
            _add_rows(att, start, _row_sums(w, g, v, eps), rows_per_group)
    channels = torch.zeros(geometry.intermediate_size, dtype=torch.float32, device=device)
    for i, entry in enumerate(mlp):
        start, w, g, v = parts(entry)
        if i == 1:  # down_proj: one column per channel
            channels += _col_sums(w, g, v, eps)
        else:
            _add_rows(channels, start, _row_sums(w, g, v, eps), 1)
    return att, channels


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


def fsdp_scores(
    sharded: nn.Module,
    windows: torch.Tensor | None,
    *,
    objective: str = "maxlogit",
    saliency: str = "taylor",
    micro_batch_size: int = 8,
    optimizer: torch.optim.Optimizer | None = None,
    progress: bool = True,
    seed: int = 0,
) -> Scores:
    """The single-process :func:`nirvana.saliency.compute_scores`, computed by every rank together.

    Collective: every rank calls it with the same arguments (the same full ``windows``; each rank
    keeps its own slices, see :func:`nirvana.sources.fsdp.rank_steps`). Every rank returns the same
    :class:`Scores` (float32, CPU). They equal the single-process scores up to float32 rounding for
    ``taylor``, ``magnitude``, ``random`` and ``adam`` with ``optimizer``; micro-batch ``adam`` (no
    optimizer) equals one process run with ``micro_batch_size * world_size`` (see the module
    docstring). The ``.grad`` of every parameter is as it was before.

    Args:
        sharded: what :func:`nirvana.sources.fsdp.shard_for_scoring` returned.
        windows: integer ``[N, T]`` token ids, identical on every rank; ``None`` for magnitude/random.
        saliency: one of :data:`DISTRIBUTED_SALIENCIES`.
        optimizer: only with ``saliency="adam"``: a torch.optim.Adam/AdamW built over the sharded
            parameters, so its ``exp_avg_sq`` are DTensors sharded like them; each rank reads its rows.
    """
    check_objective(objective)
    if saliency not in DISTRIBUTED_SALIENCIES:
        raise ValueError(f"saliency: must be one of {DISTRIBUTED_SALIENCIES} under --distributed, got {saliency!r}")
    if optimizer is not None and saliency != "adam":
        raise ValueError(f"optimizer: only used with saliency='adam', got saliency={saliency!r}")
    mbs = check_micro_batch(micro_batch_size)
    model = sharded.lm
    adapter = get_adapter(model)
    geometry = adapter.geometry(model.config)
    layers = adapter.layers(model)
    check_dense_layers(layers, geometry)
    names = ", ".join(architecture_names(model))
    dtype = next(model.parameters()).dtype
    world = dist.get_world_size()
    meta: dict = {
        "architecture": names,
        "saliency": saliency,
        "model_dtype": str(dtype).removeprefix("torch."),
        "distributed": {"strategy": "fsdp", "world_size": world},
    }
    if saliency == "random":
        gen = torch.Generator().manual_seed(seed)
        attention = torch.rand(geometry.num_attention_blocks, geometry.num_kv_heads, generator=gen)
        mlp = torch.rand(geometry.num_layers, geometry.intermediate_size, generator=gen)
        return Scores(attention, mlp, geometry, dict(meta, seed=seed))

    per_layer = [prunable_parameters(layer) for layer in layers]
    flat = [p for aw, mw in per_layer for p in (*aw, *mw)]
    value, steps, grads, moments = 0.0, 0, None, None
    eps, scale = ADAM_EPS, 1.0
    if optimizer is not None:
        param_names = {id(p): n for n, p in model.named_parameters()}
        states, eps, scale, info = optimizer_second_moments(optimizer, flat, param_names)
        moments = [local_rows(v.detach())[1] for v in states]
        meta.update(info, second_moment="optimizer")
    elif saliency == "adam":
        meta["second_moment"] = "micro-batch"
    if saliency in ("taylor", "adam"):
        windows = check_gradient_windows(model, windows, objective)
        micro_batch_moments = saliency == "adam" and optimizer is None
        grads, own_moments, value, steps = _sharded_gradients(
            sharded, windows, flat, objective, mbs, progress, micro_batch_moments
        )
        moments = own_moments if micro_batch_moments else moments
    with torch.no_grad():
        att_rows, mlp_rows, pos = [], [], 0
        for aw, mw in per_layer:
            end = pos + len(aw) + len(mw)
            entries = []
            for i in range(pos, end):
                start, w = local_rows(flat[i].detach())
                g = ones_view(w) if grads is None else grads[i]
                entry = (start, as_grad_dtype(w, g), g)
                entries.append(entry if moments is None else (*entry, moments[i]))
            a, m = layer_partial_scores(geometry, entries[: len(aw)], entries[len(aw) :], eps)
            att_rows.append(a)
            mlp_rows.append(m)
            # One layer's float32 gradients and widened weights at a time, as on one process.
            del entries
            for buffers in (grads, moments):
                if buffers is not None:
                    buffers[pos:end] = [None] * (end - pos)
            pos = end
        L, kv = geometry.num_layers, geometry.num_kv_heads
        total = torch.cat(
            [torch.stack(att_rows).flatten(), torch.stack(mlp_rows).flatten(), att_rows[0].new_tensor([value])]
        )
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        total = total.cpu()
    attention = total[: L * kv].view(L, kv).clone()
    mlp = total[L * kv : -1].view(L, geometry.intermediate_size).clone()
    if scale != 1.0:  # the Adam bias correction, applied to the summed scores as one process applies it
        attention, mlp = attention * scale, mlp * scale
    check_finite_scores(attention, mlp)
    if grads is not None:
        meta.update(
            objective=objective,
            objective_value=float(total[-1]),
            micro_batch_size=mbs,
            micro_batches=steps,
            num_windows=int(windows.shape[0]),
            window_length=int(windows.shape[1]),
        )
        # What one process would need as its micro-batch to see the same per-step gradients (micro-batch Adam).
        meta["global_micro_batch_size"] = world * mbs
    if saliency == "adam":
        meta["eps"] = eps / scale
    return Scores(attention, mlp, geometry, meta)


def _sharded_gradients(
    sharded: nn.Module,
    windows: torch.Tensor,
    params: list[nn.Parameter],
    objective: str,
    mbs: int,
    progress: bool,
    second_moment: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, float, int]:
    """float32 local gradient shards of the full-batch objective, their second moments (or None), this
    rank's objective share, and the global steps run.

    Every step's objective is divided by the global window count ``N``, so the reduce-scattered
    gradient of step ``s`` is ``share_s * G_s``, ``G_s`` the gradient of the mean objective over the
    step's windows (all ranks' slices together) and ``share_s`` their fraction of ``N``; with
    ``second_moment`` each rank adds ``(share_s * G_s)**2 / share_s`` to its rows, as one process does
    per micro-batch. The parameters' ``.grad`` are stashed before and put back after.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    n = windows.shape[0]
    steps = rank_steps(n, world, rank, mbs)
    device = local_rows(params[0].detach())[1].device
    sums: list[torch.Tensor | None] = [None] * len(params)
    moments: list[torch.Tensor | None] | None = [None] * len(params) if second_moment else None
    stashed = [p.grad for p in params]
    share = [1.0]

    def add(i: int, g: torch.Tensor) -> None:
        # The step's gradient rows of params[i], summed over ranks (float32), added as they arrive.
        if moments is not None:
            m = g.square().div_(share[0])
            moments[i] = m if moments[i] is None else moments[i].add_(m)
        sums[i] = g if sums[i] is None else sums[i].add_(g)

    value = 0.0
    bar = progress_bar(len(steps), progress and rank == 0)
    try:
        for p in params:
            p.grad = None
        with scoring_state(sharded, params), reduced_gradients(sharded, params, add):
            for start, stop, count in steps:
                ids, weight = windows[start:stop], 1.0 / n
                if ids.shape[0] == 0:  # the collective still runs, with no weight
                    ids, weight = windows[:1], 0.0
                share[0] = count / n
                scaled = sharded(ids.to(device, non_blocking=True), objective) * weight
                value += float(scaled.detach())
                scaled.backward()
                del scaled
                bar.update(1)
        sums = [
            s if s is not None else torch.zeros_like(local_rows(p)[1], dtype=torch.float32)
            for s, p in zip(sums, params)
        ]
    finally:
        for p, g in zip(params, stashed):
            p.grad = g
        bar.close()
    return sums, moments, value, len(steps)


# --------------------------------------------------------------------------------------------------
# A prune run's scores, on every rank
# --------------------------------------------------------------------------------------------------


def check_method(method, saliency: str) -> None:
    """A one-line ValueError unless ``method`` (a name) and ``saliency`` run under ``--distributed``."""
    scorer = get_method(method)
    if scorer.needs not in DISTRIBUTED_NEEDS or (
        scorer.needs == PER_WINDOW_GRADIENTS and scorer.name not in PER_WINDOW_SCORERS
    ):
        raise ValueError(
            f"method: {method!r} is not supported under --distributed: it needs {scorer.needs} and has no "
            "sharded version of its per-window hooks; score it on one process"
        )
    if scorer.compensates and scorer.name not in SHARDED_COMPENSATIONS:
        raise ValueError(
            f"method: {method!r} compensates weights and has no sharded compensation; prune on one process"
        )
    if saliency not in DISTRIBUTED_SALIENCIES:
        raise ValueError(f"saliency: must be one of {', '.join(DISTRIBUTED_SALIENCIES)}, got {saliency!r}")


def method_scores_on_ranks(
    sharded: nn.Module,
    method,
    windows: torch.Tensor | None,
    *,
    micro_batch_size: int,
    seed: int,
    progress: bool,
    **settings,
) -> tuple[Scores, object]:
    """One calibration set's scores by ``method`` (a :class:`nirvana.methods.Method` or name) on the
    sharded model, and its activation statistics (None unless it reads any); collective.

    The sharded source is chosen by what the method ``needs``: weights only and gradients go through
    :func:`fsdp_scores` (with the method's saliency: ``nirvana``'s setting, or the baseline's own),
    activations through :func:`nirvana.sources.fsdp.sharded_statistics` and the method's own formula on
    :data:`nirvana.sources.fsdp.SHARDED_WEIGHTS`, per-window gradients through the method's entry in
    :data:`PER_WINDOW_SCORERS` (``taylor``: :func:`nirvana.methods.taylor.sharded_taylor_scores`).
    ``settings``: the method's :attr:`~Method.settings`.
    """
    scorer = get_method(method) if isinstance(method, str) else method
    scorer.check_settings(settings)
    check_method(scorer.name, settings.get("saliency", "taylor"))
    if scorer.needs == PER_WINDOW_GRADIENTS:
        scores = PER_WINDOW_SCORERS[scorer.name](sharded, windows, micro_batch_size=micro_batch_size, progress=progress)
        return scores, None
    if scorer.needs == ACTIVATIONS:
        stats = sharded_statistics(sharded, windows, micro_batch_size=micro_batch_size, progress=progress)
        scores = with_window_meta(scorer.from_statistics(sharded.lm, stats, SHARDED_WEIGHTS), windows, micro_batch_size)
        scores.meta["distributed"] = {"strategy": "fsdp", "world_size": dist.get_world_size()}
        return scores, stats
    saliency = settings.get("saliency", getattr(scorer, "saliency", "taylor"))
    scores = fsdp_scores(
        sharded,
        windows,
        objective=settings.get("objective", "maxlogit"),
        saliency=saliency,
        micro_batch_size=micro_batch_size,
        progress=progress,
        seed=seed,
    )
    scores.meta["method"] = scorer.name
    return scores, None


@dataclass
class RankScores:
    """What every rank holds once the calibration sets of a ``--distributed`` run are scored."""

    info: RankInfo
    owned: bool  # this run initialised the process group, so share_plan destroys it
    tokenizer: object
    scores: dict[int, Scores]  # calibration seed -> the full scores (equal on every rank)
    settings: object  # the checked PruneSettings, dtype filled in with what the ranks computed in
    report: dict  # the report's "distributed" entry
    # calibration seed -> the method's all-reduced activation statistics (wanda-sp, flap), for its compensation
    stats: dict[int, object] = field(default_factory=dict)
    sharded: nn.Module | None = None  # the FSDP2 root, kept for the KL selection and the compensation
    folder: Path | None = None  # the dense safetensors folder the ranks read from (and rank 0 streams)
    load: LoadRecord | None = None  # what this rank read

    def drop_model(self) -> None:
        """Free the sharded model (every rank's shards)."""
        self.sharded = None
        gc.collect()
        if self.info.device.type == "cuda":
            torch.cuda.empty_cache()


def score_on_ranks(settings, *, progress: bool = True) -> RankScores:
    """Score every calibration set of ``settings`` (checked :class:`nirvana.pruning.PruneSettings`) on all ranks.

    Each rank reads only its own rows of the dense safetensors (:func:`nirvana.rank_load.load_sharded`;
    no rank holds a dense parameter) and takes part in :func:`method_scores_on_ranks`. The sharded
    model stays in the result (``.sharded``) for the KL selection and the compensation; call
    :meth:`RankScores.drop_model` after. Initialises the process group when nobody has.
    """
    from transformers import AutoTokenizer

    from . import rank_load

    folder = rank_load.checkpoint_folder(settings.model)  # a GGUF or hub name fails here, before any collective
    owned = not dist.is_initialized()
    info = init(settings.device)
    show = progress and info.rank == 0
    timings: dict[str, float] = {}
    start = time.perf_counter()
    dtype = settings.torch_dtype or (torch.bfloat16 if info.device.type == "cuda" else torch.float32)
    sharded, record = rank_load.load_sharded(folder, info.device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    timings["load"] = time.perf_counter() - start
    seeds = [seed for group in settings.candidate_seeds() for seed in group]
    start = time.perf_counter()
    windows = {seed: sharded_calibration(sharded, settings, tokenizer, seed) for seed in seeds}
    timings["calibration"] = time.perf_counter() - start
    start = time.perf_counter()
    method = get_method(settings.method)
    options = {name: getattr(settings, name) for name in method.settings}
    scores, stats = {}, {}
    for seed in seeds:
        scores[seed], found = method_scores_on_ranks(
            sharded, method, windows[seed], micro_batch_size=settings.micro_batch_size, seed=seed, progress=show,
            **options,
        )  # fmt: skip
        if found is not None:
            stats[seed] = found
    timings["saliency"] = time.perf_counter() - start
    reads = [None] * info.world_size
    dist.all_gather_object(reads, record.bytes_read)
    report = {
        "strategy": settings.distributed,
        "world_size": info.world_size,
        "scoring_device": info.device.type,
        "loading": "rank-local",
        "bytes_read": reads,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    single = replace(settings, dtype=str(dtype).removeprefix("torch."))
    return RankScores(info, owned, tokenizer, scores, single, report, stats, sharded, folder, record)


def sharded_calibration(sharded: nn.Module, settings, tokenizer, seed: int, heldout: bool = False) -> torch.Tensor:
    """The calibration (or, with ``heldout``, the held-out) windows of ``settings`` drawn with ``seed``; collective
    only for ``--calib self``, which samples from the sharded model (every rank the same sequences)."""
    from .calibration import SELF, heldout_windows

    model = None
    root = None
    if settings.calib == SELF:
        root = sharded
        # A first forward through the root sets FSDP up with the root as root; then the root unit
        # (embeddings, norm, lm_head) is gathered while generate() calls the decoder directly,
        # whose layers gather themselves.
        root(torch.zeros(1, 1, dtype=torch.long, device=model_device_of(sharded)), None)
        root.unshard()
        model = sharded.lm
    try:
        if heldout:
            return heldout_windows(
                settings.calib, tokenizer, num_samples=settings.heldout_samples, seq_len=settings.seq_len,
                seed=settings.seed, model=model,
            )  # fmt: skip
        return settings.calibration_windows(tokenizer, seed, model)
    finally:
        if root is not None:
            root.reshard()


def model_device_of(sharded: nn.Module) -> torch.device:
    """The device this rank's shards live on."""
    return local_rows(next(sharded.parameters()).detach())[1].device


# --------------------------------------------------------------------------------------------------
# After scoring: compensation and KL selection on the sharded model
# --------------------------------------------------------------------------------------------------


def flap_biases_on_ranks(sharded: nn.Module, plan: PruningPlan, stats) -> dict[str, torch.Tensor]:
    """FLAP's compensated o_proj / down_proj biases (float64, CPU, full length) by parameter name; collective.

    :func:`nirvana.methods.flap.apply_flap_compensation`'s ``b + W[:, R] @ mu[R]`` for every layer: a
    bias row lies with its weight row on one rank, so each rank computes its local rows from its
    local shard and the all-reduced means; one ``all_reduce`` of the zero-padded vectors gathers them.
    """
    from .compaction import pruned_indices
    from .methods.flap import compensated_bias
    from .sources.activations import check_stats

    model = sharded.lm
    adapter = get_adapter(model)
    g = adapter.geometry(model.config)
    stats = check_stats(stats, g)
    names = {id(m): name for name, m in model.named_modules()}
    mean_o, mean_down = stats.mean("o"), stats.mean("down")
    parts, keys = [], []
    for i, (lm, lp) in enumerate(zip(adapter.layers(model), plan.layers)):
        for linear, kept, total, width, mean in (
            (lm.o, lp.kv_groups_kept, g.num_kv_heads, g.group_size * g.head_dim, mean_o[i]),
            (lm.down, lp.mlp_channels_kept, g.intermediate_size, 1, mean_down[i]),
        ):
            start, w = local_rows(linear.weight.detach())
            bias = torch.zeros(linear.out_features, dtype=torch.float64)
            b = None if linear.bias is None else local_rows(linear.bias.detach())[1]
            bias[start : start + w.shape[0]] = compensated_bias(w, b, pruned_indices(kept, total, width), mean)
            parts.append(bias)
            keys.append(f"{names[id(linear)]}.bias")
    flat = torch.cat(parts).to(model_device_of(sharded))
    dist.all_reduce(flat)
    flat = flat.cpu()
    out, pos = {}, 0
    for key, part in zip(keys, parts):
        out[key] = flat[pos : pos + part.numel()].clone()
        pos += part.numel()
    return out


# Methods that change weights beyond the plan (``Method.compensates``): their compensation on the shards.
SHARDED_COMPENSATIONS = {"flap": flap_biases_on_ranks}


@contextmanager
def masked_on_ranks(sharded: nn.Module, plan: PruningPlan, biases: dict[str, torch.Tensor] | None = None):
    """The sharded model as :func:`nirvana.compaction.mask_model` of ``plan`` leaves a dense one, inside the block.

    Each rank zeroes its local rows of the pruned q/k/v rows (and biases) and gate/up rows (and
    biases), and the pruned o/down columns of its local rows, keeping the zeroed values to put back
    on leaving (no dense copy: only the pruned slices are kept). ``biases`` (FLAP's, by parameter
    name) are added to the o/down outputs by forward hooks for the block's duration, as a changed
    bias would.
    """
    from .compaction import pruned_indices

    model = sharded.lm
    adapter = get_adapter(model)
    g = plan.geometry
    qd = g.group_size * g.head_dim
    names = {id(m): name for name, m in model.named_modules()}
    saved: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []

    def zero(param, dim: int, rows: torch.Tensor) -> None:
        if param is None or not rows.numel():
            return
        start, local = local_rows(param.data)
        if dim == 0:
            rows = rows[(rows >= start) & (rows < start + local.shape[0])] - start
        if not rows.numel():
            return
        rows = rows.to(local.device)
        saved.append((local, dim, rows, local.index_select(dim, rows).clone()))
        local.index_fill_(dim, rows, 0)

    handles = []
    try:
        with torch.no_grad():
            for lm, lp in zip(adapter.layers(model), plan.layers):
                keep = lp.kv_groups_kept
                q_rows = pruned_indices(keep, g.num_kv_heads, qd, "cpu")
                kv_rows = pruned_indices(keep, g.num_kv_heads, g.head_dim, "cpu")
                for linear, rows in ((lm.q, q_rows), (lm.k, kv_rows), (lm.v, kv_rows)):
                    zero(linear.weight, 0, rows)
                    zero(linear.bias, 0, rows)
                zero(lm.o.weight, 1, q_rows)
                ch = pruned_indices(lp.mlp_channels_kept, g.intermediate_size, 1, "cpu")
                for linear in (lm.gate, lm.up):
                    if linear is not None:
                        zero(linear.weight, 0, ch)
                        zero(linear.bias, 0, ch)
                zero(lm.down.weight, 1, ch)
                for linear in (lm.o, lm.down) if biases else ():
                    new = biases[f"{names[id(linear)]}.bias"]
                    old = torch.zeros_like(new) if linear.bias is None else linear.bias.detach().full_tensor()
                    delta = (new - old.to("cpu", torch.float64)).to(model_device_of(sharded))
                    handles.append(linear.register_forward_hook(lambda _m, _a, y, d=delta: y + d.to(y.dtype)))
        yield sharded
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for local, dim, rows, values in reversed(saved):
                local.index_copy_(dim, rows, values)


def _logit_steps(sharded: nn.Module, windows: torch.Tensor, batch_size: int):
    """This rank's ``(logits or None, ids)`` for every global step over ``windows`` (collective per step)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = model_device_of(sharded)
    for start, stop, _ in rank_steps(windows.shape[0], world, rank, batch_size):
        ids = windows[start:stop] if stop > start else windows[:1]
        logits = sharded(ids.to(device), LOGITS)
        yield (logits if stop > start else None), start


def kl_on_ranks(sharded: nn.Module, dense: list, windows: torch.Tensor, batch_size: int) -> float:
    """Token-mean KL(dense || the sharded model as it is) over ``windows``; collective.

    ``dense``: this rank's dense logits per global step (from :func:`dense_logits_on_ranks`). Each rank
    sums :func:`nirvana.evaluation.kl_sum` over its windows; one all_reduce of (sum, count).
    """
    from .evaluation import kl_sum

    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for (logits, _), ref in zip(_logit_steps(sharded, windows, batch_size), dense):
            if logits is not None:
                part, n = kl_sum(ref, logits)
                total += torch.tensor([part, float(n)], dtype=torch.float64)
    total = total.to(model_device_of(sharded))
    dist.all_reduce(total)
    return float(total[0] / total[1])


def dense_logits_on_ranks(sharded: nn.Module, windows: torch.Tensor, batch_size: int) -> list:
    """This rank's float32 CPU logits per global step over ``windows`` (None for a step it has no window of)."""
    with torch.no_grad():
        return [
            None if logits is None else logits.to("cpu", torch.float32)
            for logits, _ in _logit_steps(sharded, windows, batch_size)
        ]


def select_on_ranks(
    sharded: nn.Module,
    candidates: Sequence,
    heldout: torch.Tensor,
    *,
    sparsity: float,
    gammas: Sequence[float] = (3.0,),
    allocation: str = "global",
    round_to: int = 8,
    architecture: str = "",
    batch_size: int = 8,
    compensation=None,
    stats: dict | None = None,
    progress: bool = False,
    rules=None,
):
    """:func:`nirvana.selection.select` on the sharded model; collective, every rank returns the same choice.

    Every trial's plan is allocated on every rank from the same (all-reduced) scores; its KL is that
    of the sharded model masked with the plan (:func:`masked_on_ranks`, with ``compensation(sharded,
    plan, stats[seed])``'s biases for a method that compensates), so nothing is compacted or reloaded.
    Ties and skipped gammas go as one process has them. ``rules``: the allocation options (see
    :func:`nirvana.selection.select`).
    """
    from .selection import search

    dense = dense_logits_on_ranks(sharded, heldout, batch_size) if candidates and gammas else None

    def kl_of(plan: PruningPlan, cand) -> float:
        biases = None if compensation is None else compensation(sharded, plan, stats[cand.seed])
        with masked_on_ranks(sharded, plan, biases):
            return kl_on_ranks(sharded, dense, heldout, batch_size)

    return search(
        candidates, gammas, kl_of, sparsity=sparsity, allocation=allocation, round_to=round_to,
        architecture=architecture, progress=progress, rules=rules,
    )  # fmt: skip


def share_plan(run: RankScores, plan: PruningPlan | None, *, failed: bool = False) -> tuple[int, PruningPlan]:
    """Rank 0's ``plan`` and its calibration seed, on every rank (the others pass None).

    The broadcast doubles as the barrier: the other ranks wait in it until rank 0 has saved. Rank 0
    passes ``failed=True`` when it could not finish (it then re-raises its own error), so that the
    others raise :class:`RankZeroFailed` at once instead of waiting out the timeout. Destroys the
    process group if :func:`score_on_ranks` initialised it.
    """
    if failed:
        shared = [("failed", None)]
    else:
        shared = [None] if plan is None else [(plan.meta["calibration_seed"], plan.to_dict())]
    dist.broadcast_object_list(shared, src=0)
    if run.owned:
        dist.destroy_process_group()
    seed, plan_dict = shared[0]
    if seed == "failed":
        if failed:
            return -1, plan
        raise RankZeroFailed("distributed: rank 0 failed after scoring (its error is above); nothing was written")
    return seed, plan if plan is not None else PruningPlan.from_dict(plan_dict)


class RankZeroFailed(RuntimeError):
    """Raised on the other ranks when rank 0 could not allocate or write the output."""


__all__ = [
    "DISTRIBUTED_NEEDS",
    "DISTRIBUTED_SALIENCIES",
    "LAUNCH_ENV",
    "PER_WINDOW_SCORERS",
    "SHARDED_COMPENSATIONS",
    "STRATEGIES",
    "RankInfo",
    "RankScores",
    "RankZeroFailed",
    "check_launch",
    "check_method",
    "dense_logits_on_ranks",
    "flap_biases_on_ranks",
    "fsdp_scores",
    "init",
    "kl_on_ranks",
    "layer_partial_scores",
    "local_rows",
    "masked_on_ranks",
    "method_scores_on_ranks",
    "model_device_of",
    "score_on_ranks",
    "select_on_ranks",
    "shard_for_scoring",
    "share_plan",
    "sharded_calibration",
]
