"""Plain tests of the benchmarks' own logic: byte counts, comparisons and gpu_check's verdicts.

They take no ``benchmark`` fixture, so ``--benchmark-only`` skips them; run them with
``python -m pytest -q benchmarks/test_bench_logic.py``.
"""

import contextlib
import statistics

import gpu_check
import measure
import pytest
import shapes
import torch

BF16 = 2


def hand_count(op: str, m: shapes.Model, kept_columns: list[int] | None = None) -> int:
    """The bytes each op must move at bf16, counted from the layer geometry (and, for a column gather, which
    columns it keeps: it reads every 32-byte sector of a row that one of them touches, 16 bf16 per sector)."""
    h, i, d, kv = m.hidden, m.intermediate, m.head_dim, m.num_kv_heads
    sectors = len({c // 16 for c in kept_columns}) if kept_columns is not None else 0
    attn = 2 * m.q_rows * h + 2 * m.kv_rows * h + (m.q_rows + 2 * m.kv_rows if m.qkv_bias else 0)
    return {
        "attention_group_saliency": 2 * BF16 * attn + 4 * kv,
        "attention_group_saliency_adam": 3 * BF16 * attn + 4 * kv,
        "mlp_channel_saliency": 3 * 2 * BF16 * i * h + 4 * i,
        "saliency_dim0": 2 * BF16 * i * h + 4 * i,
        "saliency_dim1": 2 * BF16 * i * h + 4 * i,
        "compact_rows": 2 * BF16 * (i // 2) * h,
        "compact_cols": h * (32 * sectors + BF16 * (i // 2)),
        "compact_groups_k_rows": 2 * BF16 * (kv // 2) * d * h,
        "compact_groups_o_cols": 2 * BF16 * (kv // 2) * m.group_columns * h,
        "compact_many": 2 * 2 * BF16 * (i // 2) * h,
    }[op]


@pytest.mark.parametrize("model", [m.name for m in shapes.CPU_MODELS], ids=[m.name for m in shapes.CPU_MODELS])
@pytest.mark.parametrize("op", shapes.ops(), ids=shapes.ops())
def test_bytes_moved_matches_hand_count(op, model):
    w = shapes.workload(op, model, "cpu")
    kept = w.args[1].tolist() if op == "compact_cols" else None
    assert w.bytes_moved == hand_count(op, shapes.MODELS[model], kept)
    ok, detail = measure.check_output(w.run_reference(), w.out_shapes, w.out_dtype)
    assert ok, detail


def test_real_shapes_byte_count():
    # Llama-3.1-70B attention: q and o are 8192x8192, k and v 1024x8192; weight and grad in bf16.
    assert hand_count("attention_group_saliency", shapes.LLAMA_70B) == 2 * 2 * (2 * 8192 * 8192 + 2 * 1024 * 8192) + 32
    assert shapes.compaction_bytes([(14336, 8192)], torch.bfloat16) == 2 * 2 * 14336 * 8192


def test_workload_rejects_unknown_names():
    with pytest.raises(ValueError, match="op: unknown op 'nope'"):
        shapes.workload("nope", "cpu-llama", "cpu")
    with pytest.raises(ValueError, match="model: unknown model 'gpt'"):
        shapes.workload("compact_rows", "gpt", "cpu")
    with pytest.raises(ValueError, match="family"):
        shapes.ops("other")


def test_workloads_are_seeded():
    a, b = shapes.workload("compact_rows", "cpu-llama", "cpu"), shapes.workload("compact_rows", "cpu-llama", "cpu")
    assert torch.equal(a.args[0], b.args[0]) and torch.equal(a.args[1], b.args[1])
    index = a.args[1]
    assert index.numel() == 704 and bool((index[1:] > index[:-1]).all())


@pytest.mark.parametrize(
    ("change", "exact", "ok", "detail"),
    [
        (lambda t: t.clone(), True, True, "bit-exact"),
        (lambda t: torch.where(t == 0, -t, t), True, False, "1 of 6 elements differ"),  # -0.0 vs 0.0
        (lambda t: t * (1 + 3e-5), False, True, "max rel err 3"),
        (lambda t: t * (1 + 3e-3), False, False, "max rel err 3.0e-03 > 1e-04"),
        (lambda t: t * float("nan"), False, False, "nan"),
    ],
    ids=["same", "negative-zero", "within-rtol", "beyond-rtol", "nan"],
)
def test_compare(change, exact, ok, detail):
    t = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]) + (0 if exact else 1)
    got_ok, got_detail = measure.compare(change(t), t, exact=exact)
    assert got_ok == ok
    assert detail in got_detail


def test_copy_bandwidth_is_positive_and_sized():
    bw, nbytes = measure.copy_bandwidth(torch.device("cpu"), 1 << 20, warmup_ms=0, rep_ms=1)
    assert nbytes == 1 << 20 and bw > 0
    with pytest.raises(ValueError, match="nbytes"):
        measure.copy_bandwidth(torch.device("cpu"), 0)


def _row(family=shapes.SALIENCY, triton_ms=1.0, eager_ms=4.0, compile_ms=1.5, ok=True, model="llama-3.1-70b"):
    # 900 MB in 1 ms is 900 GB/s: 90% of a 1000 GB/s copy.
    return gpu_check.Row(
        model=model, op="x", family=family, bytes_moved=900_000_000, triton_ms=triton_ms, eager_ms=eager_ms,
        compile_ms=compile_ms, ok=ok, detail="",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("row", "verdict"),
    [
        (_row(), "PASS"),
        (_row(compile_ms=None), "PASS (vs compile n/a)"),
        (_row(family=shapes.SALIENCY, triton_ms=1.2), "FAIL (75% < 85% BW)"),
        (_row(family=shapes.COMPACTION, triton_ms=1.2), "FAIL (75% < 80% BW)"),
        (_row(eager_ms=2.0, compile_ms=0.5), "FAIL (2x < 3x eager; 0.5x < 1x compile)"),
        (_row(ok=False), "FAIL (no correct kernel result)"),
        (_row(model="llama-3.1-8b"), ""),
    ],
    ids=["pass", "no-compile", "slow-saliency", "slow-compaction", "slow-vs-references", "wrong", "not-a-target"],
)
def test_target_verdict(row, verdict):
    assert gpu_check.target_verdict(row, 1e12, ("llama-3.1-70b",)) == verdict


def test_render_is_one_table():
    rows = [_row(), _row(model="llama-3.1-8b"), gpu_check.Row(model="qwen2.5-72b", op="y", family=shapes.COMPACTION)]
    rows[-1].skipped, rows[-1].detail = True, "time budget"
    text = gpu_check.render(rows, "header", 1e12, gpu_check.Budget(1, 1), ("llama-3.1-70b",))
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows)
    assert len({line.count("|") for line in table}) == 1  # every row has every column
    assert "| 900 | 90% | 4 | 1.5 | 4x | 1.5x | ok () | PASS |" in table[2]
    assert "skipped (time budget)" in table[4]
    assert "Correct: 2/2 checked (1 not reached in the time budget). Targets: 1/1 PASS." in text


def test_parse_args_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    smoke = gpu_check.parse_args(["--smoke"])
    assert (smoke.compile_backend, smoke.warmup_ms, smoke.out) == ("eager", 0.0, tmp_path / "gpu_check.md")
    gpu = gpu_check.parse_args([])
    assert (gpu.compile_backend, gpu.rep_ms) == ("inductor", measure.REP_MS)
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--budget-s", "-1"])


# --------------------------------------------------------------------------------------------------
# quality.py: its evaluation agrees with nirvana.evaluation, and its tables say what the runs hold
# --------------------------------------------------------------------------------------------------


def test_quality_evaluate_matches_the_library(tmp_path):
    import quality

    from nirvana.evaluation import kl_divergence, window_logits
    from tests.tiny_models import tiny_model

    torch.manual_seed(0)
    dense, pruned = tiny_model("llama"), tiny_model("llama")
    windows = torch.randint(0, dense.config.vocab_size, (3, 17))
    dense_logits = window_logits(dense, windows)
    got = quality.evaluate(pruned, windows, dense_logits)
    with torch.no_grad():
        logits = pruned(input_ids=windows).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten())
    torch.testing.assert_close(got["ppl"], nll.exp().item(), rtol=1e-5, atol=0)
    torch.testing.assert_close(got["kl"], kl_divergence(dense_logits, logits), rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    ("values", "text"),
    [([], "-"), ([2.0], "2.00"), ([1.0, 2.0, 6.0], "3.00 ± 2.65"), ([4.0, 4.0], "4.00 ± 0.00")],
    ids=["none", "one", "three", "equal"],
)
def test_quality_mean_std_is_the_sample_std(values, text):
    import quality

    # 1, 2, 6: squared deviations 4 + 1 + 9 = 14 over n - 1 = 2, std sqrt(7) = 2.6458 (half the spread is 2.50).
    assert quality._mean_std(values) == text


@pytest.mark.parametrize("allocation", [None, "global", "uniform"], ids=["own", "global", "uniform"])
def test_quality_allocates_each_method_as_the_cli_does(allocation):
    import quality

    from nirvana.methods import METHODS
    from nirvana.pruning import PruneSettings

    want = {"nirvana": "global", "flap": "global", "taylor": "uniform", "wanda-sp": "uniform"}
    for method in METHODS:
        cli = PruneSettings(method=method, allocation=allocation).resolved_allocation
        assert quality.allocation_of(method, allocation) == cli, method
        assert cli == (allocation or want.get(method, cli)), method
    assert quality.allocation_of("nirvana-uniform", allocation) == (allocation or "uniform")
    assert set(quality.METHODS) - set(METHODS) == set(quality.ROW_FLAGS)
    if allocation == "uniform":  # the published recipe ranks globally: a contradiction, refused in one line
        with pytest.raises(ValueError, match="--recipe paper fixes it to 'global'"):
            quality.allocation_of("nirvana-paper", allocation)
    else:
        assert quality.allocation_of("nirvana-paper", allocation) == "global"


@pytest.mark.parametrize("allocation", [None, "uniform"], ids=["own", "uniform"])
def test_quality_rows_keep_the_layers_the_cli_keeps(allocation):
    """A methods-table row prunes with the rules `nirvana prune` resolves for the model: `nirvana` keeps
    layer 0 whole under global allocation, the published recipe keeps none, and a run's key says so."""
    import quality

    from nirvana.methods import METHODS
    from nirvana.pruning import PruneSettings
    from tests.test_allocation import TINY as geometry

    for method in METHODS:
        cli = PruneSettings(method=method, allocation=allocation).for_geometry(geometry).rules
        assert quality.row_rules(method, geometry, allocation) == cli, method
    protect = 0 if allocation == "uniform" else 1
    assert quality.row_rules("nirvana", geometry, allocation)["protect_layers"] == protect
    assert quality.row_rules("nirvana-uniform", geometry)["protect_layers"] == 0
    assert quality.row_rules("nirvana-paper", geometry)["protect_layers"] == 0
    paper, default = (
        quality.pruned_key(m, 0, 0.2, 3.0, quality.identity(quality.row_rules(m, geometry)))
        for m in ("nirvana-paper", "nirvana")
    )
    assert paper == "nirvana-paper|seed=0|s=0.2|gamma=3.0"
    assert default == "nirvana|seed=0|s=0.2|gamma=3.0|protect_layers=1"


def test_quality_render_lists_every_run():
    import quality

    def run(method, seed, s, ppl, gamma=3.0, allocation="global"):
        return {
            "method": method, "seed": seed, "sparsity": s, "gamma": gamma, "allocation": allocation,
            "achieved_sparsity": s, "params": 100e6 * (1 - s), "ppl_a": ppl, "ppl_b": 2 * ppl, "kl_a": ppl / 100,
        }  # fmt: skip

    runs = {
        "dense": {"method": "dense", "params": 100e6, "ppl_a": 10.0, "ppl_b": 20.0, "achieved_sparsity": 0.0},
        "nirvana|seed=0|s=0.2|gamma=3.0": run("nirvana", 0, 0.2, 30.0),
        "nirvana|seed=1|s=0.2|gamma=3.0": run("nirvana", 1, 0.2, 40.0),
        "nirvana|seed=0|s=0.2|gamma=1.0": run("nirvana", 0, 0.2, 50.0, gamma=1.0),
        "magnitude|seed=0|s=0.2|gamma=3.0": run("magnitude", 0, 0.2, 900.0, allocation="uniform"),
        "select|s=0.2": {"study": "select", "sparsity": 0.2, "seed": 1, "trials": []},
        "gamma-auto|s=0.2": {"study": "gamma-auto", "sparsity": 0.2, "gamma": 1.0, "trials": []},
    }
    results = {"settings": {"model": "m", "heldout_samples": 4, "calib_seq_len": 8}, "runs": runs}
    text = quality.render(results, ["nirvana", "magnitude"], [0.2], ["a", "b"], "cmd")
    # Two seeds, 30 and 40: sample std 10 / sqrt(2) = 7.07 (the tables gave half the spread, 5.00, before).
    assert "| nirvana | global | 2 | 20.00% | 80.00M | 35.00 ± 7.07 | 70.00 ± 14.14 | 0.35 ± 0.07 |" in text
    assert "| magnitude | uniform | 1 | 20.00% | 80.00M | 900.00 | 1800.00 | 9.00 |" in text
    assert "| 20% | 2 | 1 | 40.00 | 35.00 ± 7.07 | 80.00 | 70.00 ± 14.14 |" in text  # the selected seed's run
    assert "| 20% | 1 * | 20.00% | 50.00 | 100.00 | 0.5000 |" in text  # gamma 1, auto's pick


def _method_run(method, seed, s, ppl_a, ppl_b, kl=0.5):
    return {
        "method": method, "seed": seed, "sparsity": s, "gamma": 3.0, "allocation": "global", "achieved_sparsity": s,
        "params": 100e6 * (1 - s), "ppl_a": ppl_a, "ppl_b": ppl_b, "kl_a": kl,
    }  # fmt: skip


def test_quality_methods_table_gives_mean_and_sample_std_over_seeds():
    import quality

    runs = {"dense": {"method": "dense", "params": 100e6, "ppl_a": 10.0, "ppl_b": 20.0, "achieved_sparsity": 0.0}}
    # Five seeds with known moments: a = 10..50 (mean 30, std sqrt(250) = 15.81), b = 1, 2, 3, 4, 10 (mean 4,
    # std sqrt(50 / 4) = 3.54), KL 0.1, 0.1, 0.1, 0.1, 0.6 (mean 0.2, std sqrt(0.2 / 4) = 0.22).
    for seed, (a, b, kl) in enumerate(zip([10, 20, 30, 40, 50], [1, 2, 3, 4, 10], [0.1, 0.1, 0.1, 0.1, 0.6])):
        runs[f"flap|seed={seed}|s=0.5|gamma=3.0"] = _method_run("flap", seed, 0.5, float(a), float(b), kl)
    results = {"settings": {"model": "m"}, "runs": runs}
    text = quality.render(results, ["flap", "taylor"], [0.2, 0.5], ["a", "b"], "cmd")
    assert "| flap | global | 5 | 50.00% | 50.00M | 30.00 ± 15.81 | 4.00 ± 3.54 | 0.20 ± 0.22 |" in text
    assert "sample standard deviation (n - 1)" in text and "half the spread" not in text
    assert "## Sparsity 50%" in text and "## Sparsity 20%" not in text  # no runs at 20%: no empty table


def test_quality_recovery_table_reads_a_seedless_key_as_seed_0():
    import quality

    runs = {
        f"nirvana|seed={seed}|s=0.3|gamma=3.0": _method_run("nirvana", seed, 0.3, a, 2 * a)
        for seed, a in enumerate([100.0, 120.0, 500.0])
    }

    def recovered(ppl, seed=None):
        r = {"method": "nirvana", "sparsity": 0.3, "steps": 5, "params": 70e6, "ppl_a": ppl, "ppl_b": 2 * ppl}
        return r if seed is None else r | {"seed": seed}

    runs["recover|nirvana|s=0.3|steps=5"] = recovered(50.0)  # written before recovery had seeds: no seed
    runs[quality.recover_key("nirvana", 1, 0.3, 5)] = recovered(60.0, seed=1)
    results = {"settings": {"model": "m"}, "runs": runs}
    assert {k: sorted(v) for k, v in quality.recover_runs(results).items()} == {("nirvana", 0.3, 5): [0, 1]}
    lines = quality.recover_table(results, ["nirvana"], ["a", "b"], 3)
    # Seeds 0 and 1 (not seed 2's 500): before 100, 120 -> 110 ± 14.14; after 50, 60 -> 55 ± 7.07.
    want = "| 2 of 3 (partial) | 70.00M | 110.00 ± 14.14 | 55.00 ± 7.07 | 220.00 ± 28.28 | 110.00 ± 14.14 |"
    assert "| nirvana | 30% | 5 " + want in lines
    # A seed-0 key beside the seedless one: one seed 0, the keyed one.
    runs[quality.recover_key("nirvana", 0, 0.3, 5)] = recovered(40.0, seed=0)
    runs[quality.recover_key("nirvana", 2, 0.3, 5)] = recovered(70.0, seed=2)
    lines = quality.recover_table(results, ["nirvana"], ["a", "b"], 3)
    row = next(line for line in lines if line.startswith("| nirvana |"))
    assert "| 3 | 70.00M | 240.00 ± 225.39 | 56.67 ± 15.28 |" in row, row  # before: 100, 120, 500


def test_quality_selection_table_uses_the_selection_among_the_most_seeds():
    import quality

    runs = {
        f"nirvana|seed={seed}|s=0.2|gamma=3.0": _method_run("nirvana", seed, 0.2, a, a)
        for seed, a in enumerate([30.0, 40.0, 50.0, 60.0, 100.0])
    }

    def trials(seeds):
        return [{"seed": seed, "gamma": 3.0, "kl": 1.0} for seed in seeds]

    runs["select|s=0.2"] = {"study": "select", "sparsity": 0.2, "seed": 1, "trials": trials([0, 1, 2])}  # older
    runs[quality.select_key(0.2, 5)] = {"study": "select", "sparsity": 0.2, "seed": 3, "trials": trials(range(5))}
    results = {"settings": {"model": "m", "heldout_samples": 4, "calib_seq_len": 8}, "runs": runs}
    assert quality.selections(results)[0.2]["seed"] == 3
    text = quality.render(results, ["nirvana"], [0.2], ["a"], "cmd")
    assert "| 20% | 5 | 3 | 60.00 | 56.00 ± 27.02 |" in text  # random: the five seeds' mean ± std
    del runs[quality.select_key(0.2, 5)]
    text = quality.render(results, ["nirvana"], [0.2], ["a"], "cmd")
    assert "| 20% | 3 | 1 | 40.00 | 40.00 ± 10.00 |" in text  # random over the three seeds it chose among


def _row_identity(method: str, geometry) -> dict:
    """A row's identity as ``nirvana prune`` resolves its settings for ``geometry`` (no ``--calib-seq-len``)."""
    import quality

    settings = quality.row_settings(method).for_geometry(geometry)
    return quality.identity(settings.rules, settings.seq_len, settings.draws)


def test_quality_committed_results_render():
    import json
    from pathlib import Path

    import quality

    path = Path(quality.__file__).with_name("results") / "quality-smollm2.json"
    results = json.loads(path.read_text())
    # Seeds and sparsities are not settings: a run with the new defaults resumes this file.
    assert set(results["settings"]) == {
        "model", "calib", "eval", "windows", "seq_len", "num_samples", "calib_seq_len", "heldout_samples",
    }  # fmt: skip
    texts = results["settings"]["eval"]
    from nirvana.plan import Geometry

    smollm2 = Geometry(num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536)
    results = quality.current_results(results, {m: _row_identity(m, smollm2) for m in quality.METHODS})
    text = quality.render(results, quality.METHODS, [0.2, 0.3, 0.4, 0.5], texts, "cmd", 3)
    runs = [r for k, r in results["runs"].items() if k.startswith("flap|") and r["sparsity"] == 0.2]
    vals = [r["ppl_fortunes"] for r in runs]
    assert len(vals) == 5
    assert f"| {statistics.fmean(vals):.2f} ± {statistics.stdev(vals):.2f} |" in text
    assert "## Sparsity 50%" in text
    # The default's rows and the published recipe's are told apart by their keys and records.
    assert all(r["rules"]["protect_layers"] == 1 for r in quality._runs(results, method="nirvana"))
    assert all(r["rules"]["protect_layers"] == 0 for r in quality._runs(results, method="nirvana-paper"))
    # NIRVANA's rows score 512-token windows and average 4 draws, as `nirvana prune` does; the published
    # recipe's, 128 and one. Without any current NIRVANA row the checks above would hold of nothing.
    assert quality._runs(results, method="nirvana") and quality._runs(results, method="nirvana-paper")
    assert {(r["seq_len"], r["draws"]) for r in quality._runs(results, method="nirvana")} == {(512, 4)}
    paper = quality._runs(results, method="nirvana-paper")
    assert {(r.get("seq_len", 128), r.get("draws", 1)) for r in paper} == {(128, 1)}
    recovery = [line for line in text.splitlines() if line.startswith("| ") and "| 50 |" in line]
    assert [line.split(" | ")[0] for line in recovery] == ["| nirvana", "| taylor", "| flap"]
    assert all(line.split(" | ")[3] == "3" and "partial" not in line for line in recovery), recovery


# README rows of "The defaults, measured" and the variance-study variants they are.
README_VARIANTS = {
    "`--recipe paper` (the published settings)": "paper",
    "**default: layer 0 kept whole, the mean of 4 draws of 32 windows of 512 tokens**": (
        "protect-1+windows-32x512+draws-4"
    ),
    "layer 0 whole, 512-token windows, `--draws 1` (one set)": "protect-1+windows-32x512",
    "layer 0 whole, 512-token windows, `--gamma 6`": "protect-1+gamma-6+windows-32x512",
    "layer 0 whole, 512-token windows, `--draws 4 --gamma 6`": "protect-1+gamma-6+windows-32x512+draws-4",
    "512-token windows, layer 0 not protected": "windows-32x512",
    "layer 0 whole, 128-token windows (the default before)": "protect-1",
    "first 2 layers kept whole": "protect-2",
    "layer 0 whole, `--gamma 6`": "protect-1+gamma-6",
    "layer 0 whole, `--select-calib 3`": "protect-1+select-3",
    "layer 0 whole, `--draws 4`": "protect-1+draws-4",
    "layer 0 whole, `--draws 4 --gamma 6`": "protect-1+gamma-6+draws-4",
    "layer 0 whole, `--draws 8`": "protect-1+draws-8",
    "layer 0 whole, `--draws 8 --gamma 6`": "protect-1+gamma-6+draws-8",
    "layer 0 whole, `--num-samples 64`": "protect-1+windows-64",
    "layer 0 whole, `--num-samples 128`": "protect-1+windows-128",
    "layer 0 whole, `--num-samples 256`": "protect-1+windows-256",
    "layer 0 whole, `--compensate bias`": "protect-1+compensate",
    "layer 0 whole, `--gamma 6 --compensate bias`": "protect-1+gamma-6+compensate",
    "`--select-calib 3`": "select-3",
    "`--select-calib 8`": "select-8",
    "`--draws 8`": "draws-8",
    "`--gamma auto`": "gamma-auto",
    "`--gamma 6`": "gamma-6",
    "`--min-kv-groups 2`": "floor-2",
    "`--num-samples 64`": "windows-64",
    "`--num-samples 128`": "windows-128",
    "`--num-samples 256`": "windows-256",
    "`--window-weight norm`": "wnorm-norm",
    "`--window-weight objective`": "wnorm-objective",
    "`--trim 0.1`": "trim-10",
}


@pytest.mark.parametrize("label", list(README_VARIANTS), ids=list(README_VARIANTS.values()))
def test_quality_readme_defaults_rows_are_the_committed_variance_figures(label):
    import json
    from pathlib import Path

    import quality

    root = Path(quality.__file__).parents[1]
    results = json.loads((root / "benchmarks" / "results" / "quality-smollm2-variance.json").read_text())
    name = README_VARIANTS[label]
    summary = quality.variance_summary(results, [name], [0.2, 0.3, 0.4], ["persuasion", "fortunes"], 5)[0]
    assert summary["complete"], summary
    row = next(line for line in (root / "README.md").read_text().splitlines() if line.startswith(f"| {label} |"))
    cells = row.split(" | ")
    assert cells[4].strip("*") == f"{summary['mean_ppl']:.1f}", row
    for cell, s in zip(cells[1:4], (0.2, 0.3, 0.4)):
        ppl = quality.variance_cells(quality.variance_runs(results, name, s), ["persuasion", "fortunes"])["ppl"]
        want = " / ".join(f"{statistics.fmean(v):.1f} ± {statistics.stdev(v):.1f}" for v in ppl.values())
        assert cell == want, (s, row)


# The README's Results table: its columns (the methods-table rows) and rows (sparsity, text).
README_METHODS = ["nirvana", "nirvana-paper", "taylor", "flap", "wanda-sp", "magnitude", "random"]
README_TEXTS = {"Persuasion": "persuasion", "fortunes": "fortunes"}


def _readme_cell(values: list[float]) -> str:
    """A README Results cell: mean ± sample std, 4 significant digits at most, 1.3e6-style past 1e4."""
    mean = statistics.fmean(values)
    text = f"{mean:.1e}".replace("e+0", "e") if mean >= 1e4 else f"{mean:.0f}" if mean >= 1000 else f"{mean:.1f}"
    if len(values) < 2 or mean >= 1e4:
        return text
    std = statistics.stdev(values)
    return f"{text} ± {std:.0f}" if mean >= 1000 else f"{text} ± {std:.1f}"


@pytest.mark.parametrize("sparsity", [0.2, 0.3, 0.4, 0.5], ids=["20", "30", "40", "50"])
def test_quality_readme_results_table_is_the_committed_methods_figures(sparsity):
    """Each cell of the README's Results table is its row's current runs in quality-smollm2.json (the rules,
    window length and draws ``nirvana prune`` gives that method now), and bold marks the best data-driven
    method."""
    import json
    from pathlib import Path

    import quality

    from nirvana.plan import Geometry

    root = Path(quality.__file__).parents[1]
    results = json.loads((root / "benchmarks" / "results" / "quality-smollm2.json").read_text())
    smollm2 = Geometry(num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536)
    identities = {m: _row_identity(m, smollm2) for m in README_METHODS}
    assert (identities["nirvana"]["seq_len"], identities["nirvana"]["draws"]) == (512, 4)
    assert all((identities[m]["seq_len"], identities[m]["draws"]) == (128, 1) for m in ("nirvana-paper", "flap"))
    current = quality.current_results(results, identities)
    lines = (root / "README.md").read_text().splitlines()
    for label, text in README_TEXTS.items():
        row = next(line for line in lines if line.startswith(f"| {sparsity:.0%}, {label} |"))
        cells = row.strip("| ").split(" | ")[1:]
        values = {
            m: [r[f"ppl_{text}"] for r in quality._runs(current, method=m, sparsity=sparsity, gamma=3.0)]
            for m in README_METHODS
        }
        assert len(values["nirvana"]) == len(values["flap"]) == 5, {m: len(v) for m, v in values.items()}
        best = min(
            (m for m in README_METHODS if m not in ("magnitude", "random")), key=lambda m: statistics.fmean(values[m])
        )
        want = [f"**{_readme_cell(values[m])}**" if m == best else _readme_cell(values[m]) for m in README_METHODS]
        assert cells == want, (label, sparsity)


# --------------------------------------------------------------------------------------------------
# gpu_check reads the static compile check's committed figures (no GPU needed)
# --------------------------------------------------------------------------------------------------


def test_static_prediction_from_the_committed_json():
    rows = gpu_check.load_static()
    assert rows, "benchmarks/results/static-sm90*.json is missing: run `make static`"
    for op in shapes.ops():
        floor_us, gb_per_s = gpu_check.static_prediction(rows, "llama-3.1-70b", op)
        assert floor_us > 0 and 0 < gb_per_s <= 4300.001, op
    # Qwen2's attention is scored with its biases: the prediction sums the call's launches.
    assert gpu_check.static_prediction(rows, "qwen2.5-72b", "attention_group_saliency", qkv_bias=True)
    assert gpu_check.static_prediction(rows, "llama-3.1-70b", "nope") is None
    assert gpu_check.load_static(["/nonexistent.json"]) == []


def test_render_shows_the_static_floor():
    row = _row()
    row.floor_us, row.static_gb_per_s = 200.0, 4000.0
    table = [
        line for line in gpu_check.render([row], "h", 1e12, gpu_check.Budget(1, 1), ()).splitlines() if "|" in line
    ]
    assert table[2].endswith("| 200 | 4000 | 5x |")  # 1 ms measured against a 200 us floor


def test_a_random_half_of_the_columns_reads_nearly_every_sector():
    # Llama-3.1-70B down_proj: 8192 rows of 28672 bf16 columns, half of them kept at random.
    index = torch.randperm(28672, generator=torch.Generator().manual_seed(0))[:14336].sort().values
    floor = shapes.column_gather_bytes(index, 8192, torch.bfloat16)
    every_sector = 8192 * 28672 * BF16
    read = floor - 8192 * 14336 * BF16  # less the output written
    assert 0.99 * every_sector < read <= every_sector, read / every_sector


# --------------------------------------------------------------------------------------------------
# quality.py's variance study on a tiny model: records, resumption, tables, and the --tag refusal
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """A tiny Llama folder, a calibration text and two evaluation texts, and the argv that runs a small study."""
    from tests.test_pruning import WIDE, write_text
    from tests.tiny_models import tiny_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("quality")
    model = root / "tiny"
    torch.manual_seed(0)
    tiny_model("llama", **WIDE).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    # The paper variant draws 32 windows of 128 tokens: the text needs a few thousand tokens.
    write_text(root / "calib.txt", n_words=20000)
    write_text(root / "a.txt", n_words=2000, seed=1)
    write_text(root / "b.txt", n_words=2000, seed=2)
    argv = [
        "--model", str(model), "--calib", str(root / "calib.txt"), "--eval", str(root / "a.txt"), str(root / "b.txt"),
        "--windows", "2", "--seq-len", "16", "--heldout-samples", "4", "--studies", "variance",
        "--variance-seeds", "2", "--sparsities", "0.3", "--tag", "t", "--out", str(root / "out"),
    ]  # fmt: skip
    return root, argv


VARIANCE_RUN = ["paper", "floor-2", "draws-4"]


def test_quality_variance_study_records_resumes_and_tables(tiny_bench, monkeypatch, capsys):
    import json

    import quality

    root, argv = tiny_bench
    assert quality.main([*argv, "--variants", *VARIANCE_RUN]) == 0
    path = root / "out" / "quality-tiny-t.json"
    results = json.loads(path.read_text())
    keys = {quality.variance_key(v, s, 0.3) for v in VARIANCE_RUN for s in (0, 1)}
    assert keys <= set(results["runs"]) and results["variance_seeds"] == 2
    assert not (root / "out" / "quality-tiny.json").exists()  # the tag kept the untagged file alone
    for key in keys:
        r = results["runs"][key]
        assert {"ppl_a", "ppl_b", "kl_a", "scoring_seconds", "pruned_kv", "pruned_mlp_counts"} <= set(r)
        assert sum(r["pruned_mlp_counts"]) == len(quality.pruned_mlp_set(r)) and abs(r["achieved_sparsity"] - 0.3) < 0.1
    draws = results["runs"][quality.variance_key("draws-4", 1, 0.3)]
    assert draws["draw_seeds"] == [1, 3, 5, 7] and draws["draws_scored"] == 4
    floor = results["runs"][quality.variance_key("floor-2", 0, 0.3)]
    assert all(sum(1 for row, _ in floor["pruned_kv"] if row == r) <= 6 for r in range(3))  # 8 groups, keeps >= 2

    # A rerun skips every recorded row: nothing is scored again, and the records are unchanged.
    def no_scoring(*args, **kwargs):
        raise AssertionError("a recorded row was scored again")

    monkeypatch.setattr(quality.Bench, "variant_scores", no_scoring)
    capsys.readouterr()
    assert quality.main([*argv, "--variants", *VARIANCE_RUN]) == 0
    again = json.loads(path.read_text())
    assert {k: again["runs"][k] for k in keys} == {k: results["runs"][k] for k in keys}
    assert "variance|" not in capsys.readouterr().out

    md = (root / "out" / "quality-tiny-t.md").read_text()
    assert (root / "out" / "quality-tiny-t.png").is_file()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    for v in VARIANCE_RUN:
        row = next(line for line in table if line.startswith(f"| {v} | 2 |"))
        paper = [results["runs"][quality.variance_key(v, s, 0.3)]["ppl_a"] for s in (0, 1)]
        assert f"{statistics.fmean(paper):.2f} ± {statistics.stdev(paper):.2f}" in row
    assert "| rank | variant | mean ppl |" in md and "(partial)" not in md
    assert "### Layer 0's KV groups against the rest" in md
    assert all(len(results["runs"][k]["kv_scores"]) == 3 for k in keys)  # [layers, KV groups] of the tiny model


def test_quality_variance_row_of_draws_and_compensation_is_the_clis_prune(tiny_bench, monkeypatch):
    """With one variance seed, a row's draws are seeds 0..K-1: pruned from those draws, the CLI gives the
    row's plan and perplexity, its biases folded from all the draws' windows."""
    import json

    import quality

    from nirvana import calibration
    from nirvana.evaluation import text_windows
    from nirvana.models import load_model
    from nirvana.pruning import PruneSettings, prune

    root, argv = tiny_bench
    name = "protect-1+gamma-6+compensate+draws-4"
    out = root / "cli-draws"
    i = argv.index("--variance-seeds")
    args = [*argv[:i], *argv[i + 2 :], "--variance-seeds", "1", "--out", str(out), "--variants", name]
    assert quality.main(args) == 0
    record = json.loads((out / "quality-tiny-t.json").read_text())["runs"][quality.variance_key(name, 0, 0.3)]
    assert record["draw_seeds"] == [0, 1, 2, 3]

    model, tokenizer = load_model(str(root / "tiny"), device="cpu")
    settings = PruneSettings(
        model=str(root / "tiny"), calib=str(root / "calib.txt"), sparsity=0.3, gamma=6.0, draws=4,
        compensate="bias", protect_layers=1, seq_len=128,
    )  # fmt: skip
    # The CLI's draws now lie 2**20 seeds apart; the variance study keeps its own seeds (seed + k * S), which
    # its committed rows were made with, so the CLI is given them here: the rest of the pruning is compared.
    assert settings.candidate_seeds() == [_four_draws(0)] != [record["draw_seeds"]]
    monkeypatch.setattr(PruneSettings, "candidate_seeds", lambda self: [record["draw_seeds"]])
    result = prune(settings, model=model, tokenizer=tokenizer, progress=False)
    kv = [
        [r, j]
        for r, lp in enumerate(result.plan.layers)
        for j in range(result.plan.geometry.num_kv_heads)
        if j not in lp.kv_groups_kept
    ]
    assert record["pruned_kv"] == kv
    assert record["pruned_mlp_counts"] == [
        result.plan.geometry.intermediate_size - len(lp.mlp_channels_kept) for lp in result.plan.layers
    ]
    windows = text_windows(calibration.tokenize((root / "a.txt").read_text(), tokenizer), 16, 2)
    assert quality.evaluate(result.model, windows)["ppl"] == pytest.approx(record["ppl_a"], rel=1e-9)


def test_quality_variance_marks_partial_rows_and_ranks(tiny_bench):
    import json

    import quality

    root, _ = tiny_bench
    path = root / "out" / "quality-tiny-t.json"
    if not path.is_file():
        pytest.skip("needs test_quality_variance_study_records_resumes_and_tables's results")
    results = json.loads(path.read_text())
    del results["runs"][quality.variance_key("floor-2", 1, 0.3)]
    text = quality.render_variance(results, VARIANCE_RUN, [0.3], ["a", "b"], 2)
    assert "| floor-2 | n=1/2 (partial) |" in text
    assert "| paper | 2 |" in text
    ranked = [line for line in text.splitlines() if line.startswith("| ") and "floor-2" in line][-1]
    assert ranked.endswith("| 1 of 2 (partial) |")
    summary = quality.variance_summary(results, VARIANCE_RUN, [0.3], ["a", "b"], 2)
    assert [r["mean_ppl"] for r in summary] == sorted(r["mean_ppl"] for r in summary)
    paper = next(r for r in summary if r["variant"] == "paper")
    runs = [results["runs"][quality.variance_key("paper", s, 0.3)] for s in (0, 1)]
    cells = [statistics.fmean(r[f"ppl_{t}"] for r in runs) for t in ("a", "b")]
    assert paper["mean_ppl"] == pytest.approx(statistics.fmean(cells))
    assert paper["within"] == (max(statistics.stdev(r[f"ppl_{t}"] for r in runs) for t in ("a", "b")) <= 5)


def test_quality_refuses_a_results_file_of_other_settings(tiny_bench, tmp_path, capsys):
    import json

    import quality

    _, argv = tiny_bench
    out = tmp_path / "out"
    out.mkdir()
    theirs = {"settings": {"model": "other", "windows": 24}, "runs": {"dense": {"ppl_a": 1.0}}}
    untagged = argv[: argv.index("--tag")] + argv[argv.index("--tag") + 2 :]
    for name, args in (("quality-tiny-t.json", argv), ("quality-tiny.json", untagged)):
        path = out / name
        path.write_text(json.dumps(theirs))
        args = [*args, "--out", str(out), "--variants", "paper"]
        assert quality.main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(path) in err and "pass another --tag or delete that file" in err, err
        assert json.loads(path.read_text()) == theirs  # untouched


def test_quality_recovery_over_two_seeds_records_resumes_and_keeps_flap_biases(
    tiny_bench, tmp_path, monkeypatch, quick
):
    import json

    import quality

    import nirvana.finetune
    from nirvana.checkpoint import load_pruned

    _, argv = tiny_bench
    i = argv.index("--studies")
    args = [*argv[:i], *argv[i + 2 :], "--out", str(tmp_path), "--methods", *quality.RECOVER_METHODS]
    args += ["--seeds", "2", "--recover", "2", "--recover-seeds", "2", "--studies"]  # no study but recovery
    args += ["--num-samples", "8"]  # NIRVANA's 4 draws a seed: 8 windows each, not 32, keep this test quick
    real = nirvana.finetune.finetune
    calls = []

    def checked(pruned_dir, text_source, **kw):
        summary = real(pruned_dir, text_source, **kw)
        found = {}
        for name, folder in (("pruned", pruned_dir), ("tuned", kw["out"])):
            layers = load_pruned(folder).model.layers
            o = [layer.self_attn.o_proj.bias for layer in layers]
            down = [layer.mlp.down_proj.bias for layer in layers]
            found[name] = None if o[0] is None else max(b.abs().max().item() for b in o + down)
        calls.append((kw["seed"], found))
        return summary

    monkeypatch.setattr(nirvana.finetune, "finetune", checked)
    assert quality.main(args) == 0
    path = tmp_path / "quality-tiny-t.json"
    runs = json.loads(path.read_text())["runs"]
    # NIRVANA's rows keep layer 0 whole, score 512-token windows and average 4 draws, as `nirvana prune` does
    # by default.
    own = {"nirvana": "|protect_layers=1|seq_len=512|draws=4", "flap": "", "taylor": ""}
    idents = {m: quality.record_identity(runs[f"recover|{m}|seed=0|s=0.3|steps=2{own[m]}"]) for m in own}
    assert idents["nirvana"]["rules"]["protect_layers"] == 1 and idents["flap"]["rules"]["protect_layers"] == 0
    want = {m: (512, 4) if m == "nirvana" else (128, 1) for m in quality.RECOVER_METHODS}
    assert {m: (idents[m]["seq_len"], idents[m]["draws"]) for m in want} == want, idents
    keys = [quality.recover_key(m, seed, 0.3, 2, idents[m]) for seed in (0, 1) for m in quality.RECOVER_METHODS]
    assert [k for k in runs if k.startswith("recover|")] == sorted(keys)
    before = [quality.pruned_key(m, seed, 0.3, 3.0, idents[m]) for seed in (0, 1) for m in quality.RECOVER_METHODS]
    assert all(k in runs for k in before), sorted(runs)
    # Seed-major, fine-tuning seeded like the pruning; FLAP's compensation biases (nonzero: the plan prunes
    # units) are in the saved checkpoint and survive fine-tuning; the tiny Llama's other methods have none.
    assert [seed for seed, _ in calls] == [0, 0, 0, 1, 1, 1]
    for (_, found), method in zip(calls, list(quality.RECOVER_METHODS) * 2):
        if method == "flap":
            assert found["pruned"] > 0 and found["tuned"] > 0, found
        else:
            assert found == {"pruned": None, "tuned": None}, (method, found)

    # A rerun fine-tunes nothing and changes no record; neither does a seedless key (an older run's) for seed 0.
    def refuse(*args, **kwargs):
        raise AssertionError("a recorded recovery ran again")

    monkeypatch.setattr(nirvana.finetune, "finetune", refuse)
    data = json.loads(path.read_text())
    legacy = data["runs"].pop(quality.recover_key("flap", 0, 0.3, 2))  # FLAP: the published rules, no suffix
    data["runs"]["recover|flap|s=0.3|steps=2"] = {k: v for k, v in legacy.items() if k != "seed"}
    path.write_text(json.dumps(data))
    assert quality.main(args) == 0
    again = json.loads(path.read_text())
    assert again["runs"] == data["runs"]
    md = (tmp_path / "quality-tiny-t.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith(("| nirvana | 30% | 2 |", "| flap | 30% | 2 |"))]
    assert len(rows) == 2 and all(line.split(" | ")[3] == "2" for line in rows), rows


def test_quality_select_study_reuses_a_selection_only_among_the_same_seeds_and_rules(
    tiny_bench, tmp_path, monkeypatch, quick
):
    import json

    import quality

    _, argv = tiny_bench
    i = argv.index("--studies")
    default_args = [*argv[:i], *argv[i + 2 :], "--out", str(tmp_path), "--methods", "nirvana"]
    default_args += ["--studies", "methods", "select"]
    default_args += ["--num-samples", "8"]  # NIRVANA's 4 draws a seed: 8 windows each, not 32, keep this test quick
    # 128-token windows for every row, as every run was before NIRVANA's rows had 512 of their own.
    args = [*default_args, "--calib-seq-len", "128"]
    assert quality.main([*args, "--seeds", "2"]) == 0
    path = tmp_path / "quality-tiny-t.json"
    data = json.loads(path.read_text())
    rules = {"protect_layers": 1, "min_kv_groups": 0, "normalize": "none"}  # the default's, as the CLI's
    ident = quality.identity(rules, 128, 4)  # and its 4 draws a candidate
    key = quality.select_key(0.3, 2, ident)
    assert key == "select|s=0.3|seeds=2|protect_layers=1|draws=4" and data["runs"][key]["rules"] == rules
    assert quality.record_identity(data["runs"][key]) == ident
    record = data["runs"].pop(key)
    assert quality.selection_seeds(record) == [0, 1]
    data["runs"]["select|s=0.3"] = record  # as an older run keyed it
    path.write_text(json.dumps(data))
    real = quality.selection.select
    monkeypatch.setattr(quality.selection, "select", lambda *a, **k: pytest.fail("selected again among the same seeds"))
    assert quality.main([*args, "--seeds", "2"]) == 0
    assert json.loads(path.read_text())["runs"] == data["runs"]
    # An older pick without rules was made with the published ones (layer 0 not kept): not the default's.
    del record["rules"]
    path.write_text(json.dumps(data))
    monkeypatch.setattr(quality.selection, "select", real)
    assert quality.main([*args, "--seeds", "2"]) == 0
    runs = json.loads(path.read_text())["runs"]
    assert runs[key]["rules"] == rules and quality.selection_seeds(runs[key]) == [0, 1]
    assert runs["select|s=0.3"] == record  # kept, not read
    assert quality.main([*args, "--seeds", "3"]) == 0  # three seeds: a selection of its own
    runs = json.loads(path.read_text())["runs"]
    assert quality.selection_seeds(runs[quality.select_key(0.3, 3, ident)]) == [0, 1, 2]

    # The same file resumed with each row's own length: the 128-token runs keep their keys, and NIRVANA selects
    # afresh among its 512-token draws (held-out windows as long), recorded under keys of their own.
    assert quality.main([*default_args, "--seeds", "2"]) == 0
    data = json.loads(path.read_text())
    assert data["settings"]["calib_seq_len"] is None
    assert all(data["runs"][k] == v for k, v in runs.items())
    long = quality.identity(rules, 512, 4)
    key = quality.select_key(0.3, 2, long)
    assert key == "select|s=0.3|seeds=2|protect_layers=1|seq_len=512|draws=4" and data["runs"][key]["seq_len"] == 512
    assert data["runs"][quality.pruned_key("nirvana", 1, 0.3, 3.0, long)]["seq_len"] == 512
    md = (tmp_path / "quality-tiny-t.md").read_text()
    assert "(4 windows of 512 tokens, as the calibration windows)" in md


def test_quality_tables_show_only_the_runs_of_each_rows_current_rules():
    import quality

    default = {"protect_layers": 1, "min_kv_groups": 0, "normalize": "none"}
    runs = {
        "dense": {"method": "dense", "params": 100e6, "ppl_a": 10.0, "achieved_sparsity": 0.0},
        "nirvana|seed=0|s=0.2|gamma=3.0": _method_run("nirvana", 0, 0.2, 90.0, 90.0),  # before rules were kept
        "nirvana|seed=0|s=0.2|gamma=3.0|protect_layers=1": _method_run("nirvana", 0, 0.2, 60.0, 60.0)
        | {"rules": default},
        "flap|seed=0|s=0.2|gamma=3.0": _method_run("flap", 0, 0.2, 50.0, 50.0),
        "select|s=0.2|seeds=5": {"study": "select", "sparsity": 0.2, "seed": 3, "trials": []},
        quality.select_key(0.2, 5, quality.identity(default)): {
            "study": "select",
            "sparsity": 0.2,
            "seed": 0,
            "trials": [],
            "rules": default,
        },
        "gamma-auto|s=0.2": {"study": "gamma-auto", "sparsity": 0.2, "gamma": 1.0, "trials": []},
        quality.variance_key("paper", 0, 0.2): {"study": "variance", "variant": "paper", "seed": 0, "sparsity": 0.2},
    }
    identities = {"nirvana": quality.identity(default), "flap": quality.identity()}
    shown = quality.current_results({"settings": {}, "runs": runs}, identities)
    assert sorted(shown["runs"]) == sorted(
        ["dense", "nirvana|seed=0|s=0.2|gamma=3.0|protect_layers=1", "flap|seed=0|s=0.2|gamma=3.0",
         "select|s=0.2|seeds=5|protect_layers=1", "variance|paper|seed=0|s=0.2"]
    )  # fmt: skip
    assert quality.selections(shown)[0.2]["seed"] == 0 and len(runs) == 8  # the file keeps every run
    published = quality.current_results({"settings": {}, "runs": runs}, {"nirvana": quality.identity()})
    assert "nirvana|seed=0|s=0.2|gamma=3.0" in published["runs"] and "gamma-auto|s=0.2" in published["runs"]
    assert quality.selections(published)[0.2]["seed"] == 3


def test_quality_tables_show_only_the_runs_of_each_rows_current_window_length():
    import quality

    default = {"protect_layers": 1, "min_kv_groups": 0, "normalize": "none"}
    short = quality.pruned_key("nirvana", 0, 0.2, 3.0, quality.identity(default))  # before rows had their own length
    long = quality.pruned_key("nirvana", 0, 0.2, 3.0, quality.identity(default, 512))
    assert (short, long) == ("nirvana|seed=0|s=0.2|gamma=3.0|protect_layers=1", f"{short}|seq_len=512")
    runs = {
        short: _method_run("nirvana", 0, 0.2, 60.0, 60.0) | {"rules": default},
        long: _method_run("nirvana", 0, 0.2, 50.0, 50.0) | {"rules": default, "seq_len": 512},
        "flap|seed=0|s=0.2|gamma=3.0": _method_run("flap", 0, 0.2, 50.0, 50.0) | {"seq_len": 128},
    }
    results = {"settings": {}, "runs": runs}
    now = quality.current_results(results, {"nirvana": quality.identity(default, 512), "flap": quality.identity()})
    assert sorted(now["runs"]) == sorted([long, "flap|seed=0|s=0.2|gamma=3.0"])
    before = quality.current_results(results, {"nirvana": quality.identity(default), "flap": quality.identity()})
    assert sorted(before["runs"]) == sorted([short, "flap|seed=0|s=0.2|gamma=3.0"])


@pytest.mark.parametrize(
    ("ident", "suffix"),
    [
        ({}, ""),
        ({"draws": 1}, ""),
        ({"draws": 4}, "|draws=4"),
        ({"rules": {"protect_layers": 0, "min_kv_groups": 0, "normalize": "none"}, "seq_len": 128}, ""),
        ({"seq_len": 512, "draws": 8}, "|seq_len=512|draws=8"),
        (
            {"rules": {"protect_layers": 1, "min_kv_groups": 0, "normalize": "none"}, "seq_len": 512, "draws": 4},
            "|protect_layers=1|seq_len=512|draws=4",
        ),
    ],
    ids=["published", "one-draw", "four-draws", "published-rules-spelt-out", "window-and-draws", "default-row"],
)
def test_quality_keys_name_only_what_differs_from_the_published_identity(ident, suffix):
    import quality

    # Every study's key takes the one suffix: a run of other draws never reads another's record.
    ident = quality.identity(**ident)
    assert quality._suffix(ident) == suffix
    assert quality.pruned_key("nirvana", 2, 0.3, 3.0, ident) == "nirvana|seed=2|s=0.3|gamma=3.0" + suffix
    assert quality.select_key(0.3, 5, ident) == "select|s=0.3|seeds=5" + suffix
    assert quality.gamma_auto_key(0.3, ident) == "gamma-auto|s=0.3" + suffix
    assert quality.recover_key("taylor", 1, 0.3, 50, ident) == "recover|taylor|seed=1|s=0.3|steps=50" + suffix


def test_quality_a_record_without_draws_is_one_draw():
    """Records made before they had ``draws`` scored one draw a candidate: they are the paper row's and the
    older default's, never the 4-draw default's, whose tables then show only its own runs."""
    import quality

    from tests.test_allocation import TINY as geometry

    default = _row_identity("nirvana", geometry)
    assert default == quality.identity({"protect_layers": 1, "min_kv_groups": 0, "normalize": "none"}, 512, 4)
    assert _row_identity("nirvana-paper", geometry) == quality.identity(quality.row_rules("nirvana-paper", geometry))
    one = default | {"draws": 1}
    old = _method_run("nirvana", 0, 0.2, 90.0, 90.0) | {"rules": default["rules"], "seq_len": 512}
    new = _method_run("nirvana", 0, 0.2, 60.0, 60.0) | default
    assert quality.record_identity(old) == one and quality.record_identity(new) == default
    assert quality.same_identity(old, one) and not quality.same_identity(old, default)
    assert quality.same_identity(new, default) and not quality.same_identity(new, one)
    assert quality.record_identity({"method": "flap"}) == quality.identity()  # nothing recorded: the published
    before, now = (quality.pruned_key("nirvana", 0, 0.2, 3.0, i) for i in (one, default))
    assert (before, now) == ("nirvana|seed=0|s=0.2|gamma=3.0|protect_layers=1|seq_len=512", f"{before}|draws=4")
    runs = {before: old, now: new}
    shown = quality.current_results({"settings": {}, "runs": runs}, {"nirvana": default})
    assert [r["ppl_a"] for r in shown["runs"].values()] == [60.0]
    shown = quality.current_results({"settings": {}, "runs": runs}, {"nirvana": one})
    assert [r["ppl_a"] for r in shown["runs"].values()] == [90.0]


def test_quality_variance_units_round_trip_and_jaccard():
    import quality

    from nirvana.allocation import allocate
    from nirvana.plan import Geometry

    g = Geometry(num_layers=3, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=21)
    gen = torch.Generator().manual_seed(0)
    plan = allocate(torch.rand(3, 2, generator=gen), torch.rand(3, 21, generator=gen), g, sparsity=0.4, round_to=1)
    units = quality.pruned_units(plan)
    want = {i * 21 + c for i, lp in enumerate(plan.layers) for c in range(21) if c not in lp.mlp_channels_kept}
    assert quality.pruned_mlp_set(units) == want
    assert units["pruned_mlp_counts"] == [21 - len(lp.mlp_channels_kept) for lp in plan.layers]
    kv = [[i, j] for i, lp in enumerate(plan.layers) for j in (0, 1) if j not in lp.kv_groups_kept]
    assert units["pruned_kv"] == kv
    assert quality.jaccard([{1, 2}, {2, 3}, {1, 2}]) == pytest.approx((1 / 3 + 1 + 1 / 3) / 3)
    assert quality.jaccard([{1}]) is None and quality.jaccard([set(), set()]) == 1.0


def test_quality_variance_draws_of_different_rows_never_share_a_seed():
    import quality

    for name, variant in quality.VARIANTS.items():
        rows = [quality.draw_seeds(variant, s, 5) for s in range(5)]
        flat = [d for row in rows for d in row]
        assert len(flat) == len(set(flat)), name
        assert [row[0] for row in rows] == list(range(5)), name  # the first draw is the paper row's set
        assert len(rows[0]) == max(variant.select, variant.draws), name


def test_quality_variance_row_that_fails_is_skipped_not_fatal(tiny_bench, tmp_path, monkeypatch, capsys):
    import json

    import quality

    _, argv = tiny_bench
    real = quality.Bench.variant_scores

    def failing(self, variant, seed):
        if variant.min_kv_groups:
            raise ValueError("min_kv_groups: broken on purpose")
        return real(self, variant, seed)

    monkeypatch.setattr(quality.Bench, "variant_scores", failing)
    assert quality.main([*argv, "--out", str(tmp_path), "--variants", "floor-2", "paper", "--variance-seeds", "1"]) == 0
    runs = json.loads((tmp_path / "quality-tiny-t.json").read_text())["runs"]
    assert quality.variance_key("paper", 0, 0.3) in runs and quality.variance_key("floor-2", 0, 0.3) not in runs
    err = capsys.readouterr().err
    assert "variance|floor-2|seed=0|s=0.3: failed, not recorded: min_kv_groups: broken on purpose" in err


def test_quality_layer0_table_compares_layer_0_with_the_rest():
    import quality

    def run(seed, s, layer0, pruned):
        kv = [[layer0, layer0]] + [[1.0, 3.0]] * 3 + [[4.0, 4.0]] * 2  # layers 1-3 mean 2, layers 4+ mean 4
        return {"variant": "paper", "seed": seed, "sparsity": s, "kv_scores": kv, "pruned_kv": pruned}

    runs = {
        "variance|paper|seed=0|s=0.2": run(0, 0.2, 0.5, [[0, 1], [3, 0]]),
        "variance|paper|seed=1|s=0.2": run(1, 0.2, 1.5, [[2, 0]]),
        "variance|paper|seed=0|s=0.3": run(0, 0.3, 0.5, [[0, 1]]),
    }
    lines = quality.layer0_table({"runs": runs}, ["paper", "draws-4"], [0.2, 0.3])
    rest = (3 * 2.0 + 2 * 4.0) / 5
    ratios = [0.5 / rest, 1.5 / rest]
    row = f"| paper | 2 | {statistics.fmean(ratios):.3f} ± {statistics.stdev(ratios):.3f} | 0.500 ± 0.000 | 1/2 | 1/1 |"
    assert row in lines
    assert not any(line.startswith("| draws-4") for line in lines)  # no runs: no row


def test_distributed_e2e_smoke_runs_both_flows_and_their_plans_agree(tmp_path):
    # gpu_check.sh's end-to-end case at tiny CPU shapes: the one process and the world-size-1
    # --distributed fsdp run (gloo here, NCCL on the GPU) must prune the same units.
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("distributed_e2e.py")
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(script), "--smoke"], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "distributed_e2e.md").read_text()
    assert "plans identical: yes" in report
    assert "prune --distributed fsdp, world size 1" in report


def test_quality_merge_adds_the_runs_it_lacks_and_refuses_a_clash(tmp_path):
    import json

    import quality

    ours = {"settings": {"windows": 8}, "variance_seeds": 5, "runs": {"dense": {"ppl_a": 1.0, "seconds": 3}}}
    other = tmp_path / "other.json"
    runs = {"dense": {"ppl_a": 1.0, "seconds": 9}, "variance|adam|seed=0|s=0.2": {"ppl_a": 7.0}}
    other.write_text(json.dumps({"settings": {"windows": 8}, "variance_seeds": 5, "runs": runs}))
    assert quality.merge_results(ours, other) == 1
    assert ours["runs"]["variance|adam|seed=0|s=0.2"] == {"ppl_a": 7.0} and ours["runs"]["dense"]["seconds"] == 3
    assert ours["merged_from"] == ["other.json"]

    # Another thread count rounds differently (a relative 1e-5 here): the same run. Another run differs by more.
    other.write_text(json.dumps({"settings": {"windows": 8}, "runs": {"dense": {"ppl_a": 1.00001, "kl_a": 3e-4}}}))
    ours["runs"]["dense"]["kl_a"] = 2.97e-4
    assert quality.merge_results(ours, other) == 0 and ours["runs"]["dense"]["ppl_a"] == 1.0
    for clash in ({"ppl_a": 1.01}, {"ppl_a": 1.0, "kl_a": 0.1}):
        other.write_text(json.dumps({"settings": {"windows": 8}, "runs": {"dense": clash}}))
        with pytest.raises(ValueError, match="other figures for 'dense'"):
            quality.merge_results(ours, other)
    other.write_text(json.dumps({"settings": {"windows": 24}, "runs": {}}))
    with pytest.raises(ValueError, match="has settings"):
        quality.merge_results(ours, other)


# --------------------------------------------------------------------------------------------------
# quality.py's --scores-cache and --first-seed on the tiny model: the methods rows as `nirvana prune` draws them
# --------------------------------------------------------------------------------------------------

CACHE_ROWS = ["nirvana", "taylor", "flap"]


@contextlib.contextmanager
def _quick():
    """What these runs check is the bench's bookkeeping, not the kernels or the figure, so they run as on a
    user's CPU: the kernels' PyTorch references (in Triton's interpreter, which tests/conftest.py turns on, one
    NIRVANA draw of the tiny model takes seconds; tests/kernels holds the kernels to the references), on one
    thread (a second one, spinning on a busy 2-core machine, makes each forward ~10x slower; tests/conftest.py
    does the same when it is loaded), and without the methods figure (seconds to draw)."""
    import quality

    from nirvana_kernels import _dispatch

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(_dispatch, "INTERPRET", False)
        monkeypatch.setattr(quality, "plot", lambda results, methods, sparsities, texts, path: path)
        torch.set_num_threads(1)
        try:
            yield monkeypatch
        finally:
            torch.set_num_threads(threads)


@pytest.fixture
def quick():
    with _quick() as monkeypatch:
        yield monkeypatch


def _four_draws(seed: int) -> list[int]:
    """The draws of `nirvana prune --seed seed` by default: 4, each 2**20 seeds from the last."""
    return [seed, seed + 2**20, seed + 2 * 2**20, seed + 3 * 2**20]


@pytest.fixture(scope="module")
def cached_methods(tiny_bench):
    """A methods study of two seeds that keeps its draws in a scores cache: (its argv but --out, the cache
    folder, the runs it recorded, the cache files' mtimes by name, taken right after it)."""
    import json

    import quality

    root, argv = tiny_bench
    i = argv.index("--studies")
    args = [*argv[:i], *argv[i + 2 :], "--studies", "methods", "--methods", *CACHE_ROWS, "--seeds", "2"]
    # 4 windows of 32 tokens a draw: the tiny model's 12 draws take seconds, not minutes.
    args += ["--num-samples", "4", "--calib-seq-len", "32", "--scores-cache", str(root / "scores-cache")]
    out = root / "cached-first"
    with _quick():
        assert quality.main([*args, "--out", str(out)]) == 0
    runs = json.loads((out / "quality-tiny-t.json").read_text())["runs"]
    files = {f.name: f.stat().st_mtime_ns for f in (root / "scores-cache").iterdir()}
    return args, root / "scores-cache", runs, files


def test_quality_scores_cache_keeps_each_draw_and_a_second_run_reads_them_back(
    cached_methods, tiny_bench, tmp_path, quick
):
    import json

    import quality

    from nirvana.pruning import PruneSettings
    from nirvana.scores import load_scores

    root, _ = tiny_bench
    args, cache, runs, files = cached_methods
    # One file per draw, at the seeds `nirvana prune --seed s` draws; FLAP's draws are not kept (their
    # activation statistics, which its compensation needs, are not in a scores file).
    want = {}
    for seed in (0, 1):
        assert PruneSettings(method="nirvana", seed=seed).candidate_seeds() == [_four_draws(seed)]
        want |= {f"nirvana-4x32-seed{d}.safetensors": ("nirvana", d) for d in _four_draws(seed)}
        want[f"taylor-4x32-seed{seed}.safetensors"] = ("taylor", seed)
    assert set(files) == set(want)
    for name, (method, seed) in want.items():
        meta = load_scores(cache / name).meta
        bench = {"model": str(root / "tiny"), "calib": str(root / "calib.txt"), "method": method, "num_samples": 4,
                 "seq_len": 32, "seed": seed}  # fmt: skip
        assert meta["bench"] == bench and meta["seconds"] > 0, (name, meta)

    # A second run, in a fresh folder, scores nothing the cache holds, writes nothing to it, and records the
    # same figures; FLAP alone is scored again, and comes out the same.
    def no_scoring(*args, **kwargs):
        raise AssertionError("a cached draw was scored again")

    quick.setattr(quality, "compute_scores", no_scoring)
    quick.setattr(quality.baselines, "method_scores", no_scoring)
    out = tmp_path / "again"
    assert quality.main([*args, "--out", str(out)]) == 0
    again = json.loads((out / "quality-tiny-t.json").read_text())["runs"]
    assert {f.name: f.stat().st_mtime_ns for f in cache.iterdir()} == files
    assert set(again) == set(runs) and len(runs) == 1 + 2 * len(CACHE_ROWS)  # dense and every row at both seeds
    for key, record in runs.items():
        figures = {k: v for k, v in record.items() if k not in ("seconds", "scoring_seconds")}
        assert {k: again[key].get(k) for k in figures} == figures, key
        if record.get("method") in ("nirvana", "taylor"):  # the cache's own seconds, not a re-read's
            assert again[key]["scoring_seconds"] == record["scoring_seconds"], key


@pytest.mark.parametrize("setting", ["calib", "model"], ids=["other-calib", "other-model"])
def test_quality_scores_cache_refuses_a_file_of_other_settings(
    cached_methods, tiny_bench, tmp_path, quick, setting, monkeypatch, capsys
):
    import shutil

    import quality

    root, _ = tiny_bench
    args, cache, _, files = cached_methods
    mine = tmp_path / "cache"
    shutil.copytree(cache, mine)
    # Another calibration text, or another model folder (a copy: same name, same label), names its draws as
    # the cached ones: reading those would prune with another text's or model's scores.
    other = {"calib": root / "a.txt", "model": tmp_path / "tiny"}[setting]
    if setting == "model":
        shutil.copytree(root / "tiny", other)
    i = args.index(f"--{setting}")
    argv = [*args[: i + 1], str(other), *args[i + 2 :], "--scores-cache", str(mine), "--out", str(tmp_path / "out")]
    monkeypatch.setattr(quality, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert quality.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("quality.py: error: --scores-cache: ") and err.count("\n") == 1, err
    message = err.strip()
    assert "\n" not in message and f"{mine / 'nirvana-4x32-seed0.safetensors'} was made with " in message
    assert f"'{setting}': {str(root / ('tiny' if setting == 'model' else 'calib.txt'))!r}" in message, message
    assert f"'{setting}': {str(other)!r}" in message, message
    assert {f.name: f.read_bytes() for f in mine.iterdir()} == {n: (cache / n).read_bytes() for n in files}


def test_quality_first_seed_runs_only_the_later_seeds(cached_methods, tmp_path, quick):
    import json

    import quality

    args, _, runs, _ = cached_methods
    out = tmp_path / "later"
    assert quality.main([*args, "--first-seed", "1", "--out", str(out)]) == 0
    later = json.loads((out / "quality-tiny-t.json").read_text())["runs"]
    assert not [k for k in later if "|seed=0|" in k]
    seed1 = sorted(k for k in runs if "|seed=1|" in k)
    assert len(seed1) == len(CACHE_ROWS) and sorted(k for k in later if k != "dense") == seed1
    # The same figures as the whole study's seed 1: a study split over processes merges into that one.
    assert all(later[k]["ppl_a"] == runs[k]["ppl_a"] and later[k]["kl_a"] == runs[k]["kl_a"] for k in seed1)


@pytest.mark.parametrize("first", ["2", "-1"], ids=["past-the-seeds", "negative"])
def test_quality_first_seed_out_of_range_is_a_usage_error(tiny_bench, first, capsys):
    import quality

    _, argv = tiny_bench
    with pytest.raises(SystemExit) as err:
        quality.main([*argv, "--seeds", "2", "--first-seed", first])
    assert err.value.code == 2
    assert f"--first-seed: must be in [0, --seeds), got {first}" in capsys.readouterr().err


def test_quality_nirvana_row_is_the_clis_prune_of_its_four_draws(cached_methods, tiny_bench, tmp_path, quick):
    """The methods table's NIRVANA row at seed s is `nirvana prune --seed s`: its scores are the mean of the
    draws `PruneSettings.candidate_seeds` names, and its plan's perplexity is the CLI's."""
    import quality

    from nirvana import calibration
    from nirvana.evaluation import text_windows
    from nirvana.models import load_model
    from nirvana.pruning import PruneSettings, prune
    from nirvana.scores import mean_scores

    root, _ = tiny_bench
    args, _, runs, _ = cached_methods
    benches = []

    class Kept(quality.Bench):
        def __init__(self, a):
            super().__init__(a)
            benches.append(self)

    quick.setattr(quality, "Bench", Kept)
    assert quality.main([*args, "--out", str(tmp_path), "--studies"]) == 0  # no study: only the Bench
    bench = benches[0]
    settings = PruneSettings(
        model=str(root / "tiny"), calib=str(root / "calib.txt"), sparsity=0.3, seed=1, num_samples=4, seq_len=32
    )
    draws = settings.candidate_seeds()[0]
    assert draws == _four_draws(1) and (bench.draws("nirvana"), bench.draws("taylor")) == (4, 1)
    scores, stats, seconds = bench.scores("nirvana", 1)
    each = [bench.draw_scores("nirvana", d) for d in draws]
    assert not torch.equal(each[0][0].mlp, each[1][0].mlp)  # four draws, not one four times
    mean = mean_scores([sc for sc, _, _ in each])
    assert torch.equal(scores.attention, mean.attention) and torch.equal(scores.mlp, mean.mlp)
    assert stats is None and seconds == pytest.approx(sum(t for _, _, t in each))

    model, tokenizer = load_model(str(root / "tiny"), device="cpu")
    result = prune(settings, model=model, tokenizer=tokenizer, progress=False)
    torch.testing.assert_close(scores.attention, result.scores.attention, rtol=1e-6, atol=0)
    torch.testing.assert_close(scores.mlp, result.scores.mlp, rtol=1e-6, atol=0)
    ident = bench.identity("nirvana")
    key = quality.pruned_key("nirvana", 1, 0.3, 3.0, ident)
    assert key.endswith("|protect_layers=1|seq_len=32|draws=4") and quality.record_identity(runs[key]) == ident
    windows = text_windows(calibration.tokenize((root / "a.txt").read_text(), tokenizer), 16, 2)
    assert quality.evaluate(result.model, windows)["ppl"] == pytest.approx(runs[key]["ppl_a"], rel=1e-9)
