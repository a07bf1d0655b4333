"""Distributed scoring with FSDP2: ``torchrun --nproc-per-node N -m nirvana prune ... --distributed fsdp``.

What crosses the network, and why that is enough:

1. Each decoder layer is an FSDP2 unit (``fully_shard``); the embeddings, final norm and lm_head form the
   root unit. Every parameter is a DTensor sharded on dim 0: rank ``r`` of ``W`` ranks holds rows
   ``[r * c, min((r + 1) * c, rows))`` with ``c = ceil(rows / W)`` (the last shards may be short or empty).
2. Each rank runs the calibration forward/backward on its own slice of the same calibration windows
   (``torch.tensor_split(windows, W)[r]``, so the union is the single-process set). Every micro-batch's
   objective is divided by the global window count and FSDP's reduce-scatter is set to a plain SUM, so
   each rank's local gradient shard is exactly the single-process full-batch gradient of its rows.
   (This traffic, weight all-gathers and gradient reduce-scatters, is FSDP's own.)
3. Each rank scores its local shards with ``nirvana_kernels.saliency``: per-row sums of ``|W * G|`` for
   q/k/v/gate/up and the q/k/v biases (a row belongs wholly to one rank, so these are final), and
   per-column partial sums over the local rows of o_proj/down_proj (sharded on the hidden dim, so each
   rank holds part of every column). Rows are mapped to their KV group (``row // (G * head_dim)`` for q,
   ``row // head_dim`` for k/v) or MLP channel with the shard's global row offset.
4. One ``all_reduce(SUM)`` of a float32 vector of ``L * (H_kv + I)`` entries (plus the objective's value)
   turns the partial sums into the full scores on every rank: ``4 * (H_kv + I)`` bytes per layer, never a
   weight or a gradient.

The sums run in a different order than on one process, so scores agree to float32 rounding, not bit for
bit. After scoring, the sharded model is dropped; rank 0 reloads the dense model unsharded (on
``--device``, default the CPU, since a model that needs FSDP does not fit one GPU), allocates, compacts
and saves through the ordinary single-process flow with the scores it already has, then broadcasts the
plan; the other ranks wait for that broadcast and exit. This module only scores and shares the plan
(:func:`score_on_ranks`, :func:`share_plan`); :func:`nirvana.pruning.prune` runs the rest, so nothing
here calls back into the flow.
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import nirvana_kernels

from .adapters import architecture_names, get_adapter
from .objective import check_objective, objective_sum
from .plan import Geometry, PruningPlan
from .saliency import as_grad_dtype, check_dense_layers, ones_view
from .scores import Scores, check_finite_scores
from .sources.common import check_micro_batch, progress_bar, scoring_state
from .sources.gradients import check_gradient_windows, prunable_parameters

STRATEGIES = ("fsdp",)
# Saliencies that are a function of the full-batch gradient (or none); "adam" without an optimizer
# needs each single-process micro-batch's own gradient, which a sharded run does not see.
DISTRIBUTED_SALIENCIES = ("taylor", "magnitude", "random")
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
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=SAVE_TIMEOUT)
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return RankInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


# --------------------------------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------------------------------


class _Objective(nn.Module):
    """The FSDP root: its forward is the calibration objective's sum over a batch.

    The objective calls the base model and lm_head directly (see ``objective.objective_sum``); as the
    root's forward, it runs after FSDP has gathered the root unit (embeddings, final norm, lm_head, tied
    or not) and before it reshards it.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, objective: str) -> torch.Tensor:
        return objective_sum(self.lm, input_ids, objective)


