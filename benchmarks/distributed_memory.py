"""Per-rank host memory and bytes read of ``nirvana prune --distributed fsdp`` on 1, 2 and 4 gloo ranks.

The checkpoint is synthetic and built on the fly: a Llama of ``--layers`` decoder layers at hidden
``--hidden`` (16 query heads, ``--kv-heads`` KV heads of 128), MLP ``--mlp``, a ``--vocab``-row
embedding and untied lm_head, float32 random normal weights, in ``--shards`` safetensors shards with
an index, and a character-level tokenizer. Weights dominate: at the defaults (6 layers, hidden 2048,
MLP 8192) it is 1.53 GB.

For each world size ``W`` one ``torchrun --nproc-per-node W`` runs the whole ``prune --distributed
fsdp`` flow (rank-local load, calibration, scoring, allocation, rank 0 streaming the pruned checkpoint
to disk) on the CPU. Each rank records:

* ``overhead``: its ``VmRSS`` after the imports and the process-group start, before any tensor (the
  fixed overhead the rule adds);
* ``after load`` / ``after scoring``: its ``VmHWM`` (peak RSS so far) when loading and scoring end;
* ``peak``: its ``ru_maxrss`` at the end, the streamed write included (rank 0);
* ``read``: the bytes its loader read (``LoadRecord``), and ``rchar`` from ``/proc/self/io`` over the
  load (every ``read``/``pread`` byte, JSON headers and config included) as a cross-check.

Target per rank: ``peak <= model/W + fp32 grad shard (params/W * 4 B) + 2 x largest layer + overhead``,
and the loaders' bytes summed over ranks ``<= 1.1 x`` the checkpoint's tensor bytes.

Usage:
    python benchmarks/distributed_memory.py [--layers 6] [--hidden 2048] [--mlp 8192] [--ranks 1 2 4]
                                            [--workdir DIR] [--out FILE.md]

Prints a markdown table and writes it to ``--out`` (default
``benchmarks/results/distributed-memory-<date>-cpu.md``). Needs twice the checkpoint in free disk.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# One calibration draw: more draws repeat the same pass, so they add time, not peak memory.
SETTINGS = dict(sparsity=0.3, num_samples=8, seq_len=64, micro_batch_size=1, round_to=8, draws=1)
# The calibration text: 20k random common words (~100 kB). Small on purpose: a whole novel through the
# character-level tokenizer costs over a GB of tokenizer state, which would drown what is measured.
CALIB_WORDS = 20_000


def _status(field: str) -> int:
    """``field`` of /proc/self/status in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return -1


