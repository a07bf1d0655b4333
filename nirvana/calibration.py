"""Calibration data: token windows drawn from a text source.

Sources (``source`` argument):

- ``"austen"``: the embedded default, the five calibration novels (never ``persuasion``, see ``nirvana.corpus``);
- a ``.txt`` file, or a folder (all its ``*.txt`` files sorted by name, minus the stems in ``exclude``, which
  defaults to ``("persuasion",)``);
- a ``.jsonl`` file whose lines are objects with a ``"text"`` field;
- ``"fortunes"``: Debian's fortune-cookie collections (another domain, for evaluation; ``nirvana.corpus``);
- ``"self"``: text sampled from the model itself from BOS with a seed, for when no data exists;
- anything else is a Hugging Face dataset id, ``"name"`` or ``"name:config"`` (train split, ``text`` column),
  used through the optional ``datasets`` package when the hub or its local cache has it.

Documents are joined with a blank line and tokenized once per process (no special tokens added).

Held-out split (used by KL-based selection of calibration sets): the last ``HELDOUT_FRACTION`` of a source's
token stream is reserved. ``calibration_windows`` draws only from the part before it and ``heldout_windows``
only from it, so held-out windows never share a token position with any candidate set, whatever the seeds.
For ``"self"`` the two are independent samples: held-out sequences use the generator seed
``HELDOUT_SEED_BASE + seed``, calibration sequences the seed itself (seeds are below ``HELDOUT_SEED_BASE``).

Large texts (more than ``LARGE_TEXT_CHARS`` characters; the Austen default has about 3.6 million, so it and
every smaller text take the whole-stream path above, window for window) are never tokenized whole: a 50 MB
file would take minutes and gigabytes for a few thousand tokens. The split is then made on characters: the
last ``HELDOUT_FRACTION`` of the characters is held out. Each calibration window draws a start character
uniformly (with ``seed``) in the calibration part and tokenizes only the span of ``SPAN_CHARS_PER_TOKEN *
seq_len`` characters from there, clipped at the split; each held-out window tokenizes one of the held-out
part's non-overlapping spans of that length, picked with ``seed`` and kept in text order. A span is
cut at word boundaries: each end moves inwards to the start of a whitespace run, where tokenizers split
words, and the window is the tokens of what remains after the first one and before the last (a margin;
nothing is dropped at the very start of the text). A span that yields too few tokens doubles its length (a
held-out draw then starts over with the longer spans), so the result depends only on the text, the
tokenizer, the request and the seed. Calibration spans end at or before the split and held-out spans start
at or after it, so the two still never share a character.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import math
import os
import weakref
from pathlib import Path

import torch

from . import corpus
from .progress import status

AUSTEN = "austen"
FORTUNES = corpus.FORTUNES
SELF = "self"
HELDOUT_FRACTION = 0.1
# torch's CPU generator keeps only the low 32 bits of a seed, so both seed ranges fit in 32 bits.
HELDOUT_SEED_BASE = 2**31
# What ``load_text("self")`` samples: enough text to look at, not a calibration set (that samples directly).
SELF_TEXT_SEQUENCES = 8
SELF_TEXT_TOKENS = 256
# Texts longer than this (in characters) are sampled by spans, not tokenized whole (see the module docstring).
LARGE_TEXT_CHARS = 8_000_000
# A span of this many characters per token wanted; English averages about 4 to 5 per token.
SPAN_CHARS_PER_TOKEN = 8
# Tokenizing a text longer than this whole takes seconds, so it gets a status line.
STATUS_CHARS = 1_000_000

# tokenizer -> {text digest: LongTensor of token ids}; weak, so a dropped tokenizer frees its streams.
_TOKEN_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _exclusions(exclude) -> frozenset[str]:
    if exclude is None:
        return frozenset({corpus.HELDOUT_BOOK})
    if isinstance(exclude, str):
        return frozenset({exclude})
    names = list(exclude)
    if not all(isinstance(n, str) for n in names):
        raise ValueError(f"exclude: {exclude!r} must be a file stem or a list of file stems (str)")
    return frozenset(names)


def _read_folder(folder: Path, exclude: frozenset[str]) -> str:
    files = [f for f in sorted(folder.glob("*.txt")) if f.stem not in exclude]
    if not files:
        raise ValueError(f"source: folder {str(folder)!r} holds no .txt files (after excluding {sorted(exclude)})")
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)


def _read_jsonl(path: Path) -> str:
    texts = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"source: {str(path)!r} line {number} is not JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"source: {str(path)!r} line {number} has no string field 'text'")
            texts.append(record["text"])
    if not texts:
        raise ValueError(f"source: {str(path)!r} holds no JSON lines")
    return "\n\n".join(texts)


def _read_hf_dataset(name: str) -> str:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"source: {name!r} is not a file, folder, {AUSTEN!r} or {SELF!r}; reading it as a Hugging Face "
            "dataset needs the datasets package: pip install datasets"
        ) from None
    from huggingface_hub import constants

    from .models import hub_reachable

    dataset_name, _, config = name.partition(":")
    # With $HF_HUB_OFFLINE set, datasets reads its local cache; otherwise fail fast instead of its long retries.
    if not constants.HF_HUB_OFFLINE and not hub_reachable():
        raise ValueError(f"source: dataset {name!r}: the Hugging Face hub ({constants.ENDPOINT}) could not be reached")
    try:
        data = datasets.load_dataset(dataset_name, config or None, split="train")
    except Exception as e:  # datasets raises many unrelated types for "not there"
        raise ValueError(f"source: dataset {name!r} could not be loaded: {str(e).splitlines()[0]}") from None
    if "text" not in data.column_names:
        raise ValueError(f"source: dataset {name!r} has no 'text' column (columns: {data.column_names})")
    return "\n\n".join(t for t in data["text"] if t)


def load_text(source: str | os.PathLike, *, model=None, tokenizer=None, exclude=None, seed: int = 0) -> str:
    """The raw text of a calibration source (see the module docstring for the kinds of source).

    ``exclude``: file stems left out of a folder source (and book names left out of ``"austen"``); None means
    ``("persuasion",)`` so the held-out novel never leaks into calibration. ``"self"`` needs ``model`` and
    ``tokenizer`` and returns ``SELF_TEXT_SEQUENCES`` sampled sequences decoded and joined; ``seed`` seeds them.
    """
    names = _exclusions(exclude)
    if isinstance(source, str) and source == AUSTEN:
        books = [b for b in corpus.CALIBRATION_BOOKS if b not in names]
        if not books:
            raise ValueError(f"exclude: {sorted(names)} leaves no Austen novel to calibrate on")
        folder = corpus.austen_dir()
        return "\n\n".join((folder / f"{b}.txt").read_text(encoding="utf-8") for b in books)
    if isinstance(source, str) and source == FORTUNES:
        return corpus.eval_text(FORTUNES)
    if isinstance(source, str) and source == SELF:
        ids = sample_from_model(
            model, tokenizer, num_sequences=SELF_TEXT_SEQUENCES, seq_len=SELF_TEXT_TOKENS, seed=seed
        )
        return "\n\n".join(tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in ids)
    if not isinstance(source, (str, os.PathLike)) or not os.fspath(source).strip():
        raise ValueError(f"source: {source!r} is not a path, dataset id, {AUSTEN!r} or {SELF!r}")
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return _read_folder(path, names)
    if path.is_file():
        return _read_jsonl(path) if path.suffix == ".jsonl" else path.read_text(encoding="utf-8")
    if isinstance(source, os.PathLike) or _names_a_file(text):
        raise FileNotFoundError(f"source: {text!r} does not exist")
    return _read_hf_dataset(text)


def _names_a_file(text: str) -> bool:
    # Anything else that is not on disk is read as a Hugging Face dataset id.
    return text.startswith(("/", "./", "../", "~")) or Path(text).suffix in (".txt", ".jsonl")


def check_source(source, *, exclude=None) -> None:
    """ValueError when ``source`` cannot be a calibration source, found without reading any text.

    Cheap enough to run before a model loads: a path that does not exist, a file that cannot be read or is
    empty, a folder without ``.txt`` files (after ``exclude``), or a dataset id without the ``datasets``
    package. A dataset id is not looked up (that needs the network), and a file is not decoded.
    """
    if isinstance(source, str) and source in (AUSTEN, FORTUNES, SELF):
        return
    if not isinstance(source, (str, os.PathLike)) or not os.fspath(source).strip():
        raise ValueError(f"calib: {source!r} is not a path, dataset id, {AUSTEN!r} or {SELF!r}")
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        names = _exclusions(exclude)
        if not any(f.stem not in names for f in path.glob("*.txt")):
            raise ValueError(f"calib: folder {text!r} holds no .txt files (after excluding {sorted(names)})")
    elif path.exists():
        if not path.is_file():
            raise ValueError(f"calib: {text!r} is not a regular file or folder")
        if not os.access(path, os.R_OK):
            raise ValueError(f"calib: {text!r} cannot be read (permission denied)")
        if path.stat().st_size == 0:
            raise ValueError(f"calib: {text!r} is empty")
    elif isinstance(source, os.PathLike) or _names_a_file(text):
        raise ValueError(f"calib: {text!r} does not exist")
    elif importlib.util.find_spec("datasets") is None:
        raise ValueError(
            f"calib: {text!r} is not a file, folder, {AUSTEN!r} or {SELF!r}; reading it as a Hugging Face "
            "dataset needs the datasets package: pip install datasets"
        )


def tokenize(text: str, tokenizer, *, progress: bool = False) -> torch.Tensor:
    """LongTensor[n_tokens] of ``text`` without special tokens; cached per tokenizer and text in this process.

    ``progress``: a status line on stderr while a text of more than ``STATUS_CHARS`` characters is tokenized.
    """
    per_tokenizer = _TOKEN_CACHE.setdefault(tokenizer, {})
    key = hashlib.sha1(text.encode("utf-8")).hexdigest()
    if key not in per_tokenizer:
        message = f"tokenizing {len(text) / 1e6:.1f}M characters of calibration text"
        with status(message, progress and len(text) > STATUS_CHARS):
            ids = _token_ids([text], tokenizer)[0]
            per_tokenizer[key] = torch.tensor(ids, dtype=torch.long)
    return per_tokenizer[key]


def _token_ids(texts: list[str], tokenizer) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def _word_bounds(text: str, start: int, stop: int) -> tuple[int, int]:
    """``(start, stop)`` moved inwards to where a whitespace run begins, so the span cuts no word (tokenizers
    split words at such points); the text's own start is kept, and a span with no such point is left as is."""
    a = start
    if start > 0:
        a = next((i for i in range(start, stop) if text[i].isspace() and not text[i - 1].isspace()), start)
    b = next((i for i in range(stop - 1, a, -1) if text[i].isspace() and not text[i - 1].isspace()), stop)
    return a, b


