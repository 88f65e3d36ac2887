"""The forgetting corpus: cleaning, pinned hashes, windows of a text file, the books from a pre-filled cache."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest
from benchmarks.method_comparison.corpus import BOOKS, Book, book_texts, build_corpus, clean, read_member, verify_sha256
from benchmarks.method_comparison.experiment import ExperimentError, ForgettingSpec

from .conftest import build_tokenizer

GUTENBERG = (
    "\ufeffProject Gutenberg's Tale\r\n*** START OF THIS PROJECT GUTENBERG EBOOK ***\r\nTALE\r\n"
    "It was `dark'.\r\n\r\n\r\n\r\n*   *   *\r\nThe end came.   \r\n--(THE END)--\r\n[A: typo]\r\nLicence text"
)


def _tarball(path, member, text):
    data = text.encode("utf-8")
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_cleaning_keeps_the_story_only(tmp_path):
    book = Book("tale", "A tale", "pkg", "1", "0" * 64, "pkg-1/tale.txt", start=r"TALE\n", end="--(THE END)--")
    raw = read_member(_tarball(tmp_path / "pkg-1.tar.gz", book.member, GUTENBERG), book.member)
    assert raw.startswith("Project Gutenberg") and "\r" not in raw  # BOM dropped, LF endings
    assert clean(book, raw) == "TALE\nIt was 'dark'.\n\nThe end came.\n"
    with pytest.raises(ExperimentError, match="start marker"):
        clean(Book("x", "", "p", "1", "", "m", start="NOPE"), raw)
    with pytest.raises(ExperimentError, match="has no file"):
        read_member(tmp_path / "pkg-1.tar.gz", "pkg-1/other.txt")


def test_a_changed_download_is_refused(tmp_path):
    path = tmp_path / "f.tar.gz"
    path.write_bytes(b"abc")
    verify_sha256(path, hashlib.sha256(b"abc").hexdigest())
    with pytest.raises(ExperimentError, match="differs from the pinned"):
        verify_sha256(path, "0" * 64)


def test_text_file_windows_and_too_short_texts(text_file):
    tokenizer = build_tokenizer()
    corpus = build_corpus(tokenizer, ForgettingSpec(corpus=str(text_file), tokens=70, window=32))
    assert [len(w) for w in corpus.windows] == [32, 32, 32] and corpus.tokens == 96  # rounded up to whole windows
    ids = tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"]
    assert corpus.windows[1] == ids[32:64]
    assert build_corpus(tokenizer, ForgettingSpec(corpus=str(text_file), tokens=70, window=32)).fingerprint == (
        corpus.fingerprint
    )
    with pytest.raises(ExperimentError, match="the probe needs 1000000"):
        build_corpus(tokenizer, ForgettingSpec(corpus=str(text_file), tokens=1_000_000, window=1000))
    with pytest.raises(ExperimentError, match="neither 'books' nor a text file"):
        build_corpus(tokenizer, ForgettingSpec(corpus="/no/such/file.txt"))


def test_books_come_from_the_cache_evenly(tmp_path):
    for book in BOOKS:  # a pre-filled cache: nothing is downloaded
        (tmp_path / "text").mkdir(exist_ok=True)
        (tmp_path / "text" / f"{book.name}-{book.sha256[:12]}.txt").write_text(f"{book.name} says the answer is. " * 50)
    assert set(book_texts(tmp_path)) == {"botchan", "alice", "lcet10"}
    corpus = build_corpus(build_tokenizer(), ForgettingSpec(tokens=100, window=16), tmp_path)
    assert corpus.sources == {"botchan": 3, "alice": 3, "lcet10": 3}  # ceil(100 / (3 × 16)) windows each
    assert len(corpus.windows) == 9 and all(len(w) == 16 for w in corpus.windows)


def test_the_pinned_books_are_the_ones_documented():
    assert [(b.name, b.package, b.version) for b in BOOKS] == [
        ("botchan", "sentencepiece", "0.2.3"),
        ("alice", "brotli", "1.2.1"),
        ("lcet10", "brotli", "1.2.1"),
    ]
    assert all(len(b.sha256) == 64 for b in BOOKS)
