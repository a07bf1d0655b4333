"""Model classes for nirvana checkpoints whose decoder layers differ in width.

This file is copied beside such a checkpoint as ``modeling_nirvana.py`` and named by ``auto_map`` in
its ``config.json``, so ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` (for T5,
``AutoModelForSeq2SeqLM``) loads it where nirvana is not installed: it imports only torch and
transformers, and nothing from nirvana.

``config.json`` carries a ``nirvana`` block::

    {"version": 1, "base_architecture": "LlamaForCausalLM",
     "layers": [{"num_heads": 6, "num_kv_heads": 2, "intermediate_size": 1100}, ...],
     "bias": ["self_attn.o_proj", "mlp.down_proj"]}

and ``auto_map`` names the class ``Nirvana<base_architecture>``, which this module creates on first
access as a subclass of ``transformers.<base_architecture>``. The subclass builds the stock model
from the config (whose global sizes are the dense model's), then, before any weight is initialised
or loaded, gives each layer's q/k/v/o and gate/up/down linears the shapes of that layer. Under
``from_pretrained`` this happens on the meta device, so the dense shapes cost no memory.

A T5 (``T5ForConditionalGeneration``) lists its encoder blocks, then its decoder blocks, and each
entry also names the dense heads its self-attention keeps (``"heads"``) and, in the decoder, those of
its cross-attention (``"cross_heads"``): T5's layers share one relative position bias, which each
layer slices to its own heads (see :class:`_SlicedPositionBias`). ``intermediate_size`` is then the
width of ``wi`` (or ``wi_0``/``wi_1``) and ``wo``.

The optional ``bias`` list names linears (paths inside each decoder layer) that carry a bias the
stock class builds without, such as the o_proj/down_proj biases of FLAP's compensation on Mistral,
Qwen or Gemma; each layer gets an (uninitialised) bias there before the weights load. A block may
therefore be present even when every layer has the same widths.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn

BLOCK_KEY = "nirvana"
BLOCK_VERSION = 1
CLASS_PREFIX = "Nirvana"
MODELING_FILE = "modeling_nirvana.py"

_CLASSES: dict[str, type] = {}


def decoder_layers(model: nn.Module):
    """The layers of a Llama-like causal LM (or of a multimodal wrapper's language model), or of a T5:
    the encoder's blocks, then the decoder's."""
    encoder, decoder = getattr(model, "encoder", None), getattr(model, "decoder", None)
    if hasattr(encoder, "block") and hasattr(decoder, "block"):
        return [*encoder.block, *decoder.block]
    inner = getattr(model, "model", model)
    inner = getattr(inner, "language_model", inner)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"model: {type(model).__name__} has no decoder layers at .model.layers")
    return layers


def resize_linear(linear: nn.Linear, in_features: int, out_features: int) -> None:
    """Give ``linear`` uninitialised parameters of a new shape, on the same device, dtype and grad setting.

    The module object is kept (not replaced), so hooks and attributes attached to it survive.
    """
    w = linear.weight
    linear.weight = nn.Parameter(
        torch.empty(out_features, in_features, dtype=w.dtype, device=w.device), requires_grad=w.requires_grad
    )
    if linear.bias is not None:
        b = linear.bias
        bias = torch.empty(out_features, dtype=b.dtype, device=b.device)
        linear.bias = nn.Parameter(bias, requires_grad=b.requires_grad)
    linear.in_features, linear.out_features = in_features, out_features


def set_attention_heads(attn: nn.Module, num_heads: int, num_kv_heads: int) -> None:
    """Update the head-count bookkeeping of an attention module whose projections were resized.

    The attention forward infers the head counts from the projections (``view(..., -1, head_dim)``),
    but the eager path repeats K/V by ``num_key_value_groups``, and some releases read the others.
    """
    for name, value in (("num_heads", num_heads), ("num_key_value_heads", num_kv_heads)):
        if hasattr(attn, name):
            setattr(attn, name, value)
    if hasattr(attn, "num_key_value_groups"):
        attn.num_key_value_groups = num_heads // num_kv_heads


def _check_heads(where: str, heads, count: int | None) -> None:
    if (
        not isinstance(heads, list)
        or not heads
        or (count is not None and len(heads) != count)
        or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in heads)
        or any(b <= a for a, b in zip(heads, heads[1:]))
    ):
        raise ValueError(
            f"config.{BLOCK_KEY}.{where}: expected {count or 'some'} increasing head indices, got {heads!r:.200}"
        )


def check_block(block, num_layers: int) -> list[dict]:
    """The per-layer widths of a ``nirvana`` config block, after checking its form."""
    if not isinstance(block, dict) or block.get("version") != BLOCK_VERSION:
        raise ValueError(f"config.{BLOCK_KEY}: expected a version {BLOCK_VERSION} block, got {block!r:.200}")
    layers = block.get("layers")
    if not isinstance(layers, list) or len(layers) != num_layers:
        got = len(layers) if isinstance(layers, list) else layers
        raise ValueError(f"config.{BLOCK_KEY}.layers: expected {num_layers} entries, got {got!r:.80}")
    for i, w in enumerate(layers):
        keys = ("num_heads", "num_kv_heads", "intermediate_size")
        h, kv, inter = (w.get(k) if isinstance(w, dict) else None for k in keys)
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (h, kv, inter)):
            raise ValueError(f"config.{BLOCK_KEY}.layers[{i}]: expected integer widths, got {w!r}")
        if kv < 1 or h < kv or h % kv or inter < 0:
            raise ValueError(f"config.{BLOCK_KEY}.layers[{i}]: inconsistent widths {w!r}")
        if "heads" in w:
            _check_heads(f"layers[{i}].heads", w["heads"], h)
        if "cross_heads" in w:
            _check_heads(f"layers[{i}].cross_heads", w["cross_heads"], None)
    bias = block.get("bias", [])
    if not isinstance(bias, list) or not all(isinstance(p, str) and p for p in bias):
        raise ValueError(f"config.{BLOCK_KEY}.bias: expected a list of module paths, got {bias!r:.200}")
    return layers


def add_bias(linear: nn.Linear) -> None:
    """Give a bias-less ``linear`` an uninitialised bias (same device, dtype and grad setting as its weight)."""
    if linear.bias is None:
        w = linear.weight
        bias = torch.empty(linear.out_features, dtype=w.dtype, device=w.device)
        linear.bias = nn.Parameter(bias, requires_grad=w.requires_grad)


def add_biases(layers, paths: list[str]) -> None:
    """Add a bias to the linear at each of ``paths`` (relative to a decoder layer) in every layer."""
    for i, layer in enumerate(layers):
        for path in paths:
            try:
                linear = layer.get_submodule(path)
            except AttributeError:
                linear = None
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"config.{BLOCK_KEY}.bias: layer {i} has no linear at {path!r}")
            add_bias(linear)


def apply_layer_widths(model: nn.Module, block: dict) -> None:
    """Resize every layer's prunable linears to the widths of ``block`` (a ``nirvana`` block)."""
    layers = decoder_layers(model)
    widths = check_block(block, len(layers))
    for layer, w in zip(layers, widths):
        if hasattr(layer, "layer"):  # a T5Block: [self-attention, (cross-attention,) feed-forward]
            _apply_t5_layer(layer, w, model.config.num_heads)
            continue
        attn, mlp = layer.self_attn, layer.mlp
        head_dim = _head_dim(attn)
        hidden = attn.q_proj.in_features
        q_width, kv_width = w["num_heads"] * head_dim, w["num_kv_heads"] * head_dim
        resize_linear(attn.q_proj, hidden, q_width)
        resize_linear(attn.k_proj, hidden, kv_width)
        resize_linear(attn.v_proj, hidden, kv_width)
        resize_linear(attn.o_proj, q_width, attn.o_proj.out_features)
        set_attention_heads(attn, w["num_heads"], w["num_kv_heads"])
        inter = w["intermediate_size"]
        for name in ("gate_proj", "up_proj"):
            if getattr(mlp, name, None) is not None:
                resize_linear(getattr(mlp, name), mlp.up_proj.in_features, inter)
        resize_linear(mlp.down_proj, inter, mlp.down_proj.out_features)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = inter
    add_biases(layers, block.get("bias", []))


# --------------------------------------------------------------------------------------------------
# T5: heads kept per layer, and the relative position bias they share
# --------------------------------------------------------------------------------------------------

HEADS_ATTR = "nirvana_heads"


class _SlicedPositionBias:
    """Mixed into a T5 attention class whose module keeps only the dense heads ``nirvana_heads``.

    A T5 stack computes its relative position bias once, in the first layer, for every dense head,
    and hands the same tensor ``[1, heads, q, k]`` to every later layer. A pruned layer takes the
    rows of the heads it kept, and passes the dense tensor on unchanged, so each layer sees exactly
    the bias its heads had in the dense model. A first layer computes the dense bias from its
    (never pruned) ``relative_attention_bias`` table itself. Where no bias is handed on (cross-attention,
    which has none: zeros), None is passed on, and each layer makes zeros of its own head count.
    """

    def forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None, cache=None, **kwargs):
        heads = getattr(self, HEADS_ATTR, None)
        dense = position_bias
        if dense is None and self.has_relative_attention_bias:
            # Self-attention only: the keys are the cached tokens plus this call's.
            q_len = hidden_states.shape[1]
            past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
            dense = self.compute_bias(q_len, past + q_len, device=hidden_states.device, past_seen_tokens=past)
        sliced = dense
        if dense is not None and heads is not None:
            sliced = dense.index_select(1, torch.as_tensor(heads, dtype=torch.long, device=dense.device))
        out, _, weights = super().forward(
            hidden_states, mask=mask, key_value_states=key_value_states, position_bias=sliced, cache=cache, **kwargs
        )
        return out, dense, weights


