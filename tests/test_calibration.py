"""Calibration sources and windows: files, folders, JSONL, the Austen default, model-sampled text, held-out split."""

from __future__ import annotations

import json
import random
import string

import pytest
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from nirvana import calibration, corpus
from nirvana.calibration import calibration_windows, heldout_start, heldout_windows, load_text, tokenize
from tests.tiny_models import tiny_model


def char_tokenizer():
    """A character-level fast tokenizer built offline: ~100 ids, so it fits a tiny model's vocabulary."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in sorted(set(string.ascii_letters + string.digits + string.punctuation + " \n")):
        vocab[c] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def random_text(chars: int, seed: int = 0) -> str:
    """Random lowercase words: any 16-character window occurs once, so a window's position can be recovered."""
    rng = random.Random(seed)
    words = []
    length = -1  # of " ".join(words)
    while length < chars:
        words.append("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 8))))
        length += len(words[-1]) + 1
    return " ".join(words)[:chars]


def positions(windows: torch.Tensor, stream: torch.Tensor) -> list[list[int]]:
    """For each window, every start index at which it occurs in the token stream."""
    slides = stream.unfold(0, windows.shape[1], 1)
    return [(slides == w).all(dim=1).nonzero().flatten().tolist() for w in windows]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(random_text(20_000), encoding="utf-8")
    return path


@pytest.fixture
def fake_austen(tmp_path, monkeypatch):
    """Six tiny 'novels', each naming itself, served through $NIRVANA_AUSTEN_DIR."""
    folder = tmp_path / "austen"
    folder.mkdir()
    for i, book in enumerate(corpus.BOOKS):
        (folder / f"{book}.txt").write_text(f"BOOK {book.upper()}\n" + random_text(3000, seed=i) + "\n")
    monkeypatch.setenv(corpus.AUSTEN_ENV, str(folder))
    return folder


# ---------------------------------------------------------------- sources


def test_text_file_is_read_verbatim(text_file):
    assert load_text(text_file) == text_file.read_text(encoding="utf-8")
    assert load_text(str(text_file)) == text_file.read_text(encoding="utf-8")


def test_folder_joins_sorted_txt_files_and_leaves_out_persuasion(tmp_path):
    for name, body in (("b", "second"), ("a", "first"), ("persuasion", "HELD OUT"), ("c", "third")):
        (tmp_path / f"{name}.txt").write_text(body)
    (tmp_path / "notes.md").write_text("not text")
    assert load_text(tmp_path) == "first\n\nsecond\n\nthird"
    assert load_text(tmp_path, exclude=()) == "first\n\nsecond\n\nthird\n\nHELD OUT"
    assert load_text(tmp_path, exclude="b") == "first\n\nthird\n\nHELD OUT"
    assert load_text(tmp_path, exclude=["a", "c", "persuasion"]) == "second"


def test_folder_without_text_files_is_an_error(tmp_path):
    (tmp_path / "persuasion.txt").write_text("held out")
    with pytest.raises(ValueError, match="no .txt files"):
        load_text(tmp_path)


def test_jsonl_joins_the_text_fields(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"text": "one", "id": 1}, {"text": "two\nlines"}, {"text": "three"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_text(path) == "one\n\ntwo\nlines\n\nthree"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"text": "ok"}\n{"txt": "no"}\n', "line 2 has no string field 'text'"),
        ('{"text": "ok"}\nnot json\n', "line 2 is not JSON"),
        ('{"text": 3}\n', "line 1 has no string field 'text'"),
        ("\n\n", "holds no JSON lines"),
    ],
    ids=["missing-field", "bad-json", "non-string", "empty"],
)
def test_bad_jsonl_names_the_line(tmp_path, body, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(body)
    with pytest.raises(ValueError, match=message):
        load_text(path)


@pytest.mark.parametrize("source", ["/no/such/dir/x.txt", "./missing.jsonl", "notes.txt"], ids=["abs", "rel", "bare"])
def test_missing_file_names_it(source):
    with pytest.raises(FileNotFoundError, match=source.replace(".", r"\.")):
        load_text(source)


@pytest.mark.parametrize("source", [None, 3, ""], ids=["none", "int", "empty"])
def test_bad_source_is_a_value_error(source):
    with pytest.raises(ValueError, match="source"):
        load_text(source)


def test_exclude_must_be_names():
    with pytest.raises(ValueError, match="exclude"):
        load_text("austen", exclude=[1, 2])


def test_hub_dataset_without_datasets_package_says_how_to_install(monkeypatch):
    try:
        import datasets  # noqa: F401

        pytest.skip("the datasets package is installed here, so its absence cannot be observed")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="pip install datasets"):
        load_text("wikitext:wikitext-2-raw-v1")


