"""Llama-like decoders: Llama 2/3.x, Mistral, Qwen2/2.5 (q/k/v biases), Qwen3 (q_norm/k_norm), Gemma 2/3.

They share one layout: ``model.model.layers[i].self_attn.{q,k,v,o}_proj`` and
``.mlp.{gate,up,down}_proj``. Qwen3's q_norm/k_norm act per head on ``head_dim`` features, so removing
whole heads leaves them untouched; Gemma's GeGLU differs from SwiGLU only in the activation.
"""

from __future__ import annotations

from torch import nn

from ..plan import Geometry
from .base import Adapter, LayerModules, text_config


class LlamaLikeAdapter(Adapter):
    architectures = (
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
    )
    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")

    def geometry(self, config) -> Geometry:
        c = text_config(config)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        return Geometry(
            num_layers=c.num_hidden_layers,
            hidden_size=c.hidden_size,
            num_heads=c.num_attention_heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            intermediate_size=c.intermediate_size,
            gated=True,
        )

    def decoder_layers(self, model: nn.Module):
        inner = getattr(model, "model", model)
        inner = getattr(inner, "language_model", inner)
        return inner.layers

    def layers(self, model: nn.Module) -> list[LayerModules]:
        out = []
        for layer in self.decoder_layers(model):
            a, m = layer.self_attn, layer.mlp
            out.append(LayerModules(a, a.q_proj, a.k_proj, a.v_proj, a.o_proj, m, m.up_proj, m.down_proj, m.gate_proj))
        return out

    def set_layer_heads(self, layer: LayerModules, num_heads: int, num_kv_heads: int) -> None:
        # The attention forward infers head counts from the projections' widths (view(..., -1,
        # head_dim)); only these bookkeeping attributes, read by some attention backends and by
        # older transformers releases, need to follow.
        attn = layer.attn
        for name, value in (("num_heads", num_heads), ("num_key_value_heads", num_kv_heads)):
            if hasattr(attn, name):
                setattr(attn, name, value)
        if hasattr(attn, "num_key_value_groups") and num_kv_heads:
            attn.num_key_value_groups = num_heads // num_kv_heads
