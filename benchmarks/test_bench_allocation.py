"""Allocation at Llama-3.1-70B's geometry: a pure function of the scores, timed on the CPU."""

from __future__ import annotations

import torch

from nirvana.allocation import allocate
from nirvana.plan import Geometry

LLAMA_70B = Geometry(
    num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8, head_dim=128, intermediate_size=28672
)


def test_allocate_70b(benchmark):
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(LLAMA_70B.num_layers, LLAMA_70B.num_kv_heads, generator=g)
    mlp = torch.rand(LLAMA_70B.num_layers, LLAMA_70B.intermediate_size, generator=g)
    plan = benchmark(allocate, attn, mlp, LLAMA_70B, sparsity=0.5, gamma=3.36)
    assert abs(plan.achieved_sparsity() - 0.5) <= 0.005
