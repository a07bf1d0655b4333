"""nirvana.objective: the max-logit and cross-entropy objectives against the model's own forward."""

from __future__ import annotations

import pytest
import torch

import nirvana.objective as objective_module
from nirvana.objective import objective_value
from nirvana.sources.gradients import accumulate_gradients

from .helpers import assert_close
from .references import N_WINDOWS, SEQ, flat_params, windows
from .tiny_models import ARCHITECTURES, tiny_model


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=ARCHITECTURES)
def test_maxlogit_objective_matches_hand_formula(arch):
    model = tiny_model(arch)
    ids = windows()
    with torch.no_grad():
        logits = model(ids).logits.double()
    expected = logits.amax(dim=1).mean()  # max over positions, then mean over (sample, vocab)
    got = objective_value(model, ids, "maxlogit")
    assert got.dtype == torch.float32 and got.dim() == 0
    assert_close(got, expected, rtol=1e-6, name=f"{arch} maxlogit")
    sums = accumulate_gradients(model, ids, flat_params(model), micro_batch_size=2)
    assert_close(torch.tensor(sums.objective), expected, rtol=1e-6, name="summed micro-batch objectives")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"], ids=["llama", "qwen2", "gemma2"])
def test_ce_objective_matches_transformers_loss(arch):
    model = tiny_model(arch)
    ids = windows()
    with torch.no_grad():
        expected = model(ids, labels=ids).loss  # transformers' own shifted next-token loss
    assert_close(objective_value(model, ids, "ce"), expected, rtol=1e-6, name=f"{arch} ce")


def test_vocab_chunking_changes_nothing(monkeypatch):
    model = tiny_model("gemma2")  # with the final logit soft-cap, applied after the max over positions
    ids = windows()
    params = flat_params(model)
    whole = accumulate_gradients(model, ids, params, micro_batch_size=5)
    # 24 logits per slice: the 128-token vocabulary is projected in 5-row slices.
    monkeypatch.setattr(objective_module, "LOGIT_CHUNK_ELEMS", 5 * N_WINDOWS * SEQ)
    chunked = accumulate_gradients(model, ids, params, micro_batch_size=5)
    assert_close(torch.tensor(chunked.objective), torch.tensor(whole.objective), rtol=1e-6, name="objective")
    for i, (c, w) in enumerate(zip(chunked.grads, whole.grads)):
        assert_close(c, w, rtol=1e-5, atol=1e-6 * w.abs().max().item(), name=f"grad {i}")
