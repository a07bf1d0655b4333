"""The command line: real runs on a saved tiny model, and one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from nirvana import cli, pruning
from tests.helpers import prune_args
from tests.test_pruning import WIDE, write_text
from tests.tiny_models import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    tiny_model("llama", **WIDE).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def calib(tmp_path):
    return write_text(tmp_path / "calib.txt")


def run(argv, capsys):
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors exit from inside parse_args
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_prune_report_and_eval(tiny_dir, calib, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in tiny_dir.iterdir() if p.is_file()}
    out = tmp_path / "pruned"
    code, text, err = run(prune_args(tiny_dir, calib, out, "--select-calib", "2", "--heldout-samples", "4"), capsys)
    assert code == 0, err
    assert f"saved to {out}" in text and "sparsity: target 0.300" in text
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["select_calib"] == 2 and len(report["selection"]["trials"]) == 2
    # The source checkpoint is never modified.
    assert {p.name: p.read_bytes() for p in tiny_dir.iterdir() if p.is_file()} == before

    code, text, _ = run(["report", out], capsys)
    assert code == 0 and "kv groups per layer:" in text
    achieved = float(text.split("achieved ", 1)[1].split()[0])
    assert abs(achieved - report["sparsity"]["achieved"]) < 1e-4 and abs(achieved - 0.3) <= 0.005
    code, text, _ = run(["report", out, "--json"], capsys)
    assert json.loads(text)["sparsity"]["target"] == 0.3

    code, text, err = run(
        ["eval", out, "--text", calib, "--seq-len", "32", "--max-windows", "3", "--device", "cpu"], capsys
    )
    assert code == 0, err
    ppl = float(text.rsplit(":", 1)[1])
    assert ppl > 1.0 and ppl < 1e4  # finite and not degenerate


def test_finetune_command(tiny_dir, calib, tmp_path, capsys):
    src = tmp_path / "pruned"
    code, _, err = run(prune_args(tiny_dir, calib, src), capsys)
    assert code == 0, err
    out = tmp_path / "tuned"
    transformers.utils.logging.enable_progress_bar()
    code, text, err = run(
        [
            "finetune",
            src,
            "--text",
            calib,
            "--steps",
            "3",
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--full",
            "--device",
            "cpu",
            "--quiet",
            "--out",
            out,
        ],
        capsys,
    )
    assert code == 0, err
    # prune --quiet turned transformers' bars off for the whole process; finetune --quiet must not rely on it.
    assert "Loading weights" not in err and "Writing model shards" not in err, err
    assert json.loads(text)["steps"] == 3
    assert "finetune" in json.loads((out / "report.json").read_text())
    code, _, err = run(["finetune", src, "--text", calib, "--steps", "0", "--out", tmp_path / "t2"], capsys)
    assert code == 2 and err.count("\n") == 1 and "steps" in err


def test_existing_output_needs_overwrite(tiny_dir, calib, tmp_path, capsys):
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(prune_args(tiny_dir, calib, out), capsys)
    assert code == 2 and err.count("\n") == 1 and "already exists; pass --overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only a folder nirvana wrote; this one is the user's.
    code, _, err = run(prune_args(tiny_dir, calib, out, "--overwrite"), capsys)
    assert code == 2 and err.count("\n") == 1 and "was not written by nirvana" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (out / "keep.txt").unlink()
    out.rmdir()
    code, _, err = run(prune_args(tiny_dir, calib, out), capsys)
    assert code == 0, err
    (out / "keep.txt").write_text("mine")
    code, _, err = run(prune_args(tiny_dir, calib, out, "--overwrite"), capsys)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "plan.json").is_file()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=128, n_positions=64)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


BAD = [
    ("sparsity-high", ["--sparsity", "1.0"], "sparsity: must be in [0, 1), got 1.0"),
    ("sparsity-negative", ["--sparsity", "-0.2"], "sparsity: must be in [0, 1), got -0.2"),
    ("gamma-zero", ["--gamma", "0"], "gamma: must be > 0, got 0.0"),
    ("gamma-text", ["--gamma", "lots"], "argument --gamma: must be a number or 'auto'"),
    ("method", ["--method", "sparsegpt"], "argument --method: invalid choice: 'sparsegpt'"),
    ("missing-model", ["MODEL=/no/such/folder"], "model: '/no/such/folder' does not exist"),
    ("short-text", ["CALIB=short"], "has 11 tokens"),
    ("unknown-arch", ["MODEL=gpt2"], "architecture: 'GPT2LMHeadModel' is not supported"),
    ("protect-all", ["--protect-layers", "3"], "protect_layers: 3 protects every layer of this model (3 layers)"),
    ("protect-negative", ["--protect-layers", "-1"], "protect_layers: must be a non-negative integer, got -1"),
    ("floor-too-high", ["--min-kv-groups", "9"], "min_kv_groups: 9 is more than the model's 8 KV groups per layer"),
    ("normalize-name", ["--normalize", "zscore"], "argument --normalize: invalid choice: 'zscore'"),
    ("recipe-contradicted", ["--recipe", "paper"], "num_samples: --recipe paper fixes it to 32, got 4"),
    ("recipe-name", ["--recipe", "mine"], "argument --recipe: invalid choice: 'mine'"),
    ("trim-half", ["--trim", "0.5"], "trim: must be a number in [0, 0.5), got 0.5"),
    (
        "window-weight-adam",
        ["--window-weight", "norm", "--saliency", "adam"],
        "window_weight: --window-weight norm weighs NIRVANA's gradient sum, needs --method nirvana --saliency taylor",
    ),
    (
        "normalize-uniform",
        ["--normalize", "mean", "--allocation", "uniform"],
        "normalize: 'mean' needs global allocation (it cannot change a per-layer order), got --allocation uniform",
    ),
]


@pytest.mark.parametrize("case,change,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_exit_2(case, change, message, tiny_dir, gpt2_dir, calib, tmp_path, capsys):
    model, text, extra = tiny_dir, calib, []
    for item in change:
        if item == "MODEL=gpt2":
            model = gpt2_dir
        elif item.startswith("MODEL="):
            model = item.split("=", 1)[1]
        elif item == "CALIB=short":
            text = tmp_path / "short.txt"
            text.write_text("hello world")
        else:
            extra.append(item)
    argv = prune_args(model, text, tmp_path / "out")
    if extra:
        i = argv.index(extra[0]) if extra[0] in argv else None
        if i is not None:
            argv[i + 1] = extra[1]
        else:
            argv += extra
    code, out, err = run(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("nirvana: error: "), err
    assert message in err, err
    assert not (tmp_path / "out").exists()


def test_prune_with_allocation_rules(tiny_dir, calib, tmp_path, capsys):
    out = tmp_path / "ruled"
    rules = ["--protect-layers", "1", "--min-kv-groups", "2", "--normalize", "median"]
    code, _, err = run(prune_args(tiny_dir, calib, out, *rules), capsys)
    assert code == 0, err
    plan = json.loads((out / "plan.json").read_text())
    assert {k: plan["meta"][k] for k in ("protect_layers", "min_kv_groups", "normalize")} == {
        "protect_layers": 1, "min_kv_groups": 2, "normalize": "median",
    }  # fmt: skip
    first = plan["layers"][0]
    assert len(first["kv_groups_kept"]) == 8 and len(first["mlp_channels_kept"]) == 64
    assert all(len(layer["kv_groups_kept"]) >= 2 for layer in plan["layers"])
    report = json.loads((out / "report.json").read_text())
    assert (report["settings"]["protect_layers"], report["settings"]["normalize"]) == (1, "median")
    assert abs(report["sparsity"]["achieved"] - 0.3) <= 0.02
    # Re-planned from the saved scores with the same rules: the same plan, no backward pass.
    again = tmp_path / "again"
    code, _, err = run(prune_args(tiny_dir, calib, again, *rules, "--scores", out), capsys)
    assert code == 0, err
    assert json.loads((again / "plan.json").read_text())["layers"] == plan["layers"]


@pytest.mark.parametrize("flags", [["--window-weight", "norm"], ["--trim", "0.25"]], ids=["norm", "trim"])
def test_prune_with_robust_aggregation(flags, tiny_dir, calib, tmp_path, capsys):
    out = tmp_path / "robust"
    code, _, err = run(prune_args(tiny_dir, calib, out, *flags), capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert (report["settings"]["window_weight"], report["settings"]["trim"]) == (
        ("norm", 0.0) if flags[0] == "--window-weight" else ("none", 0.25)
    )
    from nirvana.scores import load_scores

    meta = load_scores(out).meta
    assert meta["micro_batch_size"] == 1 and meta["micro_batches"] == (4 if flags[0] == "--window-weight" else 4 + 3)


def test_eval_of_a_missing_text_is_one_line(tiny_dir, capsys):
    code, _, err = run(["eval", tiny_dir, "--text", "/no/such.txt"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--text: '/no/such.txt' is not a file" in err


def test_eval_needs_something_to_measure(tiny_dir, capsys):
    code, _, err = run(["eval", tiny_dir], capsys)
    assert code == 2 and err.count("\n") == 1 and "eval: give --text FILE" in err


def test_eval_tasks_without_lm_eval_is_one_line(tiny_dir, capsys):
    try:
        import lm_eval  # noqa: F401

        pytest.skip("lm-eval is installed here; this test checks the message when it is missing")
    except ImportError:
        pass
    code, _, err = run(["eval", tiny_dir, "--tasks", "hellaswag", "--device", "cpu"], capsys)
    assert code == 2 and "pip install lm-eval" in err.splitlines()[-1]


def test_console_entry_point_prints_no_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NIRVANA_DEBUG"}
    proc = subprocess.run(
        [sys.executable, "-m", "nirvana.cli", "prune", "/no/such/model", "--sparsity", "0.2", "--out", tmp_path / "o"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["nirvana: error: model: '/no/such/model' does not exist"]
    assert "Traceback" not in proc.stderr


def test_warnings_are_one_line_each(tiny_dir, calib, tmp_path, capsys):
    argv = prune_args(tiny_dir, calib, tmp_path / "out")
    argv[argv.index("--seq-len") + 1] = "130"  # the tiny model has 128 positions
    argv[argv.index("--round-to") + 1] = "32"  # 64-channel MLPs in 32-channel blocks miss 0.3 by 2 points
    code, out, err = run(argv, capsys)
    assert code == 0, err
    warned = [line for line in err.splitlines() if line.startswith("nirvana: warning: ")]
    assert len(warned) == 2, err
    assert "seq_len: 130 is longer than the model's max_position_embeddings (128)" in warned[0]
    assert "percentage points from the target 0.3" in warned[1] and "32-channel MLP blocks (round_to)" in warned[1]
    assert "RuntimeWarning" not in err and "warnings.warn" not in err
    assert "method: nirvana (taylor saliency, maxlogit objective)" in out


def test_apply_shows_bytes_written_unless_quiet(tiny_dir, calib, tmp_path, capsys):
    pruned = tmp_path / "pruned"
    assert run(prune_args(tiny_dir, calib, pruned), capsys)[0] == 0
    code, out, err = run(["apply", pruned, "--model", tiny_dir, "--out", tmp_path / "a", "--device", "cpu"], capsys)
    assert code == 0 and "writing: 100%" in err, err
    argv = ["apply", pruned, "--model", tiny_dir, "--out", tmp_path / "b", "--device", "cpu", "--quiet"]
    code, out, err = run(argv, capsys)
    assert code == 0 and err == "" and out.startswith("saved to "), (out, err)


PAPER = {**pruning.RECIPES["paper"], "gamma": pruning.PAPER_GAMMA, "recipe": "paper"}


@pytest.mark.parametrize(
    "extra, expected",
    [
        ([], {name: getattr(pruning.PruneSettings(), name) for name in [*pruning.RECIPES["paper"], "gamma", "recipe"]}),
        (["--recipe", "paper"], PAPER),
        (["--recipe", "paper", "--gamma", "4", "--seed", "3"], {**PAPER, "gamma": 4.0, "seed": 3}),
    ],
    ids=["defaults", "paper", "paper-with-its-free-flags"],
)
def test_flags_left_out_come_from_the_recipe_or_the_defaults(
    extra, expected, tiny_dir, calib, tmp_path, monkeypatch, capsys
):
    seen = []

    def capture(settings, progress=True):
        seen.append(settings)
        raise ValueError("captured")

    monkeypatch.setattr(pruning, "prune", capture)
    argv = ["prune", tiny_dir, "--sparsity", "0.2", "--calib", calib, "--out", tmp_path / "out", *extra]
    code, _, err = run(argv, capsys)
    assert code == 2 and "captured" in err
    assert {name: getattr(seen[0], name) for name in expected} == expected
