"""nirvana.sources.gradients: micro-batched gradient sums and second moments against one plain backward()."""

from __future__ import annotations

import math

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


# --------------------------------------------------------------------------------------------------
# Robust aggregation: each window's gradient weighted before the sum, the largest ones trimmed
# --------------------------------------------------------------------------------------------------


def _per_window(model, ids, objective="maxlogit"):
    """Each window's own float64 gradient (plain autograd) and objective value, by hand."""
    from ..references import hand_objective

    grads = [naive_grads(model, ids[n : n + 1], objective) for n in range(ids.shape[0])]
    with torch.no_grad():
        values = [float(hand_objective(model, ids[n : n + 1], objective)) for n in range(ids.shape[0])]
    return grads, values


def _norm(grads) -> float:
    return float(sum(g.square().sum() for g in grads).sqrt())


def _assert_sums(got, want, what):
    for i, (g, e) in enumerate(zip(got, want)):
        scale = e.abs().max().item()
        assert scale > 0, f"param {i}: zero gradient, the test would prove nothing"
        assert_close(g, e, rtol=1e-4, atol=1e-5 * scale, name=f"{what} {i}")


@pytest.mark.parametrize(("arch", "objective"), [("llama", "maxlogit"), ("qwen2", "ce")], ids=["llama", "qwen2-ce"])
def test_norm_weighting_sums_each_window_gradient_over_its_norm(arch, objective):
    model = tiny_model(arch)
    ids = windows()
    params = flat_params(model)
    grads, _ = _per_window(model, ids, objective)
    want = [sum(g[i] / _norm(g) for g in grads) for i in range(len(params))]
    sums = accumulate_gradients(model, ids, params, objective=objective, window_weight="norm")
    _assert_sums(sums.grads, want, "norm-weighted grad")
    assert sums.micro_batches == N_WINDOWS and sums.second_moment is None


def test_objective_weighting_divides_each_window_gradient_by_its_value():
    model = tiny_model("llama")
    ids = windows()
    params = flat_params(model)
    grads, values = _per_window(model, ids)
    assert all(v > 0 for v in values)
    # The plain sum adds grad(f_n) / N for window n; weighted, that term is divided by f_n.
    want = [sum(g[i] / N_WINDOWS / f for g, f in zip(grads, values)) for i in range(len(params))]
    sums = accumulate_gradients(model, ids, params, window_weight="objective")
    _assert_sums(sums.grads, want, "objective-weighted grad")
    assert sums.objective == pytest.approx(sum(values) / N_WINDOWS, rel=1e-5)


TRIMS = [(0.2, "none"), (0.3, "none"), (0.2, "norm")]


@pytest.mark.parametrize(("trim", "weight"), TRIMS, ids=["1of5", "2of5", "norm"])
def test_trim_leaves_out_the_windows_with_the_largest_gradient_norms(trim, weight):
    model = tiny_model("llama")
    ids = windows()
    params = flat_params(model)
    grads, values = _per_window(model, ids)
    norms = [_norm(g) for g in grads]
    dropped = sorted(range(N_WINDOWS), key=lambda n: -norms[n])[: math.ceil(trim * N_WINDOWS)]
    assert len(dropped) == {0.2: 1, 0.3: 2}[trim]
    kept = [n for n in range(N_WINDOWS) if n not in dropped]

    def term(n):
        return [g / (norms[n] if weight == "norm" else N_WINDOWS) for g in grads[n]]

    want = [sum(term(n)[i] for n in kept) for i in range(len(params))]
    sums = accumulate_gradients(model, ids, params, window_weight=weight, trim=trim)
    _assert_sums(sums.grads, want, "trimmed grad")
    assert sums.micro_batches == N_WINDOWS + len(kept)  # the norm pass, then the kept windows
    assert sums.objective == pytest.approx(sum(values) / N_WINDOWS, rel=1e-5)  # the objective of every window


def test_trimmed_windows_picks_the_largest_norms():
    from nirvana.sources.gradients import trimmed_windows

    assert trimmed_windows([1.0, 5.0, 3.0, 5.0, 0.5], 0.3) == {1, 3}
    assert trimmed_windows([1.0, 5.0, 3.0, 5.0, 0.5], 0.1) == {1}  # ties: the earlier window goes
    assert trimmed_windows([1.0, 2.0], 0.0) == set()


def test_default_aggregation_is_the_plain_sum_bit_for_bit():
    model = tiny_model("llama")
    ids = windows()
    plain = accumulate_gradients(model, ids, flat_params(model), micro_batch_size=2)
    named = accumulate_gradients(model, ids, flat_params(model), micro_batch_size=2, window_weight="none", trim=0.0)
    for a, b in zip(plain.grads, named.grads):
        assert torch.equal(a, b)
    assert plain.micro_batches == named.micro_batches == 3


AGGREGATION_REFUSALS = {
    "weight-name": ({"window_weight": "l1"}, r"^window_weight: must be one of none, norm, objective, got 'l1'$"),
    "trim-half": ({"trim": 0.5}, r"^trim: must be a number in \[0, 0\.5\), got 0\.5$"),
    "trim-negative": ({"trim": -0.1}, r"^trim: must be a number in \[0, 0\.5\), got -0\.1$"),
    "second-moment": ({"window_weight": "norm", "second_moment": True}, r"^window_weight: 'norm' / trim 0\.0 weigh"),
}


@pytest.mark.parametrize(("kwargs", "pattern"), list(AGGREGATION_REFUSALS.values()), ids=list(AGGREGATION_REFUSALS))
def test_aggregation_refusals_are_one_line(kwargs, pattern):
    model = tiny_model("llama", num_hidden_layers=1)
    with pytest.raises(ValueError, match=pattern) as err:
        accumulate_gradients(model, windows(), flat_params(model), **kwargs)
    assert "\n" not in str(err.value)


def test_a_trim_that_leaves_out_every_window_is_refused():
    model = tiny_model("llama", num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"^trim: 0\.4 of 1 windows leaves out all of them"):
        accumulate_gradients(model, windows()[:1], flat_params(model), trim=0.4)
