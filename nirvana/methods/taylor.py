"""``taylor``: LLM-Pruner's first-order term, ``sum_s |w * dCE_s/dw|``, accumulated per window."""

from __future__ import annotations

import torch
from torch import nn

from ..saliency import Scores, model_device, objective_value, prunable_parameters, scoring_state
from .base import PER_WINDOW_GRADIENTS, Method
from .common import (
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


def taylor_scores(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    micro_batch_size: int = 8,
    progress: bool = True,
) -> Scores:
    """LLM-Pruner-style first-order Taylor importance, accumulated per sample.

    For every prunable weight (and q/k/v bias entry) ``w``::

        A(w) = sum_s |w * dCE_s/dw|

    where ``CE_s`` is window ``s``'s mean next-token cross-entropy over its ``T-1`` predictions, and a
    unit's score is the sum of ``A`` over the weights it owns (as for ``nirvana``'s ``|W * G|``).

    Why per sample, not ``|W * sum_s G_s|``: near a trained optimum the per-sample gradients point
    in many directions and largely cancel in their sum, so ``|W * sum G|`` measures mostly how much
    they failed to cancel; ``sum_s |W * G_s|`` measures how much each window's loss depends on the
    unit, which is the first-order estimate of the loss change from removing it, taken per window
    before averaging. It also makes the score independent of the micro-batching.

    How: the windows of a micro-batch are independent, so the gradient of ``sum_s CE_s`` with respect
    to a linear's output ``Y = X W^T`` holds each window's own ``dCE_s/dY_s``, and
    ``dCE_s/dW = dY_s^T X_s``. Forward hooks keep each prunable linear's input for the micro-batch and
    a tensor hook on its output receives ``dY``; ``A`` is accumulated window by window in float32 and
    the input is dropped. The backward runs towards the input embeddings only: no parameter requires
    grad, so no weight gradient is ever formed beyond the one window being added. Memory: one float32
    copy of the prunable weights (``A``), plus the linear inputs of one micro-batch.
    """
    mbs = check_micro_batch(micro_batch_size)
    windows = check_windows(model, windows, min_length=2)
    geometry, layers = dense_layers(model)
    scored = []  # (module, has a scored bias)
    for lm in layers:
        attn_params, _ = prunable_parameters(lm)  # checks that q/k/v biases are all or none
        with_bias = len(attn_params) > 4
        scored += [(lm.q, with_bias), (lm.k, with_bias), (lm.v, with_bias), (lm.o, False)]
        scored += [(m, False) for m in (lm.up, lm.down, lm.gate) if m is not None]
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
            g_s = dy_s.T @ x[s].reshape(-1, x.shape[-1]).float()  # [out, in]: dCE_s/dW
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
    bar = progress_bar(len(starts), progress, "taylor")
    with scoring_state(model, ()), torch.enable_grad(), hooks() as handles:
        handles.append(model.get_input_embeddings().register_forward_hook(track_embeddings))
        handles += [m.register_forward_hook(keep_input) for m, _ in scored]
        for s in starts:
            ids = windows[s : s + mbs].to(device)
            # objective_value("ce") is the mean over windows of each window's mean CE: times B, the sum.
            loss = objective_value(model, ids, "ce") * ids.shape[0]
            torch.autograd.grad(loss, embedded.pop())
            del loss
            if inputs:
                raise ValueError(f"model: {len(inputs)} prunable linears got no gradient from the loss")
            bar.update(1)
    bar.close()

    att_rows, mlp_rows = [], []
    for lm in layers:
        rows = {n: acc_w.pop(id(m)).sum(dim=1) for n, m in (("q", lm.q), ("k", lm.k), ("v", lm.v))}
        for n, m in (("q", lm.q), ("k", lm.k), ("v", lm.v)):
            if id(m) in acc_b:
                rows[n] = rows[n] + acc_b.pop(id(m))
        att_rows.append(group_attention(geometry, rows["q"], rows["k"], rows["v"], acc_w.pop(id(lm.o)).sum(dim=0)))
        gate = acc_w.pop(id(lm.gate)).sum(dim=1) if lm.gate is not None else None
        mlp_rows.append(group_mlp(acc_w.pop(id(lm.up)).sum(dim=1), acc_w.pop(id(lm.down)).sum(dim=0), gate))
    meta = base_meta(model, "taylor") | {
        "objective": "ce",
        "accumulation": "per-sample",
        "micro_batch_size": mbs,
        "num_windows": int(windows.shape[0]),
        "window_length": int(windows.shape[1]),
    }
    return finish(att_rows, mlp_rows, geometry, meta)


class Taylor(Method):
    """:func:`taylor_scores`: each window's cross-entropy gradient, taken window by window."""

    name = "taylor"
    needs = PER_WINDOW_GRADIENTS

    def scores(self, model, windows, *, micro_batch_size=8, seed=0, progress=True, stats=None, **settings) -> Scores:
        """:func:`taylor_scores` (``seed`` and ``stats`` are unused)."""
        self.check_settings(settings)
        return taylor_scores(model, windows, micro_batch_size=micro_batch_size, progress=progress)


METHOD = Taylor()

__all__ = ["METHOD", "Taylor", "taylor_scores"]
