"""Factories for the kernel tests: inputs in every layout the public API promises to read in place."""

from __future__ import annotations

import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
LAYOUTS = ["contiguous", "transposed", "sliced"]


def make_matrix(rows: int, cols: int, dtype: torch.dtype, layout: str, *, gen: torch.Generator, positive: bool = False):
    """A [rows, cols] tensor that is contiguous, a transposed view, or a strided slice of a larger one."""

    def draw(*shape):
        t = torch.rand(*shape, generator=gen) + 0.05 if positive else torch.randn(*shape, generator=gen)
        return t.to(dtype)

    if layout == "contiguous":
        return draw(rows, cols)
    if layout == "transposed":
        return draw(cols, rows).t()
    if layout == "sliced":
        # Every other column of a wider matrix, starting at an offset: neither stride is the shape's.
        base = draw(rows + 1, 2 * cols + 3)
        return base[1:, 3::2][:, :cols]
    raise ValueError(layout)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
