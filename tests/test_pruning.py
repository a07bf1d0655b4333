"""The whole flow (nirvana.pruning), KL selection and the report, on tiny models and on the real SmolLM2."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from nirvana import selection
from nirvana.adapters import get_adapter
from nirvana.checkpoint import load_pruned
from nirvana.compaction import compact_model
from nirvana.evaluation import kl_to_model, window_logits
from nirvana.pruning import DRAW_SEED_STRIDE, RECIPES, PruneSettings, count_params, prune
from nirvana.report import load_report, summarize
from nirvana.saliency import compute_scores
from nirvana.scores import Scores, load_scores
from tests.helpers import assert_close, nirvana_as_user
from tests.tiny_models import tiny_batch, tiny_model, tiny_tokenizer

# Granular enough that 0.5-point sparsity targets are reachable: 8 KV groups and 64 channels per layer.
WIDE = dict(num_hidden_layers=3, num_attention_heads=16, num_key_value_heads=8, intermediate_size=64)


def write_text(path, n_words=3000, seed=0):
    rng = random.Random(seed)
    words = ["the", "lady", "of", "bath", "walked", "and", "said", "that", "it", "was", "a", "fine", "day"]
    path.write_text(" ".join(rng.choice(words) for _ in range(n_words)))
    return path


def settings(tmp_path, **kw):
    base = dict(
        model="tiny",
        sparsity=0.3,
        calib=str(write_text(tmp_path / "calib.txt")),
        num_samples=4,
        seq_len=16,
        heldout_samples=4,
        micro_batch_size=2,
        draws=1,  # NIRVANA's default of 4 quadruples every run; the tests of draws ask for them
        device="cpu",
        round_to=2,
        out=str(tmp_path / "out"),
    )
    base.update(kw)
    return PruneSettings(**base)


def test_prune_writes_a_complete_checkpoint_that_loads_back(tmp_path):
    model, tok = tiny_model("llama", **WIDE), tiny_tokenizer()
    dense_params = count_params(model)
    result = prune(settings(tmp_path, select_calib=2), model=model, tokenizer=tok, progress=False)
    out = result.out
    for name in (
        "config.json",
        "model.safetensors",
        "plan.json",
        "report.json",
        "scores.safetensors",
        "layers.png",
        "tokenizer.json",
    ):
        assert (out / name).is_file(), name
    assert not any(p.name.startswith(".") for p in out.parent.iterdir() if p != out), "a temporary folder was left"

    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"settings", "sparsity", "params", "per_layer", "timings_s", "peak_memory_bytes", "versions"}
    assert report["settings"]["sparsity"] == 0.3 and report["settings"]["select_calib"] == 2
    assert abs(report["sparsity"]["achieved"] - 0.3) <= 0.005
    assert report["params"] == {**report["params"], "before": dense_params, "after": count_params(result.model)}
    assert report["params"]["after"] < report["params"]["before"]
    assert len(report["per_layer"]) == 3 and all(r["kv_groups"] >= 1 for r in report["per_layer"])
    assert {"calibration", "saliency", "selection", "compaction"} <= set(report["timings_s"])
    assert report["peak_memory_bytes"]["host"] > 0
    trials = report["selection"]["trials"]
    assert [t["seed"] for t in trials] == [0, 1] and all(math.isfinite(t["kl"]) and t["kl"] > 0 for t in trials)
    assert report["selection"]["kl"] == min(t["kl"] for t in trials)
    assert summarize(load_report(out)).count("\n") >= 5

    loaded = load_pruned(out)
    ids = tiny_batch(seq=10)
    with torch.no_grad():
        assert_close(loaded(ids).logits, result.model(ids).logits, rtol=1e-5, atol=1e-6, name="reloaded logits")
    scores = load_scores(out / "scores.safetensors")
    assert torch.equal(scores.attention, result.scores.attention)


def test_prune_refuses_bad_settings_before_loading(tmp_path):
    (tmp_path / "out").mkdir()
    cases = [
        (dict(sparsity=1.0), "sparsity: must be in"),
        (dict(sparsity=-0.1), "sparsity: must be in"),
        (dict(gamma=0.0), "gamma: must be > 0"),
        (dict(gamma=float("nan")), "gamma: must be a positive number"),
        (dict(saliency="fisher"), "saliency: must be one of"),
        (dict(num_samples=0), "num_samples: must be a positive integer"),
        (dict(model="/no/such/model"), "model: '/no/such/model' does not exist"),
        (dict(), "out: .* already exists; pass --overwrite"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            prune(settings(tmp_path, **kw))  # no model given: would load one if the check did not stop it


def test_selection_prefers_the_calibration_set_closer_to_the_dense_model():
    model = tiny_model("llama", **WIDE)
    good = compute_scores(model, tiny_batch(batch=4, seq=16, seed=1), micro_batch_size=2, progress=False)
    # Inverted scores prune the most salient units first: a much worse candidate.
    bad = Scores(-good.attention, -good.mlp, good.geometry)
    heldout = tiny_batch(batch=4, seq=16, seed=9)
    dense_before = window_logits(model, heldout)
    chosen = selection.select(
        model, [selection.Candidate(7, bad), selection.Candidate(8, good)], heldout, sparsity=0.3, gammas=[3.0]
    )
    assert chosen.seed == 8
    kls = {t["seed"]: t["kl"] for t in chosen.trials}
    assert kls[8] < kls[7]
    # The recorded KL is the KL of the returned plan's pruned model, and the dense model is untouched.
    direct = kl_to_model(dense_before, selection.pruned_copy(model, chosen.plan), heldout)
    assert chosen.kl == pytest.approx(direct, rel=1e-6)
    assert torch.equal(window_logits(model, heldout), dense_before)


def test_pruned_copy_shares_what_it_does_not_change():
    model = tiny_model("qwen2", **WIDE)
    scores = compute_scores(model, tiny_batch(batch=2, seq=16), progress=False)
    plan = selection.allocate(scores.attention, scores.mlp, scores.geometry, sparsity=0.3)
    copy = selection.pruned_copy(model, plan)
    assert copy.model.embed_tokens.weight is model.model.embed_tokens.weight
    pruned_layer = next(i for i, lp in enumerate(plan.layers) if len(lp.kv_groups_kept) < 8)
    q_copy = copy.model.layers[pruned_layer].self_attn.q_proj
    assert q_copy.weight is not model.model.layers[pruned_layer].self_attn.q_proj.weight
    assert q_copy.out_features < model.model.layers[pruned_layer].self_attn.q_proj.out_features
    assert model.config.num_key_value_heads == 8 and count_params(copy) < count_params(model)
    reference = compact_model(tiny_model("qwen2", **WIDE), plan)
    ids = tiny_batch(seq=10)
    with torch.no_grad():
        assert_close(copy(ids).logits, reference(ids).logits, rtol=1e-6, atol=1e-7)


def test_gamma_auto_tries_the_grid_and_reports_each_trial(tmp_path):
    model, tok = tiny_model("llama", **WIDE), tiny_tokenizer()
    result = prune(
        settings(tmp_path, gamma="auto", sparsity=0.25, out=None), model=model, tokenizer=tok, progress=False
    )
    sel = result.report["selection"]
    tried = [t["gamma"] for t in sel["trials"]]
    assert tried == list(selection.GAMMA_GRID)
    finite = [t for t in sel["trials"] if t["kl"] is not None]
    assert sel["gamma"] in [t["gamma"] for t in finite]
    assert sel["kl"] == min(t["kl"] for t in finite)
    assert result.plan.meta["gamma"] == sel["gamma"]


@pytest.mark.parametrize("method", ["magnitude", "random", "taylor", "wanda-sp", "flap"])
def test_baseline_methods_run_through_the_whole_flow(method, tmp_path):
    model, tok = tiny_model("llama", **WIDE), tiny_tokenizer()
    select = 2 if method == "flap" else 1  # FLAP's compensation must also reach the KL candidates
    result = prune(settings(tmp_path, method=method, select_calib=select), model=model, tokenizer=tok, progress=False)
    report = json.loads((result.out / "report.json").read_text())
    assert report["settings"]["method"] == method and result.plan.meta["method"] == method
    assert abs(report["sparsity"]["achieved"] - 0.3) <= 0.005
    if method == "flap":
        assert all(t["kl"] is not None and math.isfinite(t["kl"]) for t in report["selection"]["trials"])
        assert result.model.model.layers[0].self_attn.o_proj.bias is not None  # the compensation bias
    loaded = load_pruned(result.out)
    ids = tiny_batch(seq=10)
    with torch.no_grad():
        assert_close(loaded(ids).logits, result.model(ids).logits, rtol=1e-5, atol=1e-6, name=f"{method} reloaded")


def test_draws_average_the_scores_of_their_calibration_sets(tmp_path):
    """--draws D: a candidate's scores are the mean of D draws' (seeds seed .. seed+D-1), and its plan is what
    that mean allocates; with --select-calib K the candidates draw disjoint seeds and are named by their first."""
    import copy

    from nirvana.allocation import allocate
    from nirvana.scores import mean_scores

    model, tok = tiny_model("llama", **WIDE), tiny_tokenizer()

    def run(**kw):
        return prune(settings(tmp_path, out=None, **kw), model=copy.deepcopy(model), tokenizer=tok, progress=False)

    single = [run(seed=seed).scores for seed in (3, 3 + DRAW_SEED_STRIDE)]
    result = run(seed=3, draws=2)
    want = mean_scores(single)
    assert torch.equal(result.scores.attention, want.attention) and torch.equal(result.scores.mlp, want.mlp)
    assert result.scores.meta["calibration_seeds"] == [3, 3 + DRAW_SEED_STRIDE] and result.scores.meta["draws"] == 2
    assert result.plan.meta["calibration_seed"] == 3 and result.report["settings"]["draws"] == 2
    s = settings(tmp_path, seed=3, draws=2).for_geometry(want.geometry)
    plan = allocate(
        want.attention, want.mlp, want.geometry, sparsity=s.sparsity, gamma=s.gamma, allocation="global",
        round_to=s.round_to, architecture="LlamaForCausalLM", **s.rules,
    )  # fmt: skip
    assert [lp.kv_groups_kept for lp in result.plan.layers] == [lp.kv_groups_kept for lp in plan.layers]
    assert [lp.mlp_channels_kept for lp in result.plan.layers] == [lp.mlp_channels_kept for lp in plan.layers]
    assert not torch.equal(single[0].attention, single[1].attention), "the two draws scored alike: no test"

    chosen = run(select_calib=2, draws=2)
    trials = chosen.report["selection"]["trials"]
    assert [t["seed"] for t in trials] == [0, 1], trials
    assert chosen.scores.meta["calibration_seeds"] in ([0, DRAW_SEED_STRIDE], [1, 1 + DRAW_SEED_STRIDE])


def test_unknown_method_is_refused(tmp_path):
    with pytest.raises(ValueError, match="method: must be one of"):
        prune(settings(tmp_path, method="sparsegpt", out=None))


@pytest.mark.slow
def test_real_smollm2_keeps_perplexity_below_three_times_dense_at_20_percent(tmp_path):
    nirvana = nirvana_as_user  # as a CPU user runs it

    out = tmp_path / "pruned"
    text = nirvana(
        "prune",
        "smollm2",
        "--sparsity",
        "0.2",
        "--gamma",
        "3",
        "--calib",
        "austen",
        # One draw of 8 x 512 tokens (the paper's 32 x 128 in tokens), not the default's 4 x 32 x 512, which
        # take 16x the scoring (577 s of the demo on two cores); the quality benchmark measures those.
        "--num-samples",
        "8",
        "--draws",
        "1",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        out,
    )
    assert f"saved to {out}" in text
    report = json.loads((out / "report.json").read_text())
    assert abs(report["sparsity"]["achieved"] - 0.2) <= 0.005
    assert report["params"]["after"] < report["params"]["before"]

    def ppl(model):
        line = nirvana("eval", model, "--text", "persuasion", "--max-windows", "4", "--device", "cpu")
        return float(line.rsplit(":", 1)[1])

    dense, pruned = ppl("smollm2"), ppl(out)
    assert math.isfinite(pruned) and dense < pruned < 3 * dense, (dense, pruned)


def _pruned_folder(tmp_path, how):
    folder = tmp_path / "pruned"
    folder.mkdir()
    if how == "plan":
        (folder / "plan.json").write_text("{}")
        (folder / "config.json").write_text("{}")
    else:  # a pruned config whose plan.json was lost
        (folder / "config.json").write_text(json.dumps({"nirvana": {"base_architecture": "LlamaForCausalLM"}}))
    return str(folder)


def _empty_file(path):
    path.touch()
    return str(path)


def _calib_folder(tmp_path, names):
    folder = tmp_path / "texts"
    folder.mkdir()
    for name in names:
        write_text(folder / name)
    return str(folder)


# (settings, or a function of tmp_path giving them; what the message must say)
CHEAP_CHECKS = {
    "select-calib-too-many": (dict(select_calib=65), "select_calib: at most 64 candidate sets, got 65"),
    "self-too-many-windows": (dict(calib="self", num_samples=1025), "num_samples: at most 1024 with --calib self"),
    "self-too-many-heldout": (dict(calib="self", heldout_samples=5000), "heldout_samples: at most 1024"),
    "seed-negative": (dict(seed=-1), r"seed: must be an integer in \[0, 2\*\*31\), got -1"),
    "seed-too-big": (dict(seed=2**31), r"seed: must be an integer in \[0, 2\*\*31\)"),
    "seed-float": (dict(seed=1.0), r"seed: must be an integer"),
    "seed-bool": (dict(seed=True), r"seed: must be an integer"),
    "seed-plus-candidates": (dict(seed=2**31 - 2, select_calib=3), "uses seeds up to 2147483648, past 2"),
    "seed-plus-draws": (dict(seed=2**31 - 2, draws=3), "--select-calib 1 --draws 3 uses seeds up to 2149580798"),
    "seed-plus-default-draws": (dict(seed=2**31 - 2, draws=None), "--select-calib 1 --draws 4 uses seeds up to"),
    "draws-zero": (dict(draws=0), "draws: must be a positive integer, got 0"),
    "draws-times-candidates": (dict(select_calib=8, draws=9), "draws: 9 draws for each of 8 candidate sets make 72"),
    "default-draws-times-candidates": (
        dict(select_calib=64, draws=None),
        r"draws: 4 draws \(nirvana's default; pass --draws 1 for one\) for each of 64 candidate sets make 256",
    ),
    "calib-missing": (lambda t: dict(calib=str(t / "none.txt")), "calib: .*none.txt' does not exist"),
    "calib-missing-relative": (dict(calib="texts/none.jsonl"), "calib: 'texts/none.jsonl' does not exist"),
    "calib-empty": (lambda t: dict(calib=_empty_file(t / "e.txt")), "e.txt' is empty"),
    "calib-folder-no-txt": (lambda t: dict(calib=_calib_folder(t, [])), "holds no .txt files"),
    "calib-folder-only-heldout": (lambda t: dict(calib=_calib_folder(t, ["persuasion.txt"])), "holds no .txt files"),
    "model-pruned": (lambda t: dict(model=_pruned_folder(t, "plan")), "is a pruned checkpoint; prune the dense"),
    "model-pruned-config": (lambda t: dict(model=_pruned_folder(t, "config")), "is a pruned checkpoint"),
    "adam-steps-negative": (dict(saliency="adam", adam_steps=-1), "adam_steps: must be a non-negative integer, got -1"),
    "adam-steps-float": (dict(saliency="adam", adam_steps=1.5), "adam_steps: must be a non-negative integer, got 1.5"),
    "adam-steps-taylor": (dict(adam_steps=2), "adam_steps: 2 needs --method nirvana --saliency adam, got"),
    "adam-steps-flap": (dict(method="flap", saliency="adam", adam_steps=2), "needs --method nirvana --saliency"),
    "window-weight-name": (dict(window_weight="l2"), "window_weight: must be one of none, norm, objective, got 'l2'"),
    "window-weight-adam": (dict(window_weight="norm", saliency="adam"), "window_weight: --window-weight norm weighs"),
    "trim-flap": (dict(method="flap", trim=0.1), "window_weight: --trim 0.1 weighs NIRVANA's gradient sum, needs"),
    "trim-range": (dict(trim=0.5), r"trim: must be a number in \[0, 0.5\), got 0.5"),
    "protect-negative": (dict(protect_layers=-2), "protect_layers: must be a non-negative integer, got -2"),
    "normalize-uniform": (dict(normalize="mean", allocation="uniform"), "normalize: 'mean' needs global allocation"),
}


@pytest.mark.parametrize("case", list(CHEAP_CHECKS), ids=list(CHEAP_CHECKS))
def test_check_refuses_before_loading(case, tmp_path, monkeypatch):
    import nirvana.models

    kw, message = CHEAP_CHECKS[case]
    kw = kw(tmp_path) if callable(kw) else kw
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(nirvana.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match=message) as err:
        prune(settings(tmp_path, **kw))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "kw",
    [
        dict(select_calib=64),
        dict(calib="self", num_samples=1024, heldout_samples=1024),
        dict(seed=2**31 - 64, select_calib=64),
        dict(model="org/name"),  # a hub id: resolved by load_model, not refused as a missing path
        dict(calib="austen"),
        dict(calib="some-dataset-id"),
    ],
    ids=["select-calib-64", "self-1024", "last-seeds", "hub-name", "austen", "dataset-id"],
)
def test_check_accepts_the_bounds(kw, tmp_path, monkeypatch):
    import importlib.util

    if kw.get("calib") == "some-dataset-id" and importlib.util.find_spec("datasets") is None:
        with pytest.raises(ValueError, match="needs the datasets package"):
            settings(tmp_path, **kw).check()
        return
    settings(tmp_path, **kw).check()


def test_windows_longer_than_the_model_positions_warn(tmp_path):
    model, tok = tiny_model("llama", **WIDE), tiny_tokenizer()  # max_position_embeddings 128
    with pytest.warns(RuntimeWarning, match=r"seq_len: 130 is longer than the model's max_position_embeddings \(128\)"):
        prune(settings(tmp_path, seq_len=130, num_samples=2, out=None), model=model, tokenizer=tok, progress=False)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(distributed="fsdp", window_weight="norm"), "window_weight: --window-weight norm is not under --distrib"),
        (dict(scores="x", trim=0.1), "window_weight: --trim 0.1 changes scoring, but --scores re-plans saved scores"),
    ],
    ids=["distributed", "scores"],
)
def test_robust_aggregation_is_refused_where_nothing_sums_windows(kw, message):
    # Called on its own: under pytest, --distributed and --scores fail their own checks (no torchrun, no file) first.
    with pytest.raises(ValueError, match=f"^{message}"):
        PruneSettings(**kw)._check_aggregation()


def test_adam_steps_scores_with_adamws_state_after_those_steps(tmp_path):
    """--saliency adam --adam-steps N: the scores of compute_scores given an AdamW stepped N times at lr 0."""
    from nirvana.saliency import scored_blocks
    from nirvana.sources.gradients import adam_state_from_steps

    cfg = settings(tmp_path, saliency="adam", adam_steps=3, out=None)
    tok = tiny_tokenizer()
    result = prune(cfg, model=tiny_model("llama"), tokenizer=tok, progress=False)
    model = tiny_model("llama")
    ids = cfg.calibration_windows(tok, cfg.seed, model, progress=False)
    params = [p for _, block in scored_blocks(get_adapter(model).layers(model)) for p in block]
    opt = adam_state_from_steps(model, ids, params, steps=3, micro_batch_size=cfg.micro_batch_size)
    want = compute_scores(model, ids, saliency="adam", optimizer=opt, micro_batch_size=cfg.micro_batch_size)
    assert torch.equal(result.scores.attention, want.attention) and torch.equal(result.scores.mlp, want.mlp)
    meta = result.scores.meta
    assert (meta["adam_steps"], meta["second_moment"], meta["optimizer_step"]) == (3, "optimizer", 3.0)
    assert result.report["settings"]["adam_steps"] == 3
    # The micro-batch second moment gives other scores: the flag is not ignored.
    plain = compute_scores(model, ids, saliency="adam", micro_batch_size=cfg.micro_batch_size, progress=False)
    assert not torch.equal(plain.mlp, want.mlp)


def test_for_recipe_fills_in_the_paper_and_check_holds_it(tmp_path):
    settings = PruneSettings.for_recipe("paper", sparsity=0.3, gamma=2.0)
    assert {name: getattr(settings, name) for name in RECIPES["paper"]} == RECIPES["paper"]
    assert (settings.gamma, settings.recipe, settings.sparsity) == (2.0, "paper", 0.3)
    assert PruneSettings.for_recipe(None, sparsity=0.3) == PruneSettings(sparsity=0.3)


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda: PruneSettings.for_recipe("paper", normalize="mean"),
            "normalize: --recipe paper fixes it to 'none', got 'mean'",
        ),
        (
            lambda: PruneSettings.for_recipe("paper", select_calib=3),
            "select_calib: --recipe paper fixes it to 1, got 3",
        ),
        (lambda: PruneSettings.for_recipe("paper", draws=4), "draws: --recipe paper fixes it to 1, got 4"),
        (lambda: PruneSettings.for_recipe("mine"), "recipe: must be one of paper, got 'mine'"),
        (
            lambda: PruneSettings(recipe="paper", seq_len=128, draws=1, protect_layers=1).check(),
            "protect_layers: --recipe paper fixes it to 0, got 1",
        ),
        # None is NIRVANA's own 512-token windows, which are not the paper's.
        (lambda: PruneSettings(recipe="paper").check(), "seq_len: --recipe paper fixes it to 128, got 512"),
        (lambda: PruneSettings.for_recipe("paper", gamma="auto").check(), "gamma: --recipe paper takes a number"),
    ],
    ids=[
        "contradicted",
        "contradicted-int",
        "contradicted-draws",
        "unknown",
        "hand-built",
        "hand-built-seq-len",
        "gamma-auto",
    ],  # fmt: skip
)
def test_a_recipe_refuses_what_contradicts_it_in_one_line(build, message):
    with pytest.raises(ValueError) as err:
        build()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_nirvana_prunes_from_512_token_windows_two_a_pass_by_default(tmp_path, monkeypatch):
    """With seq_len and micro_batch_size left to the method, NIRVANA draws 512-token windows (its calibration and
    its held-out KL windows alike) two a pass, and report.json records both as used."""
    from nirvana import calibration

    heldout_lengths = []
    real_heldout = calibration.heldout_windows

    def heldout_windows(*args, **kw):
        heldout_lengths.append(kw["seq_len"])
        return real_heldout(*args, **kw)

    monkeypatch.setattr(calibration, "heldout_windows", heldout_windows)
    calib = write_text(tmp_path / "long.txt", n_words=12000)
    cfg = settings(
        tmp_path, calib=str(calib), seq_len=None, micro_batch_size=None, draws=None, select_calib=2, out=None
    )
    model = tiny_model("llama", max_position_embeddings=1024)
    result = prune(cfg, model=model, tokenizer=tiny_tokenizer(), progress=False)
    s = result.report["settings"]
    assert (s["seq_len"], s["micro_batch_size"], s["draws"]) == (512, 2, 4)
    meta = result.scores.meta
    assert (meta["num_windows"], meta["window_length"], meta["micro_batch_size"]) == (4, 512, 2)
    assert len(result.report["selection"]["trials"]) == 2 and heldout_lengths == [512]
    # Each candidate is the mean of 4 draws, the chosen one's seeds its own: its first, then 2**20 apart.
    first = result.report["selection"]["seed"]
    assert meta["draws"] == 4 and meta["calibration_seeds"] == [first + k * DRAW_SEED_STRIDE for k in range(4)]


@pytest.mark.parametrize(
    ("kw", "draws"),
    [
        (dict(), 4),
        (dict(method="flap"), 1),
        (dict(method="taylor"), 1),
        (dict(draws=2), 2),
        (dict(scores="run/scores.safetensors"), 1),
        (dict(recipe="paper"), 1),
    ],
    ids=["nirvana", "flap", "taylor", "given", "saved-scores", "recipe-paper"],
)
def test_draws_default_to_the_methods_own(kw, draws):
    settings = PruneSettings.for_recipe(kw.pop("recipe", None), **kw)
    assert settings.resolved_draws == draws
    assert [len(group) for group in settings.candidate_seeds()] == [draws]


def test_nearby_seeds_share_no_calibration_draw():
    """Runs a seed apart (how users sweep seeds) draw disjoint sets of windows; candidate set c still starts
    at seed + c, and one draw is the seed itself, as before draws existed."""
    seeds = {}
    for seed in range(8):
        for k in (1, 3):
            groups = PruneSettings(seed=seed, select_calib=k).candidate_seeds()
            assert [g[0] for g in groups] == list(range(seed, seed + k))
            seeds[seed, k] = {d for g in groups for d in g}
    for a in range(8):
        for b in range(a + 1, 8):
            assert not seeds[a, 1] & seeds[b, 1], (a, b)
    assert PruneSettings(seed=5, draws=1).candidate_seeds() == [[5]]
    assert PruneSettings(seed=5, select_calib=2, draws=1).candidate_seeds() == [[5], [6]]