def make_checkpoint(folder: Path, args) -> dict:
    """Write the synthetic checkpoint shard by shard (one shard's tensors in memory at a time)."""
    import torch
    import transformers
    from safetensors.torch import save_file
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    head_dim, heads = 128, args.hidden // 128
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=args.kv_heads,
        head_dim=head_dim, max_position_embeddings=512, tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"], dtype="float32",
    )  # fmt: skip
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    vocab = {chr(i): i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="?", bos_token="\x02", eos_token="\x03", pad_token="\x00"
    ).save_pretrained(folder)
    h, kv = args.hidden, args.kv_heads * head_dim

    def layer(i: int) -> dict[str, tuple[int, ...]]:
        p = f"model.layers.{i}."
        return {
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (args.mlp, h), p + "mlp.up_proj.weight": (args.mlp, h),
            p + "mlp.down_proj.weight": (h, args.mlp),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        }  # fmt: skip

    groups = [[] for _ in range(args.shards)]
    for i in range(args.layers):
        groups[i * args.shards // args.layers].append(layer(i))
    groups[0].insert(0, {"model.embed_tokens.weight": (args.vocab, h)})
    groups[-1].append({"model.norm.weight": (h,), "lm_head.weight": (args.vocab, h)})
    gen = torch.Generator().manual_seed(0)
    weight_map, total, largest_layer = {}, 0, 0
    for s, group in enumerate(groups):
        name = f"model-{s + 1:05d}-of-{args.shards:05d}.safetensors"
        tensors = {}
        for shapes in group:
            nbytes = 0
            for key, shape in shapes.items():
                t = torch.ones(shape) if "norm" in key else torch.randn(shape, generator=gen) * 0.02
                tensors[key] = t
                nbytes += t.numel() * 4
            if "model.embed_tokens.weight" not in shapes and "lm_head.weight" not in shapes:
                largest_layer = max(largest_layer, nbytes)
        save_file(tensors, folder / name, metadata={"format": "pt"})
        total += sum(t.numel() * 4 for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"bytes": total, "params": total // 4, "largest_layer": largest_layer}


def make_calibration(path: Path) -> Path:
    import random

    words = "the a of to and in that it was her you as had with for she not but be his at on".split()
    rng = random.Random(0)
    path.write_text(" ".join(rng.choice(words) for _ in range(CALIB_WORDS)), encoding="utf-8")
    return path


def rank_main(ckpt: str, out: str, result: str) -> None:
    """One rank of one world size: the prune flow, with this rank's memory and reads recorded."""
    import torch
    import torch.distributed as dist

    from nirvana import distributed, rank_load
    from nirvana.pruning import PruneSettings, prune

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    rec: dict = {"rank": rank, "world_size": dist.get_world_size(), "overhead": _status("VmRSS")}
    load, score = rank_load.load_sharded, distributed.score_on_ranks

    def timed_load(*a, **kw):
        before, start = _rchar(), time.perf_counter()
        root, record = load(*a, **kw)
        rec.update(read=record.bytes_read, rchar=_rchar() - before, load_s=time.perf_counter() - start)
        rec["after_load"] = _status("VmHWM")
        return root, record

    def timed_score(*a, **kw):
        run = score(*a, **kw)
        rec["after_scoring"] = _status("VmHWM")
        return run

    rank_load.load_sharded, distributed.score_on_ranks = timed_load, timed_score
    start = time.perf_counter()
    calib = str(Path(ckpt).parent / "calib.txt")
    settings = PruneSettings(model=ckpt, calib=calib, device="cpu", distributed="fsdp", out=out, **SETTINGS)
    prune(settings, progress=False)
    rec["wall_s"] = time.perf_counter() - start
    rec["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(f"{result}.rank{rank}.json").write_text(json.dumps(rec))
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


def _launch(work: Path, ckpt: Path, w: int, tag: str) -> tuple[list[dict], float]:
    """One torchrun of ``w`` ranks over ``ckpt``: every rank's record, and the wall time."""
    out, result = work / f"pruned-{tag}-{w}", work / f"result-{tag}-{w}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={w}"]
    cmd += [__file__, "--rank-main", str(ckpt), str(out), str(result)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        sys.exit(f"torchrun with {w} ranks failed:\n{proc.stderr[-6000:]}")
    wall = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return [json.loads(Path(f"{result}.rank{r}.json").read_text()) for r in range(w)], wall


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--mlp", type=int, default=8192)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--rank-main", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank_main:
        rank_main(*args.rank_main)
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="nirvana-dist-mem-"))
    try:
        ckpt = work / "dense"
        info = make_checkpoint(ckpt, args)
        # The fixed overhead: the same flow on a model of ~1 MB (imports, process group, tokenizer,
        # calibration, kernels, the write), measured per world size and rank.
        floor = argparse.Namespace(**{**vars(args), "layers": 1, "hidden": 256, "mlp": 512, "vocab": 256})
        floor.kv_heads, floor.shards = 1, 1
        make_checkpoint(work / "floor", floor)
        make_calibration(work / "calib.txt")
        rows, runs = [], {}
        for w in args.ranks:
            fixed = _launch(work, work / "floor", w, "floor")[0]
            ranks, wall = _launch(work, ckpt, w, "dense")
            runs[w] = ranks
            for rec, base in zip(ranks, fixed):
                rule = info["bytes"] / w + info["params"] * 4 / w + 2 * info["largest_layer"]
                rows.append((w, rec, base["peak"], rule, wall))
        lines = [
            f"# `prune --distributed fsdp` host memory per rank ({datetime.date.today()}, CPU, gloo)",
            "",
            f"Synthetic Llama: {args.layers} layers, hidden {args.hidden}, MLP {args.mlp}, {args.kv_heads} KV heads "
            f"of 128, vocab {args.vocab}, float32, {args.shards} safetensors shards: **{gb(info['bytes'])} GB** "
            f"({info['params'] / 1e6:.0f}M parameters), largest layer {gb(info['largest_layer'])} GB. "
            f"Settings: {SETTINGS}, calibration on {CALIB_WORDS} random words. Machine: "
            f"{platform.machine()}, {os.cpu_count()} cores (shared), every rank on the CPU. Each world size "
            "is one torchrun of the whole flow, the streamed write of the pruned checkpoint on rank 0 included.",
            "",
            "imports = VmRSS after imports and process-group start; fixed = the peak of the same flow on a "
            "~1 MB model (1 layer, hidden 256) with the same W, the fixed overhead; rule = model/W + fp32 "
            "grad shard (params/W x 4 B) + 2 x largest layer; target: peak <= rule + fixed. GB = 10^9 bytes.",
            "",
            "in flight = (peak - fixed - model/W - grad shard) / largest layer: how many layer-sized buffers "
            "the step holds at its peak beyond the shards (the rule's 2 is the unsharded layer and the "
            "prefetched one).",
            "",
            "| W | rank | imports | fixed | after load | after scoring | peak | rule | rule + fixed | "
            "peak - rule | met | in flight | read (loader) | rchar over load | load s | wall s (torchrun) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        flights = []
        for w, rec, fixed, rule, wall in rows:
            ok = rec["peak"] <= rule + fixed
            shards = info["bytes"] / w + info["params"] * 4 / w
            flights.append((rec["peak"] - fixed - shards) / info["largest_layer"])
            lines.append(
                f"| {w} | {rec['rank']} | {gb(rec['overhead'])} | {gb(fixed)} | {gb(rec['after_load'])} | "
                f"{gb(rec['after_scoring'])} | {gb(rec['peak'])} | {gb(rule)} | {gb(rule + fixed)} | "
                f"{gb(rec['peak'] - rule)} | {'yes' if ok else 'NO'} | {flights[-1]:.1f} | {gb(rec['read'])} | "
                f"{gb(rec['rchar'])} | "
                f"{rec['load_s']:.1f} | {wall:.0f} |"
            )
        lines += ["", "| W | bytes read, all ranks | / checkpoint | target <= 1.1 |", "|---|---|---|---|"]
        for w, ranks in runs.items():
            total = sum(r["read"] for r in ranks)
            ratio = total / info["bytes"]
            lines.append(f"| {w} | {gb(total)} GB | {ratio:.3f} | {'yes' if ratio <= 1.1 else 'NO'} |")
        lines += [
            "",
            f"Measured rule: peak per rank <= model/W + fp32 grad shard + {math.ceil(max(flights))} x largest layer "
            f"+ {gb(max(r[2] for r in rows))} GB fixed (the largest 'in flight' and 'fixed' above).",
        ]
        text = "\n".join(lines) + "\n"
        print(text)
        dest = Path(args.out or ROOT / "benchmarks" / "results" / f"distributed-memory-{datetime.date.today()}-cpu.md")
        dest.write_text(text)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
