"""Factories for the kernel tests: inputs in every layout the public API promises to read in place, and the
pairwise case generator behind their big parametrizations."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
LAYOUTS = ["contiguous", "transposed", "sliced"]

# CI runs the kernels in Triton's interpreter on CPU tensors. With the interpreter off on a CUDA machine
# (benchmarks/gpu_check.sh) the grid tests draw their inputs on the GPU, so the compiled kernels run.
DEVICE = torch.device("cuda" if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available() else "cpu")
KERNEL_BACKEND = "triton" if DEVICE.type == "cuda" else "triton-interpreter"


def make_matrix(rows: int, cols: int, dtype: torch.dtype, layout: str, *, gen: torch.Generator, positive: bool = False):
    """A [rows, cols] tensor that is contiguous, a transposed view, or a strided slice of a larger one."""

    def draw(*shape):
        t = torch.rand(*shape, generator=gen) + 0.05 if positive else torch.randn(*shape, generator=gen)
        return t.to(DEVICE, dtype)

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


def pytest_configure(config):
    config.addinivalue_line("markers", "grid: a pairwise case set; NIRVANA_FULL_GRID=1 runs the full product")


# ----------------------------------------------------------------------------------------------
# Pairwise cases
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Axis:
    """The values of one parameter, with their ids (a list, or a function of the value; default str)."""

    values: Sequence
    ids: Sequence[str] | Callable[[object], str] | None = None

    def id_of(self, i: int) -> str:
        if self.ids is None:
            return str(self.values[i])
        return self.ids(self.values[i]) if callable(self.ids) else self.ids[i]


def full_grid() -> bool:
    return os.environ.get("NIRVANA_FULL_GRID", "0") == "1"


def pairwise_indices(sizes: Sequence[int], must: Sequence[dict[int, int]] = ()) -> list[tuple[int, ...]]:
    """Cases, as value indices per axis, in which every pair of values of any two axes appears at least once.

    Deterministic greedy: the ``must`` cases (axis -> value index; the axes they leave out are free) come
    first, then each new case starts from the first pair not yet covered. A free axis takes the value that
    covers the most new pairs with the axes set so far, then the one in the most pairs still uncovered, then
    the lowest index.
    """
    m = len(sizes)
    uncovered = {
        (i, a, j, b) for i, j in itertools.combinations(range(m), 2) for a in range(sizes[i]) for b in range(sizes[j])
    }
    if m == 1:  # no pairs on one axis: each value once
        uncovered = {(0, a, 0, a) for a in range(sizes[0])}

    def gain(case: dict[int, int], axis: int, value: int) -> int:
        n = 0
        for k, v in case.items():
            if k == axis:
                continue
            key = (axis, value, k, v) if axis < k else (k, v, axis, value)
            n += key in uncovered
        return n

    def open_pairs(axis: int, value: int) -> int:
        return sum(1 for i, a, j, b in uncovered if (i == axis and a == value) or (j == axis and b == value))

    def complete(case: dict[int, int]) -> tuple[int, ...]:
        for axis in range(m):
            if axis not in case:
                case[axis] = max(range(sizes[axis]), key=lambda v: (gain(case, axis, v), open_pairs(axis, v), -v))
        full = tuple(case[axis] for axis in range(m))
        for i, j in itertools.combinations(range(m), 2):
            uncovered.discard((i, full[i], j, full[j]))
        if m == 1:
            uncovered.discard((0, full[0], 0, full[0]))
        return full

    cases: list[tuple[int, ...]] = []
    for fixed in must:
        case = complete(dict(fixed))
        if case not in cases:
            cases.append(case)
    while uncovered:
        i, a, j, b = min(uncovered)
        cases.append(complete({i: a, j: b}))
    return cases


def pairwise(*, must: Sequence[dict] = (), **axes: Axis | Sequence):
    """``pytest.mark.parametrize`` over a pairwise covering set of the product of ``axes``, marked ``grid``.

    Each ``must`` case (name -> value, a subset of the axes) is in the set, its other axes filled in; they keep
    the edges a test names, beyond what pairs alone would cover. Ids join the axes' ids in the order given.
    With NIRVANA_FULL_GRID=1 it is the full product instead (the must cases are in it).
    """
    names = list(axes)
    spec = [a if isinstance(a, Axis) else Axis(list(a)) for a in axes.values()]
    fixed = []
    for case in must:
        unknown = set(case) - set(names)
        if unknown:
            raise ValueError(f"must: {sorted(unknown)} are not axes of {names}")
        idx = {}
        for name, value in case.items():
            axis = spec[names.index(name)]
            matches = [i for i, v in enumerate(axis.values) if v == value and type(v) is type(value)]
            if not matches:
                raise ValueError(f"must: {name}={value!r} is not one of the axis' values")
            idx[names.index(name)] = matches[0]
        fixed.append(idx)
    sizes = [len(a.values) for a in spec]
    rows = list(itertools.product(*map(range, sizes))) if full_grid() else pairwise_indices(sizes, fixed)
    params = [
        pytest.param(
            *(a.values[i] for a, i in zip(spec, row)),
            id="-".join(a.id_of(i) for a, i in zip(spec, row)),
            marks=pytest.mark.grid,
        )
        for row in rows
    ]
    return pytest.mark.parametrize(",".join(names), params)
