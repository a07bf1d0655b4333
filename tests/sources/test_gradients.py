"""nirvana.sources.gradients: micro-batched gradient sums and second moments against one plain backward()."""

from __future__ import annotations

import pytest
import torch

from nirvana.sources.gradients import accumulate_gradients, adam_state_from_steps

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


def test_adam_state_from_steps_is_the_ema_of_step_gradients_and_moves_nothing():
    model = tiny_model("llama")
    ids = windows()
    params = flat_params(model)
    # Steps take micro-batches 0:2, 2:4, 4:5, then 0:2 again, each its own mean cross-entropy.
    step_grads = [naive_grads(model, ids[s : s + 2], "ce") for s in (0, 2, 4, 0)]
    before = [p.detach().clone() for p in params]
    marker = params[0].grad = torch.ones_like(params[0])
    opt = adam_state_from_steps(model, ids, params, steps=4, micro_batch_size=2)
    beta2 = opt.param_groups[0]["betas"][1]
    for i, p in enumerate(params):
        want = torch.zeros_like(step_grads[0][i])
        for g in step_grads:
            want = beta2 * want + (1 - beta2) * g[i] ** 2
        got = opt.state[p]["exp_avg_sq"]
        assert_close(got, want, rtol=1e-4, atol=1e-6 * want.max().item(), name=f"exp_avg_sq {i}")
        assert torch.equal(p.detach(), before[i]), f"param {i} moved at lr 0"
    assert params[0].grad is marker and all(p.grad is None for p in params[1:])
    assert float(opt.state[params[0]]["step"]) == 4


@pytest.mark.parametrize("steps", [0, -1, 1.5, True], ids=["zero", "negative", "float", "bool"])
def test_adam_state_from_steps_refuses_a_bad_step_count(steps):
    model = tiny_model("llama", num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"^steps: must be a positive integer, got "):
        adam_state_from_steps(model, windows(), flat_params(model), steps=steps)