def test_austen_source_is_the_five_calibration_novels(fake_austen):
    text = load_text("austen")
    for book in corpus.CALIBRATION_BOOKS:
        assert f"BOOK {book.upper()}" in text
    assert "PERSUASION" not in text
    assert corpus.HELDOUT_BOOK not in corpus.CALIBRATION_BOOKS and len(corpus.CALIBRATION_BOOKS) == 5
    # Even asked to exclude nothing, "austen" never includes the held-out novel.
    assert "PERSUASION" not in load_text("austen", exclude=())
    assert "BOOK EMMA" not in load_text("austen", exclude=["emma"])
    with pytest.raises(ValueError, match="leaves no Austen novel"):
        load_text("austen", exclude=corpus.CALIBRATION_BOOKS)


# ---------------------------------------------------------------- windows


def test_tokenize_is_cached_and_adds_no_special_tokens(tok):
    text = random_text(500, seed=3)
    ids = tokenize(text, tok)
    assert ids.dtype == torch.long and ids.shape == (500,)
    assert tokenize(text, tok) is ids
    assert tok.decode(ids.tolist()) == text


@pytest.mark.parametrize(("num_samples", "seq_len"), [(32, 128), (5, 16), (1, 1)], ids=["official", "small", "one"])
def test_windows_are_slices_of_the_calibration_part(tok, text_file, num_samples, seq_len):
    windows = calibration_windows(text_file, tok, num_samples=num_samples, seq_len=seq_len, seed=1)
    assert windows.shape == (num_samples, seq_len) and windows.dtype == torch.long
    stream = tokenize(load_text(text_file), tok)
    split = heldout_start(len(stream))
    assert split == len(stream) - len(stream) // 10
    if seq_len >= 16:  # long enough to be unique in random text
        for found in positions(windows, stream):
            assert len(found) == 1 and found[0] + seq_len <= split


def test_same_seed_same_windows_other_seed_other_windows(tok, text_file):
    a = calibration_windows(text_file, tok, num_samples=8, seq_len=32, seed=0)
    assert torch.equal(a, calibration_windows(text_file, tok, num_samples=8, seq_len=32, seed=0))
    b = calibration_windows(text_file, tok, num_samples=8, seq_len=32, seed=1)
    assert not torch.equal(a, b)


def test_heldout_windows_never_touch_a_calibration_token(tok, text_file):
    stream = tokenize(load_text(text_file), tok)
    split = heldout_start(len(stream))
    held = heldout_windows(text_file, tok, num_samples=16, seq_len=64, seed=0)
    starts = [p[0] for p in positions(held, stream)]
    assert all(s >= split and (s - split) % 64 == 0 for s in starts)
    assert len(set(starts)) == 16 and starts == sorted(starts)
    for seed in range(5):
        cal = calibration_windows(text_file, tok, num_samples=32, seq_len=64, seed=seed)
        assert max(p[0] for p in positions(cal, stream)) + 64 <= split
    assert not torch.equal(held, heldout_windows(text_file, tok, num_samples=16, seq_len=64, seed=1))


