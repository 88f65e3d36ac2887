"""Prompt styles: one template for train and eval by default, the reference's exact pair, and chat templates."""

from __future__ import annotations

import pytest

from fura.recipes.data.formats import Example
from fura.recipes.data.prompts import (
    FURA_TEMPLATE,
    REFERENCE_EVAL_TEMPLATE,
    REFERENCE_TRAIN_TEMPLATE,
    PromptFormatter,
)

HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def test_fura_style_uses_the_training_text_without_literal_bos_for_train_and_eval(tokenizer):
    fmt = PromptFormatter("fura", tokenizer)
    expected = HEADER + "  \n\n### Instruction:\nQ?\n" + " " * 16 + "\n### Response:\n"
    assert fmt.prompt("Q?", split="train") == fmt.prompt("Q?", split="eval") == expected
    assert REFERENCE_TRAIN_TEMPLATE == "<s> " + FURA_TEMPLATE
    assert fmt.add_special_tokens
    assert tokenizer(expected).input_ids[0] == tokenizer.bos_token_id  # the real BOS comes from the tokenizer
    assert fmt.target("Q?", "the correct answer is true</s>") == "the correct answer is true </s>"


def test_reference_style_reproduces_both_reference_templates(tokenizer):
    fmt = PromptFormatter("reference", tokenizer)
    train = "<s> " + HEADER + "  \n\n### Instruction:\nQ?\n" + " " * 16 + "\n### Response:\n"
    assert fmt.prompt("Q?", "train") == train
    assert fmt.prompt("Q?", "eval") == "<s> " + HEADER + " \n\n### Instruction:\nQ?\n\n### Response:\n"
    assert fmt.prompt("Q?", "eval") == REFERENCE_EVAL_TEMPLATE.format(instruction="Q?")
    assert not fmt.add_special_tokens


def test_chat_style_prompt_and_target_come_from_the_template(chat_tokenizer):
    fmt = PromptFormatter("chat", chat_tokenizer)
    assert fmt.prompt("Q?") == "<|user|>\nQ?</s>\n<|assistant|>\n"
    assert fmt.target("Q?", "yes") == "yes</s>\n"
    assert not fmt.add_special_tokens


def test_input_field_is_appended_by_default_and_replaces_the_instruction_in_reference_style(tokenizer):
    example = Example(instruction="Translate.", output="o", answer="a", input="bonjour")
    assert PromptFormatter("fura", tokenizer).instruction(example) == "Translate.\n\nbonjour"
    assert PromptFormatter("reference", tokenizer).instruction(example) == "bonjour"


def test_bad_styles_are_rejected(tokenizer):
    with pytest.raises(ValueError, match="prompt_style must be one of"):
        PromptFormatter("alpaca", tokenizer)
    with pytest.raises(ValueError, match="chat_template"):
        PromptFormatter("chat", tokenizer)
