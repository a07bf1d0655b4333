"""The single-process gradient source: the full-batch gradient of an objective, one micro-batch at a time.

What :func:`accumulate_gradients` hands a scorer is the gradient of the objective over all windows
with respect to the prunable weights only (summed in float32 over micro-batches), and optionally the
mean over micro-batches of each micro-batch's squared gradient: Adam's second moment without the EMA.
:func:`optimizer_second_moments` reads that second moment from an optimizer that has stepped instead.

Robust aggregation (``window_weight``, ``trim``) takes each window's own gradient term ``g_n`` (one window
per backward pass, the term the plain sum adds for that window: ``grad(f_n) / N``) and sums
``g_n / ||g_n||`` (``"norm"``, the L2 norm over all the given parameters) or ``g_n / f_n`` (``"objective"``,
``f_n`` the window's objective value), leaving out the ``ceil(trim * N)`` windows with the largest
``||g_n||`` (a first pass measures the norms). Only the ranking of the scores matters, so the overall scale
of the weighted sum is left as it comes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import LayerModules
from ..objective import check_objective, is_encoder_decoder, objective_sum
from .common import check_micro_batch, check_windows, model_device, progress_bar, scoring_state

WINDOW_WEIGHTS = ("none", "norm", "objective")


@dataclass
class GradientSums:
    """What :func:`accumulate_gradients` returns, aligned with the ``params`` it was given.

    Attributes:
        grads: float32 tensors shaped like each parameter: the gradient of the full-batch objective,
            summed over micro-batches.
        second_moment: ``None``, or float32 tensors: ``sum_m share_m * g_m**2`` where ``g_m`` is the
            gradient of micro-batch ``m``'s own (mean) objective and ``share_m`` its fraction of the
            windows, i.e. the mean of ``g_m**2`` over micro-batches (a plain mean when all are equal).
        objective: the full-batch objective's value.
        micro_batches: how many micro-batches were run.
    """

    grads: list[torch.Tensor]
    second_moment: list[torch.Tensor] | None
    objective: float
    micro_batches: int


def prunable_parameters(layer: LayerModules) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The parameters scored in one layer: attention ``[q, k, v, o, (q_b, k_b, v_b)]`` and mlp
    ``[up, down, (gate)]``, in the order the kernels take them (the biases only when present).
    A cross-attention's are :func:`attention_parameters` of ``layer.cross``."""
    mlp = [layer.up.weight, layer.down.weight] + ([layer.gate.weight] if layer.gate is not None else [])
    return attention_parameters(layer), mlp


def attention_parameters(block) -> list[nn.Parameter]:
    """One attention block's scored parameters, ``[q, k, v, o, (q_b, k_b, v_b)]``."""
    attn = [block.q.weight, block.k.weight, block.v.weight, block.o.weight]
    biases = [m.bias for m in (block.q, block.k, block.v)]
    if any(b is not None for b in biases):
        if any(b is None for b in biases):
            raise ValueError("model: q/k/v biases must be all present or all absent")
        attn += biases
    return attn


def check_gradient_windows(model: nn.Module, windows, objective: str) -> torch.Tensor:
    """:func:`~nirvana.sources.common.check_windows`, with ``T >= 2`` where the objective or the model
    needs a target (the ``"ce"`` objective, an encoder-decoder)."""
    if is_encoder_decoder(model):
        return check_windows(model, windows, 2, "an encoder-decoder")
    if objective == "ce":
        return check_windows(model, windows, 2, "the 'ce' objective")
    return check_windows(model, windows)


