"""Peak host memory of ``nirvana apply`` on a checkpoint with real 70B layer shapes, against its largest tensor.

The checkpoint is synthetic: Llama 3 70B's layer shapes (hidden 8192, 64 query and 8 KV heads of 128,
MLP 28672) but only ``--layers`` layers and a ``--vocab``-row embedding and untied lm_head, in
bfloat16, filled with random bits, in safetensors shards of at most ``--source-shard-size``. The plan
comes from :func:`nirvana.allocation.allocate` on random scores (``--sparsity``, global allocation).
Target: peak RSS of the apply below 3x the largest tensor.

Every step runs in a fresh interpreter (this script re-run with a hidden option), so no reading
inherits the benchmark's own memory:

1. ``--make`` writes the checkpoint and ``plan.json`` under ``--workdir`` (a temporary folder in
   ``/tmp`` by default, removed at the end);
2. ``--floor`` imports what the apply imports, builds the meta model and reads every header, then
   reports its peak: what the apply costs before any tensor is read;
3. ``--apply`` runs ``nirvana.cli.main(["apply", ...])`` and reports its own ``VmHWM``; meanwhile this
   process samples the child's ``/proc/PID/status`` every 10 ms for ``RssAnon`` (heap) and
   ``RssFile`` (the memory-mapped source pages) peaks, and ``os.wait4`` gives its ``ru_maxrss``.

Then two compacted tensors are checked bit for bit against ``index_select`` of the source.

Usage:
    python benchmarks/apply_memory.py [--layers 3] [--vocab 32000] [--sparsity 0.3] [--device cpu]
                                      [--workdir DIR] [--keep] [--out FILE.md]

Prints a markdown report and writes it to ``--out`` (default
``benchmarks/results/apply-memory-<date>-<device>.md``). Needs about 6 GB of free disk for the
source and 4 GB for the output at the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = dict(hidden_size=8192, num_attention_heads=64, num_key_value_heads=8, head_dim=128, intermediate_size=28672)
# --tiny: the same script on small shapes, to check the script itself in seconds.
TINY_SHAPES = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32, intermediate_size=512)
TARGET = 3.0
MIB = 1 << 20


# --------------------------------------------------------------------------------------------------
# Children
# --------------------------------------------------------------------------------------------------


def _status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon and RssFile of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def make_checkpoint(
    folder: Path, layers: int, vocab: int, sparsity: float, source_shard_bytes: int, tiny: bool
) -> None:
    import torch
    import transformers
    from safetensors.torch import save_file

    from nirvana.adapters import get_adapter
    from nirvana.allocation import allocate

    config = transformers.LlamaConfig(
        **(TINY_SHAPES if tiny else SHAPES),
        num_hidden_layers=layers,
        vocab_size=vocab,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    config.architectures = ["LlamaForCausalLM"]
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)

    def random_bf16(shape):
        # Random bits, NaNs included: the apply only moves them, and the check compares bits.
        return torch.randint(-(1 << 15), 1 << 15, shape, dtype=torch.int16, generator=gen).view(torch.bfloat16)

    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        if groups[-1] and size + nbytes > source_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(groups, 1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: random_bf16(shapes[n]) for n in names}, folder / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, file)
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    g = get_adapter(config).geometry(config)
    attn = torch.rand(g.num_layers, g.num_kv_heads, generator=gen)
    mlp = torch.rand(g.num_layers, g.intermediate_size, generator=gen)
    plan = allocate(attn, mlp, g, sparsity=sparsity, architecture="LlamaForCausalLM")
    plan.save(folder.parent / "plan.json")


def floor(folder: Path) -> dict:
    """Everything the apply does before it reads a tensor: imports, the meta model, every header."""
    from nirvana.apply import meta_model, read_plan, source_tensors, tensor_specs

    plan = read_plan(folder.parent / "plan.json")
    _, meta = meta_model(folder)
    specs = tensor_specs(source_tensors(folder), meta, plan)
    return {"status": _status(), "tensors": len(specs)}


def run_apply(folder: Path, out: Path, device: str) -> dict:
    from nirvana.cli import main

    t0 = time.perf_counter()
    code = main(
        ["apply", str(folder.parent / "plan.json"), "--model", str(folder), "--out", str(out), "--device", device]
    )
    if code != 0:
        raise SystemExit(code)
    return {"status": _status(), "wall_s": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------------


def _child(argv: list[str], sample: bool = False) -> tuple[dict, dict]:
    """Run this script with ``argv``; its JSON result, and the sampled RSS peaks plus ru_maxrss."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the apply runs as a user runs it: CPU tensors take torch's gather
    proc = subprocess.Popen([sys.executable, __file__, *argv], stdout=subprocess.PIPE, env=env, cwd=ROOT)
    peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    done = threading.Event()

    def sampler():
        path = Path(f"/proc/{proc.pid}/status")
        while not done.is_set():
            try:
                for line in path.read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(value.split()[0]) * 1024)
            except (OSError, ValueError):
                pass
            time.sleep(0.01)

    thread = threading.Thread(target=sampler, daemon=True)
    if sample:
        thread.start()
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    if sample:
        thread.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"child {argv[0]} failed with status {os.waitstatus_to_exitcode(status)}")
    peaks["ru_maxrss"] = usage.ru_maxrss * 1024
    return json.loads(stdout.decode().strip().splitlines()[-1]), peaks


