"""The pairwise case generator behind the kernel tests' parametrizations (tests/kernels/conftest.py)."""

from __future__ import annotations

import itertools

import pytest

from tests.kernels.conftest import Axis, pairwise, pairwise_indices


def _params(mark):
    return mark.args[1]


@pytest.mark.parametrize("sizes", [(2, 2, 10, 3, 3), (2, 2, 8, 3, 4), (4, 2, 2, 2), (6, 2, 3), (3, 3), (5,)])
def test_every_pair_is_covered(sizes):
    cases = pairwise_indices(sizes)
    for i, j in itertools.combinations(range(len(sizes)), 2):
        assert {(c[i], c[j]) for c in cases} == set(itertools.product(range(sizes[i]), range(sizes[j])))
    assert {c[0] for c in cases} == set(range(sizes[0]))
    assert len(set(cases)) == len(cases)
    assert pairwise_indices(sizes) == cases  # deterministic: the same ids on every run


def test_must_cases_are_kept_and_ids_are_readable(monkeypatch):
    monkeypatch.delenv("NIRVANA_FULL_GRID", raising=False)
    mark = pairwise(
        adam=Axis([False, True], ["taylor", "adam"]),
        shape=Axis([(1, 1), (7, 63), (8, 64)], lambda s: f"{s[0]}x{s[1]}"),
        layout=["contiguous", "transposed", "sliced"],
        must=[dict(shape=(7, 63), layout="sliced", adam=True), dict(shape=(8, 64), layout="transposed")],
    )
    assert mark.args[0] == "adam,shape,layout"
    params = _params(mark)
    assert params[0].id == "adam-7x63-sliced" and params[0].values == (True, (7, 63), "sliced")
    assert params[1].values[1:] == ((8, 64), "transposed")
    assert all(p.marks[0].name == "grid" for p in params)
    assert len(params) < 2 * 3 * 3


def test_full_grid_flag_gives_the_product(monkeypatch):
    monkeypatch.setenv("NIRVANA_FULL_GRID", "1")
    params = _params(pairwise(a=Axis([1, 2, 3]), b=Axis([True, False], ["t", "f"]), c="xy"))
    assert [p.values for p in params] == list(itertools.product([1, 2, 3], [True, False], "xy"))
    assert params[0].id == "1-t-x"


def test_a_must_case_outside_the_axes_is_an_error():
    with pytest.raises(ValueError, match="not axes"):
        pairwise(a=[1, 2], b=[3, 4], must=[dict(c=1)])
    with pytest.raises(ValueError, match="not one of the axis' values"):
        pairwise(a=[1, 2], b=[3, 4], must=[dict(a=5)])
    with pytest.raises(ValueError, match="not one of the axis' values"):
        pairwise(a=[0, 1], b=[3, 4], must=[dict(a=True)])  # True == 1, but it is not the axis' value