def test_too_short_text_says_found_and_needed(tok, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text(random_text(1000))
    # 1000 tokens: 900 for calibration, 100 held out.
    assert calibration_windows(path, tok, num_samples=9, seq_len=100).shape == (9, 100)
    with pytest.raises(ValueError, match=r"has 1000 tokens, 900 of them in the calibration part; .* needs 1000"):
        calibration_windows(path, tok, num_samples=10, seq_len=100)
    assert heldout_windows(path, tok, num_samples=2, seq_len=50).shape == (2, 50)
    with pytest.raises(ValueError, match=r"has 1000 tokens, 100 of them in the held-out part; .* needs 120"):
        heldout_windows(path, tok, num_samples=3, seq_len=40)


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        ({"num_samples": 0}, "num_samples"),
        ({"seq_len": 0}, "seq_len"),
        ({"seed": -1}, "seed"),
        ({"seed": calibration.HELDOUT_SEED_BASE}, "seed"),
    ],
    ids=["samples", "seq_len", "negative-seed", "huge-seed"],
)
def test_bad_request_names_the_argument(tok, text_file, kw, name):
    with pytest.raises(ValueError, match=name):
        calibration_windows(text_file, tok, **kw)


def test_austen_windows_come_from_calibration_books(tok, fake_austen):
    windows = calibration_windows("austen", tok, num_samples=4, seq_len=16, seed=0)
    stream = tokenize(load_text("austen"), tok)
    assert all(len(p) == 1 for p in positions(windows, stream))
    persuasion = tokenize((fake_austen / "persuasion.txt").read_text(), tok)
    assert all(positions(windows, persuasion)[i] == [] for i in range(4))


# ---------------------------------------------------------------- "self"


@pytest.fixture(scope="module")
def tiny_lm(tok):
    return tiny_model("llama", vocab_size=len(tok))


def _sample_without_cache(model, first: torch.Tensor, seq_len: int, seed: int, temperature: float = 1.0):
    # The same draws as sample_from_model, but recomputing the whole prefix at every step.
    g = torch.Generator().manual_seed(seed)
    out = first.clone()
    with torch.no_grad():
        for _ in range(1, seq_len):
            probs = torch.softmax(model(input_ids=out).logits[:, -1].float() / temperature, dim=-1)
            out = torch.cat([out, torch.multinomial(probs, 1, generator=g)], dim=1)
    return out


def test_self_windows_are_seeded_samples_from_bos(tok, tiny_lm):
    windows = calibration_windows("self", tok, model=tiny_lm, num_samples=3, seq_len=10, seed=4)
    assert windows.shape == (3, 10) and windows.dtype == torch.long
    assert (windows[:, 0] == tok.bos_token_id).all()
    expected = _sample_without_cache(tiny_lm, windows[:, :1], 10, seed=4)
    assert torch.equal(windows, expected), "the KV-cached sampler must draw what a full recomputation draws"
    assert torch.equal(windows, calibration_windows("self", tok, model=tiny_lm, num_samples=3, seq_len=10, seed=4))
    assert not torch.equal(windows, calibration_windows("self", tok, model=tiny_lm, num_samples=3, seq_len=10, seed=5))


def test_self_heldout_is_a_separate_sample(tok, tiny_lm):
    cal = calibration_windows("self", tok, model=tiny_lm, num_samples=4, seq_len=12, seed=0)
    held = heldout_windows("self", tok, model=tiny_lm, num_samples=4, seq_len=12, seed=0)
    assert held.shape == cal.shape and not torch.equal(held, cal)
    expected = _sample_without_cache(tiny_lm, held[:, :1], 12, seed=calibration.HELDOUT_SEED_BASE)
    assert torch.equal(held, expected)


def test_low_temperature_sampling_is_greedy(tok, tiny_lm):
    out = calibration.sample_from_model(tiny_lm, tok, num_sequences=2, seq_len=8, seed=0, temperature=1e-6)
    with torch.no_grad():
        greedy = tiny_lm(input_ids=out).logits[:, :-1].argmax(-1)
    assert torch.equal(out[:, 1:], greedy)