def check_bits(src: Path, out: Path) -> str:
    """Layer 0's q_proj and down_proj in the output against index_select of the source, bit for bit."""
    import torch
    from safetensors import safe_open

    from nirvana.plan import PruningPlan

    plan = PruningPlan.load(out / "plan.json")
    g, lp = plan.geometry, plan.layers[0]
    src_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    out_index = out / "model.safetensors.index.json"
    out_map = json.loads(out_index.read_text())["weight_map"] if out_index.exists() else None
    qd = g.group_size * g.head_dim
    rows = torch.tensor([j * qd + r for j in lp.kv_groups_kept for r in range(qd)])
    cols = torch.tensor(lp.mlp_channels_kept)
    results = []
    for name, dim, index in (
        ("model.layers.0.self_attn.q_proj.weight", 0, rows),
        ("model.layers.0.mlp.down_proj.weight", 1, cols),
    ):
        with safe_open(src / src_map[name], framework="pt") as f:
            want = f.get_tensor(name).index_select(dim, index)
        with safe_open(out / (out_map[name] if out_map else "model.safetensors"), framework="pt") as f:
            got = f.get_tensor(name)
        same = got.shape == want.shape and torch.equal(got.view(torch.int16), want.view(torch.int16))
        results.append(f"{name} {list(got.shape)}: {'identical' if same else 'DIFFERENT'}")
    return "; ".join(results)


def _mib(n: int) -> str:
    return f"{n:,} ({n / MIB:,.0f} MiB)"


