"""Shared fixtures: tiny random models, the CUDA marker, paths to the shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hugging Face Hub
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def shared_data_dir() -> Path:
    """``$FURA_DATA_DIR`` or ``../shared/data`` beside the checkout (never copied into the repo)."""
    return Path(os.environ.get("FURA_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (runs when one is lent)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def tiny_llama_config(**overrides):
    """A 2-layer Llama with GQA and head_dim 16: every projection shape FuRA meets, in milliseconds."""
    from transformers import LlamaConfig

    values = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny models run fastest so, and two threads crawl on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_llama():
    """A fresh tiny random Llama in float32 (seeded)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture
def tiny_inputs():
    torch.manual_seed(1)
    return torch.randint(0, 96, (2, 12))
