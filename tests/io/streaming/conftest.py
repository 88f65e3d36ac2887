"""Fixtures of the layer-streaming tests: tiny random Llama checkpoints on disk and helpers to load and run them."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from fura.apps.synthetic_checkpoint import make_random_checkpoint

TINY = dict(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, vocab=96)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny Llama checkpoints on disk, created lazily: ``checkpoints(dtype, **overrides)`` → folder."""
    root = tmp_path_factory.mktemp("checkpoints")
    made = {}

    def get(dtype=torch.float32, **overrides):
        key = (dtype, *sorted(overrides.items()))
        if key not in made:
            made[key] = make_random_checkpoint(root / f"ckpt{len(made)}", **{**TINY, "dtype": dtype, **overrides})
        return made[key]

    return get


def load_model(model_dir, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def token_ids():
    return torch.randint(0, TINY["vocab"], (2, 12), generator=torch.Generator().manual_seed(1))


def adapter_config(folder):
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = sorted(config["target_modules"])  # a set: its order is arbitrary
    return config