def test_self_text_and_missing_model(tok, tiny_lm, monkeypatch):
    monkeypatch.setattr(calibration, "SELF_TEXT_TOKENS", 16)
    text = load_text("self", model=tiny_lm, tokenizer=tok, seed=0)
    assert isinstance(text, str) and text.count("\n\n") >= calibration.SELF_TEXT_SEQUENCES - 1
    assert text == load_text("self", model=tiny_lm, tokenizer=tok, seed=0)
    with pytest.raises(ValueError, match="model"):
        calibration_windows("self", tok, num_samples=2, seq_len=4)
    with pytest.raises(ValueError, match="temperature"):
        calibration.sample_from_model(tiny_lm, tok, num_sequences=1, seq_len=2, seed=0, temperature=0.0)


def test_sampling_leaves_training_mode_alone(tok):
    model = tiny_model("llama", vocab_size=len(tok)).train()
    calibration_windows("self", tok, model=model, num_samples=1, seq_len=3, seed=0)
    assert model.training


def test_fortunes_source_reads_the_cached_collections(tmp_path, monkeypatch):
    monkeypatch.setenv("NIRVANA_CACHE", str(tmp_path))
    (tmp_path / "fortunes.txt").write_text("Q: Why?\nA: Because.\n\nAnother one.\n")
    assert load_text(calibration.FORTUNES) == "Q: Why?\nA: Because.\n\nAnother one.\n"


# ---------------------------------------------------------------- large texts: sampled by character spans


class CountingTokenizer:
    """Wraps a tokenizer and records the length of every text it is asked to tokenize."""

    def __init__(self, inner):
        self.inner, self.lengths = inner, []

    def __call__(self, texts, **kw):
        self.lengths += [len(t) for t in ([texts] if isinstance(texts, str) else texts)]
        return self.inner(texts, **kw)


