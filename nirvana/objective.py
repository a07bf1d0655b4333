"""The calibration objectives whose gradient NIRVANA scores with: the max logit and the cross-entropy.

``"maxlogit"`` (NIRVANA): logits ``[B, T, V]`` -> max over positions -> ``[B, V]`` -> mean over the
vocabulary; ``"ce"``: the next-token cross-entropy, averaged over each window's ``T - 1`` predictions.

Encoder-decoders (T5) need decoder inputs, and the calibration windows are plain text, so each window
of ``T`` tokens is split in two (:func:`split_window`): the first ``T // 2`` tokens are the encoder's
input, the rest the decoder's target, fed to the decoder shifted right behind the decoder start token
(teacher forcing), as in T5's own training. ``"maxlogit"`` takes the max of each logit over the
decoder's positions, ``"ce"`` the mean cross-entropy of the target tokens. A split rather than span
corruption: it needs no sentinel tokens (Flan-T5 and other checkpoints differ in them) and every token
of the window is used, half as context and half as target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import text_config

OBJECTIVES = ("maxlogit", "ce")
# The maxlogit objective projects onto the vocabulary in slices of about this many logits, so a
# micro-batch never holds its full [B, T, V] logits (max's backward keeps only the argmax indices).
LOGIT_CHUNK_ELEMS = 1 << 24


def check_objective(objective) -> None:
    """A ValueError unless ``objective`` is one of :data:`OBJECTIVES`."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: must be one of {OBJECTIVES}, got {objective!r}")


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
    """Whether ``model`` is an encoder-decoder (T5): its objective runs over the decoder's positions."""
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
    step = max(1, LOGIT_CHUNK_ELEMS // max(1, b * t))
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


__all__ = [
    "LOGIT_CHUNK_ELEMS",
    "OBJECTIVES",
    "check_objective",
    "is_encoder_decoder",
    "objective_sum",
    "objective_value",
    "split_window",
]
