"""``nirvana`` command line: argument parsing and one-line errors; the work is in the Python API.

nirvana prune MODEL --sparsity 0.2 [--gamma 3.0|auto] [--calib SOURCE] ... --out DIR
nirvana prune MODEL --scores PRUNED_DIR/scores.safetensors --sparsity 0.4 ... --out DIR  (no backward pass)
torchrun --nproc-per-node N -m nirvana prune MODEL ... --distributed fsdp --out DIR
nirvana apply PLAN.json --model DENSE_DIR --out DIR [--max-shard-size 5GB]
nirvana convert SRC.gguf|HUB_NAME --out DIR  (a safetensors folder, as --distributed needs)
nirvana eval MODEL_OR_DIR --text FILE [--seq-len 512]
nirvana eval FILE.gguf --engine llama.cpp --text FILE  (perplexity from llama.cpp's logits, same windows)
nirvana export PRUNED_DIR --format gguf --out FILE.gguf [--dtype f32|f16|bf16] [--quantize q8_0|q4_k_m|...]
               [--tokenizer-from SOURCE.gguf]
nirvana report DIR
nirvana demo
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
import warnings
from pathlib import Path

EXIT_USAGE = 2
ENGINES = ("transformers", "llama.cpp")


class CliError(Exception):
    """A one-line message for the user; the CLI prints it and exits non-zero."""


def _gamma(text: str):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or 'auto', got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        self.exit(EXIT_USAGE, f"nirvana: error: {message} (see nirvana {self.prog.split()[-1]} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .allocation import ALLOCATIONS, NORMALIZATIONS
    from .compensation import COMPENSATIONS
    from .distributed import STRATEGIES
    from .export import DTYPES as EXPORT_DTYPES
    from .export import QUANT_TYPES
    from .methods import METHODS, get_method
    from .pruning import DEVICE_MAPS, MICRO_BATCH_TOKENS, OBJECTIVES, RECIPES, SALIENCIES
    from .sources.gradients import WINDOW_WEIGHTS

    own_allocations = ", ".join(f"{m}: {get_method(m).allocation}" for m in METHODS)
    own_protection = ", ".join(f"{m}: {get_method(m).protect_layers}" for m in METHODS)
    own_seq_len = ", ".join(f"{m}: {get_method(m).seq_len}" for m in METHODS)
    own_draws = ", ".join(f"{m}: {get_method(m).draws}" for m in METHODS)
    p = _Parser(prog="nirvana", description="Structured pruning of LLMs with NIRVANA.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    pr = sub.add_parser("prune", help="prune a model and save it")
    pr.add_argument("model", help="local folder, .gguf file, hub name (when reachable), or 'smollm2'")
    pr.add_argument("--method", choices=METHODS, default=None, help="nirvana (default) or a baseline's scores")
    pr.add_argument("--sparsity", type=float, required=True, help="share of attention+MLP parameters to remove")
    pr.add_argument("--gamma", type=_gamma, default=None, help="MLP/attention pruning ratio, or 'auto' (default 3.0)")
    pr.add_argument("--calib", default="austen", help="text file/folder, .jsonl, dataset name, 'austen' or 'self'")
    pr.add_argument("--num-samples", type=int, default=None, help="calibration windows (default 32)")
    pr.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help=f"tokens per calibration (and held-out) window (default: the method's own, {own_seq_len})",
    )
    pr.add_argument("--select-calib", type=int, default=None, metavar="K", help="candidate sets (KL pick), <= 64")
    pr.add_argument(
        "--draws",
        type=int,
        default=None,
        metavar="D",
        help=f"calibration draws averaged into each candidate's scores, D times the scoring (default: the "
        f"method's own, {own_draws}; 1 with --scores)",
    )
    pr.add_argument("--heldout-samples", type=int, default=16, help="held-out windows for the KL criterion")
    pr.add_argument("--saliency", choices=SALIENCIES, default=None, help="default taylor")
    pr.add_argument("--objective", choices=OBJECTIVES, default=None, help="default maxlogit")
    pr.add_argument(
        "--adam-steps",
        type=int,
        default=0,
        metavar="N",
        help="with --saliency adam: V from AdamW's state after N steps at lr 0 on the calibration windows "
        "(default 0: the mean squared micro-batch gradient)",
    )
    pr.add_argument(
        "--window-weight",
        choices=WINDOW_WEIGHTS,
        default=None,
        help="divide each calibration window's gradient by its L2 norm (norm) or its objective value (objective) "
        "before the sum; one window per backward pass (default none: the plain sum)",
    )
    pr.add_argument(
        "--trim",
        type=float,
        default=None,
        metavar="F",
        help="leave the ceil(F*N) windows with the largest gradient norms out of the sum, F in [0, 0.5) (default 0)",
    )
    pr.add_argument(
        "--allocation",
        choices=ALLOCATIONS,
        default=None,
        help="rank KV groups/channels across layers (global) or prune each layer alike (uniform); default: the "
        f"method's own ({own_allocations})",
    )
    pr.add_argument(
        "--compensate",
        choices=COMPENSATIONS,
        default=None,
        help="bias: fold the calibration mean of the removed inputs into o_proj/down_proj biases (FLAP's "
        "compensation) for any method; flap always does, so it changes nothing there. Not for encoder-decoders",
    )
    pr.add_argument(
        "--protect-layers",
        type=int,
        default=None,
        metavar="N",
        help="the first N layers keep every KV group and MLP channel; the target is met from the others "
        f"(default: the method's own, {own_protection}; at most all layers but one)",
    )
    pr.add_argument(
        "--min-kv-groups",
        type=int,
        default=None,
        metavar="K",
        help="every layer keeps at least K KV groups (default 0: at least one, the keep-one rule)",
    )
    pr.add_argument(
        "--normalize",
        choices=NORMALIZATIONS,
        default=None,
        help="divide each layer's KV-group and MLP-channel scores by that layer's mean or median before the "
        "global ranking (default none: the published unnormalised scores)",
    )
    pr.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default=None,
        help="paper: exactly the published NIRVANA settings (32 windows of 128 tokens, one set, the plain "
        "gradient sum, unnormalised global ranking; --gamma a number, default 3); a flag that contradicts "
        "it is refused",
    )
    pr.add_argument("--round-to", type=int, default=8)
    pr.add_argument(
        "--micro-batch-size",
        type=int,
        default=None,
        help=f"windows per forward/backward pass (default {MICRO_BATCH_TOKENS} tokens' worth: 8 at 128, 2 at 512)",
    )
    pr.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    pr.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    pr.add_argument("--distributed", choices=STRATEGIES, default=None, help="fsdp: score on all torchrun ranks")
    pr.add_argument("--device-map", choices=DEVICE_MAPS, default=None, help="spread one process's model (accelerate)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument(
        "--scores",
        default=None,
        metavar="FILE",
        help="re-prune from an earlier run's scores.safetensors (or its folder): no calibration, no backward pass",
    )
    pr.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    pr.add_argument("--overwrite", action="store_true")
    pr.add_argument("--quiet", action="store_true", help="no progress bars")

    ap = sub.add_parser("apply", help="compact a dense safetensors checkpoint with a plan.json, tensor by tensor")
    ap.add_argument("plan", help="a plan.json, or a pruned folder holding one")
    ap.add_argument("--model", required=True, help="the dense checkpoint folder the plan was made for (never modified)")
    ap.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    ap.add_argument("--max-shard-size", default="5GB", help="most bytes per output shard, e.g. 5GB or 500MiB")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument(
        "--compensation",
        default=None,
        metavar="FILE",
        help="a compensated plan's calibration means (default: the compensation.safetensors beside the plan)",
    )
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")

    cv = sub.add_parser("convert", help="write a .gguf file or hub model as a safetensors folder (for --distributed)")
    cv.add_argument("source", help=".gguf file, hub name, model folder or 'smollm2'")
    cv.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    cv.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    cv.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB")
    cv.add_argument("--overwrite", action="store_true")

    ev = sub.add_parser("eval", help="perplexity of a model on a text")
    ev.add_argument("model", help="model folder (pruned or dense), .gguf file or 'smollm2'")
    ev.add_argument(
        "--text",
        default=None,
        help="a plain-text file, 'persuasion' (held-out novel) or 'fortunes' (Debian's fortunes, another domain)",
    )
    ev.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks (needs the lm-eval package)")
    ev.add_argument("--seq-len", type=int, default=512)
    ev.add_argument("--max-windows", type=int, default=None)
    ev.add_argument("--device", default=None)
    ev.add_argument(
        "--engine",
        choices=ENGINES,
        default="transformers",
        help="transformers (default), or llama.cpp for a .gguf file (needs llama_cpp)",
    )

    ex = sub.add_parser("export", help="write a pruned folder as one GGUF file that llama.cpp runs")
    ex.add_argument("pruned_dir", help="a pruned (or dense) Llama/Mistral/SmolLM folder with its tokenizer")
    ex.add_argument("--format", choices=("gguf",), default="gguf", help="gguf (llama.cpp), the only format so far")
    ex.add_argument("--out", required=True, help="the .gguf file to write (never replaced)")
    ex.add_argument("--dtype", choices=EXPORT_DTYPES, default="f32", help="the float file's weights (default f32)")
    ex.add_argument(
        "--quantize", choices=QUANT_TYPES, default=None, help="then run llama.cpp's quantiser (needs llama_cpp)"
    )
    ex.add_argument(
        "--tokenizer-from", default=None, metavar="FILE.gguf", help="copy this GGUF file's tokenizer metadata as is"
    )

    ft = sub.add_parser("finetune", help="recovery fine-tuning of a pruned folder (LoRA, or --full)")
    ft.add_argument("pruned_dir")
    ft.add_argument("--text", required=True, help="text file/folder, .jsonl, 'austen' or a dataset name")
    ft.add_argument("--steps", type=int, required=True)
    ft.add_argument("--out", required=True)
    ft.add_argument("--full", action="store_true", help="train every weight instead of LoRA adapters")
    ft.add_argument("--lr", type=float, default=None)
    ft.add_argument("--seq-len", type=int, default=256)
    ft.add_argument("--batch-size", type=int, default=4)
    ft.add_argument("--lora-rank", type=int, default=8)
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--device", default=None)
    ft.add_argument("--overwrite", action="store_true")
    ft.add_argument("--quiet", action="store_true")

    rp = sub.add_parser("report", help="summarise a pruned folder's report.json")
    rp.add_argument("dir")
    rp.add_argument("--json", action="store_true", help="print the raw report.json")

    dm = sub.add_parser("demo", help="the embedded default: SmolLM2-135M pruned by 20% on Jane Austen")
    dm.add_argument("--out", default=None, help="output folder (default: runs/smollm2-nirvana-20)")
    dm.add_argument("--max-windows", type=int, default=24, help="512-token windows of persuasion to evaluate")
    return p


def _text_source(text: str) -> tuple[str, str]:
    from . import corpus

    named = corpus.eval_text(text)
    if named is not None:
        return named, text
    path = Path(text).expanduser()
    if not path.is_file():
        raise CliError(f"--text: {text!r} is not a file (or 'persuasion' or 'fortunes')")
    return path.read_text(encoding="utf-8"), str(path)


def load_any(model: str, device: str | None):
    """A pruned checkpoint folder (with plan.json) or anything ``load_model`` takes."""
    import torch

    from .checkpoint import PLAN_FILE, load_pruned
    from .models import load_model

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = Path(model).expanduser()
    if path.is_dir() and (path / PLAN_FILE).is_file():
        from transformers import AutoTokenizer

        return load_pruned(path, device=dev).eval(), AutoTokenizer.from_pretrained(path)
    return load_model(model, device=dev)


def cmd_prune(args) -> int:
    from .pruning import PruneSettings, prune
    from .report import summarize

    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' own bars (weight loading) go to stderr too

    # Flags left at None were not given: the recipe, or else PruneSettings, supplies them.
    names = {f.name for f in dataclasses.fields(PruneSettings)} - {"recipe"}
    given = {name: value for name, value in vars(args).items() if name in names and value is not None}
    settings = PruneSettings.for_recipe(args.recipe, **given)
    result = prune(settings, progress=not args.quiet)
    if result.out is None and settings.distributed:
        return 0  # a rank other than 0: rank 0 prints and saves
    print(summarize(result.report))
    print(f"saved to {result.out}")
    return 0


def cmd_apply(args) -> int:
    from .apply import apply_plan

    out = apply_plan(
        args.plan,
        args.model,
        args.out,
        max_shard_size=args.max_shard_size,
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.quiet,
        compensation=args.compensation,
    )
    print(f"saved to {out}")
    return 0


def cmd_convert(args) -> int:
    from .convert import convert

    out = convert(args.source, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    print(f"saved to {out}")
    return 0


def cmd_eval(args) -> int:
    from .evaluation import lm_eval_tasks, perplexity

    if args.text is None and args.tasks is None:
        raise CliError("eval: give --text FILE (perplexity) and/or --tasks T1,T2 (lm-eval)")
    if args.engine == "llama.cpp":
        return _eval_llama_cpp(args)
    text, label = _text_source(args.text) if args.text is not None else (None, None)
    model, tokenizer = load_any(args.model, args.device)
    if text is not None:
        ppl = perplexity(model, tokenizer, text, seq_len=args.seq_len, max_windows=args.max_windows)
        print(f"perplexity of {args.model} on {label} ({args.seq_len}-token windows): {ppl:.3f}")
    if args.tasks is not None:
        results = lm_eval_tasks(model, tokenizer, [t for t in args.tasks.split(",") if t])
        print(json.dumps(results, indent=1, default=str))
    return 0


def cmd_export(args) -> int:
    from .export import export_gguf

    info = export_gguf(
        args.pruned_dir, args.out, dtype=args.dtype, quantize=args.quantize, tokenizer_from=args.tokenizer_from
    )
    kind = args.quantize or args.dtype
    print(f"wrote {info['path']} ({info['architecture']}, {kind}, {info['bytes'] / 2**20:.1f} MiB)")
    return 0


def _eval_llama_cpp(args) -> int:
    from .evaluation import gguf_perplexity

    if args.tasks is not None:
        raise CliError("--tasks: lm-eval tasks run on the transformers engine only; drop --engine llama.cpp")
    if args.text is None:
        raise CliError("eval: --engine llama.cpp gives perplexity; give --text FILE")
    if args.device not in (None, "cpu"):
        raise CliError(f"--device: {args.device!r} is not used by --engine llama.cpp (it runs on the CPU here)")
    if not args.model.endswith(".gguf") or not Path(args.model).expanduser().is_file():
        raise CliError(f"model: {args.model!r} is not a .gguf file; --engine llama.cpp runs GGUF files only")
    text, label = _text_source(args.text)
    ppl = gguf_perplexity(
        Path(args.model).expanduser(), text, seq_len=args.seq_len, max_windows=args.max_windows, progress=False
    )
    print(f"perplexity of {args.model} on {label} ({args.seq_len}-token windows, llama.cpp): {ppl:.3f}")
    return 0


def cmd_finetune(args) -> int:
    from .finetune import finetune
    from .progress import library_bars

    with library_bars(not args.quiet):  # transformers' own bars (loading, saving) follow --quiet too
        summary = finetune(
            args.pruned_dir,
            args.text,
            steps=args.steps,
            out=args.out,
            full=args.full,
            lr=args.lr,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            lora_rank=args.lora_rank,
            seed=args.seed,
            device=args.device,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    print(json.dumps(summary, indent=1, default=str))
    return 0


def cmd_report(args) -> int:
    from .report import load_report, summarize

    report = load_report(args.dir)
    print(json.dumps(report, indent=1) if args.json else summarize(report))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out=args.out, max_windows=args.max_windows)
    return 0


COMMANDS = {
    "prune": cmd_prune,
    "apply": cmd_apply,
    "convert": cmd_convert,
    "eval": cmd_eval,
    "export": cmd_export,
    "finetune": cmd_finetune,
    "report": cmd_report,
    "demo": cmd_demo,
}


def launch_rank() -> int:
    """This process's rank under torchrun (or a launcher that sets the same variables), else 0.

    Read from the environment, not from torch.distributed: a bad flag fails before the process group exists.
    """
    from .distributed import LAUNCH_ENV

    if not all(os.environ.get(name) for name in LAUNCH_ENV):
        return 0
    try:
        return int(os.environ["RANK"])
    except ValueError:
        return 0


def _fail(line: str) -> None:
    """Print ``line`` on rank 0 only (every rank hits the same bad flag), and give torchrun its error file."""
    # torchrun names a file per worker in TORCHELASTIC_ERROR_FILE; its failure summary then shows this line
    # (a rank-specific error included) instead of a link to its docs. Its own traceback still follows.
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w", encoding="utf-8") as f:
                # The layout torch.distributed.elastic's own ErrorHandler writes, so torchrun reads it silently.
                extra = {"py_callstack": line, "timestamp": str(int(time.time()))}
                json.dump({"message": {"message": line, "extraInfo": extra}}, f)
        except OSError:
            pass  # the summary then falls back to torchrun's own words; the exit status still says it failed
    if launch_rank() == 0:
        print(line, file=sys.stderr)


def _show_warning(message, category, filename, lineno, file=None, line=None, *, fallback):
    """nirvana's own warnings as one line, ``nirvana: warning: ...``; other libraries' as Python prints them."""
    if Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent):
        if launch_rank() == 0:
            print(f"nirvana: warning: {str(message).splitlines()[0]}", file=file or sys.stderr)
        return
    fallback(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    shown = warnings.showwarning
    warnings.showwarning = functools.partial(_show_warning, fallback=shown)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        _fail("nirvana: interrupted; nothing half-written was left behind")
        return 130
    except (CliError, ValueError, FileNotFoundError, FileExistsError, OSError) as e:
        if os.environ.get("NIRVANA_DEBUG"):
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        _fail(f"nirvana: error: {message}")
        return EXIT_USAGE
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
