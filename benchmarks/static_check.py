"""Ahead-of-time compile check: what the kernels compile to for a GPU, on a machine without one.

Every launch that the public launchers (``nirvana_kernels.saliency``, ``attention_group_saliency``,
``mlp_channel_saliency``, ``compact``, ``compact_groups``, ``compact_many``) make at real layer shapes
is captured and compiled for ``sm_90a`` and ``sm_80`` through Triton's own launch path, and the cubin
is read back with the ``cuobjdump`` shipped in the Triton wheel. Nothing runs on a device.

How a launch is captured, without a GPU and without copying Triton's rules:

* The inputs are tensors that report ``device="cuda"`` (``_CudaView``: a wrapper subclass over a meta
  tensor, so a 70B layer takes no memory), so the launchers take their GPU path with their GPU block
  sizes. Indices are given on the host, as the pruning flow builds them; a copy to "cuda" keeps its
  values on the CPU for the launchers' checks. A dispatch mode runs every torch op on the wrapped
  tensors and routes the ``nirvana::`` ops to their real implementations, so the launchers' own checks
  and views run as they would on a GPU. Each value read back to the host from a "cuda" tensor
  (``.tolist()``, ``.item()``) is counted as a host synchronisation.
* ``JITFunction.run`` is wrapped: each launch's arguments and grid are recorded, nothing is launched.
* Each recorded launch is replayed as ``JITFunction.run(*args, grid=grid, warmup=True)`` under a
  stand-in active driver (``triton.runtime.driver.set_active``) that reports ``GPUTarget("cuda", 90,
  32)`` (or 80). The real binder specialises the arguments (integers equal to 1 become constexpr,
  multiples of 16 and 16-byte-aligned pointers get divisibility hints: a tensor's pointer is taken as
  ``storage_offset * itemsize``, its base being 16-byte aligned as every CUDA allocation is) and the
  real compiler runs down to a cubin.

What is read from the cubin: registers, local (spill) and shared memory from ``cuobjdump
--dump-resource-usage``; the global loads and stores by width, the MUFU count and the loop bodies from
``cuobjdump -sass``.

What is computed per launch (the formulas, so a reader can check them):

* ``programs/SM`` = grid / 132 (H200 SMs); ``resident`` = CTAs one SM holds at once, the least of
  65536 / (registers * threads, registers allocated per warp in units of 256), the shared memory limit
  (228 KB sm_90, 164 KB sm_80), 64 warps and 32 CTAs; ``waves`` = grid / (132 * resident).
* ``minimum bytes``: what the op must move. Saliency: every input element once plus 4 bytes per score.
  Compaction: every kept element read once and written once.
* ``sector floor`` (compaction only): the 32-byte sectors of the source that the kept elements touch,
  plus the output. For a random half of the columns this is nearly the whole source.
* ``tiling bytes``: what this launch's tiling moves to and from DRAM at 32-byte sector granularity.
  Saliency: the inputs once (the tiles cover every element exactly once; masked lanes fetch nothing)
  plus the fp32 scratch that the kernel writes and the final sum reads back, plus the scores.
  Compaction: the kept rows whole, or for column gathers the source sectors each tile of
  ``BLOCK_G`` (``BLOCK_C``) consecutive output columns touches, summed over tiles; a sector shared by
  two neighbouring tiles counts once when their program ids are closer than the programs the GPU holds
  at once (they run together, the second read hits L2), twice otherwise. Plus the output and the index.
* ``floor us`` = max(minimum, sector floor) / 4.3 TB/s, the H200 copy bandwidth until a device measures it.
* ``instr/elem`` (saliency): SASS instructions in the hottest K loop per element of W, counted as loop
  instructions * (2 bytes * inputs per element) / global bytes the loop loads per thread.
* ``masked iters``: fully masked iterations / all iterations of the K loop on the worst part's last
  split, from the launch's arguments (``K<i>``, ``kc<i>``, ``BK<i>`` as named today; "-" otherwise).

The checks (``check_row``; CI runs them at the 70B shapes on both archs, in
tests/kernels/test_static_compile.py): it compiles; no local memory or stack; 128-bit loads (saliency:
every global load is 128-bit; gathers of whole rows or of whole runs of columns: 128-bit loads and
nothing narrower than the 64-bit index loads; gathers of single columns, which no vector load can
serve: no layout conversion of a data tile in the TTGIR, so no shared-memory transpose, and 128-bit
stores); saliency: <= 128 registers, <= 20 instructions per element, no K loop bounded by the chunk
argument as passed while a split has fully masked iterations, one launch per call; compaction: no host
synchronisation; >= 4 programs per SM at once (the least of ``resident`` and grid / 132, rounded up);
tiling bytes <= 1.01x the minimum, or the sector floor for column gathers.

Usage::

    python benchmarks/static_check.py --arch 90 --arch 80 --out benchmarks/results/static-sm90.md \\
        --json benchmarks/results/static-sm90.json [--before benchmarks/results/static-sm90-before.json]

Run it with ``TRITON_INTERPRET`` unset: the kernels' ``@triton.jit`` objects follow that variable at
import time, and under the interpreter there is nothing to compile.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402  (benchmarks/ is not a package)

nk = shapes.nk

H200_SMS = 132
COPY_BYTES_PER_S = 4.3e12
SECTOR = 32
ARCHS = (90, 80)
REG_FILE = 65536
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32
SHARED_PER_SM = {90: 228 * 1024, 80: 164 * 1024}
DEFAULT_MODELS = (shapes.LLAMA_8B, shapes.LLAMA_70B, shapes.QWEN_72B)
_CUDA = torch.device("cuda", 0)

# --------------------------------------------------------------------------------------------------
# Tensors that report device cuda, and the dispatch mode that runs the launchers on them
# --------------------------------------------------------------------------------------------------


class _CudaView(torch.Tensor):
    """A tensor that says ``cuda:0`` and holds a meta tensor (inputs, outputs) or a CPU one (indices)."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls,
            elem.shape,
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            device=_CUDA,
            requires_grad=False,
        )

    def __init__(self, elem: torch.Tensor):
        self.elem = elem
        self.tag = _new_tag(created=False)  # (id, made inside a launcher), shared by views

    def tolist(self):  # tolist refuses subclasses; the index checks call it
        SYNCS[0] += 1
        return self.elem.tolist()

    def __getitem__(self, idx):  # Python indexing takes a CUDA device guard, which a CPU build lacks
        out = _CudaView(self.elem[tree_map(lambda x: x.elem if isinstance(x, _CudaView) else x, idx)])
        out.tag = self.tag
        return out

    def __repr__(self) -> str:
        return f"_CudaView({tuple(self.shape)}, {self.dtype})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run_op(func, args, kwargs or {})


