"""NirvanaPruningModifier inside llm-compressor's own ``oneshot``, on tiny GQA Llamas.

llmcompressor 0.14 pins transformers 5.15-5.17, so this runs in the second venv (``make test-integrations``).
"""

import copy
import json

import pytest
import torch
import transformers

pytest.importorskip(
    "llmcompressor", reason="llmcompressor is not installed: it runs in its own venv, `make test-integrations`"
)

from datasets import Dataset  # noqa: E402  (llmcompressor depends on datasets)
from llmcompressor import oneshot  # noqa: E402
from llmcompressor.modifiers.quantization import GPTQModifier  # noqa: E402

from nirvana._remote_modeling import BLOCK_KEY, MODELING_FILE  # noqa: E402
from nirvana.allocation import allocate  # noqa: E402
from nirvana.checkpoint import layer_widths, load_pruned, plan_widths  # noqa: E402
from nirvana.compaction import mask_model  # noqa: E402
from nirvana.integrations.llmcompressor import NirvanaPruningModifier, calibration_windows  # noqa: E402
from nirvana.saliency import compute_scores  # noqa: E402
from tests.helpers import assert_bitwise_equal, assert_close  # noqa: E402
from tests.tiny_models import tiny_model, tiny_tokenizer  # noqa: E402

# W4A16 quantizes in groups of 128 input columns: every linear's input width (hidden size, kept query
# heads x head_dim, kept channels) must stay a multiple of 128. Two KV groups of two 64-wide heads and
# 384 channels pruned to one group and 256 (round_to=128) do; sparsity 0.4 at gamma 1 prunes exactly that.
GPTQ_DIMS = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=384)


def saved_dense(tmp_path, **dims):
    """A tiny dense Llama saved and loaded back: oneshot reads the original config from its folder."""
    folder = tmp_path / "dense"
    tiny_model("llama", **dims).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")


def windows_and_dataset(n=8, seq=16):
    ids = torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(1))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    return ids, data


def run_oneshot(model, data, recipe, **kwargs):
    return oneshot(
        model=model,
        tokenizer=tiny_tokenizer(),
        dataset=data,
        recipe=recipe,
        num_calibration_samples=len(data),
        shuffle_calibration_samples=False,
        **kwargs,
    )


@pytest.mark.parametrize("allocation", ["uniform", "global"], ids=["uniform", "global"])
def test_modifier_removes_nirvanas_plan_and_matches_the_masked_model(tmp_path, allocation):
    model = saved_dense(tmp_path)
    dense = copy.deepcopy(model)
    windows, data = windows_and_dataset()
    settings = dict(sparsity=0.4, gamma=1.0, allocation=allocation, round_to=8)
    modifier = NirvanaPruningModifier(**settings, micro_batch_size=4)
    pruned = run_oneshot(model, data, [modifier])

    # nirvana's own scores and plan for the same windows and settings.
    scores = compute_scores(dense, windows, micro_batch_size=4, progress=False)
    assert_bitwise_equal(modifier.scores.attention, scores.attention, name="attention scores")
    assert_bitwise_equal(modifier.scores.mlp, scores.mlp, name="mlp scores")
    plan = allocate(scores.attention, scores.mlp, scores.geometry, **settings)
    assert modifier.plan.layers == plan.layers
    assert plan.meta["kv_groups_pruned"] > 0 and plan.meta["mlp_channels_pruned"] > 0

    assert layer_widths(pruned) == plan_widths(plan)
    with torch.no_grad():
        got, want = pruned(windows).logits, mask_model(dense, plan)(windows).logits
    assert_close(got, want, rtol=1e-5, atol=1e-5, name="logits")


def test_uniform_gives_a_stock_llama_config(tmp_path):
    model = saved_dense(tmp_path)
    _, data = windows_and_dataset()
    pruned = run_oneshot(model, data, [NirvanaPruningModifier(sparsity=0.4, gamma=1.0, micro_batch_size=4)])
    c = pruned.config
    # One of two KV groups goes with its two query heads; 16 of 48 channels (round_to 8).
    assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.head_dim) == (2, 1, 32, 8)
    assert not hasattr(c, BLOCK_KEY)
    stock = transformers.LlamaForCausalLM(copy.deepcopy(c))
    assert {k: v.shape for k, v in stock.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}


