"""SFT tokenisation (label masking), the padding collator, the held-out split, file mixing, end to end."""

from __future__ import annotations

import json

import pytest
import torch

from fura.recipes.data.formats import Example
from fura.recipes.data.prompts import PromptFormatter
from fura.recipes.data.sft import (
    IGNORE_INDEX,
    SFTCollator,
    SFTDataConfig,
    build_sft_datasets,
    load_mixture,
    tokenize_example,
    train_val_split,
)

from .conftest import build_tokenizer, require_data, tiny_causal_lm

EXAMPLE = Example(instruction="Is water wet?", output="the correct answer is true", answer="true")


@pytest.mark.parametrize("style", ["fura", "reference"])
def test_labels_mask_exactly_the_prompt_tokens(tokenizer, style):
    fmt = PromptFormatter(style, tokenizer)
    row = tokenize_example(EXAMPLE, fmt, max_seq_len=512)
    prompt_len = len(tokenizer(fmt.prompt(EXAMPLE.instruction), add_special_tokens=fmt.add_special_tokens).input_ids)
    ids, labels = row["input_ids"], row["labels"]
    assert len(ids) == len(labels) > prompt_len
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[prompt_len:]) == "the correct answer is true </s>"
    assert ids[0] == tokenizer.bos_token_id  # fura: added by the tokenizer; reference: the literal "<s> " text
    assert ids[1] != tokenizer.bos_token_id  # never twice


def test_chat_labels_cover_the_assistant_turn(chat_tokenizer):
    fmt = PromptFormatter("chat", chat_tokenizer)
    row = tokenize_example(EXAMPLE, fmt)
    n_masked = row["labels"].count(IGNORE_INDEX)
    assert n_masked == len(chat_tokenizer(fmt.prompt(EXAMPLE.instruction), add_special_tokens=False).input_ids)
    assert chat_tokenizer.decode(row["input_ids"][n_masked:]) == "the correct answer is true</s>\n"


def test_truncation_to_max_seq_len(tokenizer):
    fmt = PromptFormatter("fura", tokenizer)
    row = tokenize_example(EXAMPLE, fmt, max_seq_len=10)
    assert len(row["input_ids"]) == len(row["labels"]) == 10
    assert set(row["labels"]) == {IGNORE_INDEX}  # the prompt alone is longer than 10 tokens: nothing to learn


def test_collator_right_pads_and_masks_by_length_even_when_pad_is_eos():
    eos = 2
    collate = SFTCollator(pad_token_id=eos)
    batch = collate([{"input_ids": [5, 6, eos], "labels": [-100, 6, eos]}, {"input_ids": [7], "labels": [7]}])
    assert batch["input_ids"].tolist() == [[5, 6, eos], [7, eos, eos]]
    assert batch["labels"].tolist() == [[-100, 6, eos], [7, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]  # the trained EOS stays visible
    assert all(t.dtype == torch.long for t in batch.values())
    assert SFTCollator(0, pad_to_multiple_of=8)([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}])["input_ids"].shape == (
        1,
        8,
    )


def test_collator_for_tokenizer_without_pad_uses_eos():
    tok = build_tokenizer()
    tok.pad_token = None
    assert SFTCollator.for_tokenizer(tok).pad_token_id == tok.eos_token_id


def test_train_val_split_is_seeded_disjoint_and_complete():
    items = list(range(50))
    train, val = train_val_split(items, 7, seed=43)
    assert len(val) == 7 and len(train) == 43 and sorted(train + val) == items
    assert train_val_split(items, 7, seed=43) == (train, val)
    assert train_val_split(items, 7, seed=44)[1] != val
    assert train_val_split(items, 0, seed=1) == (items, [])
    with pytest.raises(ValueError, match="no training rows"):
        train_val_split(items, 50, seed=1)


def _write_task(path, name, n):
    rows = [{"instruction": f"{name} q{i}", "input": "", "output": f"the correct answer is a{i}", "answer": f"a{i}"}
            for i in range(n)]  # fmt: skip
    (path / f"{name}.json").write_text(json.dumps(rows))


def test_mixture_caps_each_file_and_is_seeded(tmp_path):
    _write_task(tmp_path, "alpha", 30)
    _write_task(tmp_path, "beta", 4)
    mix = load_mixture([tmp_path], max_rows_per_file=5, seed=3)
    assert sorted(e.source for e in mix) == ["alpha"] * 5 + ["beta"] * 4
    assert mix == load_mixture([tmp_path], max_rows_per_file=5, seed=3)
    assert len({e.instruction for e in mix}) == 9


def test_real_train_dir_mixture():
    train_dir = require_data("commonsense", "train")
    mix = load_mixture([train_dir], max_rows_per_file=5, seed=43)
    assert len(mix) == 20
    assert {e.source for e in mix} == {"boolq", "ARC-Easy", "ARC-Challenge", "openbookqa"}


def test_build_sft_datasets_end_to_end_gives_a_finite_loss(tmp_path, tokenizer):
    _write_task(tmp_path, "alpha", 12)
    config = SFTDataConfig(train_files=[str(tmp_path / "alpha.json")], val_set_size=2, max_seq_len=128)
    data = build_sft_datasets(config, tokenizer, seed=43)
    assert len(data.train) == 10 and len(data.val) == 2 and len(data.val_examples) == 2
    batch = data.collator(data.train[:4])
    model = tiny_causal_lm(len(tokenizer))
    loss = model(**batch).loss
    assert torch.isfinite(loss) and loss.item() > 0