def _run_op(func, args, kwargs):
    seen = []
    # A tensor made from nothing (an output, a scratch buffer) lives on meta and takes no memory; one
    # copied from a host tensor (an index) stays on the CPU with its values, for the checks to read.
    has_tensor = any(isinstance(x, torch.Tensor) for x in _flat([args, list(kwargs.values())]))
    target = torch.device("cpu" if has_tensor else "meta")

    def unwrap(x):
        if isinstance(x, _CudaView):
            seen.append(x.elem.device.type)
            return x.elem
        if isinstance(x, torch.device) and x.type == "cuda":
            seen.append(target.type)
            return target
        return x

    name = func.overloadpacket.__name__
    if name in ("pin_memory", "_pin_memory", "is_pinned"):
        # Page-locking host memory needs a CUDA runtime; an unpinned copy reads the same here.
        return False if name == "is_pinned" else args[0]
    a, k = tree_map(unwrap, args), tree_map(unwrap, kwargs)
    if not seen:
        return func(*a, **k)
    if func is torch.ops.aten._local_scalar_dense.default:  # .item(), int(t), bool(t): the host waits
        SYNCS[0] += 1
    if "meta" in seen:  # a meta input meeting a CPU one: run on meta
        a, k = tree_map(_to_meta, a), tree_map(_to_meta, k)
    out = func(*a, **k)
    # A result inherits the tag of the first wrapped input (a view of it, or a value computed from it);
    # one made from nothing (an output or scratch buffer the launcher allocates) gets a fresh tag.
    sources = [x for x in _flat([args, list(kwargs.values())]) if isinstance(x, _CudaView)]
    tag = sources[0].tag if sources else _new_tag(created=True)

    def wrap(x):
        if not isinstance(x, torch.Tensor):
            return x
        w = _CudaView(x)
        w.tag = tag
        return w

    return tree_map(wrap, out)


_TAGS = [0]
SYNCS = [0]  # values read back to the host from "cuda" tensors: each is a device synchronisation


def _new_tag(*, created: bool) -> tuple[int, bool]:
    _TAGS[0] += 1
    return (_TAGS[0], created)


def _to_meta(x):
    return x.to("meta") if isinstance(x, torch.Tensor) and x.device.type == "cpu" else x


class _CudaMode(TorchDispatchMode):
    """Runs every op on the wrapped tensors; ``nirvana::`` ops run their real implementation."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "nirvana":
            from torch._library.custom_ops import OPDEFS

            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        return _run_op(func, args, kwargs)


def cuda_tensor(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """An input of ``shape`` that takes no memory and that the launchers see on ``cuda:0``."""
    return _CudaView(torch.empty(*shape, dtype=dtype, device="meta"))


# --------------------------------------------------------------------------------------------------
# Capture: record each JITFunction launch the launchers make
# --------------------------------------------------------------------------------------------------


@dataclass
class Arg:
    """One recorded kernel argument: a tensor's layout (never its data), or a plain value."""

    dtype: torch.dtype | None = None
    shape: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    offset: int = 0
    created: bool = False  # made inside the launcher (an output or scratch), not passed in
    tag: int = 0  # the same for every view of one tensor
    value: object = None

    def data_ptr(self) -> int:
        # A CUDA allocation is at least 256-byte aligned, so only the view's offset decides alignment.
        return self.offset * self.dtype.itemsize

    @property
    def is_tensor(self) -> bool:
        return self.dtype is not None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class Launch:
    kernel: object  # the JITFunction
    args: list
    kwargs: dict
    grid: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def programs(self) -> int:
        return math.prod(self.grid)

    def tensors(self) -> list[Arg]:
        return [a for a in _flat(self.args) + _flat(list(self.kwargs.values())) if isinstance(a, Arg) and a.is_tensor]

    def constexprs(self) -> dict:
        return {k: v for k, v in self.kwargs.items() if isinstance(v, (int, bool, tuple))}


def _flat(items) -> list:
    out = []
    for x in items:
        out += _flat(x) if isinstance(x, (tuple, list)) else [x]
    return out


