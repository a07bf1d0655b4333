"""Perplexity, KL divergence and the lm-eval hook, against float64 formulas written out here."""

from __future__ import annotations

import math

import pytest
import torch

from nirvana import evaluation
from nirvana.calibration import tokenize
from nirvana.evaluation import kl_divergence, kl_to_model, lm_eval_tasks, perplexity, text_windows, window_logits
from tests.test_calibration import char_tokenizer, random_text
from tests.tiny_models import tiny_model


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model("llama", vocab_size=len(tok))


@pytest.fixture(scope="module")
def text():
    return random_text(1000, seed=7)


def reference_perplexity(model, ids: torch.Tensor, seq_len: int, windows: int) -> float:
    """One window at a time, NLL from float64 log-softmax."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            chunk = ids[w * seq_len : (w + 1) * seq_len][None]
            logp = torch.log_softmax(model(input_ids=chunk).logits[0, :-1].double(), dim=-1)
            nll -= logp.gather(1, chunk[0, 1:, None]).sum().item()
            count += seq_len - 1
    return math.exp(nll / count)


def reference_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """sum_v p log(p/q) per position from float64 probabilities, then the mean over positions."""
    p = torch.softmax(p_logits.double(), -1).reshape(-1, p_logits.shape[-1])
    q = torch.softmax(q_logits.double(), -1).reshape(-1, q_logits.shape[-1])
    return (p * (p.log() - q.log())).sum(-1).mean().item()


# ---------------------------------------------------------------- perplexity


@pytest.mark.parametrize(
    ("seq_len", "max_windows", "batch_size"),
    [(100, None, 1), (100, None, 3), (64, 5, 2), (999, None, 1), (1000, 1, 4)],
    ids=["all-bs1", "all-bs3", "first-5", "one-long", "whole-text"],
)
def test_perplexity_matches_float64_reference(model, tok, text, seq_len, max_windows, batch_size):
    ids = tokenize(text, tok)
    windows = min(len(ids) // seq_len, max_windows or 10**9)
    got = perplexity(model, tok, text, seq_len=seq_len, max_windows=max_windows, batch_size=batch_size, progress=False)
    assert got == pytest.approx(reference_perplexity(model, ids, seq_len, windows), rel=1e-5)


def test_uniform_model_has_perplexity_equal_to_vocab_size(tok, text):
    model = tiny_model("llama", vocab_size=len(tok))
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: each of the V tokens has probability 1/V
    assert perplexity(model, tok, text, seq_len=50, progress=False) == pytest.approx(len(tok), rel=1e-6)


def test_text_windows_drop_the_remainder():
    ids = torch.arange(10)
    assert torch.equal(text_windows(ids, 3), torch.arange(9).view(3, 3))
    assert torch.equal(text_windows(ids, 3, max_windows=2), torch.arange(6).view(2, 3))
    assert text_windows(ids, 11).shape == (0, 11)


@pytest.mark.parametrize(
    ("kw", "name"),
    [({"seq_len": 1}, "seq_len"), ({"batch_size": 0}, "batch_size"), ({"max_windows": 0}, "max_windows")],
    ids=["seq_len", "batch_size", "max_windows"],
)
def test_perplexity_bad_arguments(model, tok, text, kw, name):
    with pytest.raises(ValueError, match=name):
        perplexity(model, tok, text, progress=False, **kw)


def test_perplexity_of_too_short_text_says_how_many_tokens(model, tok):
    with pytest.raises(ValueError, match="has 20 tokens; one window needs seq_len=512"):
        perplexity(model, tok, "x" * 20, progress=False)


def test_evaluation_restores_training_mode(tok, text):
    model = tiny_model("llama", vocab_size=len(tok)).train()
    perplexity(model, tok, text, seq_len=100, max_windows=1, progress=False)
    window_logits(model, tokenize(text, tok)[:20].view(2, 10))
    assert model.training


# ---------------------------------------------------------------- KL


def test_kl_of_identical_logits_is_zero():
    logits = torch.randn(3, 7, 50, generator=torch.Generator().manual_seed(0))
    assert kl_divergence(logits, logits.clone()) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("shape", [(5,), (4, 11), (2, 3, 17)], ids=["one-row", "2d", "3d"])
def test_kl_matches_float64_formula(dtype, shape):
    g = torch.Generator().manual_seed(1)
    p = (3 * torch.randn(shape, generator=g)).to(dtype)
    q = (p.float() + 0.5 * torch.randn(shape, generator=g)).to(dtype)
    expected = reference_kl(p, q)
    got = kl_divergence(p, q)
    assert expected > 0
    assert got == pytest.approx(expected, rel=1e-12 if dtype == torch.float64 else 1e-4)


def test_kl_known_two_token_case():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 log 2 + 1/2 log(2/3).
    p = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    q = torch.log(torch.tensor([[0.25, 0.75]], dtype=torch.float64))
    assert kl_divergence(p, q) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-14)
    assert kl_divergence(q, p) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-14)


def test_kl_with_impossible_tokens():
    # Dense gives a token probability 0: its term is 0, not NaN. Pruned giving 0 where dense does not: infinite.
    dense = torch.tensor([[0.0, 1.0, -math.inf]])
    pruned = torch.tensor([[1.0, 0.0, -math.inf]])
    p, q = torch.softmax(dense.double(), -1)[0, :2], torch.softmax(pruned.double(), -1)[0, :2]
    assert kl_divergence(dense, pruned) == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-6)
    assert kl_divergence(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, -math.inf]])) == math.inf


def test_kl_in_chunks_equals_kl_at_once(monkeypatch):
    g = torch.Generator().manual_seed(2)
    p, q = torch.randn(6, 9, 40, generator=g), torch.randn(6, 9, 40, generator=g)
    whole = kl_divergence(p, q)
    monkeypatch.setattr(evaluation, "_KL_CHUNK_ELEMENTS", 7 * 40)  # 7 rows per chunk: 8 chunks, the last partial
    assert kl_divergence(p, q) == pytest.approx(whole, rel=1e-6)
    assert whole == pytest.approx(reference_kl(p, q), rel=1e-5)


@pytest.mark.parametrize(
    ("dense", "pruned", "name"),
    [
        (torch.zeros(2, 5), torch.zeros(2, 6), "pruned_logits"),
        (torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5), "dense_logits"),
        (torch.zeros(0, 5), torch.zeros(0, 5), "dense_logits"),
        ([0.0, 1.0], torch.zeros(2), "dense_logits"),
    ],
    ids=["shape", "int", "empty", "list"],
)
def test_kl_bad_inputs_name_the_argument(dense, pruned, name):
    with pytest.raises(ValueError, match=name):
        kl_divergence(dense, pruned)


def test_window_logits_and_kl_to_model(model, tok, text):
    windows = tokenize(text, tok)[:60].view(6, 10)
    logits = window_logits(model, windows, batch_size=4)
    with torch.no_grad():
        assert torch.equal(logits, model(input_ids=windows).logits)
    assert window_logits(model, windows, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert kl_to_model(logits, model, windows, batch_size=4) == 0.0
    other = tiny_model("llama", seed=1, vocab_size=len(tok))
    with torch.no_grad():
        other_logits = other(input_ids=windows).logits
    got = kl_to_model(logits, other, windows, batch_size=4)
    assert got == pytest.approx(reference_kl(logits, other_logits), rel=1e-5)
    assert got == pytest.approx(kl_divergence(logits, other_logits), rel=1e-6)


def test_kl_to_model_checks_shapes(model, tok, text):
    windows = tokenize(text, tok)[:60].view(6, 10)
    with pytest.raises(ValueError, match="dense_logits"):
        kl_to_model(torch.zeros(5, 10, len(tok)), model, windows)
    with pytest.raises(ValueError, match="windows"):
        kl_to_model(torch.zeros(6, 10, len(tok)), model, windows.float())


# ---------------------------------------------------------------- lm-eval


def test_lm_eval_missing_package_says_how_to_install(model, tok):
    try:
        import lm_eval  # noqa: F401

        pytest.skip("lm-eval is installed here, so its absence cannot be observed")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="pip install lm-eval"):
        lm_eval_tasks(model, tok, ["hellaswag"])


@pytest.mark.parametrize("tasks", [[], "hellaswag", [""], [3]], ids=["empty", "str", "blank", "int"])
def test_lm_eval_bad_tasks(model, tok, tasks):
    with pytest.raises(ValueError, match="tasks"):
        lm_eval_tasks(model, tok, tasks)


# ---------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_perplexity_on_persuasion_is_sane():
    from nirvana.corpus import HELDOUT_BOOK, read_book
    from nirvana.models import load_model

    model, tokenizer = load_model("smollm2")
    # Two windows of 256 tokens keep this to seconds on 2 CPU cores; 24 x 512 (the reported figure) gives 37.4.
    ppl = perplexity(model, tokenizer, read_book(HELDOUT_BOOK), seq_len=256, max_windows=2, progress=False)
    assert math.isfinite(ppl) and 10 < ppl < 100, ppl
