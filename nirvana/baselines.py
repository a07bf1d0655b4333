"""Baseline scoring methods, so that pruning methods are compared on equal terms.

Every method turns a dense model (and, for most, calibration windows) into the same :class:`Scores`
(float32 ``[num_layers, num_kv_heads]`` and ``[num_layers, intermediate_size]`` on the CPU, higher
means more important), which then go through the flow's own allocation, compaction and checkpoint
steps. Only the scores, and FLAP's bias compensation, differ between methods.

Notation for one decoder layer: KV group ``j`` owns q rows and o_proj columns ``Q_j = [j*G*d,
(j+1)*G*d)`` and k/v rows ``K_j = [j*d, (j+1)*d)``; MLP channel ``c`` owns row ``c`` of gate/up and
column ``c`` of down. Over the calibration tokens ``t`` (every position of every window),
``X^attn`` is the input of q/k/v (the normed layer input), ``X^o`` the input of o_proj, ``X^mlp`` the
input of gate/up, ``X^down`` the input of down_proj; ``||X_c||`` is the 2-norm over tokens of
channel ``c``, ``mu_c`` and ``var_c`` its mean and unbiased variance.

* ``nirvana``: :func:`nirvana.saliency.compute_scores` with the max-logit objective and Taylor
  saliency, ``sum |W * G|`` over the unit, ``G`` the gradient of the objective over all windows.
* ``magnitude``: ``sum |W|`` over the unit's weights (and q/k/v bias entries); no data.
* ``random``: uniform [0, 1) scores from ``seed``; no data.
* ``taylor`` (LLM-Pruner's first-order term, per sample): ``sum_s sum_{w in unit} |w * dCE_s/dw|``
  where ``CE_s`` is window ``s``'s next-token cross-entropy (mean over its ``T-1`` predictions).
  See :func:`taylor_scores` for why per sample.
* ``wanda-sp``: ``sum_{w in unit} |w| * ||X_{in(w)}||``, each weight times the norm of the input
  channel it reads. See :func:`wanda_sp_scores`.
* ``flap``: the fluctuation ``var_c * ||W[:, c]||^2`` of each o_proj / down_proj input column,
  standardised per layer, then per KV group the mean over its columns; plus the bias compensation
  :func:`apply_flap_compensation`. See :func:`flap_scores`.

The activation statistics (``wanda-sp``, ``flap``) are running float64 sums of ``x`` and ``x**2`` per
input channel, gathered by forward pre-hooks during plain no-grad forward passes, one micro-batch at
a time: no activation outlives its micro-batch. The per-sample gradients (``taylor``) come from
forward hooks that keep one micro-batch's linear inputs and tensor hooks that receive the gradient
of each linear's output. Every hook is removed and every flag restored afterwards, also on error.
"""

from __future__ import annotations

import contextlib
import json
import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .adapters import LayerModules, architecture_names, get_adapter, text_config
from .compaction import check_dense, pruned_indices
from .plan import Geometry, PruningPlan
from .saliency import Scores, compute_scores, model_device, objective_value, prunable_parameters, scoring_state

METHODS = ("nirvana", "magnitude", "random", "taylor", "wanda-sp", "flap")
# The methods that need no calibration windows.
DATA_FREE = ("magnitude", "random")
# The methods whose result is more than the plan: FLAP's bias compensation is computed from calibration
# activations, so only nirvana prune (which runs them) can produce it; nirvana apply refuses such plans.
NEEDS_ACTIVATIONS = frozenset({"flap"})
# What ActivationStats holds statistics of: the inputs of q/k/v, o_proj, gate/up and down_proj.
INPUTS = ("attn", "o", "mlp", "down")
STATS_FORMAT = "nirvana-activation-stats"
STATS_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Plain data
# --------------------------------------------------------------------------------------------------


