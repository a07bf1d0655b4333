"""Fault suite, output paths: the command line as a user runs it, the source hashed before and after.

Symlinked and nested outputs, --overwrite on a folder nirvana did not write, a parent that cannot
hold the output, concurrent writers, and SIGINT / SIGKILL during a save followed by a clean next run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from nirvana.output import MARKER_FILE, TEMP_INFIX
from tests.conftest import tree_digest
from tests.helpers import one_line_error, prune_args
from tests.test_apply import make_plan
from tests.test_cli import run
from tests.test_pruning import write_text

# Runs the CLI with one change: each save stops just before it publishes, says "ready" and waits
# for the file argv[1] to appear (never, if the test kills it there). The save's temporary folders
# then exist, complete, beside the output.
STALLED_CLI = """
import pathlib, sys, time
import nirvana.output as output
real = output._sync_tree
def stall(folder):
    print("ready", flush=True)
    while not pathlib.Path(sys.argv[1]).exists():
        time.sleep(0.05)
    real(folder)
output._sync_tree = stall
from nirvana.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture
def plan_file(dense_dir, tmp_path) -> Path:
    plan = make_plan(transformers.AutoModelForCausalLM.from_pretrained(dense_dir), "uniform")
    path = tmp_path / "plan.json"
    plan.save(path)
    return path


@pytest.fixture
def calib(tmp_path) -> Path:
    return write_text(tmp_path / "calib.txt")


def apply_args(plan, model, out, *extra):
    return ["apply", plan, "--model", model, "--out", out, "--device", "cpu", *extra]


def finetune_args(src, calib, out, *extra):
    base = ["finetune", src, "--text", calib, "--steps", "1", "--seq-len", "16", "--batch-size", "1"]
    return [*base, "--full", "--device", "cpu", "--quiet", "--out", out, *extra]


COMMANDS = ["prune", "apply", "finetune"]


def command(name, tmp_path, dense_dir, plan_file, calib, out, *extra):
    """The argv of ``name`` writing to ``out``, and the source folder it reads."""
    if name == "prune":
        return prune_args(dense_dir, calib, out, *extra), dense_dir
    if name == "apply":
        return apply_args(plan_file, dense_dir, out, *extra), dense_dir
    from nirvana.apply import apply_plan

    src = dense_dir.parent / "pruned"
    if not src.exists():
        apply_plan(plan_file, dense_dir, src, device="cpu")
    return finetune_args(src, calib, out, *extra), src


@pytest.mark.parametrize("name", COMMANDS)
def test_symlinked_output_that_is_the_source_is_refused(name, tmp_path, dense_dir, plan_file, calib, capsys):
    # The reproduction from the issue: ln -s models linkdir; --out linkdir/<source> --overwrite.
    (tmp_path / "linkdir").symlink_to(tmp_path / "models")
    argv, src = command(name, tmp_path, dense_dir, plan_file, calib, None)
    argv[argv.index("--out") + 1] = tmp_path / "linkdir" / src.name
    before = tree_digest(src)
    line = one_line_error(*run([*argv, "--overwrite"], capsys)[::2])
    assert "would replace the model's source folder" in line and "really" in line
    assert tree_digest(src) == before


@pytest.mark.parametrize("name", COMMANDS)
def test_output_inside_the_source_is_refused(name, tmp_path, dense_dir, plan_file, calib, capsys):
    argv, src = command(name, tmp_path, dense_dir, plan_file, calib, None)
    before = tree_digest(src)
    for out in (src / "pruned", tmp_path / "linkdir" / "sub"):
        (tmp_path / "linkdir").unlink(missing_ok=True)
        (tmp_path / "linkdir").symlink_to(src)
        argv[argv.index("--out") + 1] = out
        line = one_line_error(*run(argv, capsys)[::2])
        assert "lies inside the model's source folder" in line
    assert tree_digest(src) == before


@pytest.mark.parametrize("name", ["prune", "apply"])
def test_overwrite_of_the_working_folder_is_refused(name, tmp_path, dense_dir, plan_file, calib, capsys, monkeypatch):
    work = tmp_path / "work"
    (work / "notes").mkdir(parents=True)
    (work / "thesis.tex").write_text("weeks of work")
    (work / "notes" / "a.txt").write_text("a")
    before, source_before = tree_digest(work), tree_digest(dense_dir)
    monkeypatch.chdir(work)
    argv, _ = command(name, tmp_path, dense_dir, plan_file, calib, ".", "--overwrite")
    line = one_line_error(*run(argv, capsys)[::2])
    assert "was not written by nirvana; refusing to replace it" in line
    assert tree_digest(work) == before and tree_digest(dense_dir) == source_before


def test_overwrite_replaces_a_folder_nirvana_wrote(tmp_path, dense_dir, plan_file, capsys):
    out = tmp_path / "out"
    code, _, err = run(apply_args(plan_file, dense_dir, out), capsys)
    assert code == 0, err
    assert (out / MARKER_FILE).is_file()
    (out / "stale.txt").write_text("from before")
    code, _, err = run(apply_args(plan_file, dense_dir, out, "--overwrite"), capsys)
    assert code == 0, err
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