def test_recipe_with_gptq_saves_a_compressed_stock_checkpoint(tmp_path):
    model = saved_dense(tmp_path, **GPTQ_DIMS)
    windows, data = windows_and_dataset()
    recipe = [
        NirvanaPruningModifier(sparsity=0.4, gamma=1.0, allocation="uniform", round_to=128, micro_batch_size=4),
        GPTQModifier(scheme="W4A16", targets="Linear", ignore=["lm_head"]),
    ]
    out = tmp_path / "pruned-w4a16"
    quantized = run_oneshot(model, data, recipe, output_dir=str(out), save_compressed=True)

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (2, 1, 256)
    assert BLOCK_KEY not in config and "auto_map" not in config and not (out / MODELING_FILE).exists()
    q = config["quantization_config"]
    assert (q["quant_method"], q["format"]) == ("compressed-tensors", "pack-quantized")
    assert q["quantization_status"] == "compressed"
    assert q["config_groups"]["group_0"]["weights"]["num_bits"] == 4

    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert (loaded.config.num_key_value_heads, loaded.config.intermediate_size) == (1, 256)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    # Compressed linears keep their packed int4 weights (weight_packed, weight_scale, weight_shape).
    k, down = loaded.model.layers[0].self_attn.k_proj, loaded.model.layers[0].mlp.down_proj
    assert k.weight_shape.tolist() == [64, 128] and down.weight_shape.tolist() == [128, 256]
    with torch.no_grad():
        got, want = loaded(windows[:2]).logits, quantized(windows[:2]).logits
    assert got.isfinite().all()
    assert_close(got, want, rtol=1e-4, atol=1e-5, name="reloaded logits")
    generated = loaded.generate(windows[:1, :4], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 8)


def test_global_saves_a_per_layer_checkpoint_both_loaders_read(tmp_path):
    model = saved_dense(tmp_path, intermediate_size=64)
    windows, data = windows_and_dataset()
    modifier = NirvanaPruningModifier(sparsity=0.3, gamma=1.0, allocation="global", micro_batch_size=4)
    out = tmp_path / "pruned-global"
    with pytest.warns(RuntimeWarning, match="achieved sparsity"):  # 8-channel blocks on a 64-wide tiny MLP
        pruned = run_oneshot(model, data, [modifier], output_dir=str(out))
    widths = plan_widths(modifier.plan)
    assert len({json.dumps(w, sort_keys=True) for w in widths}) > 1, "this seed should give per-layer widths"

    config = json.loads((out / "config.json").read_text())
    assert config[BLOCK_KEY]["layers"] == widths
    assert (out / MODELING_FILE).exists()
    with torch.no_grad():
        want = pruned(windows).logits
        for loaded in (
            transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True),
            load_pruned(out),
        ):
            assert layer_widths(loaded) == widths
            assert_close(loaded(windows).logits, want, rtol=1e-5, atol=1e-6, name=type(loaded).__name__)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(sparsity=1.5), "sparsity: must be a number in (0, 1), got 1.5"),
        (dict(sparsity=True), "sparsity: must be a number in (0, 1), got True"),
        (dict(sparsity=0.2, gamma=0), "gamma: must be a finite number > 0, got 0"),
        (dict(sparsity=0.2, allocation="layerwise"), "allocation: must be one of global, uniform, got 'layerwise'"),
        (dict(sparsity=0.2, saliency="magnitude"), "saliency: must be one of taylor, adam, got 'magnitude'"),
        (dict(sparsity=0.2, round_to=0), "round_to: must be a positive integer, got 0"),
        (dict(sparsity=0.2, seq_len=2.5), "seq_len: must be a positive integer, got 2.5"),
    ],
    ids=["sparsity-above-1", "sparsity-bool", "gamma-zero", "allocation", "saliency", "round-to", "seq-len"],
)
def test_bad_arguments_are_one_line_value_errors(kwargs, needle):
    with pytest.raises(ValueError) as err:
        NirvanaPruningModifier(**kwargs)
    assert str(err.value) == needle


def test_sparsity_too_high_for_gamma_is_refused_before_scoring(tmp_path):
    model = saved_dense(tmp_path)
    _, data = windows_and_dataset()
    with pytest.raises(ValueError, match=r"^[^\n]*gamma[^\n]*$"):
        run_oneshot(model, data, [NirvanaPruningModifier(sparsity=0.9, gamma=0.2)])
    assert layer_widths(model) == layer_widths(tiny_model("llama"))


def test_oneshot_without_calibration_data_is_refused_in_one_line(tmp_path):
    model = saved_dense(tmp_path)
    with pytest.raises(ValueError) as err:
        oneshot(model=model, tokenizer=tiny_tokenizer(), recipe=[NirvanaPruningModifier(sparsity=0.3)])
    assert str(err.value) == "calib: NirvanaPruningModifier needs calibration data, got none (pass dataset= to oneshot)"
    assert layer_widths(model) == layer_widths(tiny_model("llama"))


def test_calibration_windows_drop_padding_and_cut_to_length():
    loader = [
        {"input_ids": torch.tensor([[1, 2, 3, 4, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 0]])},
        {
            "input_ids": torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]]),
            "attention_mask": torch.tensor([[1] * 5, [1, 1, 1, 0, 0]]),
        },
    ]
    assert calibration_windows(loader).tolist() == [[1, 2, 3], [5, 6, 7], [10, 11, 12]]
    assert calibration_windows(loader, seq_len=4).tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    with pytest.raises(ValueError, match="seq_len: 13 is more than the 12 calibration tokens"):
        calibration_windows(loader, seq_len=13)
    with pytest.raises(ValueError, match="calib: NirvanaPruningModifier needs calibration data"):
        calibration_windows(None)
