"""Saliency collection: a model and calibration windows in, per-layer unit scores out.

One backward pass (split into micro-batches) gives the gradient of a calibration objective with
respect to the prunable weights only; the fused kernels then score every KV group and MLP channel:

* ``attention``: float32 ``[num_layers, num_kv_heads]``, one score per KV group (its G query heads,
  its k and v heads, the matching o_proj columns, and the q/k/v bias entries when present);
* ``mlp``: float32 ``[num_layers, intermediate_size]``, one score per channel (gate/up rows and
  down_proj columns).

The scores are saved as ``scores.safetensors`` so that pruning again at another sparsity needs no
second backward pass.

Encoder-decoders (T5): ``attention`` has one row per attention block, ``[num_attention_blocks,
num_heads]``: the encoder layers' self-attention, the decoder layers' self-attention, then the
decoder layers' cross-attention; ``mlp`` one row per layer, encoder first (``Geometry.sections()``
names the ranges). The objective needs decoder inputs, and the calibration windows are plain text,
so each window of ``T`` tokens is split in two (:func:`split_window`): the first ``T // 2`` tokens
are the encoder's input, the rest the decoder's target, fed to the decoder shifted right behind the
decoder start token (teacher forcing), as in T5's own training. ``"maxlogit"`` takes the max of
each logit over the decoder's positions, ``"ce"`` the mean cross-entropy of the target tokens.
A split rather than span corruption: it needs no sentinel tokens (Flan-T5 and other checkpoints
differ in them) and every token of the window is used, half as context and half as target.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import nirvana_kernels

from .adapters import LayerModules, architecture_names, attention_blocks, get_adapter, text_config
from .plan import Geometry
from .tensorfile import read_header

OBJECTIVES = ("maxlogit", "ce")
SALIENCIES = ("taylor", "adam", "magnitude", "random")
SCORES_FILE = "scores.safetensors"
SCORES_FORMAT = "nirvana-scores"
SCORES_VERSION = 1
# torch.optim.Adam's default; used when the second moment is accumulated here rather than read
# from an optimizer (whose own eps is used then).
ADAM_EPS = 1e-8
# The maxlogit objective projects onto the vocabulary in slices of about this many logits, so a
# micro-batch never holds its full [B, T, V] logits (max's backward keeps only the argmax indices).
_LOGIT_CHUNK_ELEMS = 1 << 24


# --------------------------------------------------------------------------------------------------
# Plain data
# --------------------------------------------------------------------------------------------------


@dataclass
class Scores:
    """Per-unit saliency of a dense model.

    Attributes:
        attention: float32 ``[num_attention_blocks, num_kv_heads]`` on the CPU, one score per KV group
            (``num_attention_blocks`` is ``num_layers`` but for encoder-decoders, see ``Geometry``).
        mlp: float32 ``[num_layers, intermediate_size]`` on the CPU, one score per MLP channel.
        geometry: the dense geometry the scores index into.
        meta: JSON-serialisable settings: objective, saliency, micro_batch_size, num_windows, ...
    """

    attention: torch.Tensor
    mlp: torch.Tensor
    geometry: Geometry
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        g = self.geometry
        for name, t, shape in (
            ("attention", self.attention, (g.num_attention_blocks, g.num_kv_heads)),
            ("mlp", self.mlp, (g.num_layers, g.intermediate_size)),
        ):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")  # noqa: TRY004
            if tuple(t.shape) != shape:
                raise ValueError(f"{name}: shape {tuple(t.shape)} does not match the geometry's {shape}")
            if t.dtype != torch.float32:
                raise ValueError(f"{name}: dtype must be float32, got {t.dtype}")


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


# --------------------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------------------


def _lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, float | None]:
    """The base model (hidden states), the lm_head and the final logit soft-cap of a causal LM."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    if head is None or base is None or base is model:
        raise ValueError(f"model: {type(model).__name__} is not a causal LM with a separate lm_head")
    cap = getattr(text_config(model.config), "final_logit_softcapping", None)
    return base, head, cap


