"""Evaluating a (pruned) model: perplexity on held-out text, KL divergence to the dense model, lm-eval tasks."""

from __future__ import annotations

import contextlib
import math

import torch
from tqdm.auto import tqdm

from .calibration import tokenize
from .objective import is_encoder_decoder, split_window

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

    An encoder-decoder (T5) is scored as its scores were taken (:func:`nirvana.objective.split_window`):
    each window's first ``seq_len // 2`` tokens are the encoder's input and the decoder predicts the
    other ``seq_len - seq_len // 2``, teacher-forced, so the mean is over those decoder targets.
    """
    if not isinstance(text, str):
        raise ValueError(f"text: expected a str, got {type(text).__name__}")
    _positive_int("seq_len", seq_len, 2)
    _positive_int("batch_size", batch_size)
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
            if is_encoder_decoder(model):
                logits, targets = seq2seq_logits(model, batch)
                logits = logits.float()
            else:
                logits, targets = model(input_ids=batch).logits[:, :-1].float(), batch[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
            total += nll.item()
            count += targets.numel()
    return math.exp(total / count)


def seq2seq_logits(model, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An encoder-decoder's logits over its decoder targets, and those targets, for LongTensor[n, T] windows
    (``T >= 2``) split as the scores split them (:func:`nirvana.objective.split_window`): logits
    ``[n, T - T // 2, vocab]`` in the model's dtype, targets LongTensor ``[n, T - T // 2]``."""
    parts = split_window(model, windows)
    labels = parts.pop("labels")
    return model(**parts, use_cache=False).logits, labels


def model_logits(model, windows: torch.Tensor) -> torch.Tensor:
    """The logits KL compares for LongTensor[n, T] windows: a decoder-only model's ``[n, T, vocab]`` at every
    position, an encoder-decoder's ``[n, T - T // 2, vocab]`` over its decoder targets (:func:`seq2seq_logits`)."""
    if is_encoder_decoder(model):
        return seq2seq_logits(model, windows)[0]
    return model(input_ids=windows).logits


def gguf_perplexity(
    path,
    text: str,
    *,
    seq_len: int = 512,
    max_windows: int | None = None,
    tokenizer=None,
    progress: bool = True,
) -> float:
    """:func:`perplexity` computed from llama.cpp's own logits for a GGUF file, on the same windows.

    The text is tokenized without special tokens by ``tokenizer`` when given (a Hugging Face tokenizer,
    exactly as :func:`perplexity` does), else by llama.cpp's tokenizer in the file, which
    :func:`nirvana.export.export_gguf` makes tokenise as the folder's tokenizer does. Each
    ``seq_len``-token window is evaluated from an empty KV cache; the NLL of tokens 2..seq_len is taken
    from llama.cpp's float32 logits, accumulated in float64. Needs ``llama_cpp``.
    """
    import os

    from .export import require_llama_cpp

    if not isinstance(text, str):
        raise ValueError(f"text: expected a str, got {type(text).__name__}")
    _positive_int("seq_len", seq_len, 2)
    if max_windows is not None:
        _positive_int("max_windows", max_windows)
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).endswith(".gguf") or not os.path.isfile(path):
        raise ValueError(f"model: {path!r} is not a .gguf file (llama.cpp runs GGUF files only)")
    llama_cpp = require_llama_cpp("evaluating with --engine llama.cpp")
    batch = min(seq_len, 512)
    llm = llama_cpp.Llama(os.fspath(path), n_ctx=seq_len, n_batch=batch, n_ubatch=batch, logits_all=True, verbose=False)
    try:
        if tokenizer is not None:
            ids = tokenize(text, tokenizer)
        else:
            ids = torch.tensor(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False), dtype=torch.long)
        windows = text_windows(ids, seq_len, max_windows)
        if windows.shape[0] == 0:
            raise ValueError(f"text: has {ids.numel()} tokens; one window needs seq_len={seq_len}")
        total, count = 0.0, 0
        for window in tqdm(windows, desc="perplexity (llama.cpp)", disable=not progress, unit="window"):
            llm.reset()  # each window from an empty cache, as transformers sees it
            llm.eval(window.tolist())
            logits = torch.from_numpy(llm.scores[: seq_len - 1].copy()).float()
            total += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
            count += seq_len - 1
    finally:
        llm.close()
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
    An encoder-decoder's are over its decoder targets only, ``[n, seq_len - seq_len // 2, vocab]``
    (:func:`model_logits`).
    """
    _check_windows(windows)
    _positive_int("batch_size", batch_size)
    device = _device(model)
    with torch.no_grad(), _eval_mode(model):
        parts = [
            model_logits(model, b.to(device)).to("cpu", dtype)
            for b in _batches(windows, batch_size, progress, "logits")
        ]
    return torch.cat(parts)


def _check_windows(windows) -> None:
    if not isinstance(windows, torch.Tensor) or windows.ndim != 2 or windows.dtype != torch.long:
        shape = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__
        raise ValueError(f"windows: expected LongTensor[n, seq_len], got {shape}")


def kl_sum(dense: torch.Tensor, pruned: torch.Tensor) -> tuple[float, int]:
    """``(sum of KL(dense || pruned) over positions, position count)`` for ``[..., vocab]`` logits of one
    batch: the part :func:`kl_to_model` adds per batch (float64 sum; float32 math unless an input is float64)."""
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
    total, rows = kl_sum(dense_logits, pruned_logits)
    return total / rows


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
    positions = windows.shape[1] - windows.shape[1] // 2 if is_encoder_decoder(model) else windows.shape[1]
    if tuple(dense_logits.shape[:2]) != (windows.shape[0], positions):
        raise ValueError(
            f"dense_logits: shape {tuple(dense_logits.shape)} does not match windows {tuple(windows.shape)}"
        )
    device = _device(model)
    total, rows, start = 0.0, 0, 0
    with torch.no_grad(), _eval_mode(model):
        for batch in _batches(windows, batch_size, progress, "kl"):
            logits = model_logits(model, batch.to(device))
            dense = dense_logits[start : start + batch.shape[0]].to(logits.device)
            if dense.shape != logits.shape:
                raise ValueError(f"dense_logits: vocab {dense.shape[-1]} differs from the model's {logits.shape[-1]}")
            part, n = kl_sum(dense, logits)
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


__all__ = [
    "gguf_perplexity",
    "kl_divergence",
    "kl_sum",
    "kl_to_model",
    "lm_eval_tasks",
    "model_logits",
    "perplexity",
    "seq2seq_logits",
    "text_windows",
    "window_logits",
]
