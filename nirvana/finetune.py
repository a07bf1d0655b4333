"""Recovery fine-tuning of a pruned checkpoint: a short LoRA (or full) run on the calibration text.

Pruning removes whole KV groups and MLP channels; a few hundred steps of next-token training on
ordinary text win back much of the lost quality. :func:`finetune` loads a checkpoint written by
:func:`nirvana.checkpoint.save_pruned`, trains it with AdamW on random windows of a text source, and
saves the result as a new checkpoint of exactly the same shapes and dtype:

- LoRA (the default, via the optional ``peft`` package): rank-``lora_rank`` adapters on every q/k/v/o
  and gate/up/down projection, merged into the weights after training, so the output is a plain
  pruned model that needs neither peft nor any adapter file;
- full fine-tuning (``full=True``): every parameter trains.

An encoder-decoder (T5) trains on the split its scores used (:func:`nirvana.objective.split_window`):
the cross-entropy of each window's second half given its first; LoRA then also adapts every
cross-attention q/k/v/o.

Training reads windows only from the part of the text before its held-out tail (the last
``nirvana.calibration.HELDOUT_FRACTION`` of the tokens, as calibration does), and ``"austen"`` never
includes the held-out novel, so perplexity and KL measurements on held-out text stay clean. The loss
is measured before and after training on the same fixed batches: a probe batch from the training
text, and a batch from the held-out tail when the tail holds at least one window.

The source folder is only read. The output holds the new weights, the source's tokenizer and other
files copied byte for byte, ``plan.json``, and ``report.json``: the source's report with a
``"finetune"`` block added (settings, losses and timings). The source's own numbers in that report
(perplexities, KL) describe the model before fine-tuning.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import calibration
from .adapters import attention_blocks, get_adapter
from .checkpoint import CONFIG_FILE, PLAN_FILE, REPORT_FILE, load_plan, load_pruned, save_pruned
from .objective import is_encoder_decoder, split_window
from .output import check_target, real_path

DEFAULT_LR_LORA = 5e-4
DEFAULT_LR_FULL = 2e-5
LORA_ALPHA_PER_RANK = 2  # lora_alpha = 2 * rank, a common choice: the adapters' update scale is alpha / rank = 2
WARMUP_FRACTION = 0.1
MAX_GRAD_NORM = 1.0
FINETUNE_KEY = "finetune"
# Files of a checkpoint that the save writes anew; every other plain file of the source is copied as is.
_WRITTEN_BY_SAVE = frozenset({CONFIG_FILE, "generation_config.json", PLAN_FILE, REPORT_FILE, "modeling_nirvana.py"})


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: {value!r} must be an int >= {low}")


def _check_folders(pruned_dir, out, overwrite: bool) -> tuple[Path, Path]:
    if not isinstance(pruned_dir, (str, os.PathLike)) or not os.fspath(pruned_dir):
        raise ValueError(f"pruned_dir: expected a checkpoint folder, got {pruned_dir!r}")
    src = real_path(pruned_dir)
    if not src.is_dir():
        raise ValueError(f"pruned_dir: {os.fspath(pruned_dir)!r} is not a folder")
    for name in (CONFIG_FILE, PLAN_FILE):
        if not (src / name).is_file():
            raise ValueError(f"pruned_dir: {str(src)!r} is not a pruned checkpoint (no {name})")
    return src, check_target(out, sources=[src], overwrite=overwrite, name="out")


def _check_settings(steps, lr, seq_len, batch_size, lora_rank, seed) -> None:
    _check_int("steps", steps, 1)
    # One window of seq_len tokens gives seq_len - 1 next-token targets.
    _check_int("seq_len", seq_len, 2)
    _check_int("batch_size", batch_size, 1)
    _check_int("lora_rank", lora_rank, 1)
    _check_int("seed", seed, 0)
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf):
        raise ValueError(f"lr: {lr!r} must be a positive number (or None for the default)")


def _training_device(device) -> torch.device:
    """``device`` as a torch.device, checked as ``nirvana prune`` checks it: cpu, cuda or cuda:N, CUDA present."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(device)
    if not isinstance(device, (str, torch.device)) or (text not in ("cpu", "cuda") and not text.startswith("cuda:")):
        raise ValueError(f"device: must be cpu, cuda or cuda:N, got {device!r}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device: must be cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {text!r} asked for, but no CUDA GPU is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device: {text!r} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return dev


def _read_report(src: Path) -> dict:
    path = src / REPORT_FILE
    if not path.is_file():
        return {}
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"pruned_dir: {str(path)!r} is not JSON ({e.msg})") from None
    if not isinstance(report, dict):
        raise ValueError(f"pruned_dir: {str(path)!r} holds a {type(report).__name__}, not a JSON object")
    return report


