"""``--compensate bias``: FLAP's bias compensation for every method (nirvana.compensation), checked against a
reference built by hand: the dense model with the plan's units masked and, on each o_proj / down_proj, a
bias ``W[:, R] @ mean(x[R])`` from input means gathered here with plain forward hooks."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from nirvana.checkpoint import load_plan, load_pruned
from nirvana.compaction import mask_model
from nirvana.compensation import COMPENSATIONS, compensation_for
from nirvana.distributed import LAUNCH_ENV
from nirvana.methods import METHODS, get_method
from nirvana.pruning import PruneSettings, prune
from tests.helpers import assert_bitwise_equal, assert_close, one_line_error, prune_args
from tests.test_cli import run
from tests.test_pruning import WIDE, settings, write_text
from tests.tiny_models import tiny_batch, tiny_model, tiny_t5, tiny_tokenizer

TOL = dict(rtol=1e-5, atol=1e-5)


def input_means(model: nn.Module, windows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the mean over every calibration token of o_proj's and down_proj's inputs (float64)."""
    sums, hooks = {}, []
    layers = model.model.layers
    for i, layer in enumerate(layers):
        for name, linear in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj)):

            def hook(_module, args, key=(i, name)):
                x = args[0].detach().to(torch.float64).reshape(-1, args[0].shape[-1])
                sums[key] = sums.get(key, 0) + x.sum(dim=0)

            hooks.append(linear.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(windows)
    for h in hooks:
        h.remove()
    tokens = windows.numel()
    return [(sums[(i, "o")] / tokens, sums[(i, "down")] / tokens) for i in range(len(layers))]


def hand_reference(dense: nn.Module, plan, windows: torch.Tensor) -> nn.Module:
    """``dense`` masked by ``plan``, with the removed inputs' means times the removed columns as biases."""
    ref = copy.deepcopy(dense)
    cfg = dense.config
    group_width = (cfg.num_attention_heads // cfg.num_key_value_heads) * cfg.head_dim
    for layer, lp, (mean_o, mean_down) in zip(ref.model.layers, plan.layers, input_means(dense, windows), strict=True):
        o, down = layer.self_attn.o_proj, layer.mlp.down_proj
        removed_o = [
            c
            for g in range(cfg.num_key_value_heads)
            if g not in lp.kv_groups_kept
            for c in range(g * group_width, (g + 1) * group_width)
        ]
        removed_down = [c for c in range(cfg.intermediate_size) if c not in lp.mlp_channels_kept]
        for linear, removed, mean in ((o, removed_o, mean_o), (down, removed_down, mean_down)):
            bias = torch.zeros(linear.out_features, dtype=torch.float64)
            if removed:
                bias += linear.weight.detach().to(torch.float64)[:, removed] @ mean[removed]
            linear.bias = nn.Parameter(bias.to(linear.weight.dtype))
    return mask_model(ref, plan)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(tiny_batch(2, 12, seed=3)).logits


@pytest.mark.parametrize(
    ("method", "select_calib", "draws"),
    [("nirvana", 1, 1), ("magnitude", 1, 1), ("wanda-sp", 1, 1), ("nirvana", 2, 1), ("nirvana", 2, 2), ("flap", 1, 2)],
    ids=["nirvana", "magnitude", "wanda-sp", "nirvana-kl-selection", "nirvana-selection-of-draws", "flap-draws"],
)
def test_pruned_logits_equal_the_masked_dense_model_plus_the_hand_made_biases(method, select_calib, draws, tmp_path):
    dense, tok = tiny_model("llama", **WIDE), tiny_tokenizer()
    s = settings(tmp_path, method=method, compensate="bias", select_calib=select_calib, draws=draws, out=None)
    result = prune(s, model=copy.deepcopy(dense), tokenizer=tok, progress=False)
    plan = result.plan
    assert any(len(lp.kv_groups_kept) < dense.config.num_key_value_heads for lp in plan.layers), "nothing pruned"
    # With KL selection, the chosen candidate's own windows (its compensation was what the selection measured);
    # with draws, all of that candidate's draws' windows pooled.
    group = next(g for g in s.candidate_seeds() if g[0] == plan.meta["calibration_seed"])
    windows = torch.cat([s.calibration_windows(tok, seed) for seed in group])
    expected = logits(hand_reference(dense, plan, windows))
    assert_close(logits(result.model), expected, **TOL, name=f"{method} compensated")
    # The biases are not a no-op: the plainly masked model is far from it.
    plain = logits(mask_model(copy.deepcopy(dense), plan))
    assert (plain - expected).abs().max() > 100 * TOL["atol"]
    assert plan.meta["compensate"] == "bias" and result.report["settings"]["compensate"] == "bias"


def test_flap_is_the_same_with_or_without_compensate_bias(tmp_path):
    dense, tok = tiny_model("llama", **WIDE), tiny_tokenizer()
    runs = {
        flag: prune(settings(tmp_path, method="flap", compensate=flag, out=None), model=copy.deepcopy(dense),
                    tokenizer=tok, progress=False)
        for flag in (None, "bias")
    }  # fmt: skip
    assert runs[None].plan.layers == runs["bias"].plan.layers
    assert_bitwise_equal(logits(runs["bias"].model), logits(runs[None].model), name="flap with --compensate bias")
    assert compensation_for(get_method("flap"), "bias") == compensation_for(get_method("flap"), None)


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"flap"}), ids=str)
def test_without_the_flag_only_flap_compensates(method):
    assert compensation_for(get_method(method), None) is None
    assert compensation_for(get_method(method), "bias") is not None


