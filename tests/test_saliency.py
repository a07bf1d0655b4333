"""nirvana.saliency: NIRVANA's kernel scores (taylor, adam, magnitude, random) against a float64 recomputation."""

from __future__ import annotations

import pytest
import torch

from nirvana.adapters import get_adapter
from nirvana.saliency import ADAM_EPS, compute_scores
from nirvana.sources.gradients import prunable_parameters

from .helpers import assert_bitwise_equal, assert_close
from .references import N_WINDOWS, SEQ, flat_params, hand_objective, naive_grads, windows
from .tiny_models import ARCHITECTURES, tiny_batch, tiny_model


def hand_scores(model, grads, moments=None, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``[L, H_kv]`` and ``[L, I]``: ``|W*G|`` (or ``/ (sqrt(V) + eps)``) summed by hand per unit."""
    adapter = get_adapter(model)
    g = adapter.geometry(model.config)
    kv, d, group = g.num_kv_heads, g.head_dim, g.group_size
    att_rows, mlp_rows, pos = [], [], 0
    for layer in adapter.layers(model):
        attn_p, mlp_p = prunable_parameters(layer)
        elems = []
        for i, p in enumerate(attn_p + mlp_p):
            s = (p.detach().double() * grads[pos + i]).abs()
            if moments is not None:
                s = s / (moments[pos + i].sqrt() + eps)
            elems.append(s)
        pos += len(attn_p) + len(mlp_p)
        q, k, v, o = elems[:4]
        att = (
            q.sum(1).view(kv, group * d).sum(1)
            + k.sum(1).view(kv, d).sum(1)
            + v.sum(1).view(kv, d).sum(1)
            + o.sum(0).view(kv, group * d).sum(1)  # o_proj columns follow the q heads
        )
        for b in elems[4 : len(attn_p)]:  # q, k, v biases when the model has them
            att = att + b.view(kv, -1).sum(1)
        up, down, *gate = elems[len(attn_p) :]
        mlp = up.sum(1) + down.sum(0) + (gate[0].sum(1) if gate else 0)
        att_rows.append(att)
        mlp_rows.append(mlp)
    return torch.stack(att_rows), torch.stack(mlp_rows)


# --------------------------------------------------------------------------------------------------
# Objectives and gradients (no kernels involved)
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------

# Layers cost interpreter time in the kernels: one layer per family, two where the layer order is checked.
SCORE_CASES = [(a, "maxlogit", 1) for a in ARCHITECTURES] + [("llama", "maxlogit", 2), ("qwen2", "ce", 1)]


@pytest.mark.parametrize(
    ("arch", "objective", "layers"), SCORE_CASES, ids=[f"{a}-{o}-{n}layer" for a, o, n in SCORE_CASES]
)
def test_taylor_scores_match_float64_recomputation(arch, objective, layers):
    model = tiny_model(arch, num_hidden_layers=layers)
    ids = windows()
    scores = compute_scores(model, ids, objective=objective, micro_batch_size=2, progress=False)
    geometry = get_adapter(model).geometry(model.config)
    assert scores.geometry == geometry
    assert scores.attention.dtype == scores.mlp.dtype == torch.float32
    assert scores.attention.device.type == "cpu"
    att, mlp = hand_scores(model, naive_grads(model, ids, objective))
    assert att.shape == (geometry.num_layers, geometry.num_kv_heads) and mlp.shape[1] == geometry.intermediate_size
    assert_close(scores.attention, att, rtol=1e-4, name=f"{arch} attention")
    assert_close(scores.mlp, mlp, rtol=1e-4, name=f"{arch} mlp")
    meta = scores.meta
    assert (meta["objective"], meta["saliency"], meta["micro_batches"]) == (objective, "taylor", 3)
    assert (meta["num_windows"], meta["window_length"]) == (N_WINDOWS, SEQ)
    with torch.no_grad():
        value = hand_objective(model, ids, objective).item()
    assert meta["objective_value"] == pytest.approx(value, rel=1e-5)


def test_bfloat16_model_scores_from_float32_gradient_sums():
    model = tiny_model("qwen2", num_hidden_layers=1, dtype=torch.bfloat16)
    ids = windows()
    scores = compute_scores(model, ids, micro_batch_size=2, progress=False)
    assert scores.meta["model_dtype"] == "bfloat16"
    # The reference backward runs in bf16 itself, so only bf16-level agreement can be asked for.
    att, mlp = hand_scores(model, naive_grads(model, ids, "maxlogit"))
    assert_close(scores.attention, att, rtol=3e-2, name="bf16 attention")
    assert_close(scores.mlp.sum(), mlp.sum(), rtol=3e-2, name="bf16 mlp total")
    assert all(p.dtype == torch.bfloat16 and p.grad is None for p in model.parameters())


def test_adam_scores_with_accumulated_second_moment():
    model = tiny_model("qwen2", num_hidden_layers=1)  # biases: the 7-part attention case
    ids = windows()
    scores = compute_scores(model, ids, saliency="adam", micro_batch_size=2, progress=False)
    own = [naive_grads(model, ids[s : s + 2], "maxlogit") for s in (0, 2, 4)]
    shares = [2 / 5, 2 / 5, 1 / 5]
    grads = [sum(w * g[i] for w, g in zip(shares, own)) for i in range(len(own[0]))]
    moments = [sum(w * g[i] ** 2 for w, g in zip(shares, own)) for i in range(len(own[0]))]
    att, mlp = hand_scores(model, grads, moments, eps=ADAM_EPS)
    assert_close(scores.attention, att, rtol=1e-4, name="adam attention")
    assert_close(scores.mlp, mlp, rtol=1e-4, name="adam mlp")
    assert scores.meta["second_moment"] == "micro-batch"
    # Scaling by the second moment really changes the ranking material, not just a constant.
    taylor_att, _ = hand_scores(model, grads)
    assert not torch.allclose(att / att.sum(), taylor_att / taylor_att.sum(), rtol=1e-3)


OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3, betas=(0.9, 0.99), eps=1e-6),
    "adamw-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-3, amsgrad=True),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS), ids=list(OPTIMIZERS))
def test_adam_scores_from_supplied_optimizer(name):
    model = tiny_model("qwen2", num_hidden_layers=1)
    opt = OPTIMIZERS[name](model.parameters())
    for step in range(3):
        opt.zero_grad()
        hand_objective(model, tiny_batch(3, SEQ, seed=10 + step), "ce").backward()
        opt.step()
    before = {n: p.grad for n, p in model.named_parameters()}
    ids = windows()
    scores = compute_scores(model, ids, saliency="adam", optimizer=opt, micro_batch_size=3, progress=False)
    # The optimizer's own gradients are left exactly where they were.
    assert all(p.grad is before[n] for n, p in model.named_parameters())
    group = opt.param_groups[0]
    correction = 1 - group["betas"][1] ** 3
    key = "max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"
    moments = [opt.state[p][key].double() / correction for p in flat_params(model)]  # Adam's bias-corrected V
    att, mlp = hand_scores(model, naive_grads(model, ids, "maxlogit"), moments, eps=group["eps"])
    assert_close(scores.attention, att, rtol=1e-4, name=f"{name} attention")
    assert_close(scores.mlp, mlp, rtol=1e-4, name=f"{name} mlp")
    assert scores.meta["second_moment"] == "optimizer" and scores.meta["optimizer_step"] == 3


def test_optimizer_errors():
    model = tiny_model("llama")
    ids = windows()
    fresh = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match=r"optimizer: holds no Adam state .*q_proj"):
        compute_scores(model, ids, saliency="adam", optimizer=fresh, progress=False)
    with pytest.raises(ValueError, match=r"optimizer: only used with saliency='adam'"):
        compute_scores(model, ids, saliency="taylor", optimizer=fresh, progress=False)
    params = flat_params(model)
    mixed = torch.optim.Adam([{"params": params[:4]}, {"params": params[4:], "eps": 1e-3}])
    for p in params:
        p.grad = torch.ones_like(p)
    mixed.step()
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match=r"optimizer: the prunable parameters differ"):
        compute_scores(model, ids, saliency="adam", optimizer=mixed, progress=False)
    with pytest.raises(ValueError, match=r"optimizer: expected a torch.optim.Adam"):
        compute_scores(model, ids, saliency="adam", optimizer=object(), progress=False)


def test_only_prunable_weights_get_gradients_and_state_is_restored():
    model = tiny_model("qwen2", num_hidden_layers=1)
    model.train()
    model.model.norm.eval()  # a mixed train/eval state must come back module by module
    layer = model.model.layers[0]
    layer.self_attn.q_proj.weight.requires_grad_(False)  # frozen by the user, yet scored
    layer.input_layernorm.weight.grad = marker = torch.full_like(layer.input_layernorm.weight, 7.0)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    seen = {}

    def record(name, module, weight=None):
        def hook(mod, args, out):
            seen[name] = ((weight if weight is not None else mod.weight).requires_grad, mod.training)

        module.register_forward_hook(hook)

    record("embed", model.model.embed_tokens)
    record("final_norm", model.model.norm)
    record("layer_norm", layer.input_layernorm)
    # lm_head is applied in vocabulary slices (its forward never runs), so read it as the norm finishes.
    record("lm_head", model.model.norm, model.lm_head.weight)
    record("q_proj", layer.self_attn.q_proj)
    record("up_proj", layer.mlp.up_proj)
    compute_scores(model, windows(), progress=False)
    assert seen == {
        "embed": (False, False),
        "final_norm": (False, False),
        "layer_norm": (False, False),
        "lm_head": (False, False),
        "q_proj": (True, False),
        "up_proj": (True, False),
    }
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert layer.input_layernorm.weight.grad is marker
    assert all(p.grad is None for n, p in model.named_parameters() if "input_layernorm" not in n)


def test_scores_inside_no_grad_context():
    model = tiny_model("llama", num_hidden_layers=1)
    ids = windows()
    with torch.no_grad():
        scores = compute_scores(model, ids, progress=False)
    att, mlp = hand_scores(model, naive_grads(model, ids, "maxlogit"))
    assert_close(scores.attention, att, rtol=1e-4, name="attention")


def test_magnitude_scores_need_no_data():
    model = tiny_model("qwen2", num_hidden_layers=1)
    scores = compute_scores(model, None, saliency="magnitude", progress=False)
    ones = [torch.ones_like(p, dtype=torch.float64) for p in flat_params(model)]
    att, mlp = hand_scores(model, ones)
    assert_close(scores.attention, att, rtol=1e-5, name="magnitude attention")
    assert_close(scores.mlp, mlp, rtol=1e-5, name="magnitude mlp")


def test_random_scores_are_seeded():
    model = tiny_model("llama")
    a = compute_scores(model, None, saliency="random", seed=3, progress=False)
    b = compute_scores(model, windows(), saliency="random", seed=3, progress=False)
    c = compute_scores(model, None, saliency="random", seed=4, progress=False)
    assert_bitwise_equal(a.attention, b.attention, name="same seed")
    assert_bitwise_equal(a.mlp, b.mlp, name="same seed")
    assert not torch.equal(a.mlp, c.mlp)
    assert ((a.mlp >= 0) & (a.mlp < 1)).all() and a.meta["seed"] == 3


def test_taylor_scores_are_deterministic():
    model = tiny_model("gemma3", num_hidden_layers=1)
    ids = windows()
    first = compute_scores(model, ids, micro_batch_size=2, progress=False)
    second = compute_scores(model, ids, micro_batch_size=2, progress=False)
    assert_bitwise_equal(first.attention, second.attention, name="attention")
    assert_bitwise_equal(first.mlp, second.mlp, name="mlp")
    assert first.meta == second.meta


def test_nan_weight_names_its_layer():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"layer 1 has non-finite mlp scores"):
        compute_scores(model, None, saliency="magnitude", progress=False)
    # With gradients the NaN reaches every layer through the backward pass; the first is named.
    model = tiny_model("llama", num_hidden_layers=1)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer 0 has non-finite attention scores"):
        compute_scores(model, windows(), progress=False)


# --------------------------------------------------------------------------------------------------
# Bad arguments
# --------------------------------------------------------------------------------------------------

BAD = {
    "objective": (dict(objective="nll"), r"objective: must be one of"),
    "saliency": (dict(saliency="fisher"), r"saliency: must be one of"),
    "micro_batch_size-zero": (dict(micro_batch_size=0), r"micro_batch_size: must be a positive integer, got 0"),
    "micro_batch_size-bool": (dict(micro_batch_size=True), r"micro_batch_size: .* got True"),
    "seed": (dict(seed="1"), r"seed: must be an integer"),
    "windows-float": (dict(windows=torch.zeros(2, 4)), r"windows: dtype must be an integer type"),
    "windows-1d": (dict(windows=torch.zeros(4, dtype=torch.long)), r"windows: expected a non-empty \[N, T\]"),
    "windows-empty": (dict(windows=torch.zeros(0, 4, dtype=torch.long)), r"windows: expected a non-empty"),
    "windows-list": (dict(windows=[[1, 2]]), r"windows: expected a torch.Tensor"),
    "windows-vocab": (dict(windows=torch.full((2, 4), 128)), r"windows: token id 128 is outside the vocabulary"),
    "windows-negative": (dict(windows=torch.full((2, 4), -1)), r"windows: token id -1"),
    "windows-ce-short": (dict(windows=torch.zeros(2, 1, dtype=torch.long), objective="ce"), r"windows: .* T >= 2"),
    "windows-none": (dict(windows=None), r"windows: expected a torch.Tensor"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_arguments_name_themselves(case):
    kwargs, message = BAD[case]
    kwargs = dict(kwargs)
    ids = kwargs.pop("windows", windows())
    with pytest.raises(ValueError, match=message):
        compute_scores(tiny_model("llama"), ids, progress=False, **kwargs)


def test_pruned_model_is_refused():
    model = tiny_model("llama")
    model.model.layers[1].mlp.up_proj = torch.nn.Linear(32, 40, bias=False)
    with pytest.raises(ValueError, match=r"model: layer 1 has 16 k_proj rows and 40 MLP channels"):
        compute_scores(model, windows(), progress=False)


@pytest.mark.parametrize("weight", ["norm", "objective"])
def test_robust_aggregation_scores_the_weighted_sum(weight):
    model = tiny_model("llama")
    ids = windows()
    grads = [naive_grads(model, ids[n : n + 1], "maxlogit") for n in range(N_WINDOWS)]
    with torch.no_grad():
        values = [float(hand_objective(model, ids[n : n + 1], "maxlogit")) for n in range(N_WINDOWS)]
    scale = [
        float(sum(x.square().sum() for x in g).sqrt()) if weight == "norm" else N_WINDOWS * f
        for g, f in zip(grads, values)
    ]
    summed = [sum(g[i] / s for g, s in zip(grads, scale)) for i in range(len(grads[0]))]
    att, mlp = hand_scores(model, summed)
    scores = compute_scores(model, ids, window_weight=weight, progress=False)
    assert_close(scores.attention, att, rtol=1e-4, name=f"{weight} attention")
    assert_close(scores.mlp, mlp, rtol=1e-4, name=f"{weight} mlp")
    assert (scores.meta["window_weight"], scores.meta["trim"], scores.meta["micro_batch_size"]) == (weight, 0.0, 1)
    assert "window_weight" not in compute_scores(model, ids, progress=False).meta  # the plain sum's meta as before
    with pytest.raises(ValueError, match=r"^window_weight: 'norm' / trim 0\.0 weigh the gradient sum of saliency"):
        compute_scores(model, ids, saliency="adam", window_weight="norm", progress=False)
