"""Saliency benchmarks: attention KV groups (plain and Adam-scaled), MLP channels, and generic rows/columns.

Each case checks its output first (the kernel and torch.compile(reference) against the eager
reference, within fp32 summation error), then records the median time, GB/s and % of the copy
bandwidth in ``benchmark.extra_info``. See conftest.py for what runs where.
"""

import pytest
import shapes
from conftest import cases


@pytest.mark.parametrize(("op", "model", "impl"), cases(shapes.SALIENCY))
def test_saliency(run_case, op, model, impl):
    run_case(op, model, impl)
