"""NIRVANA's scorer: the gradient of one objective over the calibration windows, scored by the kernels.

One backward pass (split into micro-batches, :mod:`nirvana.sources.gradients`) gives the gradient of a
calibration objective (:mod:`nirvana.objective`) with respect to the prunable weights only; the fused
kernels then score every KV group and MLP channel into :class:`~nirvana.scores.Scores`:

* ``attention``: float32 ``[num_layers, num_kv_heads]``, one score per KV group (its G query heads,
  its k and v heads, the matching o_proj columns, and the q/k/v bias entries when present);
* ``mlp``: float32 ``[num_layers, intermediate_size]``, one score per channel (gate/up rows and
  down_proj columns).

Encoder-decoders (T5): ``attention`` has one row per attention block, ``[num_attention_blocks,
num_heads]``: the encoder layers' self-attention, the decoder layers' self-attention, then the
decoder layers' cross-attention; ``mlp`` one row per layer, encoder first (``Geometry.sections()``
names the ranges). How their windows become encoder and decoder inputs is in :mod:`nirvana.objective`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import nirvana_kernels

from .adapters import LayerModules, architecture_names, attention_blocks, get_adapter
from .objective import check_objective
from .plan import Geometry
from .scores import Scores, stack_scores
from .sources.common import check_micro_batch
from .sources.gradients import (
    accumulate_gradients,
    attention_parameters,
    check_aggregation,
    optimizer_second_moments,
    prunable_parameters,
)

SALIENCIES = ("taylor", "adam", "magnitude", "random")
# torch.optim.Adam's default; used when the second moment is accumulated here rather than read
# from an optimizer (whose own eps is used then).
ADAM_EPS = 1e-8


def check_dense_layers(layers: list[LayerModules], geometry: Geometry) -> None:
    """A ValueError naming the first layer whose k_proj rows or MLP channels are not the dense ``geometry``'s."""
    kv_rows = geometry.num_kv_heads * geometry.head_dim
    for i, layer in enumerate(layers):
        k_rows, channels = layer.k.weight.shape[0], layer.up.weight.shape[0]
        if k_rows != kv_rows or channels != geometry.intermediate_size:
            raise ValueError(
                f"model: layer {i} has {k_rows} k_proj rows and {channels} MLP channels, the config says "
                f"{kv_rows} and {geometry.intermediate_size}; scores are computed on the dense model"
            )


def _attention_scores(
    geometry: Geometry,
    attn: Sequence[tuple[torch.Tensor, torch.Tensor]],
    attn_v: Sequence[torch.Tensor] | None = None,
    eps: float = ADAM_EPS,
) -> torch.Tensor:
    """One attention block's float32 ``[num_kv_heads]`` scores: ``attn`` holds (weight, grad) pairs
    for q, k, v, o (then q, k, v biases, if any); ``attn_v`` the matching second moments for Adam."""
    (q_w, q_g), (k_w, k_g), (v_w, v_g), (o_w, o_g) = attn[:4]
    bias = {}
    for name, (b, bg) in zip(("q", "k", "v"), attn[4:]):
        bias[f"{name}_b"], bias[f"{name}_bg"] = b, bg
    return nirvana_kernels.attention_group_saliency(
        q_w, q_g, k_w, k_g, v_w, v_g, o_w, o_g,
        num_kv_heads=geometry.num_kv_heads, head_dim=geometry.head_dim,
        exp_avg_sq=None if attn_v is None else tuple(attn_v), eps=eps, **bias,
    )  # fmt: skip


def _mlp_scores(
    mlp: Sequence[tuple[torch.Tensor, torch.Tensor]],
    mlp_v: Sequence[torch.Tensor] | None = None,
    eps: float = ADAM_EPS,
) -> torch.Tensor:
    """One layer's float32 ``[intermediate_size]`` scores from (weight, grad) pairs for up, down (then gate)."""
    (up_w, up_g), (down_w, down_g) = mlp[:2]
    gate = {"gate_w": mlp[2][0], "gate_g": mlp[2][1]} if len(mlp) == 3 else {}
    return nirvana_kernels.mlp_channel_saliency(
        up_w, up_g, down_w, down_g, exp_avg_sq=None if mlp_v is None else tuple(mlp_v), eps=eps, **gate
    )


