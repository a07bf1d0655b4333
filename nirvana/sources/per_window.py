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

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..objective import objective_value
from .common import check_micro_batch, check_windows, hooks, model_device, progress_bar, scoring_state


@dataclass
class PerWindowSums:
    """What :func:`per_window_saliency` returns, keyed by ``id(module)`` of each scored linear.

    Attributes:
        weights: float32 ``[out, in]``: ``sum_s |W * dL_s/dW|`` elementwise.
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
) -> PerWindowSums:
    """Elementwise ``sum_s |w * dL_s/dw|`` over the windows ``s`` for every linear in ``scored``.

    Args:
        windows: integer ``[N, T]`` token ids, ``T >= 2`` (any device; moved to the model's).
        scored: ``(linear, with_bias)`` pairs: the linears whose weights (and bias, if flagged) are scored.
        objective: ``L_s``, window ``s``'s objective (see :func:`nirvana.objective.objective_value`).
        micro_batch_size: windows per forward/backward pass.

    The model is left as found: every hook is removed and every flag restored, also on error.
    """
    mbs = check_micro_batch(micro_batch_size)
    windows = check_windows(model, windows, 2, "a per-window gradient")
    acc_w = {id(m): torch.zeros(m.weight.shape, dtype=torch.float32, device=m.weight.device) for m, _ in scored}
    acc_b = {id(m): torch.zeros(m.out_features, dtype=torch.float32, device=m.weight.device) for m, b in scored if b}
    inputs: dict[int, torch.Tensor] = {}
    embedded: list[torch.Tensor] = []

    def add_sample_terms(module: nn.Linear, dy: torch.Tensor) -> None:
        x = inputs.pop(id(module))
        w = module.weight.detach().float()
        b = module.bias.detach().float() if id(module) in acc_b else None
        for s in range(dy.shape[0]):
            dy_s = dy[s].reshape(-1, dy.shape[-1]).float()  # [T, out]
            g_s = dy_s.T @ x[s].reshape(-1, x.shape[-1]).float()  # [out, in]: dL_s/dW
            acc_w[id(module)] += g_s.mul_(w).abs_()
            if b is not None:
                acc_b[id(module)] += (dy_s.sum(dim=0) * b).abs_()

    def keep_input(module, args, output):
        inputs[id(module)] = args[0].detach()
        output.register_hook(lambda dy: add_sample_terms(module, dy))

    def track_embeddings(_module, _args, output):
        output.requires_grad_(True)  # the backward then reaches every linear, but no parameter
        embedded.append(output)
        return output

    device = model_device(model)
    starts = range(0, windows.shape[0], mbs)
    bar = progress_bar(len(starts), progress, desc)
    with scoring_state(model, ()), torch.enable_grad(), hooks() as handles:
        handles.append(model.get_input_embeddings().register_forward_hook(track_embeddings))
        handles += [m.register_forward_hook(keep_input) for m, _ in scored]
        for s in starts:
            ids = windows[s : s + mbs].to(device)
            # objective_value is the mean over windows of each window's objective: times B, the sum.
            loss = objective_value(model, ids, objective) * ids.shape[0]
            torch.autograd.grad(loss, embedded.pop())
            del loss
            if inputs:
                raise ValueError(f"model: {len(inputs)} scored linears got no gradient from the objective")
            bar.update(1)
    bar.close()
    return PerWindowSums(acc_w, acc_b)


__all__ = ["PerWindowSums", "per_window_saliency"]
