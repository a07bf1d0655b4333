"""nirvana.sources.gradients: micro-batched gradient sums and second moments against one plain backward()."""

from __future__ import annotations

import pytest
import torch

from nirvana.sources.gradients import accumulate_gradients

from ..helpers import assert_close
from ..references import N_WINDOWS, flat_params, naive_grads, windows
from ..tiny_models import ARCHITECTURES, tiny_model

CASES = [(a, "maxlogit", 2) for a in ARCHITECTURES] + [
    ("llama", "ce", 2),
    ("gemma2", "ce", 3),
    ("qwen2", "maxlogit", 1),
]


@pytest.mark.parametrize(("arch", "objective", "mbs"), CASES, ids=[f"{a}-{o}-mb{m}" for a, o, m in CASES])
def test_micro_batch_gradient_sum_equals_full_batch(arch, objective, mbs):
    model = tiny_model(arch)
    ids = windows()
    expected = naive_grads(model, ids, objective)
    sums = accumulate_gradients(model, ids, flat_params(model), objective=objective, micro_batch_size=mbs)
    assert sums.micro_batches == -(-N_WINDOWS // mbs)
    assert sums.second_moment is None
    whole = accumulate_gradients(model, ids, flat_params(model), objective=objective, micro_batch_size=N_WINDOWS)
    for i, (g, w, e) in enumerate(zip(sums.grads, whole.grads, expected)):
        assert g.dtype == torch.float32
        scale = e.abs().max().item()
        assert scale > 0, f"param {i}: zero gradient, the test would prove nothing"
        assert_close(g, e, rtol=1e-4, atol=1e-5 * scale, name=f"micro-batched grad {i}")
        assert_close(w, e, rtol=1e-4, atol=1e-5 * scale, name=f"one-batch grad {i}")


def test_second_moment_is_mean_of_micro_batch_squares():
    model = tiny_model("llama")
    ids = windows()
    params = flat_params(model)
    sums = accumulate_gradients(model, ids, params, micro_batch_size=2, second_moment=True)
    shares = [2 / 5, 2 / 5, 1 / 5]
    own = [naive_grads(model, ids[s : s + 2], "maxlogit") for s in (0, 2, 4)]  # each batch's own mean
    for i, v in enumerate(sums.second_moment):
        expected = sum(w * g[i] ** 2 for w, g in zip(shares, own))
        assert_close(v, expected, rtol=1e-4, atol=1e-6 * expected.max().item(), name=f"V {i}")


# --------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------
