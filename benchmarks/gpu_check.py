"""Check and time every kernel against its reference at real layer shapes; print one markdown table.

For each model in ``shapes.GPU_MODELS`` and each op in ``shapes.OPS`` this checks the Triton kernel
against the eager reference (compaction bit-exact, saliency within 1e-4 relative error), then times
the kernel, the eager reference and ``torch.compile(reference)`` (median, after warmup). The table
gives GB/s from the bytes each op must move (for ``compact_cols``, a gather of single columns: the
32-byte source sectors its kept columns touch, plus the output) and the percentage of the device's
measured copy bandwidth, and marks the targets at the target shapes (``shapes.TARGET_MODELS``) PASS or FAIL.

Usage (``benchmarks/gpu_check.sh`` wraps the first):
    python benchmarks/gpu_check.py                             # CUDA, real shapes
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --smoke  # CPU: tiny shapes, Triton interpreter

Exit status: 0 when every kernel output checked was correct, 1 when one was wrong or failed, 2 when
the machine cannot run the check. Cases not reached within ``--budget-s`` are listed as skipped,
and torch.compile stops after ``--compile-budget-s`` (its column then says so), which keeps a run
on an H200 under 5 minutes. Missing a performance target does not change the exit status; the
table says PASS or FAIL for each.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import measure
import shapes
import torch
import triton

# The ahead-of-time compile check's figures (make static), printed beside each measured time.
RESULTS = Path(__file__).resolve().parent / "results"
STATIC_JSON = (RESULTS / "static-sm90.json", RESULTS / "static-sm90-before.json")
# gpu_check op -> static_check call; Qwen2's attention carries its q/k/v biases in both.
STATIC_CASES = {
    "attention_group_saliency": "attention",
    "attention_group_saliency_adam": "attention+adam",
    "mlp_channel_saliency": "mlp",
    "saliency_dim0": "saliency dim0",
    "saliency_dim1": "saliency dim1",
    "compact_rows": "compact rows (up)",
    "compact_cols": "compact cols (down)",
    "compact_groups_k_rows": "compact_groups rows (k)",
    "compact_groups_o_cols": "compact_groups cols (o)",
    "compact_many": "compact_many rows (gate+up)",
}

# shapes.py imports the package, falling back to this checkout's copy when it is not installed.
nk = shapes.nk

# Targets at the target shapes: fraction of copy bandwidth by family, and minimum speedups.
MIN_PCT_OF_COPY = {shapes.SALIENCY: 85.0, shapes.COMPACTION: 80.0}
MIN_SPEEDUP_VS_EAGER = 3.0
MIN_SPEEDUP_VS_COMPILE = 1.0
RTOL = 1e-4
# A compile starts only while this much of the total budget is left: one reference can take ~30 s.
COMPILE_MARGIN_S = 45.0


@dataclass
class Row:
    """One (model, op) line of the table. ``None`` times were not measured; ``*_note`` says why."""

    model: str
    op: str
    family: str
    shape: str = ""
    dtype: str = ""
    bytes_moved: int = 0
    triton_ms: float | None = None
    eager_ms: float | None = None
    compile_ms: float | None = None
    triton_note: str = ""
    compile_note: str = ""
    ok: bool = False
    skipped: bool = False
    detail: str = ""
    floor_us: float | None = None  # the static check's time floor (bytes at 4.3 TB/s), compiled not run
    static_gb_per_s: float | None = None  # bytes over the floor time, what the compile predicts at best

    @property
    def gb_per_s(self) -> float | None:
        return None if self.triton_ms is None else measure.gb_per_s(self.bytes_moved, self.triton_ms)

    def pct_of_copy(self, copy_bytes_per_s: float) -> float | None:
        rate = self.gb_per_s
        return None if rate is None else 100 * rate * 1e9 / copy_bytes_per_s

    def speedup(self, other_ms: float | None) -> float | None:
        return None if self.triton_ms is None or other_ms is None else other_ms / self.triton_ms


def load_static(paths=STATIC_JSON) -> list[dict]:
    """The committed static-check rows (the first file that exists), or [] when there is none."""
    for path in paths:
        path = Path(path)
        if path.exists():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return []
    return []


def static_prediction(rows: list[dict], model: str, op: str, qkv_bias: bool = False) -> tuple[float, float] | None:
    """(floor us, predicted GB/s) for one (model, op) from the static rows at sm_90, or None."""
    case = STATIC_CASES.get(op)
    if case is None:
        return None
    if qkv_bias and case.startswith("attention"):
        case = case.replace("attention", "attention+bias")
    mine = [r for r in rows if r.get("model") == model and r.get("case") == case and r.get("arch") == 90]
    mine = [r for r in mine if "floor_us" in r]
    if not mine:
        return None
    floor_us = mine[0]["floor_us"]
    nbytes = sum(max(r["min_bytes"], r["sector_floor"]) for r in mine)
    tiling = sum(r["tiling_bytes"] for r in mine)
    # Predicted at best: the bytes the op must move, over the time the tiling's own bytes take at copy speed.
    return floor_us, nbytes / (tiling / 4.3e12) / 1e9 if tiling else None


def _error(err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first[:80]}" if first else type(err).__name__


class Budget:
    """Wall-clock limits, so the whole run fits its time slot even when torch.compile is slow."""

    def __init__(self, total_s: float, compile_s: float):
        self.start = time.perf_counter()
        self.total_s, self.compile_s = total_s, compile_s
        self.compile_spent = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def out_of_time(self) -> bool:
        return self.elapsed() > self.total_s

    def may_compile(self) -> bool:
        return self.compile_spent < self.compile_s and self.elapsed() + COMPILE_MARGIN_S < self.total_s


def check_case(op: str, model: shapes.Model, device: torch.device, args, budget: Budget) -> Row:
    """Check and time one op at one model's shape; failures land in the row instead of raising."""
    family = shapes.OPS[op][0]
    row = Row(model=model.name, op=op, family=family)
    if budget.out_of_time():
        row.skipped, row.detail = True, "time budget"
        return row
    timing = {"warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms}
    try:
        w = shapes.workload(op, model, device)
    except Exception as err:  # e.g. out of memory: report it and go on to the next case
        row.detail = f"inputs: {_error(err)}"
        return row
    row.shape, row.dtype, row.bytes_moved = w.shape, shapes.dtype_name(w.dtype), w.bytes_moved
    try:
        expected = w.run_reference()
        row.eager_ms = measure.median_ms(w.run_reference, device, **timing)
    except Exception as err:  # without a reference there is nothing to check the kernel against
        row.detail = f"reference: {_error(err)}"
        return row
    try:
        got = w.run_kernel()
        row.ok, row.detail = measure.compare(got, expected, exact=w.exact, rtol=RTOL)
        row.triton_ms = measure.median_ms(w.run_kernel, device, **timing)
    except Exception as err:
        row.ok, row.detail, row.triton_note = False, f"kernel: {_error(err)}", "error"
    if not budget.may_compile():
        row.compile_note = "skipped (time budget)"
        return row
    # A fresh dynamo cache per case: each reference compiles exactly once for its shape.
    torch._dynamo.reset()
    t0 = time.perf_counter()
    try:
        compiled = torch.compile(w.reference, backend=args.compile_backend)
        out = compiled(*w.args, **w.kwargs)
        measure.synchronize(device)
    except Exception as err:
        row.compile_note = f"error: {_error(err)}"
        return row
    finally:
        budget.compile_spent += time.perf_counter() - t0
    same, why = measure.compare(out, expected, exact=w.exact, rtol=RTOL)
    if not same:
        row.compile_note = f"wrong ({why})"
    try:
        row.compile_ms = measure.median_ms(lambda: compiled(*w.args, **w.kwargs), device, **timing)
    except Exception as err:
        row.compile_note = f"error: {_error(err)}"
    return row


def target_verdict(row: Row, copy_bytes_per_s: float, targets: tuple[str, ...]) -> str:
    """PASS / FAIL against the stated targets, with the reasons for a FAIL; "" off the ``targets`` models."""
    if row.model not in targets:
        return ""
    if row.skipped:
        return "not measured"
    pct = row.pct_of_copy(copy_bytes_per_s)
    if pct is None or not row.ok:
        return "FAIL (no correct kernel result)"
    misses = []
    need = MIN_PCT_OF_COPY[row.family]
    if pct < need:
        misses.append(f"{_fmt(pct)}% < {need:.0f}% BW")
    vs_eager = row.speedup(row.eager_ms)
    if vs_eager is not None and vs_eager < MIN_SPEEDUP_VS_EAGER:
        misses.append(f"{_fmt(vs_eager)}x < {MIN_SPEEDUP_VS_EAGER:.0f}x eager")
    vs_compile = row.speedup(row.compile_ms)
    if vs_compile is not None and vs_compile < MIN_SPEEDUP_VS_COMPILE:
        misses.append(f"{_fmt(vs_compile)}x < 1x compile")
    notes = misses + (["vs compile n/a"] if vs_compile is None else [])
    return ("FAIL" if misses else "PASS") + (f" ({'; '.join(notes)})" if notes else "")


def _fmt(x: float) -> str:
    # Three significant digits without switching to exponents for the large values.
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _cell(x: float | None, suffix: str = "", note: str = "") -> str:
    if x is None:
        return note or "-"
    return f"{_fmt(x)}{suffix} {note}".strip()


def render(rows: list[Row], header: str, copy_bytes_per_s: float, budget: Budget, targets: tuple[str, ...]) -> str:
    """The report: header line, targets, one markdown table, and a summary."""
    cols = [
        "model", "op", "shape", "dtype", "triton ms", "GB/s", "% copy BW", "eager ms", "compile ms",
        "vs eager", "vs compile", "ok", "target", "static floor us", "predicted GB/s", "measured / floor",
    ]  # fmt: skip
    lines = [
        header,
        "",
        "Static columns: the time floor and best-case GB/s that the ahead-of-time compile check predicts "
        "(benchmarks/results/static-sm90.json: compiled for sm_90a, not run).",
        "",
        "Bytes: what each op must move. compact_cols gathers single columns, so it is counted at sector "
        "granularity: every 32-byte sector of the source its kept columns touch (nearly all, for a random half), "
        "plus the output written.",
        "",
        f"Targets at {', '.join(targets)}: saliency >= {MIN_PCT_OF_COPY[shapes.SALIENCY]:.0f}% and "
        f"compaction >= {MIN_PCT_OF_COPY[shapes.COMPACTION]:.0f}% of the copy bandwidth, both >= "
        f"{MIN_SPEEDUP_VS_EAGER:.0f}x faster than eager and no slower than torch.compile(reference).",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    for r in rows:
        cells = [
            r.model,
            r.op,
            r.shape,
            r.dtype,
            _cell(r.triton_ms, note=r.triton_note),
            _cell(r.gb_per_s),
            _cell(r.pct_of_copy(copy_bytes_per_s), "%"),
            _cell(r.eager_ms),
            _cell(r.compile_ms, note=r.compile_note),
            _cell(r.speedup(r.eager_ms), "x"),
            _cell(r.speedup(r.compile_ms), "x"),
            ("skipped" if r.skipped else "ok" if r.ok else "FAIL") + f" ({r.detail})",
            target_verdict(r, copy_bytes_per_s, targets),
            _cell(r.floor_us),
            _cell(r.static_gb_per_s),
            _cell(None if r.floor_us is None or r.triton_ms is None else r.triton_ms * 1e3 / r.floor_us, "x"),
        ]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    verdicts = [target_verdict(r, copy_bytes_per_s, targets) for r in rows if r.model in targets]
    passed = sum(v.startswith("PASS") for v in verdicts)
    checked = [r for r in rows if not r.skipped]
    lines += [
        "",
        f"Correct: {sum(r.ok for r in checked)}/{len(checked)} checked"
        + (f" ({len(rows) - len(checked)} not reached in the time budget)" if len(checked) < len(rows) else "")
        + f". Targets: {passed}/{len(verdicts)} PASS. "
        f"torch.compile time: {budget.compile_spent:.0f} s. Elapsed: {budget.elapsed():.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU run: tiny shapes, kernels in the Triton interpreter")
    p.add_argument("--warmup-ms", type=float, default=None, help="warmup per timing (default 25; smoke 0)")
    p.add_argument("--rep-ms", type=float, default=None, help="timed repetitions per timing (default 100; smoke 1)")
    p.add_argument("--budget-s", type=float, default=240.0, help="skip the remaining cases after this many seconds")
    p.add_argument("--compile-budget-s", type=float, default=150.0, help="stop compiling after this many seconds")
    p.add_argument(
        "--compile-backend", default=None, help="torch.compile backend (default inductor; smoke eager, for speed)"
    )
    p.add_argument("--out", type=Path, default=None, help="also write the report here (default $OUT/gpu_check.md)")
    args = p.parse_args(argv)
    smoke_defaults = {"warmup_ms": 0.0, "rep_ms": 1.0, "compile_backend": "eager"}
    gpu_defaults = {"warmup_ms": measure.WARMUP_MS, "rep_ms": measure.REP_MS, "compile_backend": "inductor"}
    for name, value in (smoke_defaults if args.smoke else gpu_defaults).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("warmup_ms", "rep_ms", "budget_s", "compile_budget_s"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')}: must be >= 0, got {getattr(args, name)}")
    if args.out is None and os.environ.get("OUT"):
        args.out = Path(os.environ["OUT"]) / "gpu_check.md"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The references graph-break on purpose (the index checks read values); dynamo's warnings about it
    # would bury the table.
    torch._logging.set_logs(dynamo=logging.ERROR)
    if args.smoke:
        # The smoke run applies the targets to its first shape, only to exercise the verdicts.
        device, models = torch.device("cpu"), shapes.SMOKE_MODELS
        targets = (models[0].name,)
        if nk.backend(torch.empty(0)) != "triton-interpreter":
            print("gpu_check --smoke runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        device_name = "CPU (smoke run: Triton interpreter, tiny shapes)"
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device; on a CPU machine run it with --smoke", file=sys.stderr)
            return 2
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            # The kernels were defined for the interpreter, which would time Python instead of the GPU.
            print("gpu_check: unset TRITON_INTERPRET to time the compiled kernels (or pass --smoke)", file=sys.stderr)
            return 2
        device, models, targets = torch.device("cuda"), shapes.GPU_MODELS, shapes.TARGET_MODELS
        device_name = torch.cuda.get_device_name(device)

    budget = Budget(args.budget_s, args.compile_budget_s)
    copy_bw, copied = measure.copy_bandwidth(device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    header = (
        f"gpu_check {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC | {device_name} | torch {torch.__version__} | "
        f"triton {triton.__version__} | copy bandwidth {copy_bw / 1e9:.0f} GB/s "
        f"(median dst.copy_(src) of {copied >> 20} MiB, 2x bytes / time) | compile backend {args.compile_backend}"
    )
    print(header, flush=True)
    rows = []
    static = load_static()
    for model in models:
        for op in shapes.ops():
            row = check_case(op, model, device, args, budget)
            pred = static_prediction(static, model.name, op, model.qkv_bias)
            if pred is not None:
                row.floor_us, row.static_gb_per_s = pred
            rows.append(row)
            status = "skipped" if row.skipped else "ok" if row.ok else "FAIL"
            floor = f", static floor {row.floor_us:g} us" if row.floor_us is not None else ""
            measured = f", {row.triton_ms * 1e3:.1f} us" if row.triton_ms is not None else ""
            print(
                f"  {model.name} {op}: {status} ({row.detail}){measured}{floor} [{budget.elapsed():.0f} s]", flush=True
            )
    report = render(rows, header, copy_bw, budget, targets)
    print()
    print(report, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report, encoding="utf-8")
        print(f"written to {args.out}")
    return 0 if all(r.ok or r.skipped for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