@dataclass
class ActivationStats:
    """Per-channel sums over the calibration tokens of the inputs of each layer's prunable linears.

    Attributes:
        geometry: the dense geometry the channels index into.
        tokens: how many token positions were summed (windows times window length).
        sums: for each name in :data:`INPUTS`, float64 ``[num_layers, channels]`` on the CPU: ``sum_t x``.
            Channels are ``hidden_size`` for ``attn`` and ``mlp``, ``num_heads * head_dim`` for ``o``,
            ``intermediate_size`` for ``down``.
        squares: the same shapes: ``sum_t x**2``.
    """

    geometry: Geometry
    tokens: int
    sums: dict[str, torch.Tensor]
    squares: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            raise ValueError(f"tokens: must be a positive integer, got {self.tokens!r}")
        shapes = _stat_shapes(self.geometry)
        for field_name in ("sums", "squares"):
            table = getattr(self, field_name)
            if not isinstance(table, dict) or set(table) != set(INPUTS):
                got = sorted(table) if isinstance(table, dict) else type(table).__name__
                raise ValueError(f"{field_name}: expected the keys {list(INPUTS)}, got {got}")
            for name, t in table.items():
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != shapes[name] or t.dtype != torch.float64:
                    desc = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"{field_name}[{name!r}]: expected float64 {shapes[name]}, got {desc}")

    def mean(self, name: str) -> torch.Tensor:
        """float64 ``[num_layers, channels]``: each channel's mean over the tokens."""
        return self.sums[_input_name(name)] / self.tokens

    def norm(self, name: str) -> torch.Tensor:
        """float64 ``[num_layers, channels]``: each channel's 2-norm over the tokens."""
        return self.squares[_input_name(name)].sqrt()

    def variance(self, name: str) -> torch.Tensor:
        """float64 ``[num_layers, channels]``: each channel's unbiased variance over the tokens (0 for one token)."""
        n, s, sq = self.tokens, self.sums[_input_name(name)], self.squares[name]
        if n < 2:
            return torch.zeros_like(s)
        # The float64 sums keep the cancellation error far below any variance that matters for ranking;
        # clamping removes the tiny negative values it can leave for a constant channel.
        return ((sq - s * s / n) / (n - 1)).clamp_min(0.0)


def _input_name(name: str) -> str:
    if name not in INPUTS:
        raise ValueError(f"name: must be one of {INPUTS}, got {name!r}")
    return name


def _stat_shapes(g: Geometry) -> dict[str, tuple[int, int]]:
    return {
        "attn": (g.num_layers, g.hidden_size),
        "o": (g.num_layers, g.num_heads * g.head_dim),
        "mlp": (g.num_layers, g.hidden_size),
        "down": (g.num_layers, g.intermediate_size),
    }


def save_statistics(stats: ActivationStats, path: str | Path) -> Path:
    """Write ``stats`` as a safetensors file (tensors ``sum.<name>``/``square.<name>``); returns the path.

    With it, FLAP's compensation can be applied at another sparsity without a second calibration pass.
    """
    from safetensors.torch import save_file

    if not isinstance(stats, ActivationStats):
        raise ValueError(f"stats: expected an ActivationStats, got {type(stats).__name__}")
    tensors = {f"sum.{k}": v.contiguous() for k, v in stats.sums.items()}
    tensors |= {f"square.{k}": v.contiguous() for k, v in stats.squares.items()}
    metadata = {
        "format": STATS_FORMAT,
        "version": str(STATS_VERSION),
        "geometry": json.dumps(stats.geometry.to_dict(), sort_keys=True),
        "tokens": str(stats.tokens),
    }
    save_file(tensors, str(path), metadata=metadata)
    return Path(path)


