"""What scoring costs: wall time and peak memory of ``compute_scores`` against plain backward passes.

One run, one model, one calibration batch, three variants:

* ``scores``: ``nirvana.saliency.compute_scores(objective="maxlogit", saliency="taylor")``, micro-batched;
* ``ce_micro``: a plain forward + backward with the model's own CE loss over the same windows and the same
  micro-batches, every parameter requiring grad and ``.grad`` accumulating, as a user would write it
  (``model(input_ids=ids, labels=ids).loss.backward()`` per micro-batch): the **time** reference;
* ``ce_full``: the naive way to get gradients for saliency, one CE forward + backward over the whole batch
  with every parameter's ``.grad`` kept: the **memory** reference.

Both baselines pass ``use_cache=False``, so they build no KV cache they do not need (which makes them
cheaper, the comparison stricter). Targets: scoring time <= 1.15 x ``ce_micro``, scoring peak memory
<= 0.6 x ``ce_full``.

Time: one warm-up run of ``scores`` and ``ce_micro`` each, then ``--repeats`` runs of each, interleaved
(scores, ce_micro, scores, ce_micro, ...) so load on a shared machine hits both alike; the median is reported.
Gradients left by a previous run are dropped before the clock starts.

Memory, above what the loaded model and batch already hold:

* CUDA: in this process, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus
  ``memory_allocated`` just before the variant (PyTorch's allocator: tensors, not the cache it reserves).
* CPU: each variant in a fresh interpreter (this script re-run with a hidden option) that loads the model,
  builds the batch, runs the variant on one short window (so one-off allocations are not counted), resets
  the kernel's peak-RSS mark (``/proc/self/clear_refs``), reads its RSS, runs the variant once on the whole
  batch and reads the peak RSS (``VmHWM``; ``ru_maxrss`` as a cross-check). Peak minus RSS-before is
  the variant's peak. Resetting matters: loading can peak above the loaded model, and ``ru_maxrss`` alone
  also inherits the parent's peak across fork+exec, so the children are started before this process loads
  anything. Without ``clear_refs`` (not Linux) ``ru_maxrss`` is used and the table says so.

Usage:
    python benchmarks/flow.py [--model smollm2|tiny|PATH] [--num-samples 32] [--seq-len 128]
                              [--micro-batch-size 8] [--device cpu|cuda] [--repeats 3] [--out FILE.md]

Prints a markdown report (header, one table, PASS/FAIL per target) and writes it to ``--out`` as well.
The exit status is 0 whether or not a target is met; a failed run raises.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

try:
    import nirvana  # noqa: F401
except ImportError:  # a bare checkout that was never pip-installed: use this repository's copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nirvana_kernels
from nirvana import calibration, models
from nirvana.saliency import compute_scores

TIME_TARGET = 1.15
MEMORY_TARGET = 0.6
VARIANTS = ("scores", "ce_micro", "ce_full")
TIMED = ("scores", "ce_micro")
# Geometry of --model tiny: a random Llama with GQA (G = 2), for checking the script in seconds.
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)
_CHILD_TIMEOUT_S = 3600


@dataclass
class Batch:
    """The model under test and its calibration batch.

    Attributes:
        model: a causal LM in eval mode on the target device.
        windows: int64 ``[num_samples, seq_len]`` token ids on the same device.
        description: one line naming the model, its size and dtype.
        source: where the windows came from.
    """

    model: nn.Module
    windows: torch.Tensor
    description: str
    source: str


@dataclass
class Peak:
    """One variant's peak memory above what was held just before it ran, in bytes.

    ``details`` holds the raw readings (RSS before, VmHWM, ru_maxrss, ...) for the report.
    """

    bytes: int
    wall_s: float
    method: str
    details: dict


# --------------------------------------------------------------------------------------------------
# Model and batch
# --------------------------------------------------------------------------------------------------


def _tiny_model(seq_len: int, seed: int) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**TINY, max_position_embeddings=max(seq_len, 128), architectures=["LlamaForCausalLM"])
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def load_batch(args: argparse.Namespace) -> Batch:
    """The model (``--model``) on ``--device`` and ``--num-samples`` x ``--seq-len`` calibration windows.

    ``tiny`` uses random token ids (it has no tokenizer); the others use the embedded Austen calibration text.
    """
    device = torch.device(args.device)
    if args.model == "tiny":
        model = _tiny_model(args.seq_len, args.seed).to(device=device, dtype=getattr(torch, args.dtype or "float32"))
        gen = torch.Generator().manual_seed(args.seed)
        windows = torch.randint(0, TINY["vocab_size"], (args.num_samples, args.seq_len), generator=gen)
        source = f"uniform random token ids (seed {args.seed})"
    else:
        model, tokenizer = models.load_model(args.model, device=device, dtype=args.dtype)
        windows = calibration.calibration_windows(
            calibration.AUSTEN, tokenizer, num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed
        )
        source = f'calibration_windows("austen", seed={args.seed})'
    model.eval()
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    arch = ", ".join(getattr(config, "architectures", None) or [type(model).__name__])
    description = (
        f"{args.model} ({arch}, {config.num_hidden_layers} layers, {params / 1e6:.1f}M parameters, "
        f"{str(next(model.parameters()).dtype).removeprefix('torch.')})"
    )
    return Batch(model, windows.to(device), description, source)


# --------------------------------------------------------------------------------------------------
# The variants
# --------------------------------------------------------------------------------------------------


def _drop_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def _all_params_require_grad(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


def run_scores(model: nn.Module, windows: torch.Tensor, micro_batch_size: int) -> float:
    """The scoring pass under test; returns the objective's value."""
    scores = compute_scores(
        model, windows, objective="maxlogit", saliency="taylor", micro_batch_size=micro_batch_size, progress=False
    )
    return float(scores.meta["objective_value"])