def _carried_files(src: Path) -> dict[str, Path]:
    """The source's plain files that the save does not write itself: tokenizer files, scores, plot, notes.

    The tokenizer files are copied rather than re-saved, so the output's tokenizer is byte-identical.
    """
    carried = {}
    for path in sorted(src.iterdir()):
        name = path.name
        shard = name.startswith("model") and name.endswith((".safetensors", ".safetensors.index.json"))
        if path.is_file() and not path.is_symlink() and not name.startswith(".") and not shard:
            if name not in _WRITTEN_BY_SAVE:
                carried[name] = path
    return carried


def _token_stream(text_source, tokenizer, model) -> tuple[torch.Tensor, int]:
    """LongTensor[n] of the text's tokens and the index where its held-out tail starts."""
    try:
        text = calibration.load_text(text_source, model=model, tokenizer=tokenizer)
    except (ValueError, FileNotFoundError) as e:
        # load_text names its argument "source"; here it is text_source.
        message = str(e).removeprefix("source: ")
        raise ValueError(f"text_source: {message}") from None
    ids = calibration.tokenize(text, tokenizer)
    return ids, calibration.heldout_start(len(ids))


def _windows(ids: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """LongTensor[len(starts), seq_len]: the windows of ``ids`` beginning at ``starts``."""
    return ids[starts[:, None] + torch.arange(seq_len)]


def _lora_targets(model: nn.Module) -> list[str]:
    """Full module names of every layer's q/k/v/o and gate/up/down linears (and an encoder-decoder's
    cross-attention q/k/v/o), minus any pruned to width 0."""
    names = {id(module): name for name, module in model.named_modules()}
    targets = []
    layers = get_adapter(model).layers(model)
    for lm in layers:
        for module in (lm.q, lm.k, lm.v, lm.o, lm.gate, lm.up, lm.down):
            # An MLP pruned away entirely leaves 0-wide linears, which have nothing to adapt.
            if module is not None and module.weight.numel() > 0:
                targets.append(names[id(module)])
    for cross in attention_blocks(layers)[len(layers) :]:
        targets += [names[id(m)] for m in (cross.q, cross.k, cross.v, cross.o)]  # each keeps a head
    return targets


def _wrap_lora(model: nn.Module, rank: int) -> tuple[nn.Module, dict]:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError(
            "full: LoRA fine-tuning needs the peft package (pip install peft); pass full=True to train all weights"
        ) from None
    targets = _lora_targets(model)
    config = LoraConfig(r=rank, lora_alpha=LORA_ALPHA_PER_RANK * rank, lora_dropout=0.0, target_modules=targets)
    settings = {"lora_rank": rank, "lora_alpha": LORA_ALPHA_PER_RANK * rank, "lora_modules": len(targets)}
    with warnings.catch_warnings():
        # peft reads transformers' deprecated is_gradient_checkpointing property; the warning is not ours to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(model, config), settings


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The training loss of windows ``x`` (LongTensor[B, seq_len]): next-token cross-entropy, or for an
    encoder-decoder (T5) the cross-entropy of each window's second half given its first, split as the
    scores split it (:func:`nirvana.objective.split_window`)."""
    if is_encoder_decoder(model):
        parts = split_window(model, x)
        parts["labels"] = parts["labels"].contiguous()  # a column slice, and transformers views it flat
        return model(**parts, use_cache=False).loss
    return model(input_ids=x, labels=x, use_cache=False).loss


@torch.no_grad()
def _mean_loss(model: nn.Module, batch: torch.Tensor, device: torch.device, batch_size: int) -> float:
    """Mean next-token cross-entropy over the rows of ``batch`` (LongTensor[n, seq_len]), in eval mode."""
    was_training = model.training
    model.eval()
    try:
        total = 0.0
        for chunk in batch.split(batch_size):
            x = chunk.to(device)
            total += _loss(model, x).float().item() * len(chunk)
    finally:
        model.train(was_training)
    return total / len(batch)


def _floating_dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _learning_rate(step: int, steps: int, lr: float) -> float:
    """Linear warmup over the first WARMUP_FRACTION of the steps, then constant: short runs need no decay."""
    warmup = max(1, round(steps * WARMUP_FRACTION))
    return lr * min(1.0, (step + 1) / warmup)


def finetune(
    pruned_dir: str | os.PathLike,
    text_source: str | os.PathLike,
    *,
    steps: int,
    out: str | os.PathLike,
    full: bool = False,
    lr: float | None = None,
    seq_len: int = 256,
    batch_size: int = 4,
    lora_rank: int = 8,
    seed: int = 0,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Fine-tune a pruned checkpoint briefly on a text and save it as a new checkpoint; returns a summary.

    Args:
        pruned_dir: a folder written by :func:`nirvana.checkpoint.save_pruned` (config.json, plan.json,
            weights, tokenizer). Only read.
        text_source: anything :func:`nirvana.calibration.load_text` takes: a ``.txt``/``.jsonl`` file, a
            folder of ``.txt`` files, ``"austen"``, ``"self"`` or a dataset id. Training windows come
            from the text before its held-out tail.
        steps: optimiser steps, each on ``batch_size`` random windows of ``seq_len`` tokens.
        out: the output folder; must not exist unless ``overwrite``, and must not be, contain or lie
            inside ``pruned_dir``.
        full: train every parameter instead of LoRA adapters.
        lr: AdamW learning rate; None means ``DEFAULT_LR_LORA`` (5e-4) for LoRA, ``DEFAULT_LR_FULL``
            (2e-5) for full fine-tuning. Warmup is linear over the first 10% of the steps.
        seq_len: tokens per window (>= 2).
        batch_size: windows per step.
        lora_rank: LoRA rank (``lora_alpha`` is twice it); ignored with ``full``.
        seed: seeds the windows and the LoRA initialisation (the caller's global RNG is left as it was).
        device: where to train; None means CUDA when available, else the CPU.
        overwrite: replace an existing ``out`` (atomically: the old folder goes only once the new one is
            complete).
        progress: show a tqdm bar over the steps.

    Training runs in float32 (the weights are upcast for it) and the result is saved in the
    checkpoint's own dtype, with the same shapes. Memory: the model in float32 plus, for full
    fine-tuning, gradients and two AdamW moments (about 16 bytes per parameter).

    Returns:
        ``{"method", "steps", "lr", "loss_start", "loss_end", "heldout_loss_start", "heldout_loss_end",
        "first_step_loss", "last_step_loss", "tokens", "train_seconds", "seconds", "out"}``: the losses are
        mean next-token cross-entropies (nats) on fixed batches before and after training (the held-out
        ones None when the text's tail is shorter than one window); the step losses are those of the
        first and last training batches; ``out`` is the output folder's absolute path.

    Raises:
        ValueError: a missing or non-checkpoint ``pruned_dir``; ``steps`` < 1 or another bad setting;
            an existing ``out`` without ``overwrite``, or one inside ``pruned_dir``; a text source that
            cannot be read or is shorter than one window before its held-out tail.
    """
    t0 = time.perf_counter()
    src, dst = _check_folders(pruned_dir, out, overwrite)
    _check_settings(steps, lr, seq_len, batch_size, lora_rank, seed)
    dev = _training_device(device)
    method = "full" if full else "lora"
    lr = float(lr) if lr is not None else (DEFAULT_LR_FULL if full else DEFAULT_LR_LORA)
    report = _read_report(src)
    plan = load_plan(src)

    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise ValueError(f"pruned_dir: {str(src)!r} has no loadable tokenizer ({str(e).splitlines()[0]})") from None
    model = load_pruned(src, device=dev)
    saved_dtype = _floating_dtype(model)
    # float32 master weights: AdamW updates of half-precision weights lose most of their small steps.
    model = model.float()
    ids, split = _token_stream(text_source, tokenizer, model)
    if split < seq_len:
        raise ValueError(
            f"text_source: {os.fspath(text_source)!r} has {split} tokens before its held-out tail, "
            f"fewer than one window of seq_len={seq_len}"
        )

    g = torch.Generator().manual_seed(seed)
    probe = _windows(ids, torch.randint(0, split - seq_len + 1, (batch_size,), generator=g), seq_len)
    tail_chunks = (len(ids) - split) // seq_len
    heldout = _windows(ids, split + torch.arange(min(batch_size, tail_chunks)) * seq_len, seq_len)
    starts = torch.randint(0, split - seq_len + 1, (steps, batch_size), generator=g)

    loss_start = _mean_loss(model, probe, dev, batch_size)
    heldout_start = _mean_loss(model, heldout, dev, batch_size) if len(heldout) else None

    fork_devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        if full:
            trained, method_settings = model, {}
            for p in model.parameters():
                p.requires_grad_(True)
        else:
            trained, method_settings = _wrap_lora(model, lora_rank)
        params = [p for p in trained.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        trained.train()
        losses: list[float] = []
        t_train = time.perf_counter()
        bar = tqdm(range(steps), desc=f"fine-tuning ({method})", unit="step", disable=not progress)
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(step, steps, lr)
            x = _windows(ids, starts[step], seq_len).to(dev)
            loss = _loss(trained, x)
            if not torch.isfinite(loss):
                raise ValueError(f"lr: training diverged at step {step} (loss {loss.item()}); try a smaller lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.close()
        train_seconds = time.perf_counter() - t_train
        del optimizer
        model = trained if full else trained.merge_and_unload()

    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    loss_end = _mean_loss(model, probe, dev, batch_size)
    heldout_end = _mean_loss(model, heldout, dev, batch_size) if len(heldout) else None
    model = model.to(saved_dtype)

    summary = {
        "method": method,
        "steps": steps,
        "lr": lr,
        "loss_start": loss_start,
        "loss_end": loss_end,
        "heldout_loss_start": heldout_start,
        "heldout_loss_end": heldout_end,
        "first_step_loss": losses[0],
        "last_step_loss": losses[-1],
        "tokens": steps * batch_size * seq_len,
        "train_seconds": round(train_seconds, 3),
    }
    block = {
        **summary,
        **method_settings,
        "source": str(src),
        "text_source": os.fspath(text_source),
        "seq_len": seq_len,
        "batch_size": batch_size,
        "seed": seed,
        "optimizer": {
            "name": "AdamW",
            "weight_decay": 0.0,
            "warmup_fraction": WARMUP_FRACTION,
            "max_grad_norm": MAX_GRAD_NORM,
        },
        "device": str(dev),
        "dtype": {"train": "float32", "saved": str(saved_dtype).removeprefix("torch.")},
        "step_losses": [round(v, 5) for v in losses],
        "probe_windows": len(probe),
        "heldout_windows": len(heldout),
    }
    if FINETUNE_KEY in report:  # a checkpoint fine-tuned before: keep that run's record under the new one
        block["previous"] = report[FINETUNE_KEY]
    report[FINETUNE_KEY] = block
    # The tokenizer's files travel among the carried files, byte for byte, so the save writes none itself.
    saved = save_pruned(model, None, plan, dst, overwrite=overwrite, report=report, extra_files=_carried_files(src))
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary["out"] = str(saved)
    return summary


__all__ = ["DEFAULT_LR_FULL", "DEFAULT_LR_LORA", "finetune"]
