"""End to end on one device: a synthetic model with Llama-3.1-8B layer shapes, pruned by one process and by
``--distributed fsdp`` with world size 1, against a plain forward+backward of the same windows.

Meant for ``benchmarks/gpu_check.sh`` on a lent H200 (``--device cuda``: bfloat16, NCCL); ``--smoke`` runs
the same steps at tiny shapes on the CPU (float32, gloo), which is how it is checked without a GPU.

1. The checkpoint: ``--layers`` decoder layers of hidden 4096, 32 query and 8 KV heads of 128, MLP
   14336, vocabulary 128256, untied lm_head; random weights drawn on the device, one safetensors
   shard per layer (the embedding and the head in their own), with an index.
2. A plain micro-batched CE forward+backward of the calibration windows (the cost scoring is
   measured against), timed and with its peak device memory.
3. ``nirvana prune`` in this process, then ``torchrun --nproc-per-node 1 -m nirvana prune ...
   --distributed fsdp``: each run's per-stage times and peak device memory (from its report.json),
   and whether the two plans are identical (they must be).

Prints a markdown report; with ``$OUT`` set, writes it to ``$OUT/distributed_e2e.md``. Exit status 1
when the plans differ.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, mlp=14336, vocab=128256)
SMOKE = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, mlp=96, vocab=256)
# NIRVANA's default windows (512 tokens, two a pass), so the GPU run measures the memory the default needs.
# One calibration draw (NIRVANA's default is 4): the scoring time is compared with one forward+backward pass.
SETTINGS = dict(sparsity=0.3, num_samples=8, seq_len=512, micro_batch_size=2, round_to=8, gamma=3.0, draws=1)


def make_checkpoint(folder: Path, shapes: dict, layers: int, device: str, dtype) -> dict:
    """The synthetic checkpoint, drawn on ``device``; returns its byte counts."""
    import torch
    import transformers
    from safetensors.torch import save_file
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    s = shapes
    config = transformers.LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["mlp"], num_hidden_layers=layers,
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"],
        max_position_embeddings=1024, tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
        dtype=str(dtype).removeprefix("torch."),
    )  # fmt: skip
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({chr(i): i for i in range(128)}, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="?", bos_token="\x02", eos_token="\x03", pad_token="\x00"
    ).save_pretrained(folder)
    gen = torch.Generator(device).manual_seed(0)
    h, q, kv = s["hidden"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]

    def draw(shape, norm=False):
        if norm:
            return torch.ones(shape, dtype=dtype)
        return (torch.randn(shape, generator=gen, device=device) * 0.02).to(dtype).cpu()

    groups = [{"model.embed_tokens.weight": (s["vocab"], h)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        groups.append({
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (s["mlp"], h), p + "mlp.up_proj.weight": (s["mlp"], h),
            p + "mlp.down_proj.weight": (h, s["mlp"]),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })  # fmt: skip
    groups.append({"model.norm.weight": (h,), "lm_head.weight": (s["vocab"], h)})
    weight_map, total = {}, 0
    for n, group in enumerate(groups):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: draw(shape, "norm" in k) for k, shape in group.items()}
        save_file(tensors, folder / name, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    per_layer = sum(
        int(torch.Size(shape).numel()) for k, shape in groups[1].items() if "norm" not in k
    )  # prunable elements of one layer
    return {"bytes": total, "prunable_grad_fp32": 4 * per_layer * layers}


def plain_backward(folder: Path, calib: Path, device: str, dtype) -> dict:
    """Wall time and peak device memory of a micro-batched CE forward+backward of the calibration windows."""
    import torch

    from nirvana.calibration import calibration_windows
    from nirvana.models import load_model

    model, tokenizer = load_model(folder, device=device, dtype=dtype)
    windows = calibration_windows(
        str(calib), tokenizer, num_samples=SETTINGS["num_samples"], seq_len=SETTINGS["seq_len"]
    )
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    mbs = SETTINGS["micro_batch_size"]
    for i in range(0, windows.shape[0], mbs):
        ids = windows[i : i + mbs].to(device)
        model(input_ids=ids, labels=ids).loss.backward()
    if cuda:
        torch.cuda.synchronize()
    out = {"seconds": time.perf_counter() - start}
    out["peak_device_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
    return out


def prune_run(folder: Path, calib: Path, out: Path, device: str, dtype: str, distributed: bool) -> dict:
    """One ``nirvana prune`` (in a fresh process), returning its report.json."""
    argv = ["-m", "nirvana", "prune", str(folder), "--calib", str(calib), "--device", device, "--dtype", dtype]
    argv += ["--quiet", "--out", str(out)]
    for key, value in SETTINGS.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    cmd = [sys.executable, *argv]
    if distributed:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
        cmd = [*launch, *argv, "--distributed", "fsdp"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        sys.exit(f"distributed_e2e: {' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return json.loads((out / "report.json").read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, float32")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    import torch

    device = "cpu" if args.smoke else args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("distributed_e2e: no CUDA device; pass --smoke for the CPU check", file=sys.stderr)
        return 2
    dtype_name = "float32" if device == "cpu" else "bfloat16"
    dtype = getattr(torch, dtype_name)
    shapes = SMOKE if args.smoke else SHAPES
    work = Path(args.workdir or tempfile.mkdtemp(prefix="nirvana-e2e-"))
    ckpt, calib = work / "dense", work / "calib.txt"
    start = time.perf_counter()
    sizes = make_checkpoint(ckpt, shapes, args.layers, device, dtype)
    build_s = time.perf_counter() - start
    words = "the a of to and in that it was her you as had with for she not but be his at on".split()
    rng = random.Random(0)
    calib.write_text(" ".join(rng.choice(words) for _ in range(20_000)), encoding="utf-8")
    plain = plain_backward(ckpt, calib, device, dtype)
    single = prune_run(ckpt, calib, work / "single", device, dtype_name, distributed=False)
    dist_report = prune_run(ckpt, calib, work / "dist", device, dtype_name, distributed=True)
    same = json.loads((work / "single" / "plan.json").read_text()) == json.loads(
        (work / "dist" / "plan.json").read_text()
    )

    def gib(n):
        return "n/a" if n is None else f"{n / 2**30:.2f}"

    lines = [
        f"# distributed end to end ({device}, {dtype_name}, {args.layers} layers of {shapes})",
        "",
        f"checkpoint {gib(sizes['bytes'])} GiB, built in {build_s:.1f} s; fp32 gradients of the prunable "
        f"linears {gib(sizes['prunable_grad_fp32'])} GiB; settings {SETTINGS}",
        "",
        "| run | stage times (s) | peak device GiB |",
        "|---|---|---|",
        f"| plain CE forward+backward | {plain['seconds']:.2f} | {gib(plain['peak_device_bytes'])} |",
    ]
    for name, report in (("prune, one process", single), ("prune --distributed fsdp, world size 1", dist_report)):
        mem = report["peak_memory_bytes"].get("device")
        lines.append(f"| {name} | {report['timings_s']} | {gib(mem)} |")
    ratio = single["timings_s"].get("saliency", float("nan")) / plain["seconds"]
    lines += [
        "",
        f"scoring / plain forward+backward: {ratio:.2f} (one process; the first run includes kernel compiles)",
        f"plans identical: {'yes' if same else 'NO'}",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "distributed_e2e.md").write_text(text)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