_T5_ATTENTION_CLASSES: dict[type, type] = {}


def set_kept_heads(attn: nn.Module, heads: list[int], dense_heads: int) -> None:
    """Make a T5 attention module (its q/k/v/o already resized) one that holds the dense ``heads``."""
    attn.n_heads = len(heads)
    attn.inner_dim = len(heads) * attn.key_value_proj_dim
    if list(heads) == list(range(dense_heads)):
        setattr(attn, HEADS_ATTR, None)
        return
    base = type(attn)
    if not issubclass(base, _SlicedPositionBias):
        if base not in _T5_ATTENTION_CLASSES:
            _T5_ATTENTION_CLASSES[base] = type(CLASS_PREFIX + base.__name__, (_SlicedPositionBias, base), {})
        # The module object stays (hooks, parameters, attributes); only its forward changes.
        attn.__class__ = _T5_ATTENTION_CLASSES[base]
    setattr(attn, HEADS_ATTR, list(heads))


def _resize_t5_attention(attn: nn.Module, heads: list[int], dense_heads: int) -> None:
    d_model, width = attn.q.in_features, len(heads) * attn.key_value_proj_dim
    for linear in (attn.q, attn.k, attn.v):
        resize_linear(linear, d_model, width)
    resize_linear(attn.o, width, attn.o.out_features)
    set_kept_heads(attn, heads, dense_heads)


