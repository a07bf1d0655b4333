"""Model classes for nirvana checkpoints whose decoder layers differ in width.

This file is copied beside such a checkpoint as ``modeling_nirvana.py`` and named by ``auto_map`` in
its ``config.json``, so ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` loads it
where nirvana is not installed: it imports only torch and transformers, and nothing from nirvana.

``config.json`` carries a ``nirvana`` block::

    {"version": 1, "base_architecture": "LlamaForCausalLM",
     "layers": [{"num_heads": 6, "num_kv_heads": 2, "intermediate_size": 1100}, ...],
     "bias": ["self_attn.o_proj", "mlp.down_proj"]}

and ``auto_map`` names the class ``Nirvana<base_architecture>``, which this module creates on first
access as a subclass of ``transformers.<base_architecture>``. The subclass builds the stock model
from the config (whose global sizes are the dense model's), then, before any weight is initialised
or loaded, gives each layer's q/k/v/o and gate/up/down linears the shapes of that layer. Under
``from_pretrained`` this happens on the meta device, so the dense shapes cost no memory.

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
    """The decoder layers of a Llama-like causal LM (or of a multimodal wrapper's language model)."""
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
    """Resize every decoder layer's prunable linears to the widths of ``block`` (a ``nirvana`` block)."""
    layers = decoder_layers(model)
    widths = check_block(block, len(layers))
    for layer, w in zip(layers, widths):
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
