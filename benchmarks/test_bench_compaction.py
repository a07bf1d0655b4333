"""Compaction benchmarks: rows and columns (half kept at random), whole KV groups, and gate+up together.

Each case checks its output first (the kernel and torch.compile(reference) bit for bit against
``index_select``), then records the median time, GB/s and % of the copy bandwidth in
``benchmark.extra_info``. See conftest.py for what runs where.
"""

import pytest
import shapes
from conftest import cases


@pytest.mark.parametrize(("op", "model", "impl"), cases(shapes.COMPACTION))
def test_compaction(run_case, op, model, impl):
    run_case(op, model, impl)