def test_cli_compensate_bias_saves_a_checkpoint_equal_to_the_reference(dense_dir, tmp_path, capsys):
    calib, out = write_text(tmp_path / "calib.txt"), tmp_path / "pruned"
    # NIRVANA's own default draws, whose windows the biases pool.
    code, _, err = run(prune_args(dense_dir, calib, out, "--compensate", "bias", draws=None), capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["compensate"] == "bias"
    plan = load_plan(out)
    assert plan.meta["compensate"] == "bias"
    dense = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    s = PruneSettings(model=str(dense_dir), calib=str(calib), num_samples=4, seq_len=16)
    # NIRVANA's default draws: the biases come from all of their windows pooled.
    windows = torch.cat([s.calibration_windows(tiny_tokenizer(), seed) for seed in s.candidate_seeds()[0]])
    pruned = load_pruned(out).eval()
    assert_close(logits(pruned), logits(hand_reference(dense, plan, windows)), **TOL, name="saved, compensated")


def test_cli_without_the_flag_records_none(dense_dir, tmp_path, capsys):
    calib, out = write_text(tmp_path / "calib.txt"), tmp_path / "pruned"
    code, _, err = run(prune_args(dense_dir, calib, out, "--method", "magnitude"), capsys)
    assert code == 0, err
    assert json.loads((out / "report.json").read_text())["settings"]["compensate"] is None
    assert load_plan(out).meta["compensate"] is None


def test_bad_value_is_one_line_exit_2(dense_dir, tmp_path, capsys):
    calib, out = write_text(tmp_path / "calib.txt"), tmp_path / "pruned"
    code, stdout, err = run(prune_args(dense_dir, calib, out, "--compensate", "mean"), capsys)
    one_line_error(code, err, "--compensate", "'mean'", stdout=stdout)
    assert not out.exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(compensate="mean"), r"^compensate: must be one of bias \(or None\), got 'mean'$"),
        (dict(compensate=True), r"^compensate: must be one of bias \(or None\), got True$"),
        (dict(compensate="bias", scores="scores.safetensors"), r"^compensate: 'bias' needs .*--scores"),
    ],
    ids=["unknown", "not-a-string", "with-scores"],
)
def test_settings_refuse_bad_compensations_in_one_line(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message) as err:
        settings(tmp_path, **overrides).check()
    assert "\n" not in str(err.value)
    assert COMPENSATIONS == ("bias",)


@pytest.mark.parametrize("method", ["nirvana", "magnitude", "taylor"], ids=str)
def test_distributed_refuses_it_for_methods_whose_ranks_gather_no_statistics(method, monkeypatch):
    for name, value in zip(LAUNCH_ENV, ("0", "2", "0", "localhost", "29500")):
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=rf"^compensate: 'bias' under --distributed .*{method!r}") as err:
        PruneSettings(model="smollm2", distributed="fsdp", method=method, compensate="bias").check()
    assert "\n" not in str(err.value)
    for ok in ("wanda-sp", "flap"):
        PruneSettings(model="smollm2", distributed="fsdp", method=ok, compensate="bias").check()


def test_encoder_decoder_is_refused_in_one_line(tmp_path):
    s = settings(tmp_path, method="magnitude", compensate="bias", out=None)
    with pytest.raises(ValueError, match=r"^compensate: 'bias' does not work on encoder-decoders: .*bias") as err:
        prune(s, model=tiny_t5("t5-relu"), tokenizer=tiny_tokenizer(), progress=False)
    assert "\n" not in str(err.value)