@contextlib.contextmanager
def capture() -> Iterator[list[Launch]]:
    """Within this block the public launchers run on ``cuda_tensor`` inputs and record their launches."""
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []

    def record(value):
        if isinstance(value, torch.Tensor):
            tag = getattr(value, "tag", (0, False))
            return Arg(
                dtype=value.dtype,
                shape=tuple(value.shape),
                stride=tuple(value.stride()),
                offset=value.storage_offset(),
                created=tag[1],
                tag=tag[0],
            )
        if isinstance(value, (tuple, list)):
            return type(value)(record(v) for v in value)
        return value

    def fake_run(self, *args, grid, warmup, **kwargs):
        if callable(grid):
            raise NotImplementedError("static_check: a callable grid needs the bound arguments")
        grid = tuple(int(g) for g in (grid if isinstance(grid, (tuple, list)) else (grid,)))
        launches.append(Launch(self, [record(a) for a in args], {k: record(v) for k, v in kwargs.items()}, grid))
        return None

    props = types.SimpleNamespace(multi_processor_count=H200_SMS, name="stand-in H200", major=9, minor=0)
    saved = {
        (torch.cuda, "_lazy_init"): lambda: None,
        (torch.cuda, "get_device_properties"): lambda *a, **k: props,
        (torch.cuda, "device"): lambda *a, **k: contextlib.nullcontext(),
        (torch.cuda, "current_device"): lambda: 0,
        (os, "environ"): {k: v for k, v in os.environ.items() if k != "NIRVANA_POISON_OUTPUTS"},
        (JITFunction, "run"): fake_run,
    }
    originals = {key: getattr(*key) for key in saved}
    # As FakeTensorMode does on a machine without CUDA: a no-op device guard for "cuda" tensors.
    torch._C._ensureCUDADeviceGuardSet()
    try:
        for (obj, name), new in saved.items():
            setattr(obj, name, new)
        with _CudaMode():
            yield launches
    finally:
        for (obj, name), old in originals.items():
            setattr(obj, name, old)


# --------------------------------------------------------------------------------------------------
# Stand-in driver: Triton compiles for a target it is told about
# --------------------------------------------------------------------------------------------------


class StandInDriver:
    """The parts of a Triton GPU driver that ``JITFunction.run(warmup=True)`` and compile touch.

    The device number is the capability itself, so the per-device binder caches that Triton keeps
    on each kernel never hand an sm_90 binder to an sm_80 compile.
    """

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.driver import ty_to_cpp

        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)
        self._ty_to_cpp = ty_to_cpp

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return self.arch

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_device_capability(self, device: int | None = None) -> tuple[int, int]:
        return divmod(self.arch, 10)

    def get_active_torch_device(self):
        return _CUDA

    def map_python_to_cpp_type(self, ty: str) -> str:
        return self._ty_to_cpp(ty)

    def get_benchmarker(self):
        raise RuntimeError("static_check: nothing runs here")

    def __getattr__(self, name):
        raise AttributeError(f"static_check stand-in driver has no {name!r} (would need a device)")


@contextlib.contextmanager
def stand_in_driver(arch: int):
    from triton.runtime.driver import driver

    previous = driver._active
    driver.set_active(StandInDriver(arch))
    try:
        yield
    finally:
        driver._active = previous


def compile_launch(launch: Launch, arch: int):
    """Compile one recorded launch for ``arch`` through ``JITFunction.run(warmup=True)``."""
    from triton.runtime.jit import JITFunction

    with stand_in_driver(arch):
        return JITFunction.run(launch.kernel, *launch.args, grid=launch.grid, warmup=True, **launch.kwargs)


# --------------------------------------------------------------------------------------------------
# Reading the cubin
# --------------------------------------------------------------------------------------------------


def tool(name: str) -> str | None:
    """Path of a CUDA tool shipped in the Triton wheel (or on PATH), or None."""
    try:
        import triton

        here = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if here.exists():
            return str(here)
    except ImportError:
        pass
    return shutil.which(name)


@dataclass
class Sass:
    registers: int = 0
    local: int = 0
    stack: int = 0
    shared: int = 0
    loads: dict[str, int] = field(default_factory=dict)  # width in bits -> count
    stores: dict[str, int] = field(default_factory=dict)
    instructions: int = 0
    mufu: int = 0
    loops: list[dict] = field(default_factory=list)  # each: instructions, load_bytes, mufu


_MEM_RE = re.compile(r"\b(LDG|STG)((?:\.[A-Z0-9_]+)*)\b")
_INSTR_RE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRA_RE = re.compile(r"\bBRA\b.*?(0x[0-9a-f]+)")


def _width(mods: str) -> int:
    parts = set(mods.strip(".").split("."))
    for bits in ("128", "64"):
        if bits in parts:
            return int(bits)
    if parts & {"U16", "S16"}:
        return 16
    if parts & {"U8", "S8"}:
        return 8
    return 32


def read_cubin(cubin: bytes) -> Sass:
    out = Sass()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run(
            [tool("cuobjdump"), "--dump-resource-usage", str(path)], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True, check=True
        ).stdout
    for key, attr in (("REG", "registers"), ("STACK", "stack"), ("SHARED", "shared"), ("LOCAL", "local")):
        m = re.search(rf"\b{key}:(\d+)", usage)
        if m:
            setattr(out, attr, int(m.group(1)))
    instrs = []
    for line in sass.splitlines():
        m = _INSTR_RE.search(line)
        if m:
            instrs.append((int(m.group(1), 16), m.group(2).strip()))
    out.instructions = sum(1 for _, text in instrs if not text.startswith("NOP"))
    for _, text in instrs:
        mem = _MEM_RE.search(text)
        if mem:
            bucket = out.loads if mem.group(1) == "LDG" else out.stores
            w = str(_width(mem.group(2)))
            bucket[w] = bucket.get(w, 0) + 1
        if "MUFU" in text:
            out.mufu += 1
    # A loop: a branch back to an earlier address; its body is the instructions in between.
    for addr, text in instrs:
        m = _BRA_RE.search(text)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target >= addr:
            continue
        body = [t for a, t in instrs if target <= a <= addr and not t.startswith("NOP")]
        load_bytes = 0
        for t in body:
            mem = _MEM_RE.search(t)
            if mem and mem.group(1) == "LDG":
                load_bytes += _width(mem.group(2)) // 8
        out.loops.append({"instructions": len(body), "load_bytes": load_bytes, "mufu": sum("MUFU" in t for t in body)})
    return out


