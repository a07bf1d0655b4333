"""Test settings. This file runs before any test module imports the kernels."""

import os

# Triton reads TRITON_INTERPRET when each @triton.jit function is defined, so it must be set before
# nirvana_kernels is imported: CPU tensors then run the real kernels in Triton's interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Every kernel output and scratch buffer starts as NaN, so an element a kernel forgets to write
# cannot pass for a correct one.
os.environ["NIRVANA_POISON_OUTPUTS"] = "1"

import pytest  # noqa: E402  (the environment above must be set first)
import torch  # noqa: E402

# The tiny test models are dominated by per-op overhead, which a second thread only adds to; tests
# on the real model raise this for themselves.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one intra-op thread, and the count it found comes back after it.

    These models are tiny: handing matmuls to a second thread costs more than it saves, and on a busy
    2-core machine the spinning threads make each forward ~50x slower. A test on the real model raises
    the count for itself; restoring it here keeps that from leaking into every later test.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CI has none")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped on CPU-only machines)")
    config.addinivalue_line("markers", "slow: loads the real SmolLM2 model (seconds to minutes on CPU)")


def tree_digest(folder) -> dict[str, str]:
    """Relative path -> sha256 and mode (or the link target, for a symlink) of everything under ``folder``.

    The fault suite takes it before and after each case: a source folder must come out unchanged.
    """
    import hashlib
    from pathlib import Path

    root = Path(folder)
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = f"{hashlib.sha256(path.read_bytes()).hexdigest()} {path.stat().st_mode:o}"
        else:
            out[rel] = "dir"
    return out


@pytest.fixture
def dense_dir(tmp_path):
    """A fresh dense tiny Llama checkpoint folder (safetensors, tokenizer) at ``tmp_path/models/dense``.

    Checked on teardown: whatever a test did with the tool, the source must be byte-identical. A test
    that tampers with a source on purpose copies it first (``shutil.copytree``) and attacks the copy.
    """
    from tests.tiny_models import tiny_model, tiny_tokenizer

    folder = tmp_path / "models" / "dense"
    model = tiny_model(
        "llama", num_hidden_layers=3, num_attention_heads=16, num_key_value_heads=8, intermediate_size=64
    )
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    before = tree_digest(folder)
    yield folder
    assert tree_digest(folder) == before, f"the source folder {folder} changed"
