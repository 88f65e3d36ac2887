"""Eval fixtures: the offline tokenizer / tiny Llama from tests/data, and a stub model with scripted completions."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from ..data.conftest import build_tokenizer, require_data, shared_data_dir, tiny_causal_lm

__all__ = ["ScriptedModel", "build_tokenizer", "require_data", "shared_data_dir", "tiny_causal_lm"]


class ScriptedModel:
    """A ``.generate`` stub: answers each prompt with ``respond(prompt_text)`` (a string or a list, one per sequence).

    Records every call (kwargs, the tokenizer's padding side, the input ids) so tests can check how it was driven.
    """

    def __init__(self, tokenizer, respond: Callable[[str], str | list[str]]):
        self.tokenizer, self.respond = tokenizer, respond
        self.calls: list[dict] = []
        self.training = True
        self.device = torch.device("cpu")

    def eval(self):
        self.training = False
        return self

    def train(self, mode: bool = True):
        self.training = mode
        return self

    def generate(self, input_ids, attention_mask, **kwargs):
        n = kwargs.get("num_return_sequences", 1)
        self.calls.append({"kwargs": kwargs, "padding_side": self.tokenizer.padding_side, "input_ids": input_ids,
                           "attention_mask": attention_mask, "training": self.training})  # fmt: skip
        rows = []
        for ids in input_ids:
            answers = self.respond(self.tokenizer.decode(ids, skip_special_tokens=True))
            answers = [answers] * n if isinstance(answers, str) else answers
            assert len(answers) == n
            rows += [ids.tolist() + self.tokenizer(a, add_special_tokens=False).input_ids + [2] for a in answers]
        width = max(map(len, rows))
        return torch.tensor([r + [self.tokenizer.pad_token_id] * (width - len(r)) for r in rows])


@pytest.fixture
def tokenizer():
    """A fresh BPE tokenizer (adds BOS, right padding) per test: tests check it is restored."""
    return build_tokenizer()