_FOR_RE = re.compile(r"scf\.for %\S+ = %\S+ to %([\w.]+) step")


def bare_loop_bounds(ttir: str) -> list[str]:
    """Loops whose trip count is a kernel argument as passed, not bounded by what remains to do."""
    sig = re.search(r"tt\.func public @\w+\((.*?)\)\s*(?:attributes|\{)", ttir, re.S)
    params = set(re.findall(r"%([\w.]+):", sig.group(1))) if sig else set()
    return [ub for ub in _FOR_RE.findall(ttir) if ub in params]


_CVT_RE = re.compile(r"ttg\.convert_layout %\S+ : tensor<((?:\d+x)+)(bf16|f16|f32)\b")


def tile_conversions(ttgir: str) -> int:
    """Bytes of data tiles (2-D or more, float) that change layout through shared memory; an index
    vector's conversion to a slice of the tile's layout is not counted."""
    total = 0
    for dims, ty in _CVT_RE.findall(ttgir):
        shape = [int(d) for d in dims.rstrip("x").split("x")]
        if len(shape) >= 2:
            total += math.prod(shape) * {"bf16": 2, "f16": 2, "f32": 4}[ty]
    return total


def masked_iterations(launch: Launch) -> tuple[int, int] | None:
    """(fully masked, total) K-loop iterations of the worst part's last split, read from the launch's
    arguments when they are named like today's kernel (``K<i>``, ``kc<i>``, ``BK<i>``); else None."""
    values = dict(zip(launch.kernel.arg_names, launch.args))
    values.update(launch.kwargs)
    n = values.get("NUM_PARTS", 1)
    worst = None
    for i in range(n if isinstance(n, int) else 0):
        k, kc, bk = values.get(f"K{i}"), values.get(f"kc{i}"), values.get(f"BK{i}")
        if not all(isinstance(x, int) for x in (k, kc, bk)):
            return None
        total = -(-kc // bk)
        last = k - (-(-k // kc) - 1) * kc
        masked = total - -(-last // bk)
        if worst is None or masked > worst[0]:
            worst = (masked, total)
    return worst


def resident_ctas(arch: int, registers: int, warps: int, shared: int) -> int:
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = REG_FILE // (regs_per_warp * warps)
    by_shared = SHARED_PER_SM[arch] // shared if shared else MAX_CTAS_PER_SM
    return max(0, min(by_regs, by_shared, MAX_WARPS_PER_SM // warps, MAX_CTAS_PER_SM))


# --------------------------------------------------------------------------------------------------
# The cases: every public launcher at every model's shapes
# --------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One public call. ``kind`` is saliency / rows / cols (compaction by what is gathered)."""

    name: str
    model: str
    kind: str
    call: Callable[[], object]
    min_bytes: int
    sector_floor: int = 0
    inputs_per_elem: int = 2  # saliency: W, G (and V) per element
    n_scores: int = 0
    syncs: int = 0  # host synchronisations in one call, counted during the capture
    gather: dict = field(default_factory=dict)  # compaction: source columns kept, extents, dim


def _keep(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:k].sort().values


def _sal_bytes(shapes_: list[tuple[int, ...]], n_scores: int) -> int:
    return sum(2 * math.prod(s) for s in shapes_) + 4 * n_scores


def _sectors_touched(src_cols: torch.Tensor) -> int:
    """Distinct 32-byte sectors (16 bf16) of one source row that the kept columns touch."""
    return int(torch.unique(src_cols // (SECTOR // 2)).numel())


def cases(model: shapes.Model) -> list[Case]:
    m, bf = model, torch.bfloat16
    h, q, kv, i = m.hidden, m.q_rows, m.kv_rows, m.intermediate
    out: list[Case] = []

    def t(*s):
        return cuda_tensor(*s, dtype=bf)

    for adam in (False, True):
        for bias in (False, True) if m.qkv_bias else (False,):
            mats = [(q, h), (kv, h), (kv, h), (h, q)]
            vecs = [(q,), (kv,), (kv,)] if bias else []
            args = [t(*s) for s in mats for _ in (0, 1)]
            kw: dict = {"num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim}
            if bias:
                for name, s in zip(("q_b", "k_b", "v_b"), vecs):
                    kw[name], kw[name + "g"] = t(*s), t(*s)
            if adam:
                kw["exp_avg_sq"] = tuple(t(*s) for s in mats + vecs)
            n_in = 3 if adam else 2
            name = "attention" + ("+bias" if bias else "") + ("+adam" if adam else "")
            out.append(
                Case(
                    name,
                    m.name,
                    "saliency",
                    lambda a=args, k=kw: nk.attention_group_saliency(*a, **k),
                    _sal_bytes((mats + vecs) * n_in, m.num_kv_heads),
                    inputs_per_elem=n_in,
                    n_scores=m.num_kv_heads,
                )
            )
    for adam in (False, True):
        mats = [(i, h), (h, i), (i, h)]
        up, down, gate = ([t(*s), t(*s)] for s in mats)
        kw = {"gate_w": gate[0], "gate_g": gate[1]}
        if adam:
            kw["exp_avg_sq"] = tuple(t(*s) for s in mats)
        n_in = 3 if adam else 2
        out.append(
            Case(
                "mlp" + ("+adam" if adam else ""),
                m.name,
                "saliency",
                lambda a=up + down, k=kw: nk.mlp_channel_saliency(*a, **k),
                _sal_bytes(mats * n_in, i),
                inputs_per_elem=n_in,
                n_scores=i,
            )
        )
    for dim in (0, 1):
        s = (h, i) if dim == 0 else (i, h)
        w, g = t(*s), t(*s)
        out.append(
            Case(
                f"saliency dim{dim}",
                m.name,
                "saliency",
                lambda w=w, g=g, d=dim: nk.saliency(w, g, dim=d),
                _sal_bytes([s, s], i),
                n_scores=i,
            )
        )
    # Compaction: a random half of the MLP channels, or of the KV groups, as shapes.py draws them.
    half = _keep(i, i // 2, seed=0)
    groups = _keep(m.num_kv_heads, m.num_kv_heads // 2, seed=1)
    specs = [
        ("compact rows (up)", "rows", (i, h), 0, half, 1, "compact"),
        ("compact cols (down)", "cols", (h, i), 1, half, 1, "compact"),
        ("compact_groups rows (k)", "rows", (kv, h), 0, groups, m.head_dim, "groups"),
        ("compact_groups cols (o)", "cols", (h, q), 1, groups, m.group_columns, "groups"),
        ("compact_many rows (gate+up)", "rows", (i, h), 0, half, 1, "many"),
    ]
    for name, kind, shape, dim, index, group, fn in specs:
        n_out = 2 if fn == "many" else 1
        srcs = [t(*shape) for _ in range(n_out)]
        idx = index.clone()  # on the host, as the pruning flow builds it from the plan
        kept = index.numel() * group
        other = shape[1 - dim]
        element_bytes = 2 * kept * other * 2 * n_out
        src_cols = (index[:, None] * group + torch.arange(group)).reshape(-1)
        if dim == 1:
            floor = n_out * (_sectors_touched(src_cols) * SECTOR * other + kept * other * 2)
        else:
            floor = element_bytes
        if fn == "compact":
            call = lambda w=srcs[0], x=idx, d=dim: nk.compact(w, x, dim=d)  # noqa: E731
        elif fn == "groups":
            call = lambda w=srcs[0], x=idx, d=dim, g=group: nk.compact_groups(w, x, group_size=g, dim=d)  # noqa: E731
        else:
            call = lambda ws=srcs, x=idx, d=dim: nk.compact_many(ws, x, dim=d)  # noqa: E731
        out.append(
            Case(
                name,
                m.name,
                kind,
                call,
                element_bytes,
                sector_floor=floor,
                gather={
                    "src_cols": src_cols,
                    "other": other,
                    "n_out": n_out,
                    "dim": dim,
                    "index_bytes": index.numel() * 8,
                    "group": group,
                },
            )
        )
    return out


def capture_case(case: Case) -> list[Launch]:
    SYNCS[0] = 0
    with capture() as launches:
        case.call()
    case.syncs = SYNCS[0]
    return launches


# --------------------------------------------------------------------------------------------------
# Per-launch figures
# --------------------------------------------------------------------------------------------------


def _share(launches: list[Launch], index: int) -> float:
    """This launch's part of its call, by input bytes (1 when the call is one launch)."""
    own = [sum(a.nbytes for a in _unique(launch, created=False)) for launch in launches]
    return own[index] / sum(own) if sum(own) else 1.0


def gathered_block(launch: Launch, n_gather: int, dim: int) -> tuple[int, int] | None:
    """(tile length along the gathered axis, grid axis that walks it), or None when neither is found.

    The length is the launch's ``BLOCK_G`` constexpr (``BLOCK_C`` / ``BLOCK_R`` for a column / row
    gather); the grid axis is the one with cdiv(n_gather, length) programs.
    """
    names = ("BLOCK_G", "BLOCK_C" if dim == 1 else "BLOCK_R")
    block = next((launch.kwargs[n] for n in names if isinstance(launch.kwargs.get(n), int)), None)
    if block is None:
        return None
    axis = next((d for d, g in enumerate(launch.grid) if g == -(-n_gather // block)), None)
    return None if axis is None else (block, axis)


def tiling_bytes(case: Case, launches: list[Launch], index: int, co_resident: int) -> int:
    """Bytes the launch's tiling moves at sector granularity (see the module docstring).

    ``co_resident``: programs the GPU holds at once (132 SMs x resident CTAs), within which a sector
    two tiles share is read from DRAM once and then from L2.
    """
    launch = launches[index]
    # Launcher-made float tensors are outputs or scratch; an index copied to the device is counted apart.
    created = sum(a.nbytes for a in _unique(launch, created=True) if a.dtype.is_floating_point)
    if case.kind == "saliency":
        # Inputs once; the fp32 scratch is written here and read back by the final sum, which also
        # writes the scores. A call split over several launches shares the scratch by input bytes.
        inputs = sum(-(-a.nbytes // SECTOR) * SECTOR for a in _unique(launch, created=False))
        return inputs + round(_share(launches, index) * (2 * created + 4 * case.n_scores))
    g = case.gather
    src = g["src_cols"]
    if g["dim"] == 0:
        # Each kept row is read whole; rows are contiguous, so sectors only round the row length.
        row = -(-g["other"] * 2 // SECTOR) * SECTOR
        reads = src.numel() * row * g["n_out"]
    else:
        found = gathered_block(launch, src.numel(), 1)
        # Neighbouring tiles along the gathered axis are this many program ids apart; closer than the
        # co-resident programs, the sector they share comes from L2 the second time.
        apart = math.prod(launch.grid[: found[1]]) if found else 0
        if found and apart >= co_resident:
            block = found[0]
            per_row = sum(_sectors_touched(src[j : j + block]) for j in range(0, src.numel(), block))
        else:
            per_row = _sectors_touched(src)
        reads = per_row * SECTOR * g["other"] * g["n_out"]
    return reads + created + g["index_bytes"]


def _unique(launch: Launch, *, created: bool) -> list[Arg]:
    """The launch's distinct tensors (views of one tensor count once), inputs or launcher-made ones."""
    seen, out = set(), []
    for a in launch.tensors():
        if a.created != created or a.tag in seen:
            continue
        seen.add(a.tag)
        out.append(a)
    return out


def analyse(case: Case, launches: list[Launch], index: int, arch: int) -> dict:
    launch = launches[index]
    row = {
        "model": case.model,
        "case": case.name,
        "kind": case.kind,
        "launch": f"{launch.name}#{index}" if len(launches) > 1 else launch.name,
        "launches": len(launches),
        "arch": arch,
        "grid": list(launch.grid),
        "programs": launch.programs,
        "constexprs": {k: v for k, v in launch.constexprs().items()},
        "group": case.gather.get("group", 1),
    }
    t0 = time.perf_counter()
    try:
        kernel = compile_launch(launch, arch)
    except Exception as err:  # a compile failure is a finding, reported in the row
        row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    sass = read_cubin(kernel.asm["cubin"])
    warps = kernel.metadata.num_warps
    shared = max(sass.shared, getattr(kernel.metadata, "shared", 0) or 0)
    resident = resident_ctas(arch, sass.registers, warps, shared)
    row.update(
        registers=sass.registers,
        local=sass.local,
        stack=sass.stack,
        shared=shared,
        warps=warps,
        loads=sass.loads,
        stores=sass.stores,
        instructions=sass.instructions,
        mufu=sass.mufu,
        resident=resident,
        programs_per_sm=round(launch.programs / H200_SMS, 2),
        waves=round(launch.programs / (H200_SMS * resident), 2) if resident else None,
        concurrent=min(resident, math.ceil(launch.programs / H200_SMS)),
    )
    row["syncs"] = case.syncs
    row["tile_conversion_bytes"] = tile_conversions(kernel.asm["ttgir"])
    if case.kind == "saliency":
        row["bare_loop_bounds"] = bare_loop_bounds(kernel.asm["ttir"])
        masked = masked_iterations(launch)
        row["masked_iterations"] = list(masked) if masked else None
    if sass.loops and case.kind == "saliency":
        per_elem = [
            lp["instructions"] * 2 * case.inputs_per_elem / lp["load_bytes"] for lp in sass.loops if lp["load_bytes"]
        ]
        row["instr_per_elem"] = round(max(per_elem), 1) if per_elem else None
        row["loop_mufu"] = max(lp["mufu"] for lp in sass.loops)
    # Bytes: the case's minimum is shared by its launches; each launch is judged on its own share.
    share = _share(launches, index)
    row["min_bytes"] = round(case.min_bytes * share)
    row["sector_floor"] = round((case.sector_floor or case.min_bytes) * share)
    row["tiling_bytes"] = tiling_bytes(case, launches, index, H200_SMS * max(resident, 1))
    row["floor_us"] = round(max(case.min_bytes, case.sector_floor) / COPY_BYTES_PER_S * 1e6, 2)
    return row


def check_row(row: dict) -> dict[str, str]:
    """The CI checks for one launch: check name -> "" when it holds, else why not."""
    if "error" in row:
        return {"compiles": row["error"]}
    res = {"compiles": ""}
    res["no local memory"] = f"local {row['local']} B, stack {row['stack']} B" if row["local"] or row["stack"] else ""
    loads = {int(k): v for k, v in row["loads"].items()}
    stores = {int(k): v for k, v in row["stores"].items()}
    narrow = {w: n for w, n in loads.items() if w < 128}
    if row["kind"] == "saliency":
        res["128-bit loads"] = f"loads by width {loads}" if narrow or not loads.get(128) else ""
    elif row["kind"] == "rows" or row.get("group", 1) > 1:
        bad = {w: n for w, n in loads.items() if w < 64}
        res["128-bit loads"] = f"loads by width {loads}" if bad or not loads.get(128) else ""
    else:
        # Random single columns cannot be loaded as vectors; the output rows can be stored as such,
        # and lanes laid along the gathered axis need no shared-memory transpose.
        why = []
        if row.get("tile_conversion_bytes"):
            why.append(f"{row['tile_conversion_bytes']} B tile layout conversion through shared memory")
        if {w: n for w, n in stores.items() if w < 128}:
            why.append(f"stores by width {stores}")
        res["128-bit loads"] = "; ".join(why)
    if row["kind"] == "saliency":
        res["<= 128 registers"] = f"{row['registers']} registers" if row["registers"] > 128 else ""
        ipe = row.get("instr_per_elem")
        res["<= 20 instr/elem"] = f"{ipe} SASS instructions per element in the K loop" if ipe and ipe > 20 else ""
    res[">= 4 programs/SM"] = (
        f"{row['concurrent']} concurrent (resident {row['resident']}, grid/SM {row['programs_per_sm']})"
        if row["concurrent"] < 4
        else ""
    )
    if row["kind"] == "saliency":
        masked = row.get("masked_iterations")
        bare = row.get("bare_loop_bounds")
        res["no masked K iterations"] = (
            f"last split: {masked[0]} of {masked[1]} iterations fully masked (loop bound {', '.join(bare)})"
            if bare and (masked is None or masked[0] > 0)
            else ""
        )
        res["one launch"] = f"{row['launches']} launches for one call" if row["launches"] > 1 else ""
    else:
        res["no host sync"] = f"{row['syncs']} host synchronisation(s) per call" if row["syncs"] else ""
    ref = row["sector_floor"] if row["kind"] == "cols" else row["min_bytes"]
    ratio = row["tiling_bytes"] / ref
    res["bytes <= 1.01x"] = (
        f"{ratio:.3f}x the {'sector floor' if row['kind'] == 'cols' else 'minimum'}" if ratio > 1.01 else ""
    )
    return res


CHECKS = (
    "compiles",
    "no local memory",
    "128-bit loads",
    "<= 128 registers",
    "<= 20 instr/elem",
    ">= 4 programs/SM",
    "bytes <= 1.01x",
    "no masked K iterations",
    "one launch",
    "no host sync",
)


def checks_for(kind: str) -> tuple[str, ...]:
    """The checks that apply to a launch of this kind (saliency, rows or cols)."""
    saliency_only = {"<= 128 registers", "<= 20 instr/elem", "no masked K iterations", "one launch"}
    if kind == "saliency":
        return tuple(c for c in CHECKS if c != "no host sync")
    return tuple(c for c in CHECKS if c not in saliency_only)


def run(models=DEFAULT_MODELS, archs=ARCHS, only: Callable[[Case], bool] | None = None) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("static_check: unset TRITON_INTERPRET; the interpreter compiles nothing")
    rows = []
    for model in models:
        for case in cases(model):
            if only is not None and not only(case):
                continue
            launches = capture_case(case)
            for arch in archs:
                for j in range(len(launches)):
                    row = analyse(case, launches, j, arch)
                    row["checks"] = check_row(row)
                    rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.3f}"


def _loads(d: dict | None) -> str:
    if not d:
        return "-"
    return " ".join(f"{n}x{w}" for w, n in sorted(d.items(), key=lambda kv: -int(kv[0])))


def _key(row: dict) -> tuple:
    return (row["model"], row["case"], row["launch"])


def render(rows: list[dict], before: list[dict] | None = None, title: str = "after") -> str:
    import triton

    by_arch = {}
    for r in rows:
        by_arch.setdefault(_key(r), {})[r["arch"]] = r
    old = {}
    for r in before or []:
        old.setdefault(_key(r), {})[r["arch"]] = r
    lines = [
        f"# Static check: compiled for sm_90a (and sm_80), not run ({title})",
        "",
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `python benchmarks/static_check.py` with "
        f"Triton {triton.__version__}, torch {torch.__version__}. Compiled for sm_90a and sm_80 through "
        "`JITFunction.run(warmup=True)` under a stand-in driver; nothing ran on a device. Figures are "
        f"from the cubin (`cuobjdump`). Floors assume the H200's {H200_SMS} SMs and "
        f"{COPY_BYTES_PER_S / 1e12:.1f} TB/s copy bandwidth. Column gathers are judged against the sector "
        "floor (32-byte sectors of the source touched by the kept columns, plus the output).",
        "",
    ]
    cols = [
        "model", "call", "launch", "grid", "regs 90/80", "shared", "local", "loads (n x bits)", "stores",
        "instr/elem (loop MUFU)", "masked iters", "syncs", "resident/SM", "programs/SM", "waves", "min GB",
        "sector floor GB", "tiling GB",
        "floor us", "checks failed",
    ]  # fmt: skip
    if before:
        cols[4:4] = ["regs 90 before"]
        cols[-1:-1] = ["tiling GB before"]
    now = headline(rows)
    was = headline(before) if before else {}
    lines += ["## Issue 10's five problems", ""]
    lines += (
        ["| figure | before | " + title + " |", "|---|---|---|"]
        if before
        else ["| figure | " + title + " |", "|---|---|"]
    )
    for name, value in now.items():
        lines.append(f"| {name} | {was.get(name, '-')} | {value} |" if before else f"| {name} | {value} |")
    lines += ["", "## Every launch", ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for key, per in by_arch.items():
        r = per.get(90) or next(iter(per.values()))
        r80 = per.get(80, {})
        failed = sorted({c for a in per.values() for c, why in a["checks"].items() if why})
        if "error" in r:
            cells = [r["model"], r["case"], r["launch"], "x".join(map(str, r["grid"])), "compile error"]
            cells += ["-"] * (len(cols) - len(cells) - 1) + [r["error"]]
        else:
            cells = [
                r["model"],
                r["case"],
                r["launch"],
                "x".join(map(str, r["grid"])),
                f"{r['registers']}/{r80.get('registers', '-')}",
                str(r["shared"]),
                str(r["local"] + r["stack"]),
                _loads(r["loads"]),
                _loads(r["stores"]),
                f"{r['instr_per_elem']} ({r['loop_mufu']} MUFU)" if r.get("instr_per_elem") else "-",
                "/".join(map(str, r["masked_iterations"])) if r.get("masked_iterations") else "-",
                str(r["syncs"]),
                str(r["resident"]),
                f"{r['programs_per_sm']:g}",
                f"{r['waves']:g}" if r["waves"] is not None else "-",
                _gb(r["min_bytes"]),
                _gb(r["sector_floor"]) if r["kind"] == "cols" else "-",
                _gb(r["tiling_bytes"]),
                f"{r['floor_us']:g}",
                ", ".join(failed) or "none",
            ]
            if before:
                b = old.get(key, {}).get(90) or _match_before(old, key)
                cells[4:4] = [str(b.get("registers", "-")) if b else "-"]
                cells[-1:-1] = [_gb(b.get("tiling_bytes")) if b else "-"]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    n_launch = len(by_arch)
    n_fail = sum(any(why for a in per.values() for why in a["checks"].values()) for per in by_arch.values())
    lines += ["", f"{n_launch} launches, {n_fail} with a failed check (on either arch)."]
    return "\n".join(lines) + "\n"


def headline(rows: list[dict]) -> dict[str, str]:
    """The figures behind issue 10's five problems, at Llama-3.1-70B (Qwen2.5-72B for biases), sm_90a."""

    def pick(model: str, case: str) -> list[dict]:
        return [r for r in rows if r["model"] == model and r["case"] == case and r["arch"] == 90 and "error" not in r]

    out: dict[str, str] = {}
    l70, q72 = shapes.LLAMA_70B.name, shapes.QWEN_72B.name
    for r in pick(l70, "compact cols (down)")[:1]:
        ratio = r["tiling_bytes"] / r["sector_floor"]
        out["1. compact cols (down), 70B: loads; tile layout conversion; stores; tiling / sector floor; floor"] = (
            f"{_loads(r['loads'])}; {r.get('tile_conversion_bytes', '-')} B; {_loads(r['stores'])}; "
            f"{ratio:.3f}x; {r['floor_us']:g} us"
        )
    syncs = [r["syncs"] for c in ("compact rows (up)", "compact cols (down)", "compact_groups rows (k)",
             "compact_groups cols (o)", "compact_many rows (gate+up)") for r in pick(l70, c)[:1]]  # fmt: skip
    k_floor = [r["floor_us"] for r in pick(l70, "compact_groups rows (k)")[:1]]
    if syncs:
        out["2. host syncs per compaction call, 70B (k rows floor)"] = (
            f"{max(syncs)} (k rows floor {k_floor[0]:g} us)" if k_floor else str(max(syncs))
        )
    for case in ("attention+adam", "mlp+adam"):
        for r in pick(l70, case)[:1]:
            r80 = [x for x in rows if _key(x) == _key(r) and x["arch"] == 80]
            regs80 = r80[0].get("registers", "-") if r80 else "-"
            out[f"3. {case}, 70B: registers 90/80; CTAs/SM; instr/elem; loop MUFU"] = (
                f"{r['registers']}/{regs80}; {r['resident']}; {r.get('instr_per_elem')}; {r.get('loop_mufu')}"
            )
    for case in ("mlp", "attention", "saliency dim0"):
        for r in pick(l70, case)[:1]:
            m = r.get("masked_iterations")
            bounded = "bounded by K" if not r.get("bare_loop_bounds") else "runs k_chunk"
            out[f"4. {case}, 70B: last split fully masked iterations; loop"] = (
                f"{m[0]}/{m[1]}; {bounded}" if m else bounded
            )
    bias = pick(q72, "attention+bias")
    if bias:
        loads = "; ".join(_loads(r["loads"]) for r in bias)
        out["5. attention+bias, Qwen2.5-72B: launches; loads per launch"] = f"{len(bias)}; {loads}"
    return out


def _match_before(old: dict, key: tuple) -> dict | None:
    # A launch renumbered by a rewrite (one launch where there were two) is matched by its call.
    for k, per in old.items():
        if k[:2] == key[:2]:
            return per.get(90)
    return None


def _jsonable(rows: list[dict]) -> list[dict]:
    return json.loads(json.dumps(rows, default=str))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, action="append", choices=ARCHS, help="90 and/or 80 (default both)")
    p.add_argument("--model", action="append", choices=[m.name for m in DEFAULT_MODELS], help="default all three")
    p.add_argument("--case", default=None, help="only calls whose name contains this")
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    p.add_argument("--json", type=Path, default=None, help="write the rows as JSON here ('-' for stdout)")
    p.add_argument("--before", type=Path, default=None, help="a JSON from an earlier run, shown beside")
    p.add_argument("--title", default="after", help="the table's label (before / after)")
    args = p.parse_args(argv)
    if tool("cuobjdump") is None:
        print("static_check: cuobjdump not found (it ships in the triton wheel)", file=sys.stderr)
        return 2
    archs = tuple(sorted(set(args.arch or ARCHS), reverse=True))
    models = [m for m in DEFAULT_MODELS if not args.model or m.name in args.model]
    t0 = time.perf_counter()
    rows = run(models, archs, only=(lambda c: args.case in c.name) if args.case else None)
    rows = _jsonable(rows)
    before = json.loads(args.before.read_text()) if args.before else None
    text = render(rows, before, args.title)
    if args.json is not None:
        if str(args.json) == "-":
            print(json.dumps(rows))
        else:
            args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if args.out is not None:
        args.out.write_text(text)
    if str(args.json) != "-":
        print(text, end="")
    print(f"static_check: {len(rows)} compiles in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
