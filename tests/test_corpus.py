"""The Austen corpus: where the folder comes from, and that the Debian extraction gives the known texts."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from nirvana import corpus
from nirvana.corpus import AUSTEN_ENV, BOOKS, CALIBRATION_BOOKS, HELDOUT_BOOK, austen_dir, read_book

# Characters and SHA-256 of each novel as extracted from r-cran-janeaustenr 1.0.0 (lines joined with "\n", final "\n").
KNOWN = {
    "emma": (883_028, "7c67b5985c6d0de1efaeb5d342d52cb82c38083c40e2295129e30e87ee690ebe"),
    "mansfieldpark": (883_279, "98bc90519cdf4ef663ad7de2734bb529435ef24f7abbde6bb1a50898871dafe9"),
    "northangerabbey": (433_411, "51f91bbe0517db8e65cff009b097ce0a1836124c4e0532ac19e6c0cad982abed"),
    "persuasion": (466_854, "8061549557aebd2fd6e353d18d9197cb707029112bd52d4d8b174583a925848a"),
    "prideprejudice": (684_768, "dfc684d4f857fa938268f9ab9c5567b64bd0691251eca959644adeabe6287a4d"),
    "sensesensibility": (673_688, "105e1651fe93bed7130078578efd31e0c557d68667ba672ddc876f735b30fe09"),
}
SHARED = Path("/work/shared/data/austen")


def _apt_available() -> bool:
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        return False
    found = subprocess.run(["apt-cache", "show", corpus.DEBIAN_PACKAGE], capture_output=True, check=False)
    return found.returncode == 0


requires_apt = pytest.mark.skipif(
    not _apt_available(), reason=f"needs apt-get and dpkg with {corpus.DEBIAN_PACKAGE} in the package lists"
)


def fake_books(folder: Path, books=BOOKS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for book in books:
        (folder / f"{book}.txt").write_text(f"the text of {book}\n")
    return folder


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """One fresh download and extraction per test run (a few seconds), through austen_dir into an empty cache."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(AUSTEN_ENV, raising=False)
        mp.setenv("NIRVANA_CACHE", str(cache))
        folder = austen_dir()
    assert folder == cache / "austen"
    return folder


def test_book_lists():
    assert HELDOUT_BOOK == "persuasion" and len(BOOKS) == 6
    assert set(CALIBRATION_BOOKS) == set(BOOKS) - {HELDOUT_BOOK} and len(CALIBRATION_BOOKS) == 5


@requires_apt
@pytest.mark.parametrize("book", BOOKS)
def test_extraction_gives_the_known_texts(extracted, book):
    text = (extracted / f"{book}.txt").read_text(encoding="utf-8")
    chars, digest = KNOWN[book]
    assert len(text) == chars
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == digest
    if (SHARED / f"{book}.txt").is_file():
        assert (extracted / f"{book}.txt").read_bytes() == (SHARED / f"{book}.txt").read_bytes()


@requires_apt
def test_extraction_leaves_only_the_books(extracted):
    assert sorted(p.name for p in extracted.iterdir()) == sorted(f"{b}.txt" for b in BOOKS)
    assert sorted(p.name for p in extracted.parent.iterdir()) == ["austen"], "temporary files must be cleaned up"


def test_explicit_folder_is_used_as_is(tmp_path, monkeypatch):
    monkeypatch.setenv(AUSTEN_ENV, str(tmp_path / "elsewhere"))
    folder = fake_books(tmp_path / "mine")
    assert austen_dir(folder) == folder
    assert read_book("emma", folder) == "the text of emma\n"
    if not corpus.missing_books(SHARED):
        assert austen_dir(SHARED) == SHARED


def test_environment_folder_comes_before_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NIRVANA_CACHE", str(tmp_path / "cache"))
    fake_books(tmp_path / "cache" / "austen")
    monkeypatch.setenv(AUSTEN_ENV, str(fake_books(tmp_path / "env")))
    assert austen_dir() == tmp_path / "env"