def shard_for_scoring(model: nn.Module, device: torch.device | None = None) -> nn.Module:
    """Shard a dense decoder with ``fully_shard``: one unit per decoder layer, the rest in the root.

    The process group must be initialised. ``model`` is sharded in place (its parameters become
    DTensors on ``device``, default this rank's CUDA device or the CPU); the returned root wraps it
    (``.lm``) and is what :func:`fsdp_scores` takes. Gradients are reduce-scattered in float32 as
    plain sums, on every backend (gloo has no pre-multiplied sum).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise ValueError("model: sharding needs an initialised process group (see nirvana.distributed.init)")
    device = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None)
    device = device or torch.device("cpu")
    adapter = get_adapter(model)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    units = getattr(adapter, "decoder_layers", None)
    blocks = list(units(model)) if units is not None else [m for lm in adapter.layers(model) for m in (lm.attn, lm.mlp)]
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    root = fully_shard(_Objective(model), mesh=mesh, mp_policy=policy)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return root


def local_rows(param: torch.Tensor) -> tuple[int, torch.Tensor]:
    """``(first global row, local shard)`` of a dim-0-sharded DTensor; a plain tensor is all local."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return 0, param
    if tuple(param.placements) != (Shard(0),):
        raise ValueError(f"param: placements {param.placements}, expected (Shard(dim=0),) as fully_shard makes")
    mesh = param.device_mesh
    size, rank, rows = mesh.size(), mesh.get_local_rank(), param.shape[0]
    chunk = math.ceil(rows / size)
    start = min(rank * chunk, rows)
    local = param.to_local()
    if local.shape[0] != min(chunk, rows - start):
        raise ValueError(
            f"param: rank {rank} holds {local.shape[0]} rows of {rows}; expected {min(chunk, rows - start)} "
            f"(torch.chunk sharding over {size} ranks)"
        )
    return start, local


# --------------------------------------------------------------------------------------------------
# Local partial sums
# --------------------------------------------------------------------------------------------------


def _row_sums(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """float32 ``sum |w * g|`` per local row (a 1-D bias counts one element per row)."""
    if w.dim() == 1:
        w, g = w.unsqueeze(1), g.unsqueeze(1)
    if w.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float32, device=w.device)
    return nirvana_kernels.saliency(w, g, dim=1)