def _with_grads(
    weights: Sequence[nn.Parameter], grads: Sequence[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(as_grad_dtype(w, g), g) for w, g in zip(weights, grads)]


def as_grad_dtype(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``w`` detached, in the dtype of its gradient ``g``: the kernels want both in one dtype.

    Gradients are summed in float32, so a half-precision layer is widened (one layer at a time,
    exactly) rather than its gradient rounded.
    """
    return w.detach() if w.dtype == g.dtype else w.detach().to(g.dtype)


def ones_view(w: torch.Tensor) -> torch.Tensor:
    """Ones shaped like ``w``, as a stride-0 view: the "gradient" that makes the taylor kernels score
    magnitude (``|W * 1|``), with no gradient-sized allocation."""
    return torch.ones((), dtype=w.dtype, device=w.device).expand_as(w)


def scored_blocks(layers: list[LayerModules]) -> list[tuple[str, list[nn.Parameter]]]:
    """Every scored block in order, ``(kind, parameters)``: the attention rows (see ``Geometry``), then one
    MLP per layer; the parameters an optimizer passed to :func:`compute_scores` must hold state for."""
    blocks = [("attention", attention_parameters(a)) for a in attention_blocks(layers)]
    return blocks + [("mlp", prunable_parameters(layer)[1]) for layer in layers]


def compute_scores(
    model: nn.Module,
    windows: torch.Tensor | None,
    *,
    objective: str = "maxlogit",
    saliency: str = "taylor",
    micro_batch_size: int = 8,
    optimizer: torch.optim.Optimizer | None = None,
    progress: bool = True,
    seed: int = 0,
    window_weight: str = "none",
    trim: float = 0.0,
) -> Scores:
    """Score every KV group and MLP channel of a dense Hugging Face decoder.

    Saliency:
        ``"taylor"`` (default, NIRVANA): ``sum |W * G|`` over each unit's weights, ``G`` the gradient
        of the objective over all windows.
        ``"adam"``: ``sum |W * G| / (sqrt(V) + eps)``. Without ``optimizer``, ``V`` is the mean over
        micro-batches of each micro-batch's squared gradient (Adam's second moment without the EMA;
        with a single micro-batch it is ``G**2``, which makes the score close to ``|W|``), and eps is
        :data:`ADAM_EPS`. With ``optimizer`` (a torch.optim.Adam/AdamW that has stepped on these
        parameters), ``V`` is its bias-corrected ``exp_avg_sq`` (``max_exp_avg_sq`` with amsgrad) and
        eps its own.
        ``"magnitude"``: ``sum |W|``, no forward or backward pass. ``"random"``: uniform [0, 1)
        scores from ``seed``; ``windows`` may be ``None`` for these two baselines.

    Objective (``"maxlogit"`` or ``"ce"``): see :func:`objective_value`.

    Args:
        windows: integer ``[N, T]`` token ids; moved to the model's device micro-batch by micro-batch.
        micro_batch_size: windows per forward/backward pass; bounds activation memory.
        optimizer: only with ``saliency="adam"``.
        progress: show a tqdm bar over micro-batches.
        window_weight, trim: robust aggregation of the windows' gradients, ``"taylor"`` saliency only: each
            window's gradient divided by its norm (``"norm"``) or its objective value (``"objective"``)
            before the sum, and the ``ceil(trim * N)`` windows with the largest gradient norms left out; one
            window per backward pass (see :func:`nirvana.sources.gradients.accumulate_gradients`).

    Returns:
        :class:`Scores` with float32 tensors on the CPU. The model is left as found: no ``.grad``
        is written, requires_grad flags and train/eval modes are restored. Gradients are kept (in
        float32) for the prunable weights only.

    Raises:
        ValueError: a bad argument (named), a pruned model, or a non-finite score (naming the layer).
    """
    check_objective(objective)
    if saliency not in SALIENCIES:
        raise ValueError(f"saliency: must be one of {SALIENCIES}, got {saliency!r}")
    check_micro_batch(micro_batch_size)
    if optimizer is not None and saliency != "adam":
        raise ValueError(f"optimizer: only used with saliency='adam', got saliency={saliency!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: must be an integer, got {seed!r}")  # noqa: TRY004
    check_aggregation(window_weight, trim)
    robust = window_weight != "none" or bool(trim)
    if robust and saliency != "taylor":
        raise ValueError(
            f"window_weight: {window_weight!r} / trim {trim!r} weigh the gradient sum of saliency 'taylor', "
            f"got saliency={saliency!r}"
        )
    adapter = get_adapter(model)
    geometry = adapter.geometry(model.config)
    layers = adapter.layers(model)
    check_dense_layers(layers, geometry)
    names = ", ".join(architecture_names(model))
    meta: dict = {"architecture": names, "saliency": saliency, "model_dtype": str(_dtype(model)).removeprefix("torch.")}

    if saliency == "random":
        gen = torch.Generator().manual_seed(seed)
        attention = torch.rand(geometry.num_attention_blocks, geometry.num_kv_heads, generator=gen)
        mlp = torch.rand(geometry.num_layers, geometry.intermediate_size, generator=gen)
        return Scores(attention, mlp, geometry, dict(meta, seed=seed))

    # Every scored block in order: the attention rows (see Geometry), then one MLP per layer.
    blocks = scored_blocks(layers)

    def score(kind: str, pairs, v=None, eps=ADAM_EPS) -> torch.Tensor:
        return _attention_scores(geometry, pairs, v, eps) if kind == "attention" else _mlp_scores(pairs, v, eps)

    rows: dict[str, list[torch.Tensor]] = {"attention": [], "mlp": []}
    if saliency == "magnitude":
        with torch.no_grad():
            for kind, params in blocks:
                rows[kind].append(score(kind, [(w.detach(), ones_view(w)) for w in params]))
        return stack_scores(rows["attention"], rows["mlp"], geometry, meta, inputs="weights")

    flat = [p for _, params in blocks for p in params]
    eps, scale, moments_from_opt = ADAM_EPS, 1.0, None
    if optimizer is not None:
        param_names = {id(p): n for n, p in model.named_parameters()}
        moments_from_opt, eps, scale, info = optimizer_second_moments(optimizer, flat, param_names)
        meta.update(info, second_moment="optimizer")
    elif saliency == "adam":
        meta["second_moment"] = "micro-batch"
    sums = accumulate_gradients(
        model,
        windows,
        flat,
        objective=objective,
        micro_batch_size=micro_batch_size,
        second_moment=saliency == "adam" and optimizer is None,
        progress=progress,
        window_weight=window_weight,
        trim=trim,
    )
    grads, value, count = sums.grads, sums.objective, sums.micro_batches
    moments = moments_from_opt if moments_from_opt is not None else sums.second_moment
    del sums  # the lists above are now the only owners, so each block's buffers go once it is scored
    pos = 0
    with torch.no_grad():
        for kind, params in blocks:
            end = pos + len(params)
            row = score(kind, _with_grads(params, grads[pos:end]), None if moments is None else moments[pos:end], eps)
            rows[kind].append(row * scale if scale != 1.0 else row)
            # Drop this block's float32 buffers now rather than after the last one.
            grads[pos:end] = [None] * (end - pos)
            if moments is not None:
                moments[pos:end] = [None] * (end - pos)
            pos = end
    att_rows, mlp_rows = rows["attention"], rows["mlp"]
    meta.update(
        objective=objective,
        objective_value=value,
        micro_batch_size=micro_batch_size,
        micro_batches=count,
        num_windows=int(windows.shape[0]),
        window_length=int(windows.shape[1]),
    )
    if saliency == "adam":
        meta["eps"] = eps / scale
    if robust:  # recorded only when used, so that the plain sum's meta is what it always was
        meta.update(window_weight=window_weight, trim=trim, micro_batch_size=1)
    return stack_scores(att_rows, mlp_rows, geometry, meta, inputs="weights, gradients or second moments")


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


__all__ = [
    "ADAM_EPS",
    "SALIENCIES",
    "as_grad_dtype",
    "check_dense_layers",
    "compute_scores",
    "ones_view",
    "scored_blocks",
]
