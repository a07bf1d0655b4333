"""What the benchmarks run: model layer shapes, one workload per op, and the bytes each op must move.

Shared by the pytest benchmarks (``test_bench_*.py``) and ``gpu_check.py``, so both time the same
inputs and count bytes the same way. Byte counts are the minimum traffic an op needs: saliency reads
every weight, gradient (and ``exp_avg_sq``) element once and writes 4 bytes per score; compaction
reads the kept elements once and writes them once (the index, under 0.01% of that, is not counted).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

try:
    import nirvana_kernels as nk
except ImportError:  # a bare checkout that was never pip-installed: use this repository's copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import nirvana_kernels as nk


@dataclass(frozen=True)
class Model:
    """One decoder layer's geometry: the matrices that pruning reads and rewrites."""

    name: str
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    qkv_bias: bool = False

    @property
    def q_rows(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_rows(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def group_columns(self) -> int:
        """o_proj columns per KV group: G query heads of ``head_dim`` each."""
        return self.q_rows // self.num_kv_heads


LLAMA_8B = Model("llama-3.1-8b", 4096, 32, 8, 128, 14336)
LLAMA_70B = Model("llama-3.1-70b", 8192, 64, 8, 128, 28672)
QWEN_72B = Model("qwen2.5-72b", 8192, 64, 8, 128, 29568, qkv_bias=True)
# Real layer shapes, for CUDA only; the target model comes first so a run cut short still has it.
GPU_MODELS = (LLAMA_70B, QWEN_72B, LLAMA_8B)
# The shapes the stated performance targets apply to.
TARGET_MODELS = (LLAMA_70B.name,)
# pytest on CPU times the references here: a few MB per layer, so a 2-core machine gets through every
# op in well under a minute; these numbers track the references' overhead, not the hardware.
CPU_MODELS = (
    Model("cpu-llama", 512, 8, 2, 64, 1408),
    Model("cpu-qwen", 512, 8, 2, 64, 1408, qkv_bias=True),
)
# gpu_check.py --smoke runs the kernels in Triton's interpreter, which needs tiny shapes.
SMOKE_MODELS = (
    Model("smoke-llama", 64, 4, 2, 16, 96),
    Model("smoke-qwen", 64, 4, 2, 16, 96, qkv_bias=True),
)
MODELS = {m.name: m for m in GPU_MODELS + CPU_MODELS + SMOKE_MODELS}

SALIENCY = "saliency"
COMPACTION = "compaction"


@dataclass
class Workload:
    """One op on one model's layer: the kernel, its reference, their shared arguments, and the bytes moved.

    ``kernel`` and ``reference`` take ``*args, **kwargs`` and return a float32 score tensor
    (saliency) or one or a list of compacted tensors (compaction), of ``out_shapes`` and
    ``out_dtype``. ``exact`` says whether the two must agree bit for bit (compaction) or within
    fp32 summation error (saliency).
    """

    op: str
    model: str
    family: str
    shape: str
    dtype: torch.dtype
    kernel: Callable
    reference: Callable
    args: tuple
    kwargs: dict = field(default_factory=dict)
    out_shapes: list[tuple[int, ...]] = field(default_factory=list)
    bytes_moved: int = 0

    @property
    def exact(self) -> bool:
        return self.family == COMPACTION

    @property
    def out_dtype(self) -> torch.dtype:
        return self.dtype if self.family == COMPACTION else torch.float32

    def run_kernel(self):
        return self.kernel(*self.args, **self.kwargs)

    def run_reference(self):
        return self.reference(*self.args, **self.kwargs)


def saliency_bytes(inputs: list[torch.Tensor], num_scores: int) -> int:
    """Each input element read once, plus one float32 written per score."""
    return sum(t.numel() * t.element_size() for t in inputs) + 4 * num_scores


def compaction_bytes(kept_shapes: list[tuple[int, ...]], dtype: torch.dtype) -> int:
    """Each kept element (of every output, shapes as given) read once and written once."""
    return sum(2 * math.prod(shape) for shape in kept_shapes) * dtype.itemsize


SECTOR_BYTES = 32  # what DRAM hands the L2 per request: a gather pays for whole sectors


def column_gather_bytes(index: torch.Tensor, rows: int, dtype: torch.dtype) -> int:
    """A single-column gather counted at sector granularity: every 32-byte sector of a source row that a kept
    column touches is read (a random half of the columns touches nearly all of them), and the output is written.

    Rows are assumed to start on a sector boundary (every real row is a multiple of 32 bytes).
    """
    sectors = torch.unique(index.cpu() * dtype.itemsize // SECTOR_BYTES).numel()
    return rows * (sectors * SECTOR_BYTES + index.numel() * dtype.itemsize)


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def _dims(t: torch.Tensor) -> str:
    return "x".join(str(s) for s in t.shape)


class _Draw:
    """Seeded random tensors on one device: weights ~ N(0, 0.02^2), gradients ~ N(0, 1e-6), Adam moments > 0."""

    def __init__(self, device: torch.device, dtype: torch.dtype, seed: int):
        self.device, self.dtype = device, dtype
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def normal(self, *shape: int, std: float) -> torch.Tensor:
        t = torch.randn(*shape, generator=self.gen, device=self.device, dtype=self.dtype)
        return t.mul_(std)

    def weight(self, *shape: int) -> torch.Tensor:
        return self.normal(*shape, std=0.02)

    def grad(self, *shape: int) -> torch.Tensor:
        return self.normal(*shape, std=1e-3)

    def moment(self, *shape: int) -> torch.Tensor:
        # Adam's exp_avg_sq, kept in the parameter's dtype as torch.optim does for bf16 parameters.
        t = torch.rand(*shape, generator=self.gen, device=self.device, dtype=torch.float32)
        return t.mul_(1e-6).add_(1e-9).to(self.dtype)

    def keep(self, n: int, k: int) -> torch.Tensor:
        """``k`` of ``range(n)`` at random, sorted, int64: what a pruning plan keeps."""
        perm = torch.randperm(n, generator=self.gen, device=self.device)
        return perm[:k].sort().values


def _attention(m: Model, d: _Draw, *, adam: bool) -> Workload:
    h = m.hidden
    q_w, q_g = d.weight(m.q_rows, h), d.grad(m.q_rows, h)
    k_w, k_g = d.weight(m.kv_rows, h), d.grad(m.kv_rows, h)
    v_w, v_g = d.weight(m.kv_rows, h), d.grad(m.kv_rows, h)
    o_w, o_g = d.weight(h, m.q_rows), d.grad(h, m.q_rows)
    inputs = [q_w, q_g, k_w, k_g, v_w, v_g, o_w, o_g]
    kwargs: dict = {"num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim}
    shape = f"q,o {_dims(q_w)}; k,v {_dims(k_w)}"
    moments = []
    if m.qkv_bias:
        biases = {"q_b": m.q_rows, "k_b": m.kv_rows, "v_b": m.kv_rows}
        for name, n in biases.items():
            kwargs[name], kwargs[name + "g"] = d.weight(n), d.grad(n)
            inputs += [kwargs[name], kwargs[name + "g"]]
        shape += "; q,k,v biases"
    if adam:
        # Aligned with (q, k, v, o), then (q_b, k_b, v_b) when the layer has biases.
        moments = [d.moment(*t.shape) for t in (q_w, k_w, v_w, o_w)]
        if m.qkv_bias:
            moments += [d.moment(*kwargs[b].shape) for b in ("q_b", "k_b", "v_b")]
        kwargs["exp_avg_sq"] = tuple(moments)
        shape += "; Adam-scaled"
    return Workload(
        op="attention_group_saliency" + ("_adam" if adam else ""),
        model=m.name,
        family=SALIENCY,
        shape=shape,
        dtype=d.dtype,
        kernel=nk.attention_group_saliency,
        reference=nk.attention_group_saliency_torch,
        args=tuple(inputs[:8]),
        kwargs=kwargs,
        out_shapes=[(m.num_kv_heads,)],
        bytes_moved=saliency_bytes(inputs + moments, m.num_kv_heads),
    )


def _mlp(m: Model, d: _Draw) -> Workload:
    i, h = m.intermediate, m.hidden
    up_w, up_g, down_w, down_g = d.weight(i, h), d.grad(i, h), d.weight(h, i), d.grad(h, i)
    gate_w, gate_g = d.weight(i, h), d.grad(i, h)
    return Workload(
        op="mlp_channel_saliency",
        model=m.name,
        family=SALIENCY,
        shape=f"gate,up {_dims(up_w)}; down {_dims(down_w)}",
        dtype=d.dtype,
        kernel=nk.mlp_channel_saliency,
        reference=nk.mlp_channel_saliency_torch,
        args=(up_w, up_g, down_w, down_g),
        kwargs={"gate_w": gate_w, "gate_g": gate_g},
        out_shapes=[(i,)],
        bytes_moved=saliency_bytes([up_w, up_g, down_w, down_g, gate_w, gate_g], i),
    )


def _saliency(m: Model, d: _Draw, *, dim: int) -> Workload:
    # dim=1 scores up_proj rows, dim=0 scores down_proj columns: one score per MLP channel either way.
    name, shape = ("up", (m.intermediate, m.hidden)) if dim == 1 else ("down", (m.hidden, m.intermediate))
    w, g = d.weight(*shape), d.grad(*shape)
    return Workload(
        op=f"saliency_dim{dim}",
        model=m.name,
        family=SALIENCY,
        shape=f"{name} {_dims(w)}, dim={dim}",
        dtype=d.dtype,
        kernel=nk.saliency,
        reference=nk.saliency_torch,
        args=(w, g),
        kwargs={"dim": dim},
        out_shapes=[(m.intermediate,)],
        bytes_moved=saliency_bytes([w, g], m.intermediate),
    )


def _compact(m: Model, d: _Draw, *, dim: int) -> Workload:
    # Half the MLP channels at random: up_proj rows (dim=0) or down_proj columns (dim=1).
    name, shape = ("up", (m.intermediate, m.hidden)) if dim == 0 else ("down", (m.hidden, m.intermediate))
    w = d.weight(*shape)
    index = d.keep(m.intermediate, m.intermediate // 2)
    kept = tuple(index.numel() if axis == dim else n for axis, n in enumerate(shape))
    return Workload(
        op="compact_" + ("rows" if dim == 0 else "cols"),
        model=m.name,
        family=COMPACTION,
        shape=f"{name} {_dims(w)} -> {'x'.join(map(str, kept))}",
        dtype=d.dtype,
        kernel=nk.compact,
        reference=nk.compact_torch,
        args=(w, index),
        kwargs={"dim": dim},
        out_shapes=[kept],
        # Rows: the kept bytes, read and written. Single columns: the source sectors they touch, then the output.
        bytes_moved=compaction_bytes([kept], d.dtype) if dim == 0 else column_gather_bytes(index, shape[0], d.dtype),
    )


def _compact_groups(m: Model, d: _Draw, *, part: str) -> Workload:
    # Half the KV groups: whole heads of k_proj rows, or each group's G*d columns of o_proj.
    if part == "k":
        w, dim, group = d.weight(m.kv_rows, m.hidden), 0, m.head_dim
    else:
        w, dim, group = d.weight(m.hidden, m.q_rows), 1, m.group_columns
    keep = d.keep(m.num_kv_heads, m.num_kv_heads // 2)
    kept = tuple(keep.numel() * group if axis == dim else n for axis, n in enumerate(w.shape))
    return Workload(
        op="compact_groups_" + ("k_rows" if part == "k" else "o_cols"),
        model=m.name,
        family=COMPACTION,
        shape=f"{part} {_dims(w)} -> {'x'.join(map(str, kept))} ({keep.numel()}/{m.num_kv_heads} groups of {group})",
        dtype=d.dtype,
        kernel=nk.compact_groups,
        reference=nk.compact_groups_torch,
        args=(w, keep),
        kwargs={"group_size": group, "dim": dim},
        out_shapes=[kept],
        bytes_moved=compaction_bytes([kept], d.dtype),
    )


def _compact_many(m: Model, d: _Draw) -> Workload:
    # gate and up rows of the same kept channels, in one launch.
    gate, up = d.weight(m.intermediate, m.hidden), d.weight(m.intermediate, m.hidden)
    index = d.keep(m.intermediate, m.intermediate // 2)
    kept = (index.numel(), m.hidden)
    return Workload(
        op="compact_many",
        model=m.name,
        family=COMPACTION,
        shape=f"gate+up {_dims(gate)} -> 2 x {kept[0]}x{kept[1]}",
        dtype=d.dtype,
        kernel=nk.compact_many,
        reference=nk.compact_many_torch,
        args=([gate, up], index),
        kwargs={"dim": 0},
        out_shapes=[kept, kept],
        bytes_moved=compaction_bytes([kept, kept], d.dtype),
    )


# Every benchmarked op: name -> (family, builder). Saliency ops first, as the tables list them.
OPS: dict[str, tuple[str, Callable[[Model, _Draw], Workload]]] = {
    "attention_group_saliency": (SALIENCY, lambda m, d: _attention(m, d, adam=False)),
    "attention_group_saliency_adam": (SALIENCY, lambda m, d: _attention(m, d, adam=True)),
    "mlp_channel_saliency": (SALIENCY, _mlp),
    "saliency_dim0": (SALIENCY, lambda m, d: _saliency(m, d, dim=0)),
    "saliency_dim1": (SALIENCY, lambda m, d: _saliency(m, d, dim=1)),
    "compact_rows": (COMPACTION, lambda m, d: _compact(m, d, dim=0)),
    "compact_cols": (COMPACTION, lambda m, d: _compact(m, d, dim=1)),
    "compact_groups_k_rows": (COMPACTION, lambda m, d: _compact_groups(m, d, part="k")),
    "compact_groups_o_cols": (COMPACTION, lambda m, d: _compact_groups(m, d, part="o")),
    "compact_many": (COMPACTION, _compact_many),
}


def ops(family: str | None = None) -> list[str]:
    """Names of the benchmarked ops, all of them or one family's (``"saliency"`` / ``"compaction"``)."""
    if family not in (None, SALIENCY, COMPACTION):
        raise ValueError(f"family: expected {SALIENCY!r}, {COMPACTION!r} or None, got {family!r}")
    return [name for name, (fam, _) in OPS.items() if family is None or fam == family]


def workload(
    op: str, model: str | Model, device: torch.device | str, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> Workload:
    """Build ``op``'s inputs at ``model``'s layer shape on ``device`` (seeded, so every run sees the same data)."""
    if op not in OPS:
        raise ValueError(f"op: unknown op {op!r}; expected one of {', '.join(OPS)}")
    if isinstance(model, str):
        if model not in MODELS:
            raise ValueError(f"model: unknown model {model!r}; expected one of {', '.join(MODELS)}")
        model = MODELS[model]
    return OPS[op][1](model, _Draw(torch.device(device), dtype, seed))
