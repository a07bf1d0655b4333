"""The per-window gradient source: ``sum_s |w * dL_s/dw|``, each window's own gradient taken one at a time.

Methods that need each window's gradient rather than their sum (LLM-Pruner's Taylor term) read this.
The windows of a micro-batch are independent, so the gradient of ``sum_s L_s`` with respect to a
linear's output ``Y = X W^T`` holds each window's own ``dL_s/dY_s``, and ``dL_s/dW = dY_s^T X_s``.
Forward hooks keep each scored linear's input for the micro-batch and a tensor hook on its output
receives ``dY``; ``|W * dL_s/dW|`` is accumulated window by window in float32 and the input is dropped.
The backward runs towards the input embeddings only: no parameter requires grad, so no weight gradient
is ever formed beyond the one window being added. Memory: one float32 copy of the scored weights, plus
the linear inputs of one micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..objective import objective_value
from .common import check_micro_batch, check_windows, hooks, model_device, progress_bar, scoring_state


@dataclass
class PerWindowSums:
    """What :func:`per_window_saliency` returns, keyed by ``id(module)`` of each scored linear.

    Attributes:
        weights: float32: ``sum_s |W * dL_s/dW|`` elementwise, ``[out, in]``; or, for a linear given a
            dimension in ``reduce``, that sum taken over the dimension window by window (``[in]`` for
            0, ``[out]`` for 1).
        biases: float32 ``[out]``: ``sum_s |b * dL_s/db|``, for the linears scored with their bias.
    """

    weights: dict[int, torch.Tensor]
    biases: dict[int, torch.Tensor]


def per_window_saliency(
    model: nn.Module,
    windows,
    scored: Sequence[tuple[nn.Linear, bool]],
    *,
    objective: str = "ce",
    micro_batch_size: int = 8,
    progress: bool = True,
    desc: str = "per-window gradients",
    reduce: dict[int, int] | None = None,
    steps: Sequence[tuple[int, int]] | None = None,
    loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
    root: nn.Module | None = None,
) -> PerWindowSums:
    """``sum_s |w * dL_s/dw|`` over the windows ``s`` for every linear in ``scored``.

    Args:
        windows: integer ``[N, T]`` token ids, ``T >= 2`` (any device; moved to the model's).
        scored: ``(linear, with_bias)`` pairs: the linears whose weights (and bias, if flagged) are scored.
        objective: ``L_s``, window ``s``'s objective (see :func:`nirvana.objective.objective_value`).
        micro_batch_size: windows per forward/backward pass.
        reduce: ``id(linear) -> dim``: keep only the sums over that dimension, added window by window,
            instead of a float32 copy of the weight (how each rank of a sharded run keeps its part).
        steps: the ``(start, stop)`` window ranges of each forward/backward, by default consecutive
            micro-batches. A range with ``start == stop`` still runs (on one window, adding nothing), since
            a sharded forward is a collective every rank must join.
        loss: ``ids -> 0-d tensor`` whose gradient is the sum over the windows of ``L_s``; by default the
            model's own objective. ``root``: the module whose flags are set for scoring (default ``model``).

    The model is left as found: every hook is removed and every flag restored, also on error.
    """
    from torch.distributed.tensor import DTensor

    mbs = check_micro_batch(micro_batch_size)
    windows = check_windows(model, windows, 2, "a per-window gradient")
    reduce = reduce or {}

    def zeros(m: nn.Linear) -> torch.Tensor:
        dim = reduce.get(id(m))
        shape = m.weight.shape if dim is None else (m.weight.shape[1 - dim],)
        return torch.zeros(shape, dtype=torch.float32, device=m.weight.device)

    acc_w = {id(m): zeros(m) for m, _ in scored}
    acc_b = {id(m): torch.zeros(m.out_features, dtype=torch.float32, device=m.weight.device) for m, b in scored if b}
    inputs: dict[int, torch.Tensor] = {}
    embedded: list[torch.Tensor] = []
    counting = [True]

    def add_sample_terms(module: nn.Linear, dy: torch.Tensor) -> None:
        x = inputs.pop(id(module))
        if not counting[0]:
            return
        if isinstance(module.weight, DTensor):
            raise ValueError("model: a scored linear's weight is still sharded in its backward; expected FSDP2")
        w = module.weight.detach().float()
        b = module.bias.detach().float() if id(module) in acc_b else None
        dim = reduce.get(id(module))
        for s in range(dy.shape[0]):
            dy_s = dy[s].reshape(-1, dy.shape[-1]).float()  # [T, out]
            g_s = dy_s.T @ x[s].reshape(-1, x.shape[-1]).float()  # [out, in]: dL_s/dW
            term = g_s.mul_(w).abs_()
            acc_w[id(module)] += term if dim is None else term.sum(dim=dim)
            if b is not None:
                acc_b[id(module)] += (dy_s.sum(dim=0) * b).abs_()

    def keep_input(module, args, output):
        inputs[id(module)] = args[0].detach()
        output.register_hook(lambda dy: add_sample_terms(module, dy))

    def track_embeddings(_module, _args, output):
        output.requires_grad_(True)  # the backward then reaches every linear, but no parameter
        embedded.append(output)
        return output

    def own_objective(ids: torch.Tensor) -> torch.Tensor:
        # objective_value is the mean over windows of each window's objective: times B, the sum.
        return objective_value(model, ids, objective) * ids.shape[0]

    loss = loss or own_objective
    device = model_device(model)
    if steps is None:
        steps = [(s, min(s + mbs, windows.shape[0])) for s in range(0, windows.shape[0], mbs)]
    bar = progress_bar(len(steps), progress, desc)
    with scoring_state(root or model, ()), torch.enable_grad(), hooks() as handles:
        handles += [e.register_forward_hook(track_embeddings) for e in _embedders(model)]
        handles += [m.register_forward_hook(keep_input) for m, _ in scored]
        for start, stop in steps:
            counting[0] = stop > start
            ids = windows[start:stop] if counting[0] else windows[:1]
            value = loss(ids.to(device))
            # Towards every embedding output of this pass: an encoder-decoder embeds twice (encoder and decoder).
            torch.autograd.grad(value, embedded)
            del value
            embedded.clear()
            if inputs:
                raise ValueError(f"model: {len(inputs)} scored linears got no gradient from the objective")
            bar.update(1)
    bar.close()
    return PerWindowSums(acc_w, acc_b)


def _embedders(model: nn.Module) -> list[nn.Module]:
    """The input embedding, and every other embedding module sharing its weight: T5's encoder and decoder
    each embed with their own module (tied to ``shared``, which is never called)."""
    emb = model.get_input_embeddings()
    tied = [m for m in model.modules() if m is not emb and isinstance(m, nn.Embedding) and m.weight is emb.weight]
    return [emb, *tied]


__all__ = ["PerWindowSums", "per_window_saliency"]
