"""T5 encoder-decoders: T5 v1.0 (ReLU ``wi``/``wo``), T5 v1.1 and Flan-T5 (gated-GELU ``wi_0``/``wi_1``/``wo``).

Layout: ``model.encoder.block[i]`` holds ``layer[0].SelfAttention`` and ``layer[-1].DenseReluDense``;
``model.decoder.block[j]`` adds ``layer[1].EncDecAttention`` between them. Every attention is plain
multi-head (``n_heads`` heads of width ``d_kv``, q/k/v/o without biases), so each head is a unit
(G = 1). The geometry lists the encoder layers first, then the decoder layers, and the decoder's
cross-attentions as extra attention rows (see :class:`nirvana.plan.Geometry`). The gated FFN maps to
gate = ``wi_0`` (the activated one), up = ``wi_1``, down = ``wo``; the plain one to up = ``wi``.

Each stack's first layer computes a relative position bias for all dense heads, which every layer
of the stack shares. A compacted attention is given the dense indices of the heads it keeps
(:func:`nirvana._remote_modeling.set_kept_heads`) and slices the shared bias to them, so the pruned
model computes what the dense model computes with the pruned heads masked. The
``relative_attention_bias`` tables are never pruned: they are tiny, and later layers need rows of
heads the first layer dropped.

Usage: ``nirvana prune path/to/t5-folder --sparsity 0.2 --out pruned`` (a local Hugging Face folder of a
``T5ForConditionalGeneration``; ``load_model`` picks ``AutoModelForSeq2SeqLM`` for it). The calibration
objective runs over the decoder's positions, each window split into encoder input and decoder target
(see :mod:`nirvana.saliency`); allocation ranks the heads of all three attention kinds together (see
:mod:`nirvana.allocation`). The checkpoint always carries the ``nirvana`` block, with each layer's kept
head indices, and loads with ``nirvana.load_pruned(folder)`` or, without nirvana,
``AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True)``. Perplexity, KL selection and
fine-tuning use the same split (:mod:`nirvana.evaluation`, :mod:`nirvana.finetune`); every ``--method``
but ``flap`` scores T5 (its compensation needs o/wo biases a T5 checkpoint cannot carry).
"""

from __future__ import annotations

from torch import nn

from .. import _remote_modeling as remote
from ..plan import Geometry
from .base import Adapter, AttentionModules, LayerModules


class T5Adapter(Adapter):
    architectures = ("T5ForConditionalGeneration",)
    model_types = ("t5",)

    def geometry(self, config) -> Geometry:
        encoder, decoder = config.num_layers, config.num_decoder_layers
        return Geometry(
            num_layers=encoder + decoder,
            hidden_size=config.d_model,
            num_heads=config.num_heads,
            num_kv_heads=config.num_heads,
            head_dim=config.d_kv,
            intermediate_size=config.d_ff,
            gated=bool(config.is_gated_act),
            encoder_layers=encoder,
            cross_attention_layers=decoder,
        )

    def layers(self, model: nn.Module) -> list[LayerModules]:
        out = []
        for block in remote.decoder_layers(model):
            a, ff = block.layer[0].SelfAttention, block.layer[-1].DenseReluDense
            gated = getattr(ff, "wi_0", None) is not None
            up, gate = (ff.wi_1, ff.wi_0) if gated else (ff.wi, None)
            cross = None
            if len(block.layer) == 3:
                c = block.layer[1].EncDecAttention
                cross = AttentionModules(c, c.q, c.k, c.v, c.o)
            out.append(LayerModules(a, a.q, a.k, a.v, a.o, ff, up, ff.wo, gate, cross))
        return out

    def set_layer_heads(self, layer, num_heads: int, num_kv_heads: int) -> None:
        layer.attn.n_heads = num_heads
        layer.attn.inner_dim = num_heads * layer.attn.key_value_proj_dim

    def set_kept_groups(self, attention, kept: list[int], geometry: Geometry) -> None:
        remote.set_kept_heads(attention.attn, kept, geometry.num_heads)

    def kept_heads(self, attention) -> list[int]:
        heads = getattr(attention.attn, remote.HEADS_ATTR, None)
        return list(range(attention.attn.n_heads)) if heads is None else list(heads)

    def uniform_sizes(self, config, widths: dict, head_dim: int) -> dict | None:
        # A stock T5 config cannot say which heads each layer kept (every layer would take the first
        # rows of the shared position bias), so a pruned T5 always carries the nirvana block.
        return None