def load_statistics(path: str | Path) -> ActivationStats:
    """Read what :func:`save_statistics` wrote."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise ValueError(f"path: no statistics file at {str(path)!r}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != STATS_FORMAT or metadata.get("version") != str(STATS_VERSION):
            raise ValueError(f"path: {str(path)!r} is not a version {STATS_VERSION} {STATS_FORMAT} file")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    expected = {f"{kind}.{k}" for kind in ("sum", "square") for k in INPUTS}
    if set(tensors) != expected:
        raise ValueError(f"path: {str(path)!r} holds tensors {sorted(tensors)}, expected {sorted(expected)}")
    return ActivationStats(
        Geometry.from_dict(json.loads(metadata["geometry"])),
        int(metadata["tokens"]),
        {k: tensors[f"sum.{k}"] for k in INPUTS},
        {k: tensors[f"square.{k}"] for k in INPUTS},
    )


# --------------------------------------------------------------------------------------------------
# Checks and model state
# --------------------------------------------------------------------------------------------------


def _check_method(method) -> str:
    if method not in METHODS:
        raise ValueError(f"method: must be one of {METHODS}, got {method!r}")
    return method


def _check_micro_batch(micro_batch_size) -> int:
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size: must be a positive integer, got {micro_batch_size!r}")
    return micro_batch_size


def _check_windows(model: nn.Module, windows, min_length: int = 1) -> torch.Tensor:
    if not isinstance(windows, torch.Tensor):
        raise ValueError(f"windows: expected a torch.Tensor of token ids, got {type(windows).__name__}")
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < min_length:
        raise ValueError(
            f"windows: expected a [N, T] tensor with N >= 1 and T >= {min_length}, got shape {tuple(windows.shape)}"
        )
    if windows.dtype.is_floating_point or windows.dtype.is_complex or windows.dtype == torch.bool:
        raise ValueError(f"windows: dtype must be an integer type, got {windows.dtype}")
    vocab = getattr(model.get_input_embeddings(), "num_embeddings", None)
    lo, hi = int(windows.min()), int(windows.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise ValueError(f"windows: token id {lo if lo < 0 else hi} is outside the vocabulary [0, {vocab})")
    return windows.long()


def _dense_layers(model: nn.Module) -> tuple[Geometry, list[LayerModules]]:
    """The dense geometry and the layers; a ValueError if any layer was compacted."""
    adapter = get_adapter(model)
    geometry = check_dense(model, adapter, "scores need the dense model")
    return geometry, adapter.layers(model)


def _base_meta(model: nn.Module, method: str) -> dict:
    names = ", ".join(architecture_names(model))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return {"method": method, "architecture": names, "model_dtype": dtype}


@contextlib.contextmanager
def _hooks() -> Iterator[list]:
    """A list to append hook handles to; every one is removed on exit, also after an error."""
    handles: list = []
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="micro-batch", disable=not enabled)


# --------------------------------------------------------------------------------------------------
# Grouping per-row / per-column contributions into units
# --------------------------------------------------------------------------------------------------


def _group_attention(g: Geometry, q_rows, k_rows, v_rows, o_cols) -> torch.Tensor:
    """float64 ``[num_kv_heads]``: each KV group's total of the given per-row (q, k, v) and per-column
    (o) contributions, each a 1-D tensor (``None`` for a part that contributes nothing)."""
    h, d, qd = g.num_kv_heads, g.head_dim, g.group_size * g.head_dim
    total = torch.zeros(h, dtype=torch.float64)
    for part, width in ((q_rows, qd), (k_rows, d), (v_rows, d), (o_cols, qd)):
        if part is not None:
            total += part.detach().to("cpu", torch.float64).view(h, width).sum(dim=1)
    return total


def _group_mlp(up_rows, down_cols, gate_rows) -> torch.Tensor:
    """float64 ``[intermediate_size]``: each channel's up/gate row plus down column contribution."""
    total = up_rows.detach().to("cpu", torch.float64) + down_cols.detach().to("cpu", torch.float64)
    if gate_rows is not None:
        total += gate_rows.detach().to("cpu", torch.float64)
    return total


def _finish(att_rows, mlp_rows, geometry: Geometry, meta: dict) -> Scores:
    attention = torch.stack(att_rows).to(torch.float32)
    mlp = torch.stack(mlp_rows).to(torch.float32)
    for name, t in (("attention", attention), ("mlp", mlp)):
        bad = (~torch.isfinite(t)).any(dim=1)
        if bad.any():
            raise ValueError(
                f"scores: layer {int(bad.nonzero()[0, 0])} has non-finite {name} scores "
                "(NaN or inf in its weights or activations)"
            )
    return Scores(attention, mlp, geometry, meta)


# --------------------------------------------------------------------------------------------------
# Activation statistics (wanda-sp, flap)
# --------------------------------------------------------------------------------------------------