def _softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if cap is None else torch.tanh(logits / cap) * cap


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def split_window(model: nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """An encoder-decoder's inputs from windows of text: int64 ``[B, T]`` (``T >= 2``) ->
    ``input_ids`` ``[B, T // 2]`` (the first half), ``labels`` ``[B, T - T // 2]`` (the rest) and
    ``decoder_input_ids`` (the labels shifted right behind the decoder start token)."""
    t = input_ids.shape[1]
    if t < 2:
        raise ValueError(
            f"windows: an encoder-decoder needs T >= 2 tokens per window, got shape {tuple(input_ids.shape)}"
        )
    labels = input_ids[:, t // 2 :]
    config, gen = model.config, getattr(model, "generation_config", None)
    start = getattr(config, "decoder_start_token_id", None)
    start = getattr(gen, "decoder_start_token_id", None) if start is None else start
    start = (getattr(config, "pad_token_id", None) or 0) if start is None else start
    decoder_input_ids = torch.cat([labels.new_full((labels.shape[0], 1), start), labels[:, :-1]], dim=1)
    return {"input_ids": input_ids[:, : t // 2], "decoder_input_ids": decoder_input_ids, "labels": labels}


def _seq2seq_objective_sum(model: nn.Module, input_ids: torch.Tensor, objective: str) -> torch.Tensor:
    """:func:`objective_sum` of an encoder-decoder, over the decoder's positions (see the module docstring).

    The model's own forward computes the logits (T5 scales the decoder output before its lm_head),
    without labels, so no loss is computed; a micro-batch holds its ``[B, T - T // 2, V]`` logits.
    """
    parts = split_window(model, input_ids)
    labels = parts.pop("labels")
    logits = model(**parts, use_cache=False).logits
    if objective == "ce":
        flat = logits.float().reshape(-1, logits.shape[-1])
        return F.cross_entropy(flat, labels.reshape(-1), reduction="sum") / labels.shape[1]
    return logits.max(dim=1).values.float().sum() / logits.shape[-1]


def objective_sum(model: nn.Module, input_ids: torch.Tensor, objective: str) -> torch.Tensor:
    """Sum over the batch's samples of each sample's objective, as a float32 0-d tensor.

    The base model and lm_head are called directly, so transformers computes no loss and keeps no
    full logits tensor it does not need.
    """
    if is_encoder_decoder(model):
        return _seq2seq_objective_sum(model, input_ids, objective)
    base, head, cap = _lm_parts(model)
    hidden = base(input_ids=input_ids, use_cache=False)[0]  # [B, T, hidden]
    b, t = input_ids.shape
    if objective == "ce":
        # Next-token cross-entropy, averaged over each window's T-1 predictions.
        logits = _softcap(head(hidden[:, :-1]), cap).float()  # [B, T-1, V]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="sum")
        return loss / (t - 1)
    # maxlogit: per sample, the mean over the vocabulary of each logit's max over positions.
    if not isinstance(head, nn.Linear):
        logits = _softcap(head(hidden), cap)
        return logits.max(dim=1).values.float().sum() / logits.shape[-1]
    weight, bias = head.weight, head.bias
    vocab = weight.shape[0]
    step = max(1, _LOGIT_CHUNK_ELEMS // max(1, b * t))
    total = hidden.new_zeros((), dtype=torch.float32)
    for v0 in range(0, vocab, step):
        v1 = min(vocab, v0 + step)
        chunk = F.linear(hidden, weight[v0:v1], None if bias is None else bias[v0:v1])  # [B, T, Vc]
        # tanh is increasing, so capping after the max over positions gives the same values while
        # touching only [B, Vc] elements.
        total = total + _softcap(chunk.max(dim=1).values, cap).float().sum()
    return total / vocab


def objective_value(model: nn.Module, input_ids: torch.Tensor, objective: str = "maxlogit") -> torch.Tensor:
    """The calibration objective of one batch: a differentiable float32 0-d tensor.

    ``"maxlogit"`` (NIRVANA): logits ``[B, T, V]`` -> max over T -> ``[B, V]`` -> mean, with Gemma's
    final logit soft-cap applied as the model applies it. ``"ce"``: mean next-token cross-entropy
    over the ``B * (T - 1)`` predictions. An encoder-decoder takes both over its decoder's positions
    (see :func:`split_window` and the module docstring).

    Args:
        input_ids: int64 ``[B, T]`` token ids on the model's device (``T >= 2`` for ``"ce"`` and for
            encoder-decoders).
    """
    check_objective(objective)
    return objective_sum(model, input_ids, objective) / input_ids.shape[0]


# --------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------


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


@contextlib.contextmanager
def scoring_state(model: nn.Module, trainable: Sequence[nn.Parameter]) -> Iterator[None]:
    """Only ``trainable`` requires grad, every module is in eval mode; both restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    keep = {id(p) for p in trainable}
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in keep)
        model.eval()
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def model_device(model: nn.Module) -> torch.device:
    """The device the model's input embeddings (else its first parameter) live on: where windows go."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


def check_objective(objective) -> None:
    """A ValueError unless ``objective`` is one of :data:`OBJECTIVES`."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: must be one of {OBJECTIVES}, got {objective!r}")


def check_windows(model: nn.Module, windows, objective: str) -> torch.Tensor:
    """``windows`` as int64 token ids; a ValueError unless it is a non-empty integer [N, T] tensor of
    ids inside the model's vocabulary, with T >= 2 where the objective or the model needs a target."""
    if not isinstance(windows, torch.Tensor):
        raise ValueError(f"windows: expected a torch.Tensor of token ids, got {type(windows).__name__}")  # noqa: TRY004
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 1:
        raise ValueError(f"windows: expected a non-empty [N, T] tensor, got shape {tuple(windows.shape)}")
    if windows.dtype.is_floating_point or windows.dtype.is_complex or windows.dtype == torch.bool:
        raise ValueError(f"windows: dtype must be an integer type, got {windows.dtype}")
    if (objective == "ce" or is_encoder_decoder(model)) and windows.shape[1] < 2:
        needs = "an encoder-decoder" if is_encoder_decoder(model) else "the 'ce' objective"
        raise ValueError(f"windows: {needs} needs T >= 2 tokens per window, got shape {tuple(windows.shape)}")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    lo, hi = int(windows.min()), int(windows.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise ValueError(f"windows: token id {lo if lo < 0 else hi} is outside the vocabulary [0, {vocab})")
    return windows.long()


def check_micro_batch(micro_batch_size) -> int:
    """``micro_batch_size``; a ValueError unless it is a positive integer."""
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size: must be a positive integer, got {micro_batch_size!r}")
    return micro_batch_size


def accumulate_gradients(
    model: nn.Module,
    windows: torch.Tensor,
    params: Sequence[nn.Parameter],
    *,
    objective: str = "maxlogit",
    micro_batch_size: int = 8,
    second_moment: bool = False,
    progress: bool = False,
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

    Returns:
        :class:`GradientSums`; memory is one float32 copy of ``params`` (two with ``second_moment``).
    """
    check_objective(objective)
    mbs = check_micro_batch(micro_batch_size)
    windows = check_windows(model, windows, objective)
    params = list(params)
    if not params:
        raise ValueError("params: at least one parameter is needed")
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


def progress_bar(total: int, enabled: bool):
    """A tqdm bar over ``total`` saliency micro-batches, hidden unless ``enabled``."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="saliency", unit="micro-batch", disable=not enabled)


# --------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------


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


def adam_state(
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


def check_finite_scores(attention: torch.Tensor, mlp: torch.Tensor) -> None:
    """A ValueError naming the first layer with a NaN or infinite attention or MLP score."""
    for name, t in (("attention", attention), ("mlp", mlp)):
        bad = (~torch.isfinite(t)).any(dim=1)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"scores: layer {i} has non-finite {name} scores (NaN or inf in its weights, gradients or "
                "second moments)"
            )


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
    blocks = [("attention", attention_parameters(a)) for a in attention_blocks(layers)]
    blocks += [("mlp", prunable_parameters(layer)[1]) for layer in layers]

    def score(kind: str, pairs, v=None, eps=ADAM_EPS) -> torch.Tensor:
        return _attention_scores(geometry, pairs, v, eps) if kind == "attention" else _mlp_scores(pairs, v, eps)

    rows: dict[str, list[torch.Tensor]] = {"attention": [], "mlp": []}
    if saliency == "magnitude":
        with torch.no_grad():
            for kind, params in blocks:
                rows[kind].append(score(kind, [(w.detach(), ones_view(w)) for w in params]))
        return _finish(rows["attention"], rows["mlp"], geometry, meta)

    flat = [p for _, params in blocks for p in params]
    eps, scale, moments_from_opt = ADAM_EPS, 1.0, None
    if optimizer is not None:
        param_names = {id(p): n for n, p in model.named_parameters()}
        moments_from_opt, eps, scale, info = adam_state(optimizer, flat, param_names)
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
    return _finish(att_rows, mlp_rows, geometry, meta)


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _finish(att_rows: list[torch.Tensor], mlp_rows: list[torch.Tensor], geometry: Geometry, meta: dict) -> Scores:
    # Rows come back one by one: under a device_map each layer is scored on its own GPU.
    attention = torch.stack([r.cpu() for r in att_rows])
    mlp = torch.stack([r.cpu() for r in mlp_rows])
    check_finite_scores(attention, mlp)
    return Scores(attention, mlp, geometry, meta)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _scores_path(path: str | Path) -> Path:
    path = Path(path)
    return path / SCORES_FILE if path.is_dir() else path


def save_scores(scores: Scores, path: str | Path) -> Path:
    """Write ``scores.safetensors``: the two tensors, with format, geometry and meta as JSON metadata.

    ``path`` is the file, or an existing directory to write :data:`SCORES_FILE` into. Returns the file.
    """
    from safetensors.torch import save_file

    if not isinstance(scores, Scores):
        raise ValueError(f"scores: expected a Scores, got {type(scores).__name__}")  # noqa: TRY004
    file = _scores_path(path)
    try:
        meta = json.dumps(scores.meta, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"scores.meta: must be JSON-serialisable ({e})") from None
    metadata = {
        "format": SCORES_FORMAT,
        "version": str(SCORES_VERSION),
        "geometry": json.dumps(scores.geometry.to_dict(), sort_keys=True),
        "meta": meta,
    }
    tensors = {"attention": scores.attention.detach().cpu().contiguous(), "mlp": scores.mlp.detach().cpu().contiguous()}
    save_file(tensors, str(file), metadata=metadata)
    return file


def load_scores(path: str | Path) -> Scores:
    """Read what :func:`save_scores` wrote (a file, or a directory holding :data:`SCORES_FILE`).

    Anything else (not safetensors, another tool's tensors, a broken metadata block, wrong shapes or
    dtypes) is a one-line ValueError that names the file.
    """
    from safetensors import SafetensorError, safe_open

    file = _scores_path(path)
    if not file.is_file():
        raise ValueError(f"path: no scores file at {str(file)!r}")
    read_header(file, label="path")  # a tampered header is named here, before the library parses it
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != SCORES_FORMAT:
                raise ValueError(
                    f"path: {str(file)!r} is not a nirvana scores file (format {metadata.get('format')!r})"
                )
            if metadata.get("version") != str(SCORES_VERSION):
                raise ValueError(f"path: scores version {metadata.get('version')!r}, expected {SCORES_VERSION}")
            keys = set(f.keys())
            if keys != {"attention", "mlp"}:
                raise ValueError(f"path: {str(file)!r} holds tensors {sorted(keys)}, expected ['attention', 'mlp']")
            attention, mlp = f.get_tensor("attention"), f.get_tensor("mlp")
    except (SafetensorError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"path: {str(file)!r} is not a readable safetensors file ({reason})") from None
    try:
        geometry = Geometry.from_dict(json.loads(metadata["geometry"]))
        meta = json.loads(metadata["meta"])
        if not isinstance(meta, dict):
            raise TypeError(f"meta is a {type(meta).__name__}, not an object")
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"path: {str(file)!r} has a broken metadata block ({type(e).__name__}: {e})") from None
    try:
        return Scores(attention, mlp, geometry, meta)
    except ValueError as e:
        raise ValueError(f"path: {str(file)!r}: {e}") from None


__all__ = [
    "ADAM_EPS",
    "GradientSums",
    "OBJECTIVES",
    "SALIENCIES",
    "SCORES_FILE",
    "SCORES_FORMAT",
    "SCORES_VERSION",
    "Scores",
    "accumulate_gradients",
    "adam_state",
    "as_grad_dtype",
    "attention_parameters",
    "check_dense_layers",
    "check_finite_scores",
    "check_micro_batch",
    "check_objective",
    "check_windows",
    "compute_scores",
    "is_encoder_decoder",
    "load_scores",
    "model_device",
    "objective_sum",
    "objective_value",
    "ones_view",
    "progress_bar",
    "prunable_parameters",
    "save_scores",
    "scoring_state",
    "split_window",
]
