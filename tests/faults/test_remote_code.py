"""A pruned folder from someone else: nirvana's own load path runs no code from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nirvana.checkpoint import load_pruned, save_pruned
from tests.conftest import tree_digest
from tests.test_checkpoint import logits, pruned_model

# What a hostile folder's modeling file could do on import: here it only leaves a mark.
HOSTILE = """
from pathlib import Path
Path({mark!r}).write_text("ran")
raise SystemExit("modeling_nirvana.py was executed")
"""


@pytest.fixture
def hostile_folder(tmp_path) -> tuple[Path, Path, torch.Tensor]:
    model, plan = pruned_model()
    want = logits(model)
    folder = save_pruned(model, None, plan, tmp_path / "received")
    mark = tmp_path / "mark"
    (folder / "modeling_nirvana.py").write_text(HOSTILE.format(mark=str(mark)))
    return folder, mark, want


def test_load_pruned_runs_no_code_from_the_folder(hostile_folder):
    folder, mark, want = hostile_folder
    before = tree_digest(folder)
    model = load_pruned(folder, attn_implementation="eager")
    assert not mark.exists(), "load_pruned imported the folder's modeling_nirvana.py"
    assert torch.equal(logits(model), want), "the classes nirvana built give other logits than the saved model"
    assert tree_digest(folder) == before, "loading changed the folder"


def test_trust_remote_code_does_run_it(hostile_folder):
    """The README's warning is true: transformers' remote-code path executes the folder's file."""
    import transformers

    folder, mark, _ = hostile_folder
    with pytest.raises(BaseException, match="executed"):
        transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert mark.read_text() == "ran"