def whole_stream_windows(text, tok, num_samples, seq_len, seed):
    """What calibration_windows and heldout_windows returned before large texts were sampled by spans."""
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    split = heldout_start(len(ids))
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, split - seq_len + 1, (num_samples,), generator=g)
    cal = ids[starts[:, None] + torch.arange(seq_len)]
    g = torch.Generator().manual_seed(seed)
    picked = torch.randperm((len(ids) - split) // seq_len, generator=g)[:num_samples].sort().values
    return cal, ids[split + picked[:, None] * seq_len + torch.arange(seq_len)]


@pytest.fixture
def large(monkeypatch):
    """Make the 20,000-character test text count as large."""
    monkeypatch.setattr(calibration, "LARGE_TEXT_CHARS", 5_000)


@pytest.mark.parametrize("seed", [0, 7], ids=["seed0", "seed7"])
def test_small_texts_keep_the_whole_stream_windows(tok, text_file, seed):
    assert len(load_text(text_file)) <= calibration.LARGE_TEXT_CHARS
    cal, held = whole_stream_windows(load_text(text_file), tok, 8, 32, seed)
    assert torch.equal(calibration_windows(text_file, tok, num_samples=8, seq_len=32, seed=seed), cal)
    assert torch.equal(heldout_windows(text_file, tok, num_samples=8, seq_len=32, seed=seed), held)


def test_the_austen_default_is_not_a_large_text():
    try:
        text = load_text("austen")
    except (OSError, ValueError) as e:
        pytest.skip(f"the Austen novels are not available here: {e}")
    # The demo's numbers rest on the whole-stream windows of this text.
    assert len(text) < calibration.LARGE_TEXT_CHARS / 2


@pytest.mark.parametrize(("num_samples", "seq_len"), [(32, 64), (5, 16)], ids=["many", "few"])
def test_large_text_windows_are_token_windows_of_the_calibration_part(tok, text_file, large, num_samples, seq_len):
    counting = CountingTokenizer(tok)
    windows = calibration_windows(text_file, counting, num_samples=num_samples, seq_len=seq_len, seed=3)
    assert windows.shape == (num_samples, seq_len) and windows.dtype == torch.long
    stream = tokenize(load_text(text_file), tok)
    split = heldout_start(len(stream))  # one token per character: the character split is the token split
    for found in positions(windows, stream):
        assert len(found) == 1 and found[0] + seq_len <= split
    # Only spans were tokenized, never the whole text.
    assert len(counting.lengths) == num_samples
    assert max(counting.lengths) <= calibration.SPAN_CHARS_PER_TOKEN * seq_len


def test_large_text_windows_are_deterministic_per_seed(tok, text_file, large):
    a = calibration_windows(text_file, tok, num_samples=8, seq_len=32, seed=0)
    assert torch.equal(a, calibration_windows(text_file, tok, num_samples=8, seq_len=32, seed=0))
    assert not torch.equal(a, calibration_windows(text_file, tok, num_samples=8, seq_len=32, seed=1))
    h = heldout_windows(text_file, tok, num_samples=4, seq_len=32, seed=0)
    assert torch.equal(h, heldout_windows(text_file, tok, num_samples=4, seq_len=32, seed=0))
    assert not torch.equal(h, heldout_windows(text_file, tok, num_samples=4, seq_len=32, seed=1))


def test_large_text_heldout_windows_are_disjoint_and_after_every_calibration_window(tok, text_file, large):
    stream = tokenize(load_text(text_file), tok)
    split = heldout_start(len(stream))
    held = heldout_windows(text_file, tok, num_samples=12, seq_len=16, seed=0)  # 12 of the 15 spans
    starts = [p[0] for p in positions(held, stream)]
    assert all(s >= split for s in starts) and starts == sorted(starts)
    assert all(b - a >= 16 for a, b in zip(starts, starts[1:])), "held-out windows share tokens"
    for seed in range(4):
        cal = calibration_windows(text_file, tok, num_samples=32, seq_len=32, seed=seed)
        assert max(p[0] for p in positions(cal, stream)) + 32 <= split


def test_large_text_spans_that_tokenize_short_grow(tok, text_file, large, monkeypatch):
    monkeypatch.setattr(calibration, "SPAN_CHARS_PER_TOKEN", 1)  # a span of seq_len characters is always short
    stream = tokenize(load_text(text_file), tok)
    split = heldout_start(len(stream))
    cal = calibration_windows(text_file, tok, num_samples=6, seq_len=40, seed=2)
    assert torch.equal(cal, calibration_windows(text_file, tok, num_samples=6, seq_len=40, seed=2))
    assert all(len(p) == 1 and p[0] + 40 <= split for p in positions(cal, stream))
    held = heldout_windows(text_file, tok, num_samples=6, seq_len=40, seed=2)
    assert all(len(p) == 1 and p[0] >= split for p in positions(held, stream))


def test_large_text_that_cannot_supply_the_heldout_windows_says_so(tok, text_file, large):
    # 2,000 held-out characters make 7 spans of 8 * 32 characters.
    assert heldout_windows(text_file, tok, num_samples=7, seq_len=32).shape == (7, 32)
    with pytest.raises(ValueError, match=r"held-out part \(2000 characters\) holds fewer than 8 spans of 256"):
        heldout_windows(text_file, tok, num_samples=8, seq_len=32)


def test_large_text_status_line_only_with_progress(tok, text_file, large, capsys):
    calibration_windows(text_file, tok, num_samples=4, seq_len=16, progress=False)
    heldout_windows(text_file, tok, num_samples=4, seq_len=16, progress=False)
    assert capsys.readouterr().err == ""
    calibration_windows(text_file, tok, num_samples=4, seq_len=16, progress=True)
    err = capsys.readouterr().err
    assert err.startswith("sampling 4 windows from 0.0M characters") and err.rstrip().endswith("s)")
