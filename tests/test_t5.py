"""T5 (both FFN kinds): geometry, the pruned model against its masked twin (encoder and decoder), the
encoder-decoder objective, allocation over three attention kinds, checkpoints, and ``nirvana prune``."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
import transformers

from nirvana import _remote_modeling, baselines, cli
from nirvana.adapters import attention_blocks, get_adapter
from nirvana.allocation import allocate
from nirvana.checkpoint import layer_widths, load_plan, load_pruned, save_pruned
from nirvana.compaction import compact_model, mask_model
from nirvana.methods import get_method
from nirvana.objective import objective_value, split_window
from nirvana.plan import Geometry, LayerPlan, PruningPlan
from nirvana.saliency import compute_scores
from nirvana.scores import load_scores, save_scores
from tests.test_pruning import write_text

from .helpers import assert_bitwise_equal, assert_close, prune_args
from .tiny_models import T5_FFNS, tiny_batch, tiny_t5, tiny_tokenizer

KINDS = tuple(T5_FFNS)
EAGER = {"attn_implementation": "eager"}
ARCH = "T5ForConditionalGeneration"


def hand_plan(model) -> PruningPlan:
    """Every attention kind loses heads, and the layers of a stack keep different ones: layer 1 of each
    stack keeps a head that layer 0 (which computes the shared position bias) drops."""
    g = get_adapter(model).geometry(model.config)
    every = list(range(g.intermediate_size))
    layers = [
        LayerPlan([0, 2], [c for c in every if c % 3]),  # encoder 0
        LayerPlan([1, 2, 3], every[:40]),  # encoder 1
        LayerPlan([1, 3], every[8:], [0, 3]),  # decoder 0
        LayerPlan([0, 1, 2], every, [2]),  # decoder 1
    ]
    return PruningPlan(ARCH, g, layers)


def io(seed: int = 0) -> dict[str, torch.Tensor]:
    return {"input_ids": tiny_batch(2, 12, seed=seed), "decoder_input_ids": tiny_batch(2, 7, seed=seed + 1)}


@pytest.mark.parametrize("kind", KINDS, ids=KINDS)
def test_geometry_and_modules(kind):
    model = tiny_t5(kind)
    adapter = get_adapter(model)
    g = adapter.geometry(model.config)
    assert g == Geometry(4, 32, 4, 4, 8, 48, kind == "t5-gated", encoder_layers=2, cross_attention_layers=2)
    assert g.num_attention_blocks == 6
    assert g.sections()["decoder.cross_attention"] == ("attention", 4, 6)
    layers = adapter.layers(model)
    assert [lm.cross is not None for lm in layers] == [False, False, True, True]
    ff = model.decoder.block[1].layer[-1].DenseReluDense
    if kind == "t5-gated":
        assert (layers[3].gate, layers[3].up, layers[3].down) == (ff.wi_0, ff.wi_1, ff.wo)
    else:
        assert (layers[3].gate, layers[3].up, layers[3].down) == (None, ff.wi, ff.wo)
    assert attention_blocks(layers)[5].attn is model.decoder.block[1].layer[1].EncDecAttention


@pytest.mark.parametrize("kind", KINDS, ids=KINDS)
def test_pruned_t5_matches_its_masked_model_in_encoder_and_decoder(kind):
    dense = tiny_t5(kind)
    plan = hand_plan(dense)
    masked = mask_model(copy.deepcopy(dense), plan)
    pruned = compact_model(copy.deepcopy(dense), plan)
    x = io()
    with torch.no_grad():
        enc_want = masked.get_encoder()(input_ids=x["input_ids"]).last_hidden_state
        enc_got = pruned.get_encoder()(input_ids=x["input_ids"]).last_hidden_state
        want, got = masked(**x).logits, pruned(**x).logits
        assert not torch.allclose(dense(**x).logits, want, atol=1e-3)  # the pruning does change the model
    assert_close(enc_got, enc_want, rtol=1e-5, atol=1e-5, name=f"{kind} encoder output")
    assert_close(got, want, rtol=1e-5, atol=1e-5, name=f"{kind} logits")
    widths = layer_widths(pruned)
    assert [w["heads"] for w in widths] == [[0, 2], [1, 2, 3], [1, 3], [0, 1, 2]]
    assert [w.get("cross_heads") for w in widths] == [None, None, [0, 3], [2]]


def test_generate_with_a_cache_matches_the_masked_model():
    # Incremental decoding computes the position bias for the cached offset: the pruned layers must too.
    dense = tiny_t5("t5-gated")
    plan = hand_plan(dense)
    masked = mask_model(copy.deepcopy(dense), plan)
    pruned = compact_model(copy.deepcopy(dense), plan)
    x = tiny_batch(2, 12)
    with torch.no_grad():
        want = masked.generate(x, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
        got = pruned.generate(x, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        assert_close(a, b, rtol=1e-5, atol=1e-5, name=f"step {step} logits")


def test_split_window_makes_teacher_forced_decoder_inputs():
    model = tiny_t5()
    ids = tiny_batch(3, 9)
    parts = split_window(model, ids)
    assert torch.equal(parts["input_ids"], ids[:, :4]) and torch.equal(parts["labels"], ids[:, 4:])
    start = model.config.decoder_start_token_id
    assert torch.equal(parts["decoder_input_ids"][:, 0], torch.full((3,), start))
    assert torch.equal(parts["decoder_input_ids"][:, 1:], ids[:, 4:-1])
    with pytest.raises(ValueError, match="T >= 2"):
        split_window(model, ids[:, :1])


@pytest.mark.parametrize("objective", ["maxlogit", "ce"], ids=["maxlogit", "ce"])
def test_objective_is_taken_over_the_decoder_positions(objective):
    model = tiny_t5("t5-gated")
    ids = tiny_batch(3, 10)
    parts = split_window(model, ids)
    with torch.no_grad():
        logits = model(input_ids=parts["input_ids"], decoder_input_ids=parts["decoder_input_ids"]).logits.double()
        value = objective_value(model, ids, objective)
    if objective == "ce":
        want = F.cross_entropy(logits.flatten(0, 1), parts["labels"].flatten())
    else:
        want = logits.max(dim=1).values.mean()
    assert_close(value.double(), want, rtol=1e-5, name=objective)


@pytest.mark.parametrize("kind", KINDS, ids=KINDS)
def test_scores_have_one_row_per_attention_block_and_round_trip(kind, tmp_path):
    model = tiny_t5(kind)
    scores = compute_scores(model, tiny_batch(4, 10), micro_batch_size=2, progress=False)
    g = scores.geometry
    assert scores.attention.shape == (6, 4) and scores.mlp.shape == (4, 48)
    assert torch.isfinite(scores.attention).all() and (scores.attention > 0).all()
    back = load_scores(save_scores(scores, tmp_path / "scores.safetensors"))
    assert back.geometry == g
    assert_bitwise_equal(back.attention, scores.attention, name="attention")


@pytest.mark.parametrize("allocation", ["global", "uniform"], ids=["global", "uniform"])
def test_allocation_ranks_the_three_attention_kinds(allocation):
    g = get_adapter(tiny_t5()).geometry(tiny_t5().config)
    gen = torch.Generator().manual_seed(0)
    attn, mlp = torch.rand(6, 4, generator=gen), torch.rand(4, 48, generator=gen)
    plan = allocate(attn, mlp, g, sparsity=0.4, gamma=1.0, allocation=allocation, round_to=1, architecture=ARCH)
    blocks = [b for lp in plan.layers for b in lp.attention_blocks()]
    assert len(blocks) == 6 and all(blocks)  # every attention block keeps at least one head
    assert sum(4 - len(b) for b in blocks) == plan.meta["kv_groups_pruned"] > 0
    assert abs(plan.achieved_sparsity() - 0.4) < 0.05
    assert PruningPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    if allocation == "uniform":
        assert len({len(b) for b in blocks}) == 1


def test_decoder_only_plans_and_geometries_keep_their_format():
    from .tiny_models import tiny_model

    g = get_adapter(tiny_model("llama")).geometry(tiny_model("llama").config)
    assert set(g.to_dict()) == {
        *("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "gated")
    }
    assert g.num_attention_blocks == g.num_layers and set(g.sections()) == {"attention", "mlp"}
    layer = LayerPlan([0], [1, 2]).to_dict()
    assert layer == {"kv_groups_kept": [0], "mlp_channels_kept": [1, 2]}


def test_plan_refuses_a_cross_attention_where_the_geometry_has_none():
    plan = hand_plan(tiny_t5())
    plan.layers[0].cross_kv_groups_kept = [0]
    with pytest.raises(ValueError, match=r"layers\[0\].cross_kv_groups_kept: this layer has no cross-attention"):
        plan.validate()
    plan.layers[0].cross_kv_groups_kept, plan.layers[2].cross_kv_groups_kept = None, None
    with pytest.raises(ValueError, match=r"layers\[2\].cross_kv_groups_kept: this layer has a cross-attention"):
        plan.validate()


@pytest.mark.parametrize("kind", KINDS, ids=KINDS)
def test_pruned_t5_saves_and_loads(kind, tmp_path):
    dense = tiny_t5(kind)
    plan = hand_plan(dense)
    pruned = compact_model(copy.deepcopy(dense), plan)
    x = io(seed=3)
    with torch.no_grad():
        want = pruned(**x).logits
    out = save_pruned(pruned, tiny_tokenizer(), plan, tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForSeq2SeqLM": f"modeling_nirvana.Nirvana{ARCH}"}
    assert config["nirvana"]["layers"][2]["cross_heads"] == [0, 3]
    assert load_plan(out) == plan
    loaders = {
        "load_pruned": lambda p: load_pruned(p, **EAGER),
        "trust_remote_code": lambda p: transformers.AutoModelForSeq2SeqLM.from_pretrained(
            p, trust_remote_code=True, **EAGER
        ),
    }
    for name, load in loaders.items():
        loaded = load(out).eval()
        assert layer_widths(loaded) == layer_widths(pruned), name
        with torch.no_grad():
            assert_bitwise_equal(loaded(**x).logits, want, name=f"{kind} logits after {name}")


def test_malformed_head_lists_are_refused():
    block = {"version": 1, "base_architecture": ARCH, "layers": [{"num_heads": 2, "num_kv_heads": 2}]}
    block["layers"][0].update(intermediate_size=8, heads=[2, 1])
    with pytest.raises(ValueError, match=r"layers\[0\].heads: expected 2 increasing head indices"):
        _remote_modeling.check_block(block, 1)
    block["layers"][0].update(heads=[1, 2], cross_heads=[])
    with pytest.raises(ValueError, match=r"layers\[0\].cross_heads"):
        _remote_modeling.check_block(block, 1)


@pytest.fixture(scope="module")
def t5_dirs(tmp_path_factory):
    folders = {}
    for kind in KINDS:
        folder = tmp_path_factory.mktemp("models") / kind
        tiny_t5(kind).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        folders[kind] = folder
    return folders


@pytest.mark.parametrize("kind", KINDS, ids=KINDS)
def test_nirvana_prune_runs_end_to_end_on_a_t5_folder(kind, t5_dirs, tmp_path, capsys):
    calib, out = write_text(tmp_path / "calib.txt"), tmp_path / "pruned"
    code = cli.main([str(a) for a in prune_args(t5_dirs[kind], calib, out, round_to=4)])
    _, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert 0.2 < report["sparsity"]["achieved"] < 0.4
    assert report["params"]["after"] < report["params"]["before"]
    plan = load_plan(out)
    assert plan.geometry.cross_attention_layers == 2 and plan.layers[3].cross_kv_groups_kept
    assert report["per_layer"][3]["cross_heads"] == len(plan.layers[3].cross_kv_groups_kept)
    loaded = load_pruned(out, **EAGER)
    with torch.no_grad():
        logits = loaded(**io()).logits
    assert logits.shape == (2, 7, 128) and torch.isfinite(logits).all()
    dense = transformers.AutoModelForSeq2SeqLM.from_pretrained(t5_dirs[kind], **EAGER)
    masked = mask_model(dense, plan)
    with torch.no_grad():
        assert_close(logits, masked(**io()).logits, rtol=1e-5, atol=1e-5, name=f"{kind} saved vs masked")


def test_flap_on_a_t5_is_refused_in_one_line_before_any_scoring(t5_dirs, tmp_path, capsys):
    calib = write_text(tmp_path / "calib.txt")
    argv = prune_args(t5_dirs["t5-relu"], calib, tmp_path / "out", "--method", "flap", round_to=4)
    code = cli.main([str(a) for a in argv])
    _, err = capsys.readouterr()
    assert code == 2 and "method: 'flap' does not score encoder-decoders" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"^method: 'flap' does not score encoder-decoders: .*bias"):
        baselines.method_scores(tiny_t5("t5-gated"), tiny_batch(2, 8), "flap", progress=False)


@pytest.mark.parametrize("kind", KINDS, ids=KINDS)
@pytest.mark.parametrize("method", ["magnitude", "random", "taylor", "wanda-sp"], ids=str)
def test_every_baseline_but_flap_prunes_a_t5_end_to_end(method, kind, t5_dirs, tmp_path, capsys):
    calib, out = write_text(tmp_path / "calib.txt"), tmp_path / "pruned"
    code = cli.main([str(a) for a in prune_args(t5_dirs[kind], calib, out, "--method", method, round_to=4)])
    _, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["method"] == method and 0.2 < report["sparsity"]["achieved"] < 0.4
    assert report["settings"]["allocation"] == get_method(method).allocation
    plan = load_plan(out)
    scores = load_scores(out / "scores.safetensors")
    assert scores.meta["method"] == method and scores.attention.shape == (6, 4)
    if get_method(method).allocation == "uniform":  # every attention block, and every FFN, alike
        assert len({len(heads) for lp in plan.layers for heads in lp.attention_blocks()}) == 1
        assert len({len(lp.mlp_channels_kept) for lp in plan.layers}) == 1
    loaded = load_pruned(out, **EAGER)
    dense = transformers.AutoModelForSeq2SeqLM.from_pretrained(t5_dirs[kind], **EAGER)
    with torch.no_grad():
        assert_close(loaded(**io()).logits, mask_model(dense, plan)(**io()).logits, rtol=1e-5, atol=1e-5, name=kind)


def t5_units(model):
    """(attention blocks in score-row order, layers as (ffn module)) found without the adapter."""
    enc, dec = list(model.encoder.block), list(model.decoder.block)
    selfs = [b.layer[0].SelfAttention for b in enc + dec]
    crosses = [b.layer[1].EncDecAttention for b in dec]
    ffns = [b.layer[-1].DenseReluDense for b in enc + dec]
    return selfs + crosses, ffns


def ffn_linears(ff):
    """(row-owning linears, the column-owning wo) of a T5 FFN of either kind."""
    return ([ff.wi_0, ff.wi_1] if hasattr(ff, "wi_0") else [ff.wi]), ff.wo


def unit_totals(model, per_weight):
    """float64 [blocks, heads], [layers, d_ff]: ``per_weight(linear)`` ([out, in]) summed over each unit."""
    blocks, ffns = t5_units(model)
    d = model.config.d_kv
    att = torch.stack(
        [
            sum(per_weight(m).view(-1, d, m.in_features).sum(dim=(1, 2)) for m in (a.q, a.k, a.v))
            + per_weight(a.o).view(a.o.out_features, -1, d).sum(dim=(0, 2))
            for a in blocks
        ]
    )
    mlp = []
    for ff in ffns:
        rows, wo = ffn_linears(ff)
        mlp.append(sum(per_weight(m).sum(dim=1) for m in rows) + per_weight(wo).sum(dim=0))
    return att, torch.stack(mlp)


@pytest.mark.parametrize("kind", KINDS, ids=KINDS)
def test_taylor_on_a_t5_is_the_sum_over_windows_of_each_windows_decoder_ce_gradient(kind):
    model = tiny_t5(kind).double()
    ids = tiny_batch(5, 11)
    got = baselines.method_scores(model, ids, "taylor", micro_batch_size=2, progress=False)
    blocks, ffns = t5_units(model)
    linears = [m for a in blocks for m in (a.q, a.k, a.v, a.o)]
    linears += [m for ff in ffns for m in (*ffn_linears(ff)[0], ffn_linears(ff)[1])]
    acc = {id(m): torch.zeros_like(m.weight) for m in linears}
    for w in ids:
        # transformers' own loss: the mean CE of the window's second half given its first.
        loss = model(**split_window(model, w[None].contiguous())).loss
        grads = torch.autograd.grad(loss, [m.weight for m in linears])
        for m, g in zip(linears, grads):
            acc[id(m)] += (m.weight.detach() * g).abs()
    att, mlp = unit_totals(model, lambda m: acc[id(m)])
    assert_close(got.attention, att, rtol=1e-5, name=f"{kind} taylor attention")
    assert_close(got.mlp, mlp, rtol=1e-5, name=f"{kind} taylor mlp")
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kind", KINDS, ids=KINDS)
def test_wanda_sp_on_a_t5_reads_each_linears_own_input_norms(kind, tmp_path):
    model = tiny_t5(kind).double()
    ids = tiny_batch(5, 11)
    stats = baselines.activation_statistics(model, ids, micro_batch_size=2, progress=False)
    assert (stats.tokens, stats.decoder_tokens) == (5 * 5, 5 * 6)
    got = baselines.wanda_sp_scores(model, stats)
    inputs: dict[int, list] = {}
    blocks, ffns = t5_units(model)
    linears = [m for a in blocks for m in (a.q, a.k, a.v, a.o)]
    linears += [m for ff in ffns for m in (*ffn_linears(ff)[0], ffn_linears(ff)[1])]
    handles = [
        m.register_forward_pre_hook(lambda mod, args: inputs.setdefault(id(mod), []).append(args[0].flatten(0, 1)))
        for m in linears
    ]
    with torch.no_grad():
        model(**{k: v for k, v in split_window(model, ids).items() if k != "labels"})
    for h in handles:
        h.remove()
    norms = {k: torch.cat(v).norm(dim=0) for k, v in inputs.items()}
    # Cross-attention k/v read the encoder's output over the encoder's 5 positions per window.
    assert inputs[id(blocks[-1].k)][0].shape[0] == 5 * 5 and inputs[id(blocks[-1].q)][0].shape[0] == 5 * 6
    att, mlp = unit_totals(model, lambda m: m.weight.abs() * norms[id(m)])
    assert_close(got.attention, att, rtol=1e-6, name=f"{kind} wanda-sp attention")
    assert_close(got.mlp, mlp, rtol=1e-6, name=f"{kind} wanda-sp mlp")
    # The statistics, cross-attention tables and decoder count included, round-trip through their file.
    back = baselines.load_statistics(baselines.save_statistics(stats, tmp_path / "stats.safetensors"))
    assert back.decoder_tokens == stats.decoder_tokens and set(back.sums) == set(stats.sums)
    assert all(torch.equal(back.squares[k], stats.squares[k]) for k in stats.squares)
    # Means divide each row by the positions it saw: encoder rows by 25, decoder rows by 30.
    g = stats.geometry
    assert torch.equal(stats.mean("attn")[: g.encoder_layers], stats.sums["attn"][: g.encoder_layers] / 25)
    assert torch.equal(stats.mean("attn")[g.encoder_layers :], stats.sums["attn"][g.encoder_layers :] / 30)
    assert torch.equal(stats.mean("cross_kv"), stats.sums["cross_kv"] / 25)


@pytest.mark.parametrize("kind", KINDS, ids=KINDS)
@pytest.mark.parametrize("seq_len", [8, 9], ids=["even", "odd"])
def test_perplexity_of_a_t5_is_over_the_decoder_targets_of_the_scoring_split(kind, seq_len):
    from nirvana.calibration import tokenize
    from nirvana.evaluation import perplexity, text_windows

    model, tok = tiny_t5(kind), tiny_tokenizer()
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune."
    got = perplexity(model, tok, text, seq_len=seq_len, max_windows=5, batch_size=2, progress=False)
    windows = text_windows(tokenize(text, tok), seq_len, 5)
    with torch.no_grad():
        # transformers' own mean CE of labels = the second half, given the first half as the encoder input.
        losses = [model(input_ids=w[None, : seq_len // 2], labels=w[None, seq_len // 2 :]).loss for w in windows]
    assert_close(torch.tensor(got), torch.stack(losses).mean().exp(), rtol=1e-5, name=f"{kind} perplexity")


def test_kl_and_kl_selection_compare_decoder_logits_of_a_t5():
    from nirvana import selection
    from nirvana.evaluation import kl_divergence, kl_to_model, window_logits

    dense = tiny_t5("t5-gated")
    heldout = tiny_batch(3, 9, seed=5)
    dense_logits = window_logits(dense, heldout, batch_size=2)
    assert dense_logits.shape == (3, 5, 128)
    plan = hand_plan(dense)
    pruned = compact_model(copy.deepcopy(dense), plan)
    with torch.no_grad():
        parts = split_window(pruned, heldout)
        want = kl_divergence(
            dense_logits, pruned(input_ids=parts["input_ids"], labels=parts["labels"].contiguous()).logits
        )
    assert_close(torch.tensor(kl_to_model(dense_logits, pruned, heldout)), torch.tensor(want), rtol=1e-6)
    assert want > 0
    candidates = [
        selection.Candidate(s, compute_scores(dense, tiny_batch(4, 10, seed=s), micro_batch_size=2, progress=False))
        for s in (0, 1)
    ]
    chosen = selection.select(dense, candidates, heldout, sparsity=0.3, gammas=[1.0, 2.0], round_to=4)
    assert len(chosen.trials) == 4 and chosen.kl == min(t["kl"] for t in chosen.trials)


@pytest.mark.parametrize("kind", KINDS, ids=KINDS)
def test_select_calib_and_gamma_auto_run_on_a_t5(kind, t5_dirs, tmp_path, capsys):
    calib, out = write_text(tmp_path / "calib.txt"), tmp_path / "pruned"
    extra = ("--select-calib", "2", "--gamma", "auto", "--heldout-samples", "3")
    code = cli.main([str(a) for a in prune_args(t5_dirs[kind], calib, out, *extra, round_to=4)])
    _, err = capsys.readouterr()
    assert code == 0, err
    selection = json.loads((out / "report.json").read_text())["selection"]
    kls = [t["kl"] for t in selection["trials"] if t["kl"] is not None]
    assert {t["seed"] for t in selection["trials"]} == {0, 1} and len(kls) >= 2
    assert selection["kl"] == min(kls) and selection["gamma"] in (1.0, 2.0, 3.0, 4.0, 6.0)


@pytest.mark.parametrize("kind", KINDS, ids=KINDS)
def test_eval_and_finetune_accept_a_pruned_t5(kind, t5_dirs, tmp_path, capsys):
    from nirvana.evaluation import perplexity

    calib, pruned = write_text(tmp_path / "calib.txt"), tmp_path / "pruned"
    assert cli.main([str(a) for a in prune_args(t5_dirs[kind], calib, pruned, round_to=4)]) == 0
    capsys.readouterr()
    code = cli.main(
        ["eval", str(pruned), "--text", str(calib), "--seq-len", "16", "--max-windows", "4", "--device", "cpu"]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    want = perplexity(load_pruned(pruned), tiny_tokenizer(), calib.read_text(), seq_len=16, max_windows=4)
    assert f": {want:.3f}" in out
    tuned = tmp_path / "tuned"
    argv = [
        *("finetune", pruned, "--text", calib, "--steps", "3", "--seq-len", "16", "--batch-size", "2"),
        *("--device", "cpu", "--quiet", "--out", tuned),
    ]
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out)
    assert summary["steps"] == 3 and math.isfinite(summary["loss_end"])
    block = json.loads((tuned / "report.json").read_text())["finetune"]
    # LoRA on every self-attention q/k/v/o (4 layers), every cross-attention's (2), and every FFN linear.
    assert block["lora_modules"] == 4 * 4 + 2 * 4 + 4 * (2 + (kind == "t5-gated"))
    before, after = load_pruned(pruned, **EAGER), load_pruned(tuned, **EAGER)
    assert load_plan(tuned).to_dict() == load_plan(pruned).to_dict()
    assert {k: v.shape for k, v in after.state_dict().items()} == {k: v.shape for k, v in before.state_dict().items()}
    with torch.no_grad():
        assert not torch.equal(after(**io()).logits, before(**io()).logits)


def test_streaming_apply_refuses_a_t5_in_one_line(t5_dirs, tmp_path, capsys):
    calib, pruned = write_text(tmp_path / "calib.txt"), tmp_path / "pruned"
    assert cli.main([str(a) for a in prune_args(t5_dirs["t5-relu"], calib, pruned, round_to=4)]) == 0
    capsys.readouterr()
    code = cli.main(
        ["apply", str(pruned / "plan.json"), "--model", str(t5_dirs["t5-relu"]), "--out", str(tmp_path / "a")]
    )
    _, err = capsys.readouterr()
    assert code == 2 and "encoder-decoder" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()