def _span_windows(text: str, tokenizer, spans: list[tuple[int, int]], seq_len: int) -> list[torch.Tensor | None]:
    """For each ``(start, stop)`` character span, ``seq_len`` tokens of its words (:func:`_word_bounds`) after
    the first token (none dropped at the text's start) and before the last; None for too few tokens."""
    bounds = [_word_bounds(text, a, b) for a, b in spans]
    out: list[torch.Tensor | None] = []
    for (start, _), ids in zip(bounds, _token_ids([text[a:b] for a, b in bounds], tokenizer)):
        skip = 1 if start > 0 else 0
        out.append(torch.tensor(ids[skip : skip + seq_len]) if len(ids) >= skip + seq_len + 1 else None)
    return out


def _large_calibration_windows(text: str, tokenizer, source, num_samples: int, seq_len: int, seed: int):
    split = heldout_start(len(text))
    length = min(split, SPAN_CHARS_PER_TOKEN * seq_len)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, split - length + 1, (num_samples,), generator=g).tolist()
    lengths = [length] * num_samples
    windows: list[torch.Tensor | None] = [None] * num_samples
    while True:
        todo = [i for i, w in enumerate(windows) if w is None]
        if not todo:
            return torch.stack(windows).long()
        spans = [(starts[i], min(split, starts[i] + lengths[i])) for i in todo]
        for i, window in zip(todo, _span_windows(text, tokenizer, spans, seq_len)):
            windows[i] = window
            if window is None:
                if lengths[i] >= split:
                    raise ValueError(
                        f"source: {str(source)!r}: the calibration part ({split} characters) holds fewer than "
                        f"{seq_len + 1} tokens; use more text or shorter windows"
                    )
                lengths[i] = min(split, 2 * lengths[i])
                starts[i] = min(starts[i], split - lengths[i])


