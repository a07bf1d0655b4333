"""Which implementation a tensor takes, decided per call from the tensor itself.

CUDA tensors always run the Triton kernels. CPU tensors run the PyTorch reference, unless
``TRITON_INTERPRET=1`` was set before this package was imported: Triton reads that variable when
each ``@triton.jit`` function is defined, so flipping it later would not change the kernels, and
reading it once here keeps the answer consistent with what Triton actually compiled.
"""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401  (imported for its availability only)

    HAS_TRITON = True
except ImportError:  # macOS and Windows have no Triton wheels; the references still work there
    HAS_TRITON = False

INTERPRET = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"

TRITON = "triton"
INTERPRETER = "triton-interpreter"
TORCH = "torch"


def backend(tensor: torch.Tensor) -> str:
    """Return ``"triton"``, ``"triton-interpreter"`` or ``"torch"``: the path ``tensor`` takes."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"tensor: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type == "cuda":
        if not HAS_TRITON:
            raise RuntimeError("a CUDA tensor needs Triton, which is not installed")
        return TRITON
    if tensor.device.type == "cpu" and INTERPRET:
        return INTERPRETER
    return TORCH


def uses_triton(tensor: torch.Tensor) -> bool:
    return backend(tensor) != TORCH


def poison_enabled() -> bool:
    # Read per call so the test suite can turn it on in conftest; it only affects allocations.
    return os.environ.get("NIRVANA_POISON_OUTPUTS", "0") == "1"


def empty(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` that, under ``NIRVANA_POISON_OUTPUTS=1``, fills the buffer with NaN.

    Every kernel output and scratch buffer comes from here, so the tests can prove that the
    kernels write every element they return instead of passing on stale memory.
    """
    if not poison_enabled():
        return torch.empty(shape, dtype=dtype, device=device)
    if dtype.is_floating_point or dtype.is_complex:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=dtype, device=device)
    return torch.full(shape, torch.iinfo(dtype).max, dtype=dtype, device=device)


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1
