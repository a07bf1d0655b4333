"""The FSDP2 source: a decoder sharded for scoring, each rank's rows and windows, and what is reduced across ranks.

Every parameter of the sharded model is a DTensor sharded on dim 0 (:func:`local_rows`). Every rank
runs the same number of global steps over the calibration windows (:func:`rank_steps`): step ``s``
covers windows ``[s*W*m, (s+1)*W*m)`` of ``W`` ranks with ``m`` windows each, rank ``r`` taking the
``r``-th ``m`` of them, so one global step is exactly one single-process micro-batch of ``W*m``
windows. This module gathers the activation statistics that ``wanda-sp`` and ``flap`` read
(:func:`sharded_statistics`: float64 sums all-reduced) and the weight reductions they apply them to
(:class:`ShardedWeights`: each rank's rows, partial column sums all-reduced). The gradient source,
and the flow that runs a method on these, is :mod:`nirvana.distributed`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..adapters import get_adapter
from ..objective import objective_sum
from .activations import INPUTS, ActivationStats
from .common import check_micro_batch, check_windows, dense_layers, hooks, model_device, progress_bar, scoring_state
from .weights import WeightReductions

# The root's "objective" that returns every position's logits (the KL selection's forward).
LOGITS = "logits"


class _Objective(nn.Module):
    """The FSDP root: its forward is the calibration objective's sum over a batch, or a plain forward.

    The objective calls the base model and lm_head directly (see ``saliency.objective_sum``); as the
    root's forward, it runs after FSDP has gathered the root unit (embeddings, final norm, lm_head, tied
    or not) and before it reshards it.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, objective: str | None) -> torch.Tensor:
        if objective is None:  # what activation statistics read: every layer's inputs, the last logits only
            return self.lm(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits
        if objective == LOGITS:
            return self.lm(input_ids=input_ids, use_cache=False).logits
        return objective_sum(self.lm, input_ids, objective)


def scoring_units(model: nn.Module, adapter=None) -> list[nn.Module]:
    """The modules sharded as units of their own, inside the decoder layers' units: every prunable
    linear, then the input embeddings unless tied to the output head.

    An FSDP2 unit is gathered whole, and gathering briefly holds its all-gather input, output and the
    parameters copied out of it (about 2.5 units on 2 ranks); a decoder layer as the smallest unit
    made that, with the allocator's slack, 3.5 layer-sized buffers per rank on top of the shards. With
    a linear as the unit the peak is a few linears, within the two layers ``docs/scaling.md`` states
    (``benchmarks/distributed_memory.py``). The root keeps the rest: the final norm and the output
    head, which the max-logit objective reads in vocabulary chunks rather than calling it, so it stays
    gathered for the whole step (with a tied embedding, that too).
    """
    adapter = adapter or get_adapter(model)
    units = [m for lm in adapter.layers(model) for m in lm.linears()]
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is not embed.weight:
        units.append(embed)
    return units


def shard_for_scoring(model: nn.Module, device: torch.device | None = None) -> nn.Module:
    """Shard a dense decoder with ``fully_shard``: one unit per decoder layer, the rest in the root.

    The process group must be initialised. ``model`` is sharded in place (its parameters become
    DTensors on ``device``, default this rank's CUDA device or the CPU); the returned root wraps it
    (``.lm``) and is what :func:`nirvana.distributed.fsdp_scores` and :func:`sharded_statistics` take.
    Gradients are reduce-scattered in float32 as plain sums, on every backend (gloo has no
    pre-multiplied sum).
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
    for unit in scoring_units(model, adapter) + blocks:
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
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


def rank_steps(num_windows: int, world: int, rank: int, micro_batch_size: int) -> list[tuple[int, int, int]]:
    """This rank's ``(start, stop, global count)`` for every global step: windows ``[start, stop)``, maybe none.

    Step ``s`` covers windows ``[s*W*m, min((s+1)*W*m, N))``, ``global count`` of them over all ranks;
    rank ``r`` takes the ``r``-th slice of ``m``. Every rank gets the same number of steps, since each
    step's forward (and backward) is a collective; a rank whose slice is empty still has to run it.
    """
    m, span = micro_batch_size, world * micro_batch_size
    out = []
    for block in range(0, num_windows, span):
        start = min(block + rank * m, num_windows)
        out.append((start, min(start + m, num_windows), min(block + span, num_windows) - block))
    return out


class ShardedWeights(WeightReductions):
    """:class:`~nirvana.sources.weights.WeightReductions` of an FSDP2-sharded model; collective.

    Every rank calls each reduction in the same order and gets the whole result. A row lies wholly on
    one rank, so ``|W| @ v`` is computed for the local rows and placed into zeros of the full length
    (adding zeros is exact); the column sums are partial sums over the local rows. One ``all_reduce``
    of an ``[out_features]`` or ``[in_features]`` vector per call; no weight crosses the network.
    """

    def row_abs_dot(self, linear: nn.Linear, v: torch.Tensor) -> torch.Tensor:
        start, w = local_rows(linear.weight.detach())
        out = torch.zeros(linear.out_features, dtype=torch.float32, device=w.device)
        if w.shape[0]:
            out[start : start + w.shape[0]] = w.float().abs() @ v.to(w.device, torch.float32)
        dist.all_reduce(out)
        return out

    def col_abs_sum(self, linear: nn.Linear) -> torch.Tensor:
        _, w = local_rows(linear.weight.detach())
        out = w.float().abs().sum(dim=0)
        dist.all_reduce(out)
        return out

    def col_square_sum(self, linear: nn.Linear) -> torch.Tensor:
        _, w = local_rows(linear.weight.detach())
        out = w.float().square().sum(dim=0, dtype=torch.float64)
        dist.all_reduce(out)
        return out


SHARDED_WEIGHTS = ShardedWeights()


def reduce_rows(grad: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """float32 sum over ranks of a full ``[R, ...]`` gradient, only rows ``[start, start + rows)``.

    The rows are this rank's :func:`local_rows` chunk of ``ceil(R / W)``; ``reduce_scatter_tensor``
    needs ``W`` equal chunks, so a gradient whose row count ``W`` does not divide is padded with zero
    rows first (one extra copy of that one tensor). Collective.
    """
    world = dist.get_world_size()
    g = grad.float()  # the float32 sum the single-process scores take (no copy when already float32)
    if world == 1:
        return g[start : start + rows]
    chunk = math.ceil(grad.shape[0] / world)
    if chunk * world != grad.shape[0]:
        padded = g.new_zeros((chunk * world, *g.shape[1:]))
        padded[: grad.shape[0]] = g
        g = padded
    out = g.new_empty((chunk, *g.shape[1:]))
    dist.reduce_scatter_tensor(out, g, op=dist.ReduceOp.SUM)
    return out[:rows]


@contextlib.contextmanager
def reduced_gradients(sharded: nn.Module, params: list[nn.Parameter], add) -> Iterator[None]:
    """Inside, each backward hands ``add(i, local)`` every ``params[i]``'s float32 local gradient rows,
    summed over ranks, one tensor at a time; FSDP itself reduces nothing and no ``.grad`` is kept.

    FSDP2 would keep a unit's unsharded gradients and its flat reduce-scatter input alive together,
    and hold that input until the next unit's reduce. Here a post-accumulate-grad hook on the
    unsharded parameter (what the module holds while FSDP has its unit gathered) reduce-scatters that
    one gradient as soon as autograd has it and drops it, so at most one full gradient exists at a
    time. Every rank runs the same graph, so the hooks, and their collectives, fire in the same order.
    """
    index = {id(p): i for i, p in enumerate(params)}
    owners = [
        (module, name, index[id(p)])
        for module in sharded.modules()
        for name, p in module.named_parameters(recurse=False)
        if id(p) in index
    ]
    if len(owners) != len(params):
        raise ValueError(f"params: {len(params) - len(owners)} of them are not parameters of the sharded model")
    rows = [local_rows(p.detach()) for p in params]
    hooked: dict[int, tuple[torch.Tensor, object]] = {}  # id(unsharded param) -> (it, its hook's handle)

    def reducer(i: int):
        def hook(unsharded: torch.Tensor) -> None:
            grad, unsharded.grad = unsharded.grad, None
            start, local = rows[i]
            add(i, reduce_rows(grad, start, local.shape[0]))

        return hook

    def attach(module: nn.Module, name: str, i: int):
        def pre_hook(_module, _args) -> None:
            unsharded = getattr(module, name)
            if unsharded.requires_grad and id(unsharded) not in hooked:
                hooked[id(unsharded)] = (unsharded, unsharded.register_post_accumulate_grad_hook(reducer(i)))

        return pre_hook

    with hooks() as handles:
        handles.extend(module.register_forward_pre_hook(attach(module, name, i)) for module, name, i in owners)
        try:
            yield
        finally:
            for _, handle in hooked.values():
                handle.remove()


def sharded_statistics(
    sharded: nn.Module, windows: torch.Tensor, *, micro_batch_size: int = 8, progress: bool = True
) -> ActivationStats:
    """:func:`nirvana.methods.activation_statistics` of ``windows``, gathered by every rank together.

    Collective: every rank passes the same full ``windows`` and keeps its slices (:func:`rank_steps`).
    Forward pre-hooks on q_proj, o_proj, up_proj and down_proj of the sharded model see this rank's
    full activations (FSDP shards weights, not activations) and add them, widened to float64, into
    running sums; one ``all_reduce`` of the float64 sums, squares and token count then gives every
    rank the statistics of all windows, equal to one process's up to float64 summation order.

    Args:
        sharded: what :func:`shard_for_scoring` returned.
        windows: integer ``[N, T]`` token ids (checked like one process's).

    Returns:
        :class:`~nirvana.methods.ActivationStats` on the CPU, the same on every rank.
    """
    mbs = check_micro_batch(micro_batch_size)
    model = sharded.lm
    windows = check_windows(model, windows)
    geometry, layers = dense_layers(model)
    rank, world = dist.get_rank(), dist.get_world_size()
    steps = rank_steps(windows.shape[0], world, rank, mbs)
    device = model_device(model)
    tables: dict[str, list[torch.Tensor]] = {}  # "<input>.<layer>" -> [sum x, sum x**2]
    counting, seen = [True], [0]

    def adder(key: str):
        def hook(_module, args):
            if counting[0]:
                x = args[0].detach()
                x = x.reshape(-1, x.shape[-1]).to(torch.float64)
                tables[key][0].add_(x.sum(dim=0))
                tables[key][1].add_(x.square().sum(dim=0))
                if key == "attn.0":
                    seen[0] += x.shape[0]

        return hook

    bar = progress_bar(len(steps), progress and rank == 0, "activation statistics")
    with scoring_state(sharded, ()), torch.no_grad(), hooks() as handles:
        for i, lm in enumerate(layers):
            for name, module in (("attn", lm.q), ("o", lm.o), ("mlp", lm.up), ("down", lm.down)):
                zeros = torch.zeros(module.in_features, dtype=torch.float64, device=device)
                tables[f"{name}.{i}"] = [zeros, zeros.clone()]
                handles.append(module.register_forward_pre_hook(adder(f"{name}.{i}")))
        for start, stop, _ in steps:
            ids, counting[0] = windows[start:stop], stop > start
            if not counting[0]:  # the collective still runs; nothing of it is counted
                ids = windows[:1]
            sharded(ids.to(device, non_blocking=True), None)
            bar.update(1)
    bar.close()
    names = [f"{name}.{i}" for name in INPUTS for i in range(geometry.num_layers)]
    flat = torch.cat(
        [t for n in names for t in tables[n]] + [torch.tensor([float(seen[0])], dtype=torch.float64, device=device)]
    )
    dist.all_reduce(flat)
    flat = flat.cpu()
    pos, sums, squares = 0, {}, {}
    for name in INPUTS:
        rows_s, rows_q = [], []
        for i in range(geometry.num_layers):
            width = tables[f"{name}.{i}"][0].numel()
            rows_s.append(flat[pos : pos + width])
            rows_q.append(flat[pos + width : pos + 2 * width])
            pos += 2 * width
        sums[name], squares[name] = torch.stack(rows_s), torch.stack(rows_q)
    total = int(flat[-1])
    if total != windows.numel():
        raise ValueError(f"model: its layers saw {total} tokens of the {windows.numel()} given")
    return ActivationStats(geometry, total, sums, squares)


__all__ = [
    "LOGITS",
    "SHARDED_WEIGHTS",
    "ShardedWeights",
    "local_rows",
    "rank_steps",
    "reduce_rows",
    "reduced_gradients",
    "scoring_units",
    "shard_for_scoring",
    "sharded_statistics",
]