def _large_heldout_windows(text: str, tokenizer, source, num_samples: int, seq_len: int, seed: int):
    split = heldout_start(len(text))
    length = SPAN_CHARS_PER_TOKEN * seq_len
    while True:
        chunks = (len(text) - split) // length
        if chunks < num_samples:
            raise ValueError(
                f"source: {str(source)!r}: the held-out part ({len(text) - split} characters) holds fewer than "
                f"{num_samples} spans of {length} characters; use more text or fewer/shorter windows"
            )
        g = torch.Generator().manual_seed(seed)
        picked = torch.randperm(chunks, generator=g)[:num_samples].sort().values.tolist()
        spans = [(split + p * length, split + (p + 1) * length) for p in picked]
        windows = _span_windows(text, tokenizer, spans, seq_len)
        if all(w is not None for w in windows):
            return torch.stack(windows).long()
        length *= 2


def heldout_start(num_tokens: int) -> int:
    """Index of the first held-out token in a stream of ``num_tokens`` (the last ``HELDOUT_FRACTION``)."""
    return num_tokens - math.ceil(round(num_tokens * HELDOUT_FRACTION, 6))  # round: 0.1 is inexact


def _check_request(num_samples, seq_len, seed) -> None:
    for name, value, low in (("num_samples", num_samples, 1), ("seq_len", seq_len, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: {value!r} must be an int >= {low}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < HELDOUT_SEED_BASE:
        raise ValueError(f"seed: {seed!r} must be an int in [0, 2**31)")


def _too_short(source, found: int, usable: int, needed: int, part: str) -> ValueError:
    return ValueError(
        f"source: {source!r} has {found} tokens, {usable} of them in the {part} part; "
        f"the request needs {needed} (num_samples x seq_len). Use more text or fewer/shorter windows "
        f"(the last {HELDOUT_FRACTION:.0%} of the tokens is held out, the rest is for calibration)"
    )


def calibration_windows(
    source,
    tokenizer,
    *,
    num_samples: int = 32,
    seq_len: int = 128,
    seed: int = 0,
    model=None,
    exclude=None,
    progress: bool = False,
) -> torch.Tensor:
    """LongTensor[num_samples, seq_len] on CPU: windows at random start positions drawn with ``seed``.

    Starts are uniform over the calibration part of the token stream (everything before the held-out tail), so
    windows may overlap each other but never the held-out part. Different seeds give different windows. The
    calibration part must hold at least ``num_samples * seq_len`` tokens, else a ValueError says how many it has.
    For ``source="self"`` the windows are sequences sampled from ``model`` (BOS first, see ``sample_from_model``).
    A text of more than ``LARGE_TEXT_CHARS`` characters is sampled by character spans (see the module docstring).
    ``progress``: status lines on stderr for the steps that take seconds.
    """
    _check_request(num_samples, seq_len, seed)
    if isinstance(source, str) and source == SELF:
        return sample_from_model(model, tokenizer, num_sequences=num_samples, seq_len=seq_len, seed=seed)
    text = load_text(source, exclude=exclude)
    if len(text) > LARGE_TEXT_CHARS:
        with status(f"sampling {num_samples} windows from {len(text) / 1e6:.1f}M characters of text", progress):
            return _large_calibration_windows(text, tokenizer, source, num_samples, seq_len, seed)
    ids = tokenize(text, tokenizer, progress=progress)
    split = heldout_start(len(ids))
    needed = num_samples * seq_len
    if split < needed:
        raise _too_short(source, len(ids), split, needed, "calibration")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, split - seq_len + 1, (num_samples,), generator=g)
    return ids[starts[:, None] + torch.arange(seq_len)]


def heldout_windows(
    source,
    tokenizer,
    *,
    num_samples: int = 32,
    seq_len: int = 128,
    seed: int = 0,
    model=None,
    exclude=None,
    progress: bool = False,
) -> torch.Tensor:
    """LongTensor[num_samples, seq_len] on CPU from the held-out tail: disjoint from every calibration window.

    The tail is cut into non-overlapping ``seq_len`` chunks and ``num_samples`` of them are picked with ``seed``
    (kept in text order), so the held-out set spreads over the whole tail without repeating a token.
    For ``source="self"`` the sequences are sampled with generator seed ``HELDOUT_SEED_BASE + seed``.
    A text of more than ``LARGE_TEXT_CHARS`` characters is sampled by character spans (see the module docstring).
    """
    _check_request(num_samples, seq_len, seed)
    if isinstance(source, str) and source == SELF:
        return sample_from_model(
            model, tokenizer, num_sequences=num_samples, seq_len=seq_len, seed=HELDOUT_SEED_BASE + seed
        )
    text = load_text(source, exclude=exclude)
    if len(text) > LARGE_TEXT_CHARS:
        with status(f"sampling {num_samples} held-out windows from {len(text) / 1e6:.1f}M characters", progress):
            return _large_heldout_windows(text, tokenizer, source, num_samples, seq_len, seed)
    ids = tokenize(text, tokenizer, progress=progress)
    split = heldout_start(len(ids))
    chunks = (len(ids) - split) // seq_len
    if chunks < num_samples:
        raise _too_short(source, len(ids), len(ids) - split, num_samples * seq_len, "held-out")
    g = torch.Generator().manual_seed(seed)
    picked = torch.randperm(chunks, generator=g)[:num_samples].sort().values
    return ids[split + picked[:, None] * seq_len + torch.arange(seq_len)]


def _bos_id(model, tokenizer) -> int:
    for candidate in (
        getattr(tokenizer, "bos_token_id", None),
        getattr(getattr(model, "config", None), "bos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(candidate, int):
            return candidate
    raise ValueError("tokenizer: has no BOS (or EOS) token id to start sampling from")


def _cache_argument(model) -> str:
    # transformers 5.2x renamed the KV-cache argument and output field from past_key_values to cache.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def sample_from_model(
    model, tokenizer, *, num_sequences: int, seq_len: int, seed: int, temperature: float = 1.0
) -> torch.Tensor:
    """LongTensor[num_sequences, seq_len] on CPU: BOS then ``seq_len - 1`` tokens sampled from ``model``.

    Plain ancestral sampling at ``temperature`` with a KV cache, all sequences in one batch. The draws use a
    CPU ``torch.Generator`` seeded with ``seed``, so the same model and seed give the same tokens on any device.
    """
    if model is None or tokenizer is None:
        raise ValueError(f"model: source {SELF!r} samples text from the model, so model and tokenizer are required")
    if not temperature > 0:
        raise ValueError(f"temperature: {temperature!r} must be > 0")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    out = torch.full((num_sequences, seq_len), _bos_id(model, tokenizer), dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            cache_arg = _cache_argument(model)
            past, step_input = None, out[:, :1].to(device)
            for t in range(1, seq_len):
                result = model(input_ids=step_input, use_cache=True, **{cache_arg: past})
                past = getattr(result, cache_arg)
                probs = torch.softmax(result.logits[:, -1, :].float() / temperature, dim=-1).cpu()
                out[:, t] = torch.multinomial(probs, 1, generator=g)[:, 0]
                step_input = out[:, t : t + 1].to(device)
    finally:
        model.train(was_training)
    return out


__all__ = [
    "AUSTEN",
    "HELDOUT_FRACTION",
    "HELDOUT_SEED_BASE",
    "LARGE_TEXT_CHARS",
    "SPAN_CHARS_PER_TOKEN",
    "SELF",
    "calibration_windows",
    "check_source",
    "heldout_start",
    "heldout_windows",
    "load_text",
    "sample_from_model",
    "tokenize",
]