def accumulate_gradients(
    model: nn.Module,
    windows: torch.Tensor,
    params: Sequence[nn.Parameter],
    *,
    objective: str = "maxlogit",
    micro_batch_size: int = 8,
    second_moment: bool = False,
    progress: bool = False,
    window_weight: str = "none",
    trim: float = 0.0,
) -> GradientSums:
    """Gradients of the full-batch objective with respect to ``params`` only, one micro-batch at a time.

    Each micro-batch's objective is scaled by its share of the windows, so the summed gradients
    equal the full-batch gradient. Every other parameter is frozen meanwhile (so autograd saves
    nothing for it), the model runs in eval mode, and nothing is written to any ``.grad``: the
    gradients come from ``torch.autograd.grad`` and are summed here in float32.

    Args:
        windows: integer ``[N, T]`` token ids (any device; moved to the model's).
        params: parameters of ``model`` (e.g. from :func:`prunable_parameters`).
        second_moment: also return the share-weighted mean of squared per-micro-batch gradients.
        window_weight: "none" (the plain sum), "norm" or "objective": each window's gradient term divided
            by its L2 norm or by its objective value before the sum (see the module docstring).
        trim: in [0, 0.5): leave out the ``ceil(trim * N)`` windows with the largest gradient norms.
            With either, every window is its own backward pass (``micro_batch_size`` is not used, and
            ``micro_batches`` counts the passes, the norm pass included) and ``second_moment`` is refused.

    Returns:
        :class:`GradientSums`; memory is one float32 copy of ``params`` (two with ``second_moment``, or
        with a weighted or trimmed sum: the sum and one window's gradient).
    """
    check_objective(objective)
    mbs = check_micro_batch(micro_batch_size)
    check_aggregation(window_weight, trim)
    windows = check_gradient_windows(model, windows, objective)
    params = list(params)
    if not params:
        raise ValueError("params: at least one parameter is needed")
    if window_weight != "none" or trim:
        if second_moment:
            raise ValueError(
                f"window_weight: {window_weight!r} / trim {trim!r} weigh each window's gradient in the sum; "
                "the second moment (saliency 'adam') has no such weighting"
            )
        return _robust_sum(model, windows, params, objective, window_weight, trim, progress)
    device = model_device(model)
    n = windows.shape[0]
    grads: list[torch.Tensor | None] = [None] * len(params)
    moments: list[torch.Tensor | None] | None = [None] * len(params) if second_moment else None
    value = 0.0
    starts = range(0, n, mbs)
    bar = progress_bar(len(starts), progress)
    with scoring_state(model, params):
        for s in starts:
            ids = windows[s : s + mbs].to(device, non_blocking=True)
            share = ids.shape[0] / n
            scaled = objective_sum(model, ids, objective) / n
            value += float(scaled.detach())
            mb_grads = torch.autograd.grad(scaled, params)
            del scaled
            for i, g in enumerate(mb_grads):
                g = g.float()
                if moments is not None:
                    # g is share * (this micro-batch's own gradient), so g**2 / share = share * own**2.
                    m = g.square().div_(share)
                    moments[i] = m if moments[i] is None else moments[i].add_(m)
                grads[i] = g if grads[i] is None else grads[i].add_(g)
            del mb_grads
            bar.update(1)
    bar.close()
    return GradientSums(grads, moments, value, len(starts))


def check_aggregation(window_weight: str, trim: float) -> None:
    """A one-line ValueError for a ``window_weight`` that is not one of :data:`WINDOW_WEIGHTS` or a ``trim``
    outside [0, 0.5)."""
    if window_weight not in WINDOW_WEIGHTS:
        raise ValueError(f"window_weight: must be one of {', '.join(WINDOW_WEIGHTS)}, got {window_weight!r}")
    if isinstance(trim, bool) or not isinstance(trim, (int, float)) or not 0.0 <= trim < 0.5:
        raise ValueError(f"trim: must be a number in [0, 0.5), got {trim!r}")


def trimmed_windows(norms: Sequence[float], trim: float) -> set[int]:
    """The indices of the ``ceil(trim * N)`` largest of ``norms`` (ties: the later window is kept)."""
    k = math.ceil(trim * len(norms))
    order = sorted(range(len(norms)), key=lambda i: (-norms[i], i))
    return set(order[:k])


def _window_gradients(model, windows, params, objective: str, skip: set[int], bar):
    """Yield ``(n, f_n, g_n)`` for each window not in ``skip``: its objective value and its float32 gradient
    term ``grad(f_n) / N`` (the term the plain sum adds), one window per backward pass."""
    device = model_device(model)
    n = windows.shape[0]
    for i in range(n):
        if i in skip:
            continue
        value = objective_sum(model, windows[i : i + 1].to(device, non_blocking=True), objective)
        grads = [g.float() for g in torch.autograd.grad(value / n, params)]
        f = float(value.detach())
        del value
        bar.update(1)
        yield i, f, grads


def _l2(grads: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads))


def _robust_sum(model, windows, params, objective: str, window_weight: str, trim: float, progress: bool):
    """:func:`accumulate_gradients` with ``window_weight`` / ``trim``: the weighted sum of the kept windows."""
    n = windows.shape[0]
    if math.ceil(trim * n) >= n:
        raise ValueError(f"trim: {trim!r} of {n} windows leaves out all of them; pass more windows or a smaller trim")
    passes = n + (n - math.ceil(trim * n) if trim else 0)
    bar = progress_bar(passes, progress, "window gradients")
    norms: dict[int, float] = {}
    values: dict[int, float] = {}
    grads: list[torch.Tensor | None] = [None] * len(params)
    with scoring_state(model, params):
        skip: set[int] = set()
        if trim:  # first pass: each window's gradient norm, to know which to leave out
            for i, f, g in _window_gradients(model, windows, params, objective, set(), bar):
                norms[i], values[i] = _l2(g), f
                del g
            skip = trimmed_windows([norms[i] for i in range(n)], trim)
        for i, f, g in _window_gradients(model, windows, params, objective, skip, bar):
            values[i] = f
            weight = 1.0
            if window_weight == "norm":
                norm = norms[i] if i in norms else _l2(g)
                weight = 1.0 / norm if norm > 0 else 0.0  # a zero gradient adds nothing either way
            elif window_weight == "objective":
                if not (math.isfinite(f) and f > 0):
                    raise ValueError(
                        f"window_weight: 'objective' divides by each window's objective value, but window {i}'s "
                        f"is {f!r}; use 'norm'"
                    )
                weight = 1.0 / f
            for j, gj in enumerate(g):
                gj = gj.mul_(weight) if weight != 1.0 else gj
                grads[j] = gj if grads[j] is None else grads[j].add_(gj)
            del g
    bar.close()
    return GradientSums(grads, None, sum(values.values()) / n, passes)


