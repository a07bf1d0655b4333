"""The reductions of a linear's weight that ``wanda-sp`` and ``flap`` read, so that a sharded source can supply them.

Both methods read a weight ``W`` (``[out, in]``) only through three reductions: ``|W| @ v`` per row,
``sum_i |W[i, c]|`` and ``sum_i W[i, c]**2`` per column. :data:`DENSE_WEIGHTS` computes them on the
whole weight; :class:`nirvana.sources.fsdp.ShardedWeights` gives the same numbers from each rank's rows of an
FSDP2-sharded model (rows are whole on one rank, column sums are partial sums reduced across ranks).
"""

from __future__ import annotations

import torch
from torch import nn


class WeightReductions:
    """The reductions on a whole (unsharded) weight; each result is on the weight's device."""

    def row_abs_dot(self, linear: nn.Linear, v: torch.Tensor) -> torch.Tensor:
        """float32 ``[out_features]``: ``sum_c |W[r, c]| * v[c]`` for every row ``r`` (``v``: ``[in_features]``)."""
        w = linear.weight.detach().float()
        return w.abs() @ v.to(w.device, torch.float32)

    def col_abs_sum(self, linear: nn.Linear) -> torch.Tensor:
        """float32 ``[in_features]``: ``sum_i |W[i, c]|`` for every column ``c``."""
        return linear.weight.detach().float().abs().sum(dim=0)

    def col_square_sum(self, linear: nn.Linear) -> torch.Tensor:
        """float64 ``[in_features]``: ``sum_i W[i, c]**2`` for every column ``c`` (float32 squares, float64 sum)."""
        return linear.weight.detach().float().square().sum(dim=0, dtype=torch.float64)


DENSE_WEIGHTS = WeightReductions()

__all__ = ["DENSE_WEIGHTS", "WeightReductions"]
