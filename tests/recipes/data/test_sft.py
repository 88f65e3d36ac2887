"""SFT data: what TRL's SFTTrainer trains on (prompt masking, EOS, truncation), the padding collator, the held-out
split, file mixing."""

from __future__ import annotations

import json

import pytest
import torch

from fura.recipes.data.formats import Example
from fura.recipes.data.prompts import PromptFormatter
from fura.recipes.data.sft import (
    IGNORE_INDEX,
    SFTCollator,
    load_mixture,
    sft_dataset,
    sft_tokenizer,
    tokenize_example,
    train_val_split,
)
from fura.recipes.sft import SFTTrainingArguments, build_trainer

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


EXAMPLES = [
    EXAMPLE,
    Example(instruction="Pick one: answer1 or answer2", output="the correct answer is answer2", answer="answer2"),
]


def sft_trainer(tmp_path, formatter, examples, max_seq_len=512):
    """The recipe's ``SFTTrainer`` on a tiny Llama over ``examples`` (prompt–completion rows)."""
    args = SFTTrainingArguments(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=2)
    args.max_length = max_seq_len
    model = tiny_causal_lm(len(formatter.tokenizer))
    return build_trainer(model, sft_tokenizer(formatter), sft_dataset(examples, formatter), None, args, [])


@pytest.mark.parametrize("style", ["fura", "reference", "chat"])
def test_sft_trainer_trains_on_the_tokens_and_labels_of_tokenize_example(tmp_path, tokenizer, chat_tokenizer, style):
    fmt = PromptFormatter(style, chat_tokenizer if style == "chat" else tokenizer)
    trainer = sft_trainer(tmp_path, fmt, EXAMPLES)
    prepared = [(row["input_ids"], row["labels"]) for row in trainer.train_dataset]
    expected = [(row["input_ids"], row["labels"]) for row in (tokenize_example(e, fmt, 512) for e in EXAMPLES)]
    assert prepared == expected  # the prompt masked, one EOS (reference: no added BOS), as the reference tokenises


def test_prompt_tokens_carry_no_loss(tmp_path, tokenizer):
    fmt = PromptFormatter("fura", tokenizer)
    trainer = sft_trainer(tmp_path, fmt, EXAMPLES)
    batch = next(iter(trainer.get_train_dataloader()))
    prompt_lens = [len(tokenizer(fmt.prompt(e.instruction)).input_ids) for e in EXAMPLES]
    order = [prompt_lens.index(int((row == IGNORE_INDEX).logical_and(mask == 1).sum())) for row, mask in
             zip(batch["labels"], batch["attention_mask"], strict=True)]  # fmt: skip
    assert sorted(order) == [0, 1]  # each row masks exactly its prompt
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    answer = targets != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[:, :-1][answer], targets[answer])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)  # the mean over the answer tokens only


def test_rows_truncated_before_their_answer_are_refused(tmp_path, tokenizer):
    fmt = PromptFormatter("fura", tokenizer)
    with pytest.raises(ValueError, match="every training row was truncated before its answer"):
        sft_trainer(tmp_path, fmt, EXAMPLES, max_seq_len=10)
