"""Evaluating a (pruned) model: perplexity on held-out text, KL divergence to the dense model, lm-eval tasks."""

from __future__ import annotations

import contextlib
import math

import torch
from tqdm.auto import tqdm

from .calibration import tokenize

# Rows of [rows, vocab] handled at once by kl_divergence: about 16M elements (64 MB in float32) whatever the vocab.
_KL_CHUNK_ELEMENTS = 2**24


def _positive_int(name: str, value, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: {value!r} must be an int >= {low}")


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _batches(windows: torch.Tensor, batch_size: int, progress: bool, desc: str):
    starts = range(0, windows.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
        yield windows[start : start + batch_size]


@contextlib.contextmanager
def _eval_mode(model):
    # Evaluation must not run dropout; the caller's train/eval state comes back afterwards.
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def text_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """LongTensor[n, seq_len]: consecutive non-overlapping windows of a token stream; the remainder is dropped."""
    count = ids.numel() // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[: count * seq_len].view(count, seq_len)


def perplexity(
    model,
    tokenizer,
    text: str,
    *,
    seq_len: int = 512,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> float:
    """exp(mean next-token NLL) over non-overlapping ``seq_len``-token windows of ``text`` (the first ``max_windows``).

    The text is tokenized without special tokens; each window predicts its tokens 2..seq_len from the ones
    before, so the mean is over ``n_windows * (seq_len - 1)`` tokens. Runs under no_grad on the model's device,
    NLL in float32 per batch, accumulated in float64.
    """
    if not isinstance(text, str):
        raise ValueError(f"text: expected a str, got {type(text).__name__}")
    _positive_int("seq_len", seq_len, 2)
    _positive_int("batch_size", batch_size)
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError(
            f"model: {type(model).__name__} is an encoder-decoder; perplexity reads decoder-only next-token logits"
        )
    if max_windows is not None:
        _positive_int("max_windows", max_windows)
    ids = tokenize(text, tokenizer)
    windows = text_windows(ids, seq_len, max_windows)
    if windows.shape[0] == 0:
        raise ValueError(f"text: has {ids.numel()} tokens; one window needs seq_len={seq_len}")
    device = _device(model)
    total, count = 0.0, 0
    with torch.no_grad(), _eval_mode(model):
        for batch in _batches(windows, batch_size, progress, "perplexity"):
            batch = batch.to(device)
            logits = model(input_ids=batch).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
            total += nll.item()
            count += batch[:, 1:].numel()
    return math.exp(total / count)


def window_logits(
    model,
    windows: torch.Tensor,
    *,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> torch.Tensor:
    """Tensor[n, seq_len, vocab] of ``dtype`` on CPU: the model's logits for LongTensor[n, seq_len] windows.

    Memory is n * seq_len * vocab * itemsize (32 x 128 x 49152 float32 is 0.8 GB; pass bfloat16 to halve it).
    """
    _check_windows(windows)
    _positive_int("batch_size", batch_size)
    device = _device(model)
    with torch.no_grad(), _eval_mode(model):
        parts = [
            model(input_ids=b.to(device)).logits.to("cpu", dtype)
            for b in _batches(windows, batch_size, progress, "logits")
        ]
    return torch.cat(parts)


def _check_windows(windows) -> None:
    if not isinstance(windows, torch.Tensor) or windows.ndim != 2 or windows.dtype != torch.long:
        shape = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__
        raise ValueError(f"windows: expected LongTensor[n, seq_len], got {shape}")


def _kl_sum(dense: torch.Tensor, pruned: torch.Tensor) -> tuple[float, int]:
    # Sum over rows of KL(p || q) for [..., vocab] logits, in float64 if either input is, else float32.
    dtype = torch.float64 if torch.float64 in (dense.dtype, pruned.dtype) else torch.float32
    vocab = dense.shape[-1]
    p_logits, q_logits = dense.reshape(-1, vocab), pruned.reshape(-1, vocab)
    rows = max(1, _KL_CHUNK_ELEMENTS // vocab)
    total = 0.0
    for start in range(0, p_logits.shape[0], rows):
        log_p = torch.log_softmax(p_logits[start : start + rows].to(dtype), dim=-1)
        log_q = torch.log_softmax(q_logits[start : start + rows].to(log_p.device, dtype), dim=-1)
        # Where p is 0 the term is 0 even if q is 0 too (0 * (-inf - -inf) would be NaN).
        terms = torch.where(log_p > -math.inf, log_p.exp() * (log_p - log_q), 0.0)
        total += terms.sum(dtype=torch.float64).item()
    return total, p_logits.shape[0]


def kl_divergence(dense_logits: torch.Tensor, pruned_logits: torch.Tensor) -> float:
    """Token-mean KL(dense || pruned) of two logit tensors of the same shape [..., vocab] (any float dtype).

    KL(p || q) = sum_v p_v (log p_v - log q_v) with log-probabilities from log_softmax, computed in float32
    (float64 when either input is float64), in row chunks of bounded memory, then averaged over all positions.
    """
    for name, t in (("dense_logits", dense_logits), ("pruned_logits", pruned_logits)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.ndim < 1 or t.numel() == 0:
            desc = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a non-empty float tensor [..., vocab], got {desc}")
    if dense_logits.shape != pruned_logits.shape:
        raise ValueError(
            f"pruned_logits: shape {tuple(pruned_logits.shape)} differs from dense_logits {tuple(dense_logits.shape)}"
        )
    total, rows = _kl_sum(dense_logits, pruned_logits)
    return total / rows


def kl_sum(dense: torch.Tensor, pruned: torch.Tensor) -> tuple[float, int]:
    """``(sum of KL(dense || pruned) over positions, position count)`` for ``[..., vocab]`` logits of one
    batch: the part :func:`kl_to_model` adds per batch (float64 sum; float32 math unless an input is float64)."""
    return _kl_sum(dense, pruned)


def kl_to_model(
    dense_logits: torch.Tensor,
    model,
    windows: torch.Tensor,
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> float:
    """Token-mean KL(dense || model) over ``windows``, given the dense model's ``window_logits`` for them.

    The model's logits are computed batch by batch and never all held at once, so the dense logits can be
    computed once and compared against many pruned candidates.
    """
    _check_windows(windows)
    _positive_int("batch_size", batch_size)
    if tuple(dense_logits.shape[:2]) != tuple(windows.shape):
        raise ValueError(
            f"dense_logits: shape {tuple(dense_logits.shape)} does not match windows {tuple(windows.shape)}"
        )
    device = _device(model)
    total, rows, start = 0.0, 0, 0
    with torch.no_grad(), _eval_mode(model):
        for batch in _batches(windows, batch_size, progress, "kl"):
            logits = model(input_ids=batch.to(device)).logits
            dense = dense_logits[start : start + batch.shape[0]].to(logits.device)
            if dense.shape != logits.shape:
                raise ValueError(f"dense_logits: vocab {dense.shape[-1]} differs from the model's {logits.shape[-1]}")
            part, n = _kl_sum(dense, logits)
            total, rows, start = total + part, rows + n, start + batch.shape[0]
    return total / rows


def lm_eval_tasks(model, tokenizer, tasks: list[str], *, batch_size: int = 1, **kw) -> dict:
    """Run lm-evaluation-harness ``tasks`` on the in-memory model; returns ``{task: {metric: value}}``.

    Needs the optional ``lm-eval`` package (``pip install lm-eval``). The model is wrapped with lm-eval's HFLM
    as is (no reload, so a pruned model is evaluated as pruned); ``kw`` goes to ``lm_eval.simple_evaluate``
    (e.g. ``num_fewshot``, ``limit``).
    """
    if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"tasks: {tasks!r} must be a non-empty list of task names")
    _positive_int("batch_size", batch_size)
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise ValueError("tasks: evaluating lm-eval tasks needs the lm-eval package: pip install lm-eval") from None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), **kw)
    return dict(results["results"])


__all__ = ["kl_divergence", "kl_sum", "kl_to_model", "lm_eval_tasks", "perplexity", "text_windows", "window_logits"]