def _apply_t5_layer(layer: nn.Module, w: dict, dense_heads: int) -> None:
    heads = w.get("heads", list(range(w["num_heads"])))
    _resize_t5_attention(layer.layer[0].SelfAttention, heads, dense_heads)
    if "cross_heads" in w:
        _resize_t5_attention(layer.layer[1].EncDecAttention, w["cross_heads"], dense_heads)
    ff = layer.layer[-1].DenseReluDense
    inter = w["intermediate_size"]
    for name in ("wi", "wi_0", "wi_1"):
        if getattr(ff, name, None) is not None:
            resize_linear(getattr(ff, name), getattr(ff, name).in_features, inter)
    resize_linear(ff.wo, inter, ff.wo.out_features)


def _head_dim(attn: nn.Module) -> int:
    head_dim = getattr(attn, "head_dim", None)
    if head_dim:
        return head_dim
    # Freshly built from the config, so the config's global KV head count describes this module.
    config = attn.config
    return attn.k_proj.out_features // (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def pruned_class(base_architecture: str) -> type:
    """The subclass of ``transformers.<base_architecture>`` that builds layers of per-layer widths."""
    if base_architecture in _CLASSES:
        return _CLASSES[base_architecture]
    base = getattr(transformers, base_architecture, None)
    if not (isinstance(base, type) and issubclass(base, transformers.PreTrainedModel)):
        raise ValueError(f"base_architecture: {base_architecture!r} is not a transformers model class")

    def post_init(self):
        # The base __init__ ends here once every module exists: resize before weights are
        # initialised, tied or loaded, so all of that sees the pruned shapes.
        apply_layer_widths(self, getattr(self.config, BLOCK_KEY, None))
        base.post_init(self)

    cls = type(
        CLASS_PREFIX + base_architecture,
        (base,),
        {"post_init": post_init, "__module__": __name__, "__doc__": f"{base_architecture} with per-layer widths."},
    )
    _CLASSES[base_architecture] = cls
    return cls


def __getattr__(name: str):
    # transformers resolves auto_map's "modeling_nirvana.Nirvana<Base>" with getattr on this module.
    if name.startswith(CLASS_PREFIX) and len(name) > len(CLASS_PREFIX):
        try:
            return pruned_class(name[len(CLASS_PREFIX) :])
        except ValueError as err:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}: {err}") from err
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
