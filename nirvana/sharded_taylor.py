"""``taylor`` (per-window gradients) on an FSDP2-sharded model: each window's terms on the rank that runs it.

The single-process :func:`nirvana.methods.taylor_scores` adds ``|W * dCE_s/dW|`` window by window into
a float32 copy of the prunable weights, then sums each unit's rows or columns. A sharded step's
gradient is summed over its windows, so the per-window gradient is formed here the same way, from
hooks: a forward hook keeps each prunable linear's input ``X_s`` and a tensor hook on its output gets
``dY_s``, so ``dCE_s/dW = dY_s^T X_s``. Both hooks run while FSDP has the layer unsharded (its forward,
and its backward after FSDP's pre-backward all-gather), so the whole ``W`` is at hand there, and each
window is added on the one rank that runs it. Instead of a full-size accumulator, each rank keeps
only the reductions the scores need: per row (q, k, v, gate, up and the q/k/v biases) or per column
(o, down) sums of ``|W * dCE_s/dW|``, which one ``all_reduce`` then sums over ranks. The sums run in
another order (over the unit's rows first, then over windows), so the scores equal one process's to
float32 rounding, not bit for bit.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .methods.common import (
    base_meta,
    check_micro_batch,
    check_windows,
    dense_layers,
    finish,
    group_attention,
    group_mlp,
    hooks,
    progress_bar,
)
from .saliency import Scores, model_device, prunable_parameters, scoring_state
from .shards import rank_steps


def sharded_taylor_scores(
    sharded: nn.Module, windows: torch.Tensor, *, micro_batch_size: int = 8, progress: bool = True
) -> Scores:
    """:func:`nirvana.methods.taylor_scores` of ``windows``, computed by every rank together.

    Collective: every rank passes the same full ``windows`` (each runs its slices, see
    :func:`nirvana.shards.rank_steps`) and returns the same float32 :class:`Scores` on the CPU.

    Args:
        sharded: what :func:`nirvana.shards.shard_for_scoring` returned.
        windows: integer ``[N, T]`` token ids, ``T >= 2``.
    """
    from torch.distributed.tensor import DTensor

    mbs = check_micro_batch(micro_batch_size)
    model = sharded.lm
    windows = check_windows(model, windows, min_length=2)
    geometry, layers = dense_layers(model)
    device = model_device(model)
    scored = []  # (module, reduced over dim, has a scored bias)
    for lm in layers:
        attn_params, _ = prunable_parameters(lm)
        with_bias = len(attn_params) > 4
        scored += [(lm.q, 1, with_bias), (lm.k, 1, with_bias), (lm.v, 1, with_bias), (lm.o, 0, False)]
        scored += [(m, 0 if m is lm.down else 1, False) for m in (lm.up, lm.down, lm.gate) if m is not None]
    dims = {id(m): dim for m, dim, _ in scored}
    acc = {id(m): torch.zeros(m.weight.shape[1 - dim], dtype=torch.float32, device=device) for m, dim, _ in scored}
    acc_b = {id(m): torch.zeros(m.out_features, dtype=torch.float32, device=device) for m, _, b in scored if b}
    inputs: dict[int, torch.Tensor] = {}
    embedded: list[torch.Tensor] = []
    counting = [True]

    def add_sample_terms(module: nn.Linear, dy: torch.Tensor) -> None:
        x = inputs.pop(id(module))
        if not counting[0]:
            return
        if isinstance(module.weight, DTensor):
            raise ValueError("model: a prunable linear's weight is still sharded in its backward; expected FSDP2")
        w = module.weight.detach().float()
        b = module.bias.detach().float() if id(module) in acc_b else None
        for s in range(dy.shape[0]):
            dy_s = dy[s].reshape(-1, dy.shape[-1]).float()  # [T, out]
            g_s = dy_s.T @ x[s].reshape(-1, x.shape[-1]).float()  # [out, in]: dCE_s/dW
            acc[id(module)] += g_s.mul_(w).abs_().sum(dim=dims[id(module)])
            if b is not None:
                acc_b[id(module)] += (dy_s.sum(dim=0) * b).abs_()

    def keep_input(module, args, output):
        inputs[id(module)] = args[0].detach()
        output.register_hook(lambda dy: add_sample_terms(module, dy))

    def track_embeddings(_module, _args, output):
        output.requires_grad_(True)  # the backward then reaches every linear, but no parameter
        embedded.append(output)
        return output

    rank, world = dist.get_rank(), dist.get_world_size()
    steps = rank_steps(windows.shape[0], world, rank, mbs)
    bar = progress_bar(len(steps), progress and rank == 0, "taylor")
    with scoring_state(sharded, ()), torch.enable_grad(), hooks() as handles:
        handles.append(model.get_input_embeddings().register_forward_hook(track_embeddings))
        handles += [m.register_forward_hook(keep_input) for m, _, _ in scored]
        for start, stop, _ in steps:
            ids, counting[0] = windows[start:stop], stop > start
            if not counting[0]:  # the collectives still run; nothing of it is added
                ids = windows[:1]
            # objective_sum("ce") is the sum over windows of each window's mean CE, as taylor_scores takes it.
            loss = sharded(ids.to(device), "ce")
            torch.autograd.grad(loss, embedded.pop())
            del loss
            if inputs:
                raise ValueError(f"model: {len(inputs)} prunable linears got no gradient from the loss")
            bar.update(1)
    bar.close()

    order = [acc[id(m)] for m, _, _ in scored] + [acc_b[id(m)] for m, _, b in scored if b]
    flat = torch.cat(order)
    dist.all_reduce(flat)
    flat, pos = flat.cpu(), 0
    for t in order:
        t.copy_(flat[pos : pos + t.numel()])
        pos += t.numel()
    att_rows, mlp_rows = [], []
    for lm in layers:
        rows = {n: acc[id(m)].clone() for n, m in (("q", lm.q), ("k", lm.k), ("v", lm.v))}
        for n, m in (("q", lm.q), ("k", lm.k), ("v", lm.v)):
            if id(m) in acc_b:
                rows[n] = rows[n] + acc_b[id(m)]
        att_rows.append(group_attention(geometry, rows["q"], rows["k"], rows["v"], acc[id(lm.o)]))
        gate = acc[id(lm.gate)] if lm.gate is not None else None
        mlp_rows.append(group_mlp(acc[id(lm.up)], acc[id(lm.down)], gate))
    meta = base_meta(model, "taylor") | {
        "objective": "ce",
        "accumulation": "per-sample",
        "micro_batch_size": mbs,
        "num_windows": int(windows.shape[0]),
        "window_length": int(windows.shape[1]),
        "distributed": {"strategy": "fsdp", "world_size": world},
    }
    return finish(att_rows, mlp_rows, geometry, meta)


__all__ = ["sharded_taylor_scores"]