def run_ce(model: nn.Module, windows: torch.Tensor, micro_batch_size: int) -> float:
    """CE forward + backward per micro-batch, every parameter's ``.grad`` accumulating; returns the mean loss."""
    _all_params_require_grad(model)
    losses = []
    for s in range(0, windows.shape[0], micro_batch_size):
        ids = windows[s : s + micro_batch_size]
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        losses.append(float(loss.detach()))
    return statistics.fmean(losses)


def variant_fn(name: str, micro_batch_size: int, num_samples: int) -> Callable[[nn.Module, torch.Tensor], float]:
    if name == "scores":
        return lambda model, windows: run_scores(model, windows, micro_batch_size)
    if name == "ce_micro":
        return lambda model, windows: run_ce(model, windows, micro_batch_size)
    if name == "ce_full":
        return lambda model, windows: run_ce(model, windows, num_samples)
    raise ValueError(f"variant: must be one of {VARIANTS}, got {name!r}")


def variant_label(name: str, micro_batch_size: int) -> str:
    return {
        "scores": f"`compute_scores` (maxlogit, taylor), micro-batch {micro_batch_size}",
        "ce_micro": f"CE forward+backward, micro-batch {micro_batch_size}, all params require grad",
        "ce_full": "naive CE forward+backward, full batch, every `.grad` kept",
    }[name]


# --------------------------------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[nn.Module, torch.Tensor], float], batch: Batch) -> tuple[float, float]:
    _drop_grads(batch.model)
    device = batch.windows.device
    _sync(device)
    t0 = time.perf_counter()
    value = fn(batch.model, batch.windows)
    _sync(device)
    return time.perf_counter() - t0, value


def time_variants(batch: Batch, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, dict]:
    """Warm-up once each, then ``args.repeats`` interleaved runs; per variant its times and objective value."""
    fns = {name: variant_fn(name, args.micro_batch_size, args.num_samples) for name in TIMED}
    out = {name: {"times_s": [], "value": None} for name in TIMED}
    for name in TIMED:
        seconds, out[name]["value"] = _timed(fns[name], batch)
        log(f"warm-up {name}: {seconds:.2f} s")
    for r in range(args.repeats):
        for name in TIMED:
            seconds, _ = _timed(fns[name], batch)
            out[name]["times_s"].append(seconds)
            log(f"run {r + 1}/{args.repeats} {name}: {seconds:.2f} s")
    _drop_grads(batch.model)
    return out


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; None where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _maxrss_bytes() -> int:
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru if sys.platform == "darwin" else ru * 1024  # Linux reports kB, macOS bytes


def _reset_peak_rss() -> bool:
    # "5" resets the peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


def cpu_peak_in_this_process(name: str, batch: Batch, args: argparse.Namespace) -> dict:
    """Run one variant once and measure its peak RSS above the RSS just before it (see the module docstring)."""
    fn = variant_fn(name, args.micro_batch_size, args.num_samples)
    # One short window first, so one-off allocations (thread pools, lazy imports) are not counted.
    fn(batch.model, batch.windows[:1, : min(8, batch.windows.shape[1])])
    _drop_grads(batch.model)
    gc.collect()
    reset = _reset_peak_rss()
    rss_before = _status_bytes("VmRSS")
    maxrss_before = _maxrss_bytes()
    t0 = time.perf_counter()
    value = fn(batch.model, batch.windows)
    wall = time.perf_counter() - t0
    hwm, maxrss_after = _status_bytes("VmHWM"), _maxrss_bytes()
    if reset and rss_before is not None and hwm is not None:
        peak, method = hwm - rss_before, "VmHWM after clear_refs, minus VmRSS before"
    else:
        before = rss_before if rss_before is not None else maxrss_before
        peak, method = maxrss_after - before, "ru_maxrss minus RSS before (peak mark not resettable)"
    return {
        "peak_bytes": peak,
        "wall_s": wall,
        "method": method,
        "rss_before": rss_before,
        "hwm_after": hwm,
        "maxrss_before": maxrss_before,
        "maxrss_after": maxrss_after,
        "value": value,
    }