PARENTS = {
    "parent-is-a-file": (lambda t: t / "a-file" / "out", "is a file, not a folder"),
    "grandparent-is-a-file": (lambda t: t / "a-file" / "sub" / "out", "is a file, not a folder"),
    "proc": (lambda t: Path("/proc/nirvana-out"), "system folder of the kernel"),
    "sys": (lambda t: Path("/sys/nirvana-out"), "system folder of the kernel"),
}


@pytest.mark.parametrize("case", list(PARENTS), ids=list(PARENTS))
@pytest.mark.parametrize("name", COMMANDS)
def test_output_parent_problems_are_found_before_the_model_loads(
    case, name, tmp_path, dense_dir, plan_file, calib, capsys, monkeypatch
):
    make, message = PARENTS[case]
    (tmp_path / "a-file").write_text("x")
    argv, src = command(name, tmp_path, dense_dir, plan_file, calib, make(tmp_path))
    before = tree_digest(src)
    import nirvana.apply
    import nirvana.finetune
    import nirvana.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(nirvana.models, "load_model", refuse)
    monkeypatch.setattr(nirvana.apply, "meta_model", refuse)
    monkeypatch.setattr(nirvana.finetune, "load_pruned", refuse)
    line = one_line_error(*run(argv, capsys)[::2])
    assert message in line
    assert (tmp_path / "a-file").read_text() == "x" and tree_digest(src) == before


# --- Several processes -----------------------------------------------------------------------


def stalled(go: Path, argv) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", STALLED_CLI, str(go), *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return child


def wait_ready(child: subprocess.Popen) -> None:
    line = child.stdout.readline()
    if line.strip() != "ready":
        child.kill()
        raise AssertionError(f"the child never reached the save: {line!r} {child.stderr.read()}")


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TEMP_INFIX in p.name)


def test_two_concurrent_applies_to_one_output_exactly_one_wins(tmp_path, dense_dir, plan_file):
    parent = tmp_path / "outs"
    out, go = parent / "out", tmp_path / "go"
    # --quiet: without it the loser's stderr also holds its finished progress bar above the error line.
    children = [stalled(go, apply_args(plan_file, dense_dir, out, "--quiet")) for _ in range(2)]
    try:
        for child in children:
            wait_ready(child)  # both have written everything and are about to publish
        assert len(temporaries(parent)) == 2 and not out.exists()
        go.touch()
        results = [(child.wait(timeout=120), *child.communicate()) for child in children]
    finally:
        for child in children:
            child.kill()
    assert sorted(code for code, _, _ in results) == [0, 2], results
    (_, _, lost_err) = next(r for r in results if r[0] == 2)
    line = one_line_error(2, lost_err)
    assert "another writer while this run was writing" in line
    assert sorted(p.name for p in parent.iterdir()) == ["out"], "the loser left its temporary folder"
    assert (out / "config.json").is_file() and (out / MARKER_FILE).is_file()


def test_sigint_during_a_save_leaves_nothing(tmp_path, dense_dir, plan_file):
    out = tmp_path / "outs" / "out"
    child = stalled(tmp_path / "never", apply_args(plan_file, dense_dir, out))
    try:
        wait_ready(child)
        child.send_signal(signal.SIGINT)
        code = child.wait(timeout=60)
    finally:
        child.kill()
    err = child.stderr.read()
    assert code == 130 and "nothing half-written" in err, err
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("name", ["apply", "prune"])
def test_sigkill_during_a_save_is_cleaned_up_by_the_next_run(name, tmp_path, dense_dir, plan_file, calib, capsys):
    out = tmp_path / "outs" / "out"
    argv, src = command(name, tmp_path, dense_dir, plan_file, calib, out)
    before = tree_digest(src)
    child = stalled(tmp_path / "never", argv)
    try:
        wait_ready(child)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        child.kill()
    left = temporaries(out.parent)
    # apply leaves its staged folder; prune also the folder its scores and plot were written to.
    assert len(left) == (1 if name == "apply" else 2) and all(n.startswith(f".out{TEMP_INFIX}") for n in left), left
    assert not out.exists()
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"], "the stale temporary folders are still there"
    assert tree_digest(src) == before and os.path.isfile(out / "config.json")


def test_demo_refuses_a_foreign_output_before_it_loads_anything(tmp_path, capsys, monkeypatch):
    """The demo replaces its own earlier output, never a folder nirvana did not write, and says so at once."""
    import nirvana.models

    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "paper.tex").write_text("weeks of work")
    before = tree_digest(foreign)

    def refuse(*args, **kwargs):
        raise AssertionError("the demo loaded its model before checking its output folder")

    monkeypatch.setattr(nirvana.models, "load_model", refuse)
    monkeypatch.setattr(nirvana.models, "default_model_dir", refuse)
    line = one_line_error(*run(["demo", "--out", foreign], capsys)[::2])
    assert "was not written by nirvana; refusing to replace it" in line
    assert tree_digest(foreign) == before
