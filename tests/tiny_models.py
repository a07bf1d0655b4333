"""Tiny random decoders of every supported family: forward + backward in well under 0.1 s on CPU."""

from __future__ import annotations

import torch
import transformers

# Shared geometry: 4 query heads over 2 KV heads (G = 2), head_dim 8, so KV groups and GQA both matter.
_COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
)

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")


def tiny_config(arch: str, **overrides):
    kw = dict(_COMMON, **overrides)
    if arch == "llama":
        return transformers.LlamaConfig(**kw, architectures=["LlamaForCausalLM"])
    if arch == "mistral":
        return transformers.MistralConfig(**kw, sliding_window=None, architectures=["MistralForCausalLM"])
    if arch == "qwen2":
        # Qwen2 carries q/k/v biases.
        return transformers.Qwen2Config(**kw, architectures=["Qwen2ForCausalLM"])
    if arch == "qwen3":
        return transformers.Qwen3Config(**kw, architectures=["Qwen3ForCausalLM"])
    if arch == "gemma2":
        return transformers.Gemma2Config(**kw, architectures=["Gemma2ForCausalLM"])
    if arch == "gemma3":
        return transformers.Gemma3TextConfig(**kw, architectures=["Gemma3ForCausalLM"])
    raise ValueError(f"arch: unknown tiny architecture {arch!r}")


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised model in eval mode, with eager attention so results are reproducible."""
    config = tiny_config(arch, **overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        # Random non-zero biases and norm weights, so that a test notices when pruning drops them.
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


# Tiny T5s of both FFN kinds: 4 heads of width 8, two layers per stack, so every attention kind and
# the shared relative position bias meet a pruned head.
T5_FFNS = {"t5-relu": "relu", "t5-gated": "gated-gelu"}


def tiny_t5(kind: str = "t5-relu", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised T5ForConditionalGeneration in eval mode, eager attention."""
    if kind not in T5_FFNS:
        raise ValueError(f"kind: unknown tiny T5 {kind!r} (known: {list(T5_FFNS)})")
    kw = dict(
        vocab_size=128,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj=T5_FFNS[kind],
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=3,
        architectures=["T5ForConditionalGeneration"],
    )
    config = transformers.T5Config(**{**kw, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(config)
    with torch.no_grad():
        # Random layer-norm weights and a larger position bias, so a wrong slice of either shows.
        for name, p in model.named_parameters():
            if "layer_norm" in name or "relative_attention_bias" in name:
                p.add_(0.5 * torch.randn_like(p))
    return model.to(dtype).eval()


def tiny_batch(batch: int = 2, seq: int = 12, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def tiny_tokenizer():
    """A character-level tokenizer over ASCII: ids 0..127, matching the tiny models' vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {chr(i): i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="?", bos_token="\x02", eos_token="\x03", pad_token="\x00"
    )