def _child_argv(args: argparse.Namespace, name: str) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--memory-child", name]
    argv += ["--model", args.model, "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len)]
    argv += ["--micro-batch-size", str(args.micro_batch_size), "--device", "cpu", "--seed", str(args.seed)]
    return argv + (["--dtype", args.dtype] if args.dtype else [])


def cpu_peaks(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Peak]:
    """Each variant's peak RSS, each in a fresh interpreter; call before this process loads the model."""
    peaks = {}
    for name in VARIANTS:
        log(f"memory {name}: fresh process ...")
        done = subprocess.run(
            _child_argv(args, name), stdout=subprocess.PIPE, text=True, timeout=_CHILD_TIMEOUT_S, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"the memory run of {name} failed with exit status {done.returncode}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        peaks[name] = Peak(result.pop("peak_bytes"), result.pop("wall_s"), result.pop("method"), result)
        log(f"memory {name}: {peaks[name].bytes / 2**20:.0f} MiB in {peaks[name].wall_s:.1f} s")
    return peaks


def cuda_peaks(batch: Batch, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Peak]:
    """Each variant's peak of allocated CUDA memory above what was allocated just before it, in this process."""
    device = batch.windows.device
    peaks = {}
    for name in VARIANTS:
        fn = variant_fn(name, args.micro_batch_size, args.num_samples)
        _drop_grads(batch.model)
        gc.collect()
        torch.cuda.empty_cache()
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        value = fn(batch.model, batch.windows)
        _sync(device)
        wall = time.perf_counter() - t0
        top = torch.cuda.max_memory_allocated(device)
        details = {"allocated_before": before, "max_allocated": top, "value": value}
        peaks[name] = Peak(top - before, wall, "max_memory_allocated minus memory_allocated before", details)
        log(f"memory {name}: {peaks[name].bytes / 2**20:.0f} MiB in {wall:.2f} s")
    _drop_grads(batch.model)
    return peaks


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _bytes(n: int | None) -> str:
    return "—" if n is None else f"{n:,} ({n / 2**20:,.0f} MiB)"


def _verdict(ratio: float, target: float) -> str:
    return "PASS" if ratio <= target else "FAIL"


def _device_line(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"cpu ({cpu}; {os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads)"


def _command(argv: list[str]) -> str:
    return "python benchmarks/flow.py" + "".join(" " + shlex.quote(a) for a in argv)


def render(
    args: argparse.Namespace, argv: list[str], batch: Batch, times: dict[str, dict], peaks: dict[str, Peak]
) -> str:
    """The markdown report: header, the table, the memory readings and one verdict line per target."""
    import transformers

    device = batch.windows.device
    mbs = args.micro_batch_size
    n = args.num_samples
    med = {name: statistics.median(times[name]["times_s"]) for name in TIMED}
    time_ratio = med["scores"] / med["ce_micro"]
    mem_ratio = {name: peaks[name].bytes / peaks["ce_full"].bytes for name in VARIANTS}
    backend = nirvana_kernels.backend(next(batch.model.parameters()))
    slow = backend == "triton-interpreter"
    interp = " (TRITON_INTERPRET=1: kernels run as Python, times not meaningful)" if slow else ""
    method = next(iter(peaks.values())).method
    where = (
        "in this process"
        if device.type == "cuda"
        else "one fresh process per variant, run once after a warm-up on one short window"
    )
    lines = [
        "# Flow benchmark: saliency scoring against plain backward passes",
        "",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- device: {_device_line(device)}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; saliency kernels run on `{backend}`{interp}",
        f"- model: {batch.description}",
        f"- batch: {n} windows x {args.seq_len} tokens from {batch.source}; micro-batch {mbs} "
        f"({-(-n // mbs)} micro-batches)",
        f"- time: one warm-up run each, then the median of {args.repeats} interleaved runs "
        "(scores, CE, scores, CE, ...); gradients dropped before each run, outside the clock",
        f"- memory: peak above what the loaded model and batch hold, {where}: {method}",
        f"- command: `{_command(argv)}`",
        "",
        "| variant | median s | time ratio | peak bytes | memory ratio | target | result |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    time_target = f"time ≤ {TIME_TARGET:.2f} × CE micro-batched"
    mem_target = f"memory ≤ {MEMORY_TARGET:.2f} × naive full batch"
    mem_verdict = _verdict(mem_ratio["scores"], MEMORY_TARGET)
    rows = [
        (
            "scores",
            f"{med['scores']:.2f}",
            f"{time_ratio:.3f}",
            f"{time_target}; {mem_target}",
            f"time {_verdict(time_ratio, TIME_TARGET)}, memory {mem_verdict}",
        ),
        ("ce_micro", f"{med['ce_micro']:.2f}", "1.000", "time reference", "—"),
        ("ce_full", "—", "—", "memory reference", "—"),
    ]
    for name, median, ratio, target, verdict in rows:
        lines.append(
            f"| {variant_label(name, mbs)} | {median} | {ratio} | {_bytes(peaks[name].bytes)} | "
            f"{mem_ratio[name]:.3f} | {target} | {verdict} |"
        )
    runs = "; ".join(f"{name} {', '.join(f'{t:.2f}' for t in times[name]['times_s'])}" for name in TIMED)
    lines += ["", f"Timed runs (s, in the order run, interleaved): {runs}"]
    lines += ["", "Memory readings (one run each; bytes):", ""]
    if device.type == "cuda":
        lines += [
            "| variant | allocated before | max allocated | peak above before | wall s |",
            "|---|---:|---:|---:|---:|",
        ]
        for name in VARIANTS:
            d = peaks[name].details
            lines.append(
                f"| {name} | {_bytes(d['allocated_before'])} | {_bytes(d['max_allocated'])} | "
                f"{_bytes(peaks[name].bytes)} | {peaks[name].wall_s:.2f} |"
            )
    else:
        lines += [
            "| variant | RSS before | VmHWM after | ru_maxrss before / after | peak above before | wall s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name in VARIANTS:
            d = peaks[name].details
            lines.append(
                f"| {name} | {_bytes(d['rss_before'])} | {_bytes(d['hwm_after'])} | "
                f"{d['maxrss_before'] / 2**20:,.0f} / {d['maxrss_after'] / 2**20:,.0f} MiB | "
                f"{_bytes(peaks[name].bytes)} | {peaks[name].wall_s:.2f} |"
            )
    values = {name: times[name]["value"] for name in TIMED}
    lines += [
        "",
        f"Sanity: maxlogit objective {values['scores']:.4f}, mean CE loss {values['ce_micro']:.4f} "
        f"(full batch: {peaks['ce_full'].details['value']:.4f}).",
        "",
        f"**Time: {time_ratio:.3f} ≤ {TIME_TARGET:.2f}: {_verdict(time_ratio, TIME_TARGET)}. "
        f"Memory: {mem_ratio['scores']:.3f} ≤ {MEMORY_TARGET:.2f}: {mem_verdict}.**",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=models.DEFAULT_MODEL, help="smollm2 (default), tiny, or a model folder/.gguf")
    p.add_argument("--num-samples", type=_positive, default=32, help="calibration windows (default 32)")
    p.add_argument("--seq-len", type=_positive, default=128, help="tokens per window (default 128)")
    p.add_argument("--micro-batch-size", type=_positive, default=8, help="windows per forward/backward (default 8)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default=None, help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--repeats", type=_positive, default=3, help="timed runs per variant (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default 0)")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    p.add_argument("--memory-child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device: 'cuda' was asked for but CUDA is not available on this machine")
    if args.dtype is not None and not isinstance(getattr(torch, args.dtype, None), torch.dtype):
        p.error(f"--dtype: {args.dtype!r} is not a torch dtype name")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.memory_child is not None:
        batch = load_batch(args)
        print(json.dumps(cpu_peak_in_this_process(args.memory_child, batch, args)), flush=True)
        return 0

    def log(msg: str) -> None:
        print(f"[flow] {msg}", file=sys.stderr, flush=True)

    if os.environ.get("TRITON_INTERPRET") == "1" and args.device == "cpu":
        log("warning: TRITON_INTERPRET=1 runs the kernels in Python; unset it to time the CPU path")
    # On CPU the children run first, while this process is small (see the module docstring on ru_maxrss).
    peaks = cpu_peaks(args, log) if args.device == "cpu" else None
    batch = load_batch(args)
    log(f"{batch.description}; windows {tuple(batch.windows.shape)}")
    times = time_variants(batch, args, log)
    if peaks is None:
        peaks = cuda_peaks(batch, args, log)
    report = render(args, argv, batch, times, peaks)
    print(report, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