def _col_sums(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """float32 ``sum |w * g|`` per column over the local rows only: a partial sum."""
    if w.shape[0] == 0:
        return torch.zeros(w.shape[1], dtype=torch.float32, device=w.device)
    return nirvana_kernels.saliency(w, g, dim=0)


def _add_rows(out: torch.Tensor, start: int, sums: torch.Tensor, rows_per_unit: int) -> None:
    units = torch.arange(start, start + sums.shape[0], device=sums.device) // rows_per_unit
    out.index_add_(0, units, sums)


def layer_partial_scores(
    geometry: Geometry,
    attn: Sequence[tuple[int, torch.Tensor, torch.Tensor]],
    mlp: Sequence[tuple[int, torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's partial float32 ``[num_kv_heads]`` and ``[intermediate_size]`` scores from local shards.

    ``attn`` holds ``(first global row, local weight, local grad)`` for q, k, v, o (then the q, k, v
    biases, if any), ``mlp`` for up, down (then gate), in the order of ``sources.gradients.prunable_parameters``;
    each weight and its grad share a dtype. Summed over all ranks the results are the full scores.
    """
    kv, d = geometry.num_kv_heads, geometry.head_dim
    q_rows = geometry.group_size * d
    device = attn[0][1].device
    att = torch.zeros(kv, dtype=torch.float32, device=device)
    for (start, w, g), rows_per_group in zip(attn, (q_rows, d, d, None, q_rows, d, d)):
        if rows_per_group is None:  # o_proj: its columns are the q heads, grouped like q's rows
            att += _col_sums(w, g).view(kv, q_rows).sum(dim=1)
        else:
            _add_rows(att, start, _row_sums(w, g), rows_per_group)
    channels = torch.zeros(geometry.intermediate_size, dtype=torch.float32, device=device)
    for i, (start, w, g) in enumerate(mlp):
        if i == 1:  # down_proj: one column per channel
            channels += _col_sums(w, g)
        else:
            _add_rows(channels, start, _row_sums(w, g), 1)
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
    progress: bool = True,
    seed: int = 0,
) -> Scores:
    """The single-process :func:`nirvana.saliency.compute_scores`, computed by every rank together.

    Collective: every rank calls it with the same arguments (the same full ``windows``; each rank
    keeps its own slice). Every rank returns the same :class:`Scores` (float32, CPU), equal to the
    single-process scores up to float32 rounding. Nothing is left in any ``.grad``.

    Args:
        sharded: what :func:`shard_for_scoring` returned.
        windows: integer ``[N, T]`` token ids, identical on every rank; ``None`` for magnitude/random.
        saliency: ``"taylor"``, ``"magnitude"`` or ``"random"`` (see :data:`DISTRIBUTED_SALIENCIES`).
    """
    check_objective(objective)
    if saliency not in DISTRIBUTED_SALIENCIES:
        raise ValueError(
            f"saliency: must be one of {DISTRIBUTED_SALIENCIES} under --distributed, got {saliency!r} "
            "(Adam scaling needs each micro-batch's own gradient; score it on one process)"
        )
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
        attention = torch.rand(geometry.num_layers, geometry.num_kv_heads, generator=gen)
        mlp = torch.rand(geometry.num_layers, geometry.intermediate_size, generator=gen)
        return Scores(attention, mlp, geometry, dict(meta, seed=seed))

    per_layer = [prunable_parameters(layer) for layer in layers]
    flat = [p for aw, mw in per_layer for p in (*aw, *mw)]
    value, steps = 0.0, 0
    if saliency == "taylor":
        windows = check_gradient_windows(model, windows, objective)
        grads, value, steps = _sharded_gradients(sharded, windows, flat, objective, mbs, progress)
    with torch.no_grad():
        att_rows, mlp_rows, pos = [], [], 0
        for aw, mw in per_layer:
            end = pos + len(aw) + len(mw)
            triples = []
            for i in range(pos, end):
                start, w = local_rows(flat[i].detach())
                g = ones_view(w) if saliency == "magnitude" else grads[i]
                triples.append((start, as_grad_dtype(w, g), g))
            a, m = layer_partial_scores(geometry, triples[: len(aw)], triples[len(aw) :])
            att_rows.append(a)
            mlp_rows.append(m)
            # One layer's float32 gradients and widened weights at a time, as on one process.
            del triples
            if saliency == "taylor":
                grads[pos:end] = [None] * (end - pos)
            pos = end
        L, kv = geometry.num_layers, geometry.num_kv_heads
        total = torch.cat(
            [torch.stack(att_rows).flatten(), torch.stack(mlp_rows).flatten(), att_rows[0].new_tensor([value])]
        )
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        total = total.cpu()
    attention = total[: L * kv].view(L, kv).clone()
    mlp = total[L * kv : -1].view(L, geometry.intermediate_size).clone()
    check_finite_scores(attention, mlp)
    if saliency == "taylor":
        meta.update(
            objective=objective,
            objective_value=float(total[-1]),
            micro_batch_size=mbs,
            micro_batches=steps,
            num_windows=int(windows.shape[0]),
            window_length=int(windows.shape[1]),
        )
    return Scores(attention, mlp, geometry, meta)


def _sharded_gradients(
    sharded: nn.Module,
    windows: torch.Tensor,
    params: list[nn.Parameter],
    objective: str,
    mbs: int,
    progress: bool,
) -> tuple[list[torch.Tensor], float, int]:
    """float32 local gradient shards of the full-batch objective, this rank's objective share, steps run.

    Every rank must run the same number of forward/backward passes (each is a collective); a rank
    whose slice has run out repeats its first window with weight zero.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    n = windows.shape[0]
    mine = torch.tensor_split(windows, world)[rank]
    steps = math.ceil(math.ceil(n / world) / mbs)
    device = local_rows(params[0].detach())[1].device
    sums: list[torch.Tensor | None] = [None] * len(params)
    value = 0.0
    bar = progress_bar(steps, progress and rank == 0)
    with scoring_state(sharded, params):
        for s in range(steps):
            ids = mine[s * mbs : (s + 1) * mbs]
            weight = 1.0 / n
            if ids.shape[0] == 0:
                ids, weight = windows[:1], 0.0
            scaled = sharded(ids.to(device, non_blocking=True), objective) * weight
            value += float(scaled.detach())
            scaled.backward()
            del scaled
            for i, p in enumerate(params):
                # Summed here in float32 rather than in .grad, which keeps the parameter's dtype.
                g = (
                    p.grad.to_local().float()
                    if p.grad is not None
                    else torch.zeros_like(local_rows(p)[1], dtype=torch.float32)
                )
                sums[i] = g if sums[i] is None else sums[i].add_(g)
                p.grad = None
            bar.update(1)
    bar.close()
    return sums, value, steps


# --------------------------------------------------------------------------------------------------
# A prune run's scores, on every rank
# --------------------------------------------------------------------------------------------------


@dataclass
class RankScores:
    """What every rank holds once the calibration sets of a ``--distributed`` run are scored."""

    info: RankInfo
    owned: bool  # this run initialised the process group, so share_plan destroys it
    tokenizer: object
    scores: dict[int, Scores]  # calibration seed -> the full scores (equal on every rank)
    settings: object  # what rank 0 finishes with in one process: the same, placed on --device or the CPU
    report: dict  # the report's "distributed" entry


def score_on_ranks(settings, *, progress: bool = True) -> RankScores:
    """Score every calibration set of ``settings`` (checked :class:`nirvana.pruning.PruneSettings`) on all ranks.

    Each rank loads the model on the CPU, shards it and takes part in :func:`fsdp_scores`; the sharded
    model is dropped before this returns. Initialises the process group when nobody has.
    """
    from .models import load_model

    owned = not dist.is_initialized()
    info = init(settings.device)
    show = progress and info.rank == 0
    timings: dict[str, float] = {}
    start = time.perf_counter()
    dtype = settings.torch_dtype or (torch.bfloat16 if info.device.type == "cuda" else torch.float32)
    # Loaded on the CPU: fully_shard moves each rank's shards to its device, so no GPU ever holds it all.
    model, tokenizer = load_model(settings.model, device="cpu", dtype=dtype)
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(
            f"model: {settings.model!r} is an encoder-decoder; --distributed fsdp scores decoder-only models "
            "(score a T5 in one process)"
        )
    timings["load"] = time.perf_counter() - start
    seeds = [settings.seed + k for k in range(settings.select_calib)]
    start = time.perf_counter()
    # Before sharding: the "self" source samples text from the model.
    windows = {seed: settings.calibration_windows(tokenizer, seed, model) for seed in seeds}
    timings["calibration"] = time.perf_counter() - start
    start = time.perf_counter()
    sharded = shard_for_scoring(model, info.device)
    scores = {
        seed: fsdp_scores(
            sharded,
            windows[seed],
            objective=settings.objective,
            saliency=settings.saliency,
            micro_batch_size=settings.micro_batch_size,
            progress=show,
            seed=seed,
        )  # fmt: skip
        for seed in seeds
    }
    timings["saliency"] = time.perf_counter() - start
    del sharded, model
    gc.collect()
    if info.device.type == "cuda":
        torch.cuda.empty_cache()
    report = {
        "strategy": settings.distributed,
        "world_size": info.world_size,
        "scoring_device": info.device.type,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    single = replace(
        settings,
        device=settings.device if settings.device == "cuda" else "cpu",
        dtype=str(dtype).removeprefix("torch."),
    )
    return RankScores(info, owned, tokenizer, scores, single, report)


def share_plan(run: RankScores, plan: PruningPlan | None) -> tuple[int, PruningPlan]:
    """Rank 0's ``plan`` and its calibration seed, on every rank (the others pass None).

    The broadcast doubles as the barrier: the other ranks wait in it until rank 0 has saved. Destroys
    the process group if :func:`score_on_ranks` initialised it.
    """
    shared = [None] if plan is None else [(plan.meta["calibration_seed"], plan.to_dict())]
    dist.broadcast_object_list(shared, src=0)
    if run.owned:
        dist.destroy_process_group()
    seed, plan_dict = shared[0]
    return seed, plan if plan is not None else PruningPlan.from_dict(plan_dict)


__all__ = [
    "DISTRIBUTED_SALIENCIES",
    "LAUNCH_ENV",
    "STRATEGIES",
    "RankInfo",
    "RankScores",
    "check_launch",
    "fsdp_scores",
    "init",
    "layer_partial_scores",
    "local_rows",
    "score_on_ranks",
    "shard_for_scoring",
    "share_plan",
]