def _tensor_sizes(src: Path) -> list[tuple[str, int]]:
    from safetensors import safe_open

    sizes = []
    for file in sorted(src.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                n = 2
                for s in f.get_slice(name).get_shape():
                    n *= s
                sizes.append((name, n))
    return sorted(sizes, key=lambda x: -x[1])


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    host = platform.node() or "host"
    return f"{host}: {cpu}, {os.cpu_count()} cores, {mem / (1 << 30):.0f} GiB RAM, {platform.system()}"


def render(args, sizes, floor_result, apply_result, peaks, check, src_bytes, out_bytes, plan) -> str:
    import torch
    import transformers

    largest_name, largest = sizes[0]
    mlp_name, mlp = next((n, s) for n, s in sizes if "mlp" in n)
    peak = apply_result["status"]["VmHWM"]
    fl = floor_result["status"]["VmHWM"]
    ratio = peak / largest
    verdict = "PASS" if ratio < TARGET else "FAIL"
    shapes = (
        "TINY shapes (--tiny: a check of the script, not a measurement)"
        if args.tiny
        else "70B layer shapes (hidden 8192, 64 q / 8 KV heads of 128, MLP 28672)"
    )
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    lines = [
        "# Apply benchmark: peak host memory of `nirvana apply` against the largest tensor",
        "",
        f"- date: {now}",
        f"- machine: {_machine()}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}; device {args.device}",
        f"- checkpoint: synthetic Llama, {shapes}, "
        f"{args.layers} layers, vocab {args.vocab} (embedding and an untied lm_head), bfloat16 random bits; "
        f"{len(sizes)} tensors, {_mib(src_bytes)} in source shards of at most {args.source_shard_size} bytes",
        f"- plan: allocate() on random scores, sparsity {args.sparsity} (achieved {plan.achieved_sparsity():.3f}), "
        f"gamma 3, global; output {_mib(out_bytes)}",
        f"- command: `{command}`",
        "- peak: the apply child's own `VmHWM` at exit (fresh interpreter, `nirvana.cli.main(['apply', ...])`); "
        "RssAnon/RssFile peaks sampled every 10 ms from /proc; `ru_maxrss` from `os.wait4` as a cross-check",
        "",
        "| reading | bytes | x largest tensor |",
        "|---|---:|---:|",
        f"| largest tensor (`{largest_name}`) | {_mib(largest)} | 1.00 |",
        f"| largest MLP tensor (`{mlp_name}`) | {_mib(mlp)} | {mlp / largest:.2f} |",
        f"| floor: imports + meta model + headers, no tensor read | {_mib(fl)} | {fl / largest:.2f} |",
        f"| **apply peak RSS (VmHWM)** | **{_mib(peak)}** | **{ratio:.2f}** |",
        f"| apply peak above the floor | {_mib(peak - fl)} | {(peak - fl) / largest:.2f} |",
        f"| sampled peak RssAnon (heap) | {_mib(peaks['RssAnon'])} | {peaks['RssAnon'] / largest:.2f} |",
        f"| sampled peak RssFile (mapped source pages, libraries) | {_mib(peaks['RssFile'])} | "
        f"{peaks['RssFile'] / largest:.2f} |",
        f"| ru_maxrss (wait4) | {_mib(peaks['ru_maxrss'])} | {peaks['ru_maxrss'] / largest:.2f} |",
        "",
        f"Apply wall time: {apply_result['wall_s']:.1f} s. Bit check: {check}.",
        "",
        f"**Peak RSS {ratio:.2f}x the largest tensor; target < {TARGET:g}x: {verdict}.**",
        "",
    ]
    return "\n".join(lines)


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--source-shard-size", type=int, default=2 * 10**9, help="bytes per source shard")
    p.add_argument("--workdir", type=Path, default=None, help="where the checkpoints go (default: a /tmp folder)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # small shapes: checks the script
    # Hidden: the children.
    p.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--floor", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--apply", nargs=2, type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.make:
        make_checkpoint(args.make, args.layers, args.vocab, args.sparsity, args.source_shard_size, args.tiny)
        print(json.dumps({"ok": True}))
        return 0
    if args.floor:
        print(json.dumps(floor(args.floor)))
        return 0
    if args.apply:
        print(json.dumps(run_apply(*args.apply, args.device)))
        return 0

    work = args.workdir or Path(tempfile.mkdtemp(prefix="nirvana-apply-bench-", dir="/tmp"))
    src, out = work / "dense", work / "pruned"
    common = ["--layers", str(args.layers), "--vocab", str(args.vocab), "--sparsity", str(args.sparsity)]
    common += ["--device", args.device, "--source-shard-size", str(args.source_shard_size)]
    common += ["--tiny"] if args.tiny else []
    try:
        print(f"writing the checkpoint to {src} ...", file=sys.stderr)
        _child([*common, "--make", str(src)])
        print("measuring the floor ...", file=sys.stderr)
        floor_result, _ = _child([*common, "--floor", str(src)])
        print("running the apply ...", file=sys.stderr)
        apply_result, peaks = _child([*common, "--apply", str(src), str(out)], sample=True)
        check = check_bits(src, out)
        from nirvana.plan import PruningPlan

        plan = PruningPlan.load(work / "plan.json")
        report = render(
            args, _tensor_sizes(src), floor_result, apply_result, peaks, check, _dir_bytes(src), _dir_bytes(out), plan
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(report)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    path = args.out or ROOT / "benchmarks" / "results" / f"apply-memory-{date}-{args.device}.md"
    path.write_text(report)
    print(f"written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
