"""Fixtures for the training tests: a tiny random Llama + offline BPE tokenizer saved as a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from .data.conftest import build_tokenizer, require_data, shared_data_dir, tiny_causal_lm

__all__ = ["build_tokenizer", "require_data", "save_tiny_model", "shared_data_dir", "tiny_causal_lm"]


def save_tiny_model(folder: Path) -> Path:
    """Save the tests' tiny Llama (2 layers, hidden 32, 4 heads, 2 KV heads) and its tokenizer to ``folder``."""
    tokenizer = build_tokenizer()
    model = tiny_causal_lm(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama folder shared by the session (read-only by convention)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def commonsense_dir() -> Path:
    """``../shared/data/commonsense`` (skips when the shared data is absent)."""
    return require_data("commonsense")