def adam_state_from_steps(
    model: nn.Module,
    windows: torch.Tensor,
    params: Sequence[nn.Parameter],
    *,
    steps: int,
    objective: str = "ce",
    micro_batch_size: int = 8,
    progress: bool = False,
) -> torch.optim.AdamW:
    """An AdamW over ``params`` stepped ``steps`` times on the windows with a learning rate of 0.

    Step ``k`` takes micro-batch ``k mod M`` of the ``M`` micro-batches of ``windows`` and that
    micro-batch's own (mean) objective, as a training step would. With ``lr=0`` (and so no weight
    decay) the weights do not move, and what is left is Adam's state: ``exp_avg_sq``, the EMA of the
    squared step gradients, for :func:`optimizer_second_moments`. The model is left as found: each
    ``.grad`` as it was, flags and modes restored. Memory: AdamW's two float32 states of ``params``.
    """
    check_objective(objective)
    mbs = check_micro_batch(micro_batch_size)
    windows = check_gradient_windows(model, windows, objective)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: must be a positive integer, got {steps!r}")
    params = list(params)
    device = model_device(model)
    starts = list(range(0, windows.shape[0], mbs))
    optimizer = torch.optim.AdamW(params, lr=0.0, weight_decay=0.0)
    saved = [p.grad for p in params]  # a caller's own .grad comes back as it was
    bar = progress_bar(steps, progress, "adam steps")
    with scoring_state(model, params):
        try:
            for k in range(steps):
                ids = windows[starts[k % len(starts)] :][:mbs].to(device, non_blocking=True)
                loss = objective_sum(model, ids, objective) / ids.shape[0]
                for p, g in zip(params, torch.autograd.grad(loss, params)):
                    p.grad = g
                del loss
                optimizer.step()
                bar.update(1)
        finally:
            for p, g in zip(params, saved):
                p.grad = g
    bar.close()
    return optimizer


def optimizer_second_moments(
    optimizer, params: Sequence[nn.Parameter], names: dict[int, str]
) -> tuple[list[torch.Tensor], float, float, dict]:
    """Each parameter's Adam second moment, plus the eps and scale that fold in the bias correction.

    Adam divides by ``sqrt(v / c) + eps`` with ``c = 1 - beta2**step``; that equals
    ``(sqrt(v) + eps * sqrt(c)) / sqrt(c)``, so the kernels get ``v`` unchanged (no copy), eps
    ``eps * sqrt(c)``, and the scores are multiplied by ``sqrt(c)``.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer: expected a torch.optim.Adam or AdamW, got {type(optimizer).__name__}")  # noqa: TRY004
    group_of = {id(p): grp for grp in optimizer.param_groups for p in grp["params"]}
    vs, settings = [], set()
    for p in params:
        name = names.get(id(p), "<unnamed>")
        state = optimizer.state.get(p, {})
        grp = group_of.get(id(p))
        if grp is None or "exp_avg_sq" not in state or "step" not in state:
            raise ValueError(f"optimizer: holds no Adam state (exp_avg_sq) for parameter {name!r}")
        amsgrad = bool(grp.get("amsgrad", False))
        vs.append(state["max_exp_avg_sq"] if amsgrad else state["exp_avg_sq"])
        settings.add((float(state["step"]), float(grp["betas"][1]), float(grp["eps"]), amsgrad))
    if len(settings) != 1:
        raise ValueError(
            f"optimizer: the prunable parameters differ in Adam step, beta2, eps or amsgrad ({sorted(settings)}); "
            "their scores would not be comparable"
        )
    step, beta2, eps, amsgrad = settings.pop()
    correction = 1.0 - beta2**step
    if not correction > 0:
        raise ValueError(f"optimizer: bias correction 1 - beta2**step = {correction} (step {step}, beta2 {beta2})")
    root = math.sqrt(correction)
    info = {"optimizer": type(optimizer).__name__, "optimizer_step": step, "beta2": beta2, "amsgrad": amsgrad}
    return vs, eps * root, root, info


__all__ = [
    "GradientSums",
    "accumulate_gradients",
    "adam_state_from_steps",
    "WINDOW_WEIGHTS",
    "attention_parameters",
    "check_aggregation",
    "check_gradient_windows",
    "optimizer_second_moments",
    "prunable_parameters",
    "trimmed_windows",
]
