"""Real English text on a fresh machine: Jane Austen's six novels, taken from Debian's ``r-cran-janeaustenr``.

Model and dataset hubs may be unreachable, but a Debian mirror usually is. The package holds the novels as R
character vectors (one element per line of the Project Gutenberg text) in a lazy-load database
(``data/Rdata.rdx`` index + ``data/Rdata.rdb`` blobs). Each novel is written out as ``<name>.txt``: its lines
joined with "\\n" plus a final "\\n" (``emma.txt`` is 883,028 characters).

``persuasion`` is held out: it is the perplexity text and is never used for calibration.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

from .models import cache_dir

BOOKS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
HELDOUT_BOOK = "persuasion"
CALIBRATION_BOOKS = tuple(b for b in BOOKS if b != HELDOUT_BOOK)
DEBIAN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_ENV = "NIRVANA_AUSTEN_DIR"


def missing_books(folder: str | os.PathLike) -> list[str]:
    """The ``<book>.txt`` files of ``BOOKS`` that ``folder`` lacks (all of them when it is not a folder)."""
    folder = Path(folder)
    return [f"{b}.txt" for b in BOOKS if not (folder / f"{b}.txt").is_file()]


def _checked(folder: str | os.PathLike, what: str) -> Path:
    folder = Path(folder).expanduser()
    missing = missing_books(folder)
    if missing:
        raise ValueError(f"{what}: {str(folder)!r} lacks {', '.join(missing)} (needs all six Austen novels as .txt)")
    return folder


def _apt_get(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["apt-get", *args], cwd=cwd, capture_output=True, text=True, check=False)


def download_deb(workdir: Path, package: str = DEBIAN_PACKAGE, instead: str | None = None) -> Path:
    """Fetch a Debian package's .deb (by default ``r-cran-janeaustenr``) into ``workdir`` with ``apt-get download``.

    ``apt-get update`` runs only when the first download fails (package lists missing or stale). ``instead``
    is the error message's advice on what to do when the download is impossible.
    """
    if instead is None:
        instead = f"set ${AUSTEN_ENV} to a folder holding {', '.join(b + '.txt' for b in BOOKS)}"
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise RuntimeError(f"corpus: apt-get and dpkg are needed to fetch {package}; or {instead}")
    done = _apt_get(["download", package], workdir)
    if done.returncode != 0:
        _apt_get(["update"], workdir)
        done = _apt_get(["download", package], workdir)
    debs = sorted(workdir.glob(f"{package}_*.deb"))
    if done.returncode != 0 or not debs:
        raise RuntimeError(
            f"corpus: 'apt-get download {package}' failed ({done.stderr.strip().splitlines()[-1:]}); {instead}"
        )
    return debs[-1]


def _rdb_object(blob: bytes, compressed) -> bytes:
    # A lazy-load blob is a 4-byte big-endian uncompressed length, then the serialized object; with
    # compressed=TRUE the rest is one zlib stream (R's lazyLoadDBinsertValue with compress=1).
    if not bool(compressed):
        return blob[4:]
    if int(compressed) != 1:
        raise RuntimeError(f"corpus: R lazy-load compression type {int(compressed)} is not supported (only zlib)")
    (length,) = struct.unpack(">I", blob[:4])
    data = zlib.decompress(blob[4:])
    if len(data) != length:
        raise RuntimeError(f"corpus: R blob decompressed to {len(data)} bytes, its header says {length}")
    return data


def read_janeaustenr(root: str | os.PathLike) -> dict[str, str]:
    """The novels in an unpacked ``r-cran-janeaustenr`` tree, as {book name: text} (lines joined, final "\\n")."""
    import rdata

    found = sorted(Path(root).glob("**/janeaustenr/data/Rdata.rdx"))
    if not found:
        raise RuntimeError(f"corpus: no janeaustenr/data/Rdata.rdx under {str(root)!r}")
    index = rdata.read_rds(found[0])
    blobs = found[0].with_suffix(".rdb").read_bytes()
    compressed = index["compressed"][0] if hasattr(index["compressed"], "__len__") else index["compressed"]
    texts = {}
    for name, (offset, size) in index["variables"].items():
        name = str(name)
        if name not in BOOKS:
            continue
        raw = _rdb_object(blobs[int(offset) : int(offset) + int(size)], compressed)
        lines = rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))
        texts[name] = "\n".join(str(line) for line in lines) + "\n"
    missing = [b for b in BOOKS if b not in texts]
    if missing:
        raise RuntimeError(f"corpus: {DEBIAN_PACKAGE} lacks the novels {missing}")
    return texts


def extract_austen(dest: str | os.PathLike) -> Path:
    """Download and unpack ``r-cran-janeaustenr`` and write the six ``<book>.txt`` files into ``dest``.

    The files are written into a temporary sibling folder that is renamed to ``dest`` at the end, so ``dest``
    either holds all six novels or does not exist. ``dest`` must not exist yet, or be empty.
    """
    dest = Path(dest).expanduser()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".austen-deb.", dir=dest.parent) as work:
        work = Path(work)
        deb = download_deb(work)
        subprocess.run(["dpkg", "-x", str(deb), str(work / "root")], check=True, capture_output=True)
        texts = read_janeaustenr(work / "root")
        out = work / "books"
        out.mkdir()
        for name, text in texts.items():
            (out / f"{name}.txt").write_text(text, encoding="utf-8", newline="\n")
        out.chmod(0o755)
        try:
            os.rename(out, dest)
        except OSError:
            # A concurrent extraction won the rename; its files are identical.
            if missing_books(dest):
                raise
    return dest


def austen_dir(folder: str | os.PathLike | None = None) -> Path:
    """A folder holding the six novels as ``<book>.txt``.

    In order: ``folder`` when given (e.g. ``/work/shared/data/austen``); ``$NIRVANA_AUSTEN_DIR`` when set;
    the cache ``<cache_dir()>/austen``, extracted from Debian's package on first use (a few seconds).
    """
    if folder is not None:
        return _checked(folder, "folder")
    env = os.environ.get(AUSTEN_ENV)
    if env:
        return _checked(env, f"${AUSTEN_ENV}")
    cached = cache_dir() / "austen"
    if not missing_books(cached):
        return cached
    if cached.exists() and not any(cached.iterdir()):
        cached.rmdir()
    elif cached.exists():
        raise ValueError(f"cache: {str(cached)!r} is incomplete (lacks {', '.join(missing_books(cached))}); delete it")
    return extract_austen(cached)


def read_book(name: str, folder: str | os.PathLike | None = None) -> str:
    """The text of one novel (a name in ``BOOKS``), from ``austen_dir(folder)``."""
    if name not in BOOKS:
        raise ValueError(f"name: {name!r} is not one of the Austen novels {BOOKS}")
    return (austen_dir(folder) / f"{name}.txt").read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Named evaluation texts
# --------------------------------------------------------------------------------------------------

FORTUNES = "fortunes"
EVAL_TEXTS = (HELDOUT_BOOK, FORTUNES)


def eval_text(name: str) -> str | None:
    """The text of a named evaluation text (``persuasion``, ``fortunes``), or None for any other name."""
    if name == HELDOUT_BOOK:
        return read_book(name)
    if name == FORTUNES:
        return fortunes_path().read_text(encoding="utf-8")
    return None


# --------------------------------------------------------------------------------------------------
# A second domain for evaluation: Debian's fortune cookies
# --------------------------------------------------------------------------------------------------

FORTUNES_PACKAGE = "fortunes"
# Collections that are pictures or templates rather than prose.
FORTUNES_SKIPPED = ("art", "ascii-art", "translate-me")


def split_fortunes(text: str) -> list[str]:
    """The fortunes of one strfile-format collection: entries separated by lines holding only ``%``."""
    entries = re.split(r"^%$", text, flags=re.MULTILINE)
    return [e.strip("\n") for e in entries if e.strip()]


def join_fortunes(collections: dict[str, list[str]]) -> str:
    """One text of fortunes taken round-robin over the collections (sorted by name), blank-line separated.

    Round-robin, so that any prefix of the text (an evaluation reads its first windows) mixes every topic
    (computers, law, science, Pratchett, Star Trek, ...) instead of being all one collection.
    """
    queues = [collections[name] for name in sorted(collections)]
    out = []
    for i in range(max((len(q) for q in queues), default=0)):
        out.extend(q[i] for q in queues if i < len(q))
    return "\n\n".join(out) + "\n"


def fortunes_path() -> Path:
    """``<cache_dir()>/fortunes.txt``: Debian's ``fortunes`` collections as one text, fetched on first use.

    A text of another domain than Austen's novels (jokes, quotations, computing and science lore from the
    20th century), for perplexity outside the calibration domain. Extracted like the novels: ``apt-get
    download fortunes``, ``dpkg -x``, then the ``%``-separated collections under ``usr/share/games/fortunes``
    (minus :data:`FORTUNES_SKIPPED`) joined by :func:`join_fortunes`. Written atomically.
    """
    path = cache_dir() / "fortunes.txt"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fortunes-deb.", dir=path.parent) as work:
        work = Path(work)
        deb = download_deb(work, FORTUNES_PACKAGE, "pass a text file of your own instead")
        subprocess.run(["dpkg", "-x", str(deb), str(work / "root")], check=True, capture_output=True)
        folder = work / "root" / "usr" / "share" / "games" / "fortunes"
        collections = {
            f.name: split_fortunes(f.read_text(encoding="utf-8", errors="replace"))
            for f in sorted(folder.iterdir())
            if f.is_file() and not f.is_symlink() and f.suffix == "" and f.name not in FORTUNES_SKIPPED
        }
        if not collections:
            raise RuntimeError(f"corpus: {FORTUNES_PACKAGE} holds no fortune collections under {folder}")
        tmp = work / "fortunes.txt"
        tmp.write_text(join_fortunes(collections), encoding="utf-8", newline="\n")
        os.replace(tmp, path)
    return path


__all__ = [
    "AUSTEN_ENV",
    "BOOKS",
    "CALIBRATION_BOOKS",
    "DEBIAN_PACKAGE",
    "HELDOUT_BOOK",
    "austen_dir",
    "EVAL_TEXTS",
    "FORTUNES",
    "download_deb",
    "eval_text",
    "extract_austen",
    "fortunes_path",
    "join_fortunes",
    "split_fortunes",
    "missing_books",
    "read_book",
    "read_janeaustenr",
]