def activation_statistics(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    micro_batch_size: int = 8,
    progress: bool = True,
) -> ActivationStats:
    """Per-channel ``sum x`` and ``sum x**2`` of the inputs of every layer's prunable linears.

    Forward pre-hooks on q_proj (whose input k/v share), o_proj, up_proj (shared by gate) and down_proj
    add each micro-batch's ``[B*T, channels]`` input, widened to float64, into running sums on the
    layer's device; nothing else is kept. The forward runs under ``no_grad`` in eval mode and asks for
    the last position's logits only.

    Args:
        windows: integer ``[N, T]`` token ids (any device; moved to the model's).
        micro_batch_size: windows per forward pass.

    Returns:
        :class:`ActivationStats` over ``N * T`` tokens, on the CPU.
    """
    mbs = _check_micro_batch(micro_batch_size)
    windows = _check_windows(model, windows)
    geometry, layers = _dense_layers(model)
    sums: dict[str, list[torch.Tensor]] = {k: [] for k in INPUTS}
    squares: dict[str, list[torch.Tensor]] = {k: [] for k in INPUTS}
    seen = [0]

    def adder(name: str, i: int):
        def hook(_module, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            sums[name][i] += x.sum(dim=0)
            squares[name][i] += x.square().sum(dim=0)
            if name == "attn" and i == 0:
                seen[0] += x.shape[0]

        return hook

    device = model_device(model)
    starts = range(0, windows.shape[0], mbs)
    bar = _progress(len(starts), progress, "activation statistics")
    with scoring_state(model, ()), torch.no_grad(), _hooks() as handles:
        for i, lm in enumerate(layers):
            for name, module in (("attn", lm.q), ("o", lm.o), ("mlp", lm.up), ("down", lm.down)):
                zeros = torch.zeros(module.in_features, dtype=torch.float64, device=module.weight.device)
                sums[name].append(zeros)
                squares[name].append(zeros.clone())
                handles.append(module.register_forward_pre_hook(adder(name, i)))
        for s in starts:
            model(input_ids=windows[s : s + mbs].to(device), use_cache=False, logits_to_keep=1)
            bar.update(1)
    bar.close()
    if seen[0] != windows.numel():
        raise ValueError(f"model: its first layer saw {seen[0]} tokens of the {windows.numel()} given")
    return ActivationStats(
        geometry,
        seen[0],
        {k: torch.stack([t.cpu() for t in v]) for k, v in sums.items()},
        {k: torch.stack([t.cpu() for t in v]) for k, v in squares.items()},
    )


def _check_stats(stats, geometry: Geometry) -> ActivationStats:
    if not isinstance(stats, ActivationStats):
        raise ValueError(f"stats: expected an ActivationStats, got {type(stats).__name__}")
    if stats.geometry != geometry:
        raise ValueError(f"stats: gathered for {stats.geometry}, not this model's {geometry}")
    return stats


def _weighted_row_sums(linear: nn.Linear, norms: torch.Tensor) -> torch.Tensor:
    """float32 ``[out_features]``: ``sum_c |W[r, c]| * norms[c]`` for every row ``r``."""
    w = linear.weight.detach().float()
    return w.abs() @ norms.to(w.device, torch.float32)


def _weighted_col_sums(linear: nn.Linear, norms: torch.Tensor) -> torch.Tensor:
    """float64 ``[in_features]``: ``norms[c] * sum_i |W[i, c]|`` for every column ``c``."""
    w = linear.weight.detach().float()
    return w.abs().sum(dim=0).double() * norms.to(w.device)


def wanda_sp_scores(model: nn.Module, stats: ActivationStats) -> Scores:
    """Wanda-SP: each weight's magnitude times the 2-norm of the input channel it reads, summed per unit.

    KV group ``j``::

        sum_{r in Q_j} sum_c |Wq[r, c]| ||X^attn_c|| + sum_{r in K_j} sum_c (|Wk[r, c]| + |Wv[r, c]|) ||X^attn_c||
          + sum_{c in Q_j} sum_i |Wo[i, c]| ||X^o_c||

    MLP channel ``c``::

        sum_k (|Wgate[c, k]| + |Wup[c, k]|) ||X^mlp_k|| + sum_i |Wdown[i, c]| ||X^down_c||

    with ``||X_c|| = sqrt(sum_t x_{t,c}^2)`` over all calibration tokens. The q/k/v biases (Qwen2) read
    no input channel and are left out. This is Wanda's ``|W| * ||X||`` summed over every weight the
    unit owns (Wanda-SP as FLAP's authors released it scores the o_proj / down_proj columns only and
    averages over rows; summing all the unit's weights makes it comparable with the other methods).
    Row contributions are float32 matrix-vector products ``|W| @ ||X||``, grouped in float64.

    The raw scores scale with each layer's activations, so they rank units within a layer but not
    across layers: FLAP's authors prune Wanda-SP layer-uniformly, and ``allocation="uniform"`` is the
    faithful setting (on SmolLM2 at 20%, held-out perplexity 74 uniform against 13000 global).
    """
    geometry, layers = _dense_layers(model)
    stats = _check_stats(stats, geometry)
    n_attn, n_o, n_mlp, n_down = (stats.norm(k) for k in INPUTS)
    att_rows, mlp_rows = [], []
    rows, cols = _weighted_row_sums, _weighted_col_sums
    with torch.no_grad():
        for i, lm in enumerate(layers):
            att_rows.append(
                _group_attention(
                    geometry, rows(lm.q, n_attn[i]), rows(lm.k, n_attn[i]), rows(lm.v, n_attn[i]), cols(lm.o, n_o[i])
                )
            )
            gate = rows(lm.gate, n_mlp[i]) if lm.gate is not None else None
            mlp_rows.append(_group_mlp(rows(lm.up, n_mlp[i]), cols(lm.down, n_down[i]), gate))
    meta = _base_meta(model, "wanda-sp") | {"tokens": stats.tokens}
    return _finish(att_rows, mlp_rows, geometry, meta)


def standardize_per_layer(x: torch.Tensor) -> torch.Tensor:
    """Each row (layer) of ``x`` minus its mean, divided by its unbiased standard deviation, in float64.

    A row with a single entry or zero spread becomes all zeros (nothing tells its entries apart).
    """
    x = x.to(torch.float64)
    centred = x - x.mean(dim=1, keepdim=True)
    if x.shape[1] < 2:
        return centred
    std = x.std(dim=1, keepdim=True)
    return centred / torch.where(std > 0, std, torch.ones_like(std))


def flap_scores(model: nn.Module, stats: ActivationStats) -> Scores:
    """FLAP's fluctuation metric (WIFV), standardised per layer.

    Per input column ``c`` of o_proj (attention) and of down_proj (MLP)::

        F_c = var_c * ||W[:, c]||^2      (var_c: unbiased variance of X_c over the calibration tokens)

    Then, as FLAP's reference code does before its global ranking, each layer's ``F`` of one module
    type is standardised, ``z = (F - mean) / std`` over that layer's columns (:func:`standardize_per_layer`):
    this puts layers of different activation scales on one footing, so the global allocation compares
    layers by how a unit stands within its own layer. A KV group's score is the mean of ``z`` over its
    ``G*d`` o_proj columns; an MLP channel's score is its down_proj column's ``z``. (FLAP's released code
    also squares the attention metric before standardising; the paper's formula, used here, does not.)
    FLAP ranks attention and MLP units in one list; here the flow's ``gamma`` sets that split, as for
    every other method. The bias compensation is :func:`apply_flap_compensation`.
    """
    geometry, layers = _dense_layers(model)
    stats = _check_stats(stats, geometry)
    var_o, var_down = stats.variance("o"), stats.variance("down")
    o_cols, down_cols = [], []
    with torch.no_grad():
        for i, lm in enumerate(layers):
            for linear, var, out in ((lm.o, var_o[i], o_cols), (lm.down, var_down[i], down_cols)):
                col_sq = linear.weight.detach().float().square().sum(dim=0, dtype=torch.float64).cpu()
                out.append(var * col_sq)
    z_o = standardize_per_layer(torch.stack(o_cols))  # [L, H*d]
    z_down = standardize_per_layer(torch.stack(down_cols))  # [L, I]
    g = geometry
    attention = z_o.view(g.num_layers, g.num_kv_heads, g.group_size * g.head_dim).mean(dim=2)
    meta = _base_meta(model, "flap") | {"tokens": stats.tokens, "standardization": "per-layer z-score"}
    return _finish(list(attention), list(z_down), geometry, meta)


# --------------------------------------------------------------------------------------------------
# Per-sample Taylor
# --------------------------------------------------------------------------------------------------


def taylor_scores(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    micro_batch_size: int = 8,
    progress: bool = True,
) -> Scores:
    """LLM-Pruner-style first-order Taylor importance, accumulated per sample.

    For every prunable weight (and q/k/v bias entry) ``w``::

        A(w) = sum_s |w * dCE_s/dw|

    where ``CE_s`` is window ``s``'s mean next-token cross-entropy over its ``T-1`` predictions, and a
    unit's score is the sum of ``A`` over the weights it owns (as for ``nirvana``'s ``|W * G|``).

    Why per sample, not ``|W * sum_s G_s|``: near a trained optimum the per-sample gradients point
    in many directions and largely cancel in their sum, so ``|W * sum G|`` measures mostly how much
    they failed to cancel; ``sum_s |W * G_s|`` measures how much each window's loss depends on the
    unit, which is the first-order estimate of the loss change from removing it, taken per window
    before averaging. It also makes the score independent of the micro-batching.

    How: the windows of a micro-batch are independent, so the gradient of ``sum_s CE_s`` with respect
    to a linear's output ``Y = X W^T`` holds each window's own ``dCE_s/dY_s``, and
    ``dCE_s/dW = dY_s^T X_s``. Forward hooks keep each prunable linear's input for the micro-batch and
    a tensor hook on its output receives ``dY``; ``A`` is accumulated window by window in float32 and
    the input is dropped. The backward runs towards the input embeddings only: no parameter requires
    grad, so no weight gradient is ever formed beyond the one window being added. Memory: one float32
    copy of the prunable weights (``A``), plus the linear inputs of one micro-batch.
    """
    mbs = _check_micro_batch(micro_batch_size)
    windows = _check_windows(model, windows, min_length=2)
    geometry, layers = _dense_layers(model)
    scored = []  # (module, has a scored bias)
    for lm in layers:
        attn_params, _ = prunable_parameters(lm)  # checks that q/k/v biases are all or none
        with_bias = len(attn_params) > 4
        scored += [(lm.q, with_bias), (lm.k, with_bias), (lm.v, with_bias), (lm.o, False)]
        scored += [(m, False) for m in (lm.up, lm.down, lm.gate) if m is not None]
    acc_w = {id(m): torch.zeros(m.weight.shape, dtype=torch.float32, device=m.weight.device) for m, _ in scored}
    acc_b = {id(m): torch.zeros(m.out_features, dtype=torch.float32, device=m.weight.device) for m, b in scored if b}
    inputs: dict[int, torch.Tensor] = {}
    embedded: list[torch.Tensor] = []

    def add_sample_terms(module: nn.Linear, dy: torch.Tensor) -> None:
        x = inputs.pop(id(module))
        w = module.weight.detach().float()
        b = module.bias.detach().float() if id(module) in acc_b else None
        for s in range(dy.shape[0]):
            dy_s = dy[s].reshape(-1, dy.shape[-1]).float()  # [T, out]
            g_s = dy_s.T @ x[s].reshape(-1, x.shape[-1]).float()  # [out, in]: dCE_s/dW
            acc_w[id(module)] += g_s.mul_(w).abs_()
            if b is not None:
                acc_b[id(module)] += (dy_s.sum(dim=0) * b).abs_()

    def keep_input(module, args, output):
        inputs[id(module)] = args[0].detach()
        output.register_hook(lambda dy: add_sample_terms(module, dy))

    def track_embeddings(_module, _args, output):
        output.requires_grad_(True)  # the backward then reaches every linear, but no parameter
        embedded.append(output)
        return output

    device = model_device(model)
    starts = range(0, windows.shape[0], mbs)
    bar = _progress(len(starts), progress, "taylor")
    with scoring_state(model, ()), torch.enable_grad(), _hooks() as handles:
        handles.append(model.get_input_embeddings().register_forward_hook(track_embeddings))
        handles += [m.register_forward_hook(keep_input) for m, _ in scored]
        for s in starts:
            ids = windows[s : s + mbs].to(device)
            # objective_value("ce") is the mean over windows of each window's mean CE: times B, the sum.
            loss = objective_value(model, ids, "ce") * ids.shape[0]
            torch.autograd.grad(loss, embedded.pop())
            del loss
            if inputs:
                raise ValueError(f"model: {len(inputs)} prunable linears got no gradient from the loss")
            bar.update(1)
    bar.close()

    att_rows, mlp_rows = [], []
    for lm in layers:
        rows = {n: acc_w.pop(id(m)).sum(dim=1) for n, m in (("q", lm.q), ("k", lm.k), ("v", lm.v))}
        for n, m in (("q", lm.q), ("k", lm.k), ("v", lm.v)):
            if id(m) in acc_b:
                rows[n] = rows[n] + acc_b.pop(id(m))
        att_rows.append(_group_attention(geometry, rows["q"], rows["k"], rows["v"], acc_w.pop(id(lm.o)).sum(dim=0)))
        gate = acc_w.pop(id(lm.gate)).sum(dim=1) if lm.gate is not None else None
        mlp_rows.append(_group_mlp(acc_w.pop(id(lm.up)).sum(dim=1), acc_w.pop(id(lm.down)).sum(dim=0), gate))
    meta = _base_meta(model, "taylor") | {
        "objective": "ce",
        "accumulation": "per-sample",
        "micro_batch_size": mbs,
        "num_windows": int(windows.shape[0]),
        "window_length": int(windows.shape[1]),
    }
    return _finish(att_rows, mlp_rows, geometry, meta)


# --------------------------------------------------------------------------------------------------
# One entry point
# --------------------------------------------------------------------------------------------------


def method_scores(
    model: nn.Module,
    windows: torch.Tensor | None,
    method: str,
    *,
    micro_batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> Scores:
    """Score every KV group and MLP channel of a dense model with one of :data:`METHODS`.

    ``nirvana``, ``magnitude`` and ``random`` are :func:`nirvana.saliency.compute_scores` (max-logit
    Taylor; ``sum |W|``; uniform from ``seed``); ``taylor`` is :func:`taylor_scores`; ``wanda-sp`` and
    ``flap`` gather :func:`activation_statistics` and score with :func:`wanda_sp_scores` /
    :func:`flap_scores` (to apply FLAP's compensation too, call those two directly and keep the
    statistics). The formulas are in the module docstring.

    Args:
        windows: integer ``[N, T]`` calibration token ids; may be None for ``magnitude`` and ``random``.
        method: one of :data:`METHODS`.
        micro_batch_size: windows per forward (and backward) pass.
        seed: only ``random`` uses it.
        progress: show a tqdm bar over micro-batches.

    Returns:
        :class:`Scores` (float32 on the CPU) with ``meta["method"] = method``. The model is left as found.

    Raises:
        ValueError: a bad argument (named), or a model that was compacted already.
    """
    _check_method(method)
    _check_micro_batch(micro_batch_size)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed: must be an integer, got {seed!r}")
    if windows is None and method not in DATA_FREE:
        raise ValueError(f"windows: method {method!r} needs calibration windows, got None")
    if method in ("nirvana", "magnitude", "random"):
        saliency = "taylor" if method == "nirvana" else method
        scores = compute_scores(
            model,
            windows,
            objective="maxlogit",
            saliency=saliency,
            micro_batch_size=micro_batch_size,
            progress=progress,
            seed=int(seed),
        )
        scores.meta["method"] = method
        return scores
    if method == "taylor":
        return taylor_scores(model, windows, micro_batch_size=micro_batch_size, progress=progress)
    stats = activation_statistics(model, windows, micro_batch_size=micro_batch_size, progress=progress)
    scores = wanda_sp_scores(model, stats) if method == "wanda-sp" else flap_scores(model, stats)
    scores.meta |= {
        "micro_batch_size": micro_batch_size,
        "num_windows": int(windows.shape[0]),
        "window_length": int(windows.shape[1]),
    }
    return scores


# --------------------------------------------------------------------------------------------------
# FLAP bias compensation
# --------------------------------------------------------------------------------------------------


def _new_bias(linear: nn.Linear, value: torch.Tensor) -> None:
    # A new Parameter rather than an in-place add: a copy that shares its tensors with the dense model
    # (selection.pruned_copy) must leave the dense model's biases alone.
    w = linear.weight
    linear.bias = nn.Parameter(value.to(w.device, w.dtype), requires_grad=w.requires_grad)


def _zero_bias_if_missing(linear: nn.Linear) -> None:
    if linear.bias is None:
        _new_bias(linear, torch.zeros(linear.out_features, dtype=torch.float64))


def stock_bias_flags(config) -> bool:
    """Whether the stock config can say that o_proj and down_proj carry biases (Llama's
    ``attention_bias`` and ``mlp_bias``); the other supported architectures build them without."""
    c = text_config(config)
    return hasattr(c, "attention_bias") and hasattr(c, "mlp_bias")


@torch.no_grad()
def apply_flap_compensation(model: nn.Module, plan: PruningPlan, stats: ActivationStats) -> nn.Module:
    """Fold the calibration mean of the inputs ``plan`` removes into the o_proj and down_proj biases.

    Call it on the DENSE model, after :func:`nirvana.allocation.allocate` and BEFORE
    :func:`nirvana.compaction.compact_model` (which keeps o/down biases whole): the removed columns of
    ``W`` are needed, and compaction deletes them. Per layer, with ``R`` the o_proj columns of the
    pruned KV groups (resp. the down_proj columns of the pruned channels) and ``mu`` the input means
    from ``stats``::

        b <- b + W[:, R] @ mu[R]          (b = 0 where the linear had no bias)

    so that, over the calibration tokens, the pruned linear's output has the dense one's mean, and
    its squared error to the dense output is the smallest any constant can give. Every layer gets an
    o_proj and a down_proj bias (zero where the plan prunes nothing there), so all layers look alike.

    Loadability: where the config has Llama's ``attention_bias`` and ``mlp_bias`` flags, both are set
    and the q/k/v and gate/up linears they also govern get zero biases (an exact no-op), so a saved
    checkpoint is one that stock ``from_pretrained`` (and :func:`nirvana.checkpoint.load_pruned`) build
    with every bias in place. Other architectures' stock classes build o_proj/down_proj without a bias
    whatever the config says; the checkpoint's ``nirvana`` block then lists those biases
    (:func:`nirvana.compaction.extra_biases`), and ``load_pruned`` or ``trust_remote_code`` loading
    adds them before the weights load.

    New bias Parameters are created (no tensor is modified in place), so the function is safe on a
    copy that shares tensors with the dense model (``selection.pruned_copy`` before its compaction).
    :func:`nirvana.compaction.mask_model` after it gives the compensated pruned model's outputs too.

    Returns:
        ``model``, modified in place.

    Raises:
        ValueError: ``plan`` or ``stats`` do not fit the model, or the model was compacted already.
    """
    if not isinstance(plan, PruningPlan):
        raise ValueError(f"plan: expected a PruningPlan, got {type(plan).__name__}")
    plan.validate()
    geometry, layers = _dense_layers(model)
    if plan.geometry != geometry:
        raise ValueError(f"plan.geometry: {plan.geometry} does not match the model's {geometry}")
    stats = _check_stats(stats, geometry)
    g = geometry
    mean_o, mean_down = stats.mean("o"), stats.mean("down")
    for i, (lm, lp) in enumerate(zip(layers, plan.layers)):
        for linear, kept, total, width, mean in (
            (lm.o, lp.kv_groups_kept, g.num_kv_heads, g.group_size * g.head_dim, mean_o[i]),
            (lm.down, lp.mlp_channels_kept, g.intermediate_size, 1, mean_down[i]),
        ):
            bias = torch.zeros(linear.out_features, dtype=torch.float64)
            if linear.bias is not None:
                bias += linear.bias.detach().to("cpu", torch.float64)
            cols = pruned_indices(kept, total, width)
            if cols.numel():
                w = linear.weight.detach()
                removed = w.index_select(1, cols.to(w.device)).to(torch.float64)
                bias += (removed @ mean[cols].to(w.device)).cpu()
            _new_bias(linear, bias)
    if stock_bias_flags(model.config):
        c = text_config(model.config)
        c.attention_bias, c.mlp_bias = True, True
        for lm in layers:
            for linear in (lm.q, lm.k, lm.v, lm.up, lm.gate):
                if linear is not None:
                    _zero_bias_if_missing(linear)
    return model


__all__ = [
    "DATA_FREE",
    "INPUTS",
    "METHODS",
    "NEEDS_ACTIVATIONS",
    "ActivationStats",
    "activation_statistics",
    "apply_flap_compensation",
    "flap_scores",
    "load_statistics",
    "method_scores",
    "save_statistics",
    "standardize_per_layer",
    "stock_bias_flags",
    "taylor_scores",
    "wanda_sp_scores",
]