def test_incomplete_folders_name_what_is_missing(tmp_path, monkeypatch):
    partial = fake_books(tmp_path / "partial", books=BOOKS[:4])
    with pytest.raises(ValueError, match=r"folder: .* lacks prideprejudice.txt, sensesensibility.txt"):
        austen_dir(partial)
    monkeypatch.setenv(AUSTEN_ENV, str(partial))
    with pytest.raises(ValueError, match=r"\$NIRVANA_AUSTEN_DIR: .* lacks prideprejudice.txt"):
        austen_dir()


def test_cache_is_reused_without_downloading(tmp_path, monkeypatch):
    monkeypatch.delenv(AUSTEN_ENV, raising=False)
    monkeypatch.setenv("NIRVANA_CACHE", str(tmp_path))
    fake_books(tmp_path / "austen")
    monkeypatch.setattr(corpus, "extract_austen", lambda dest: pytest.fail("must not download again"))
    assert austen_dir() == tmp_path / "austen"


def test_empty_cache_folder_is_filled_and_incomplete_one_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(AUSTEN_ENV, raising=False)
    monkeypatch.setenv("NIRVANA_CACHE", str(tmp_path))
    (tmp_path / "austen").mkdir()
    monkeypatch.setattr(corpus, "extract_austen", lambda dest: fake_books(Path(dest)))
    assert austen_dir() == tmp_path / "austen" and not corpus.missing_books(tmp_path / "austen")
    (tmp_path / "austen" / "emma.txt").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        austen_dir()


def test_unknown_book_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="'ulysses'"):
        read_book("ulysses", fake_books(tmp_path))


def test_missing_apt_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=AUSTEN_ENV):
        corpus.download_deb(tmp_path)


def test_package_without_data_is_reported(tmp_path):
    with pytest.raises(RuntimeError, match="Rdata.rdx"):
        corpus.read_janeaustenr(tmp_path)


# --------------------------------------------------------------------------------------------------
# Debian's fortunes: the second evaluation domain
# --------------------------------------------------------------------------------------------------


def test_split_fortunes_reads_strfile_entries():
    text = "first line\nsecond line\n%\n  indented\n%\n%\nlast\n"
    assert corpus.split_fortunes(text) == ["first line\nsecond line", "  indented", "last"]


def test_join_fortunes_mixes_collections_round_robin():
    joined = corpus.join_fortunes({"b": ["b1", "b2", "b3"], "a": ["a1"], "c": ["c1", "c2"]})
    assert joined == "a1\n\nb1\n\nc1\n\nb2\n\nc2\n\nb3\n"


def test_fortunes_cache_is_reused_without_downloading(tmp_path, monkeypatch):
    monkeypatch.setenv("NIRVANA_CACHE", str(tmp_path))
    (tmp_path / "fortunes.txt").write_text("cached\n")
    monkeypatch.setattr(corpus, "download_deb", lambda *a, **k: pytest.fail("must not download again"))
    assert corpus.fortunes_path().read_text() == "cached\n"


def test_missing_apt_for_fortunes_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="fortunes.*text file of your own"):
        corpus.download_deb(tmp_path, corpus.FORTUNES_PACKAGE, "pass a text file of your own instead")


@requires_apt
def test_fortunes_extraction(tmp_path, monkeypatch):
    monkeypatch.setenv("NIRVANA_CACHE", str(tmp_path))
    text = corpus.fortunes_path().read_text(encoding="utf-8")
    assert list(tmp_path.iterdir()) == [tmp_path / "fortunes.txt"]  # no leftover work folder
    assert len(text) > 1_000_000 and "\n%\n" not in text
    # Round-robin: the first 40 kB (what 24 windows of 512 tokens read) already mix the collections.
    assert "Star Trek" in text[:40_000] or "Spock" in text[:40_000] or "Kirk" in text[:40_000]


def test_eval_text_knows_the_named_texts_only(tmp_path, monkeypatch):
    monkeypatch.setenv("NIRVANA_CACHE", str(tmp_path))
    (tmp_path / "fortunes.txt").write_text("a fortune\n")
    monkeypatch.setenv(AUSTEN_ENV, str(fake_books(tmp_path / "books")))
    assert corpus.eval_text("fortunes") == "a fortune\n"
    assert corpus.eval_text(HELDOUT_BOOK) == f"the text of {HELDOUT_BOOK}\n"
    assert corpus.eval_text("emma") is None and corpus.eval_text("notes.txt") is None
