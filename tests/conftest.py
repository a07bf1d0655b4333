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

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CI has none")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped on CPU-only machines)")
    config.addinivalue_line("markers", "slow: loads the real SmolLM2 model (seconds to minutes on CPU)")
