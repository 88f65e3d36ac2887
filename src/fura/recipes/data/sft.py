"""Supervised fine-tuning data: file mixing, a held-out split, prompt–completion rows for TRL's ``SFTTrainer``, and
the same tokens as a list (:func:`tokenize_example`) with a padding collator for the harnesses that tokenise
themselves. How the tokens compare with the reference's: ``docs/recipes/sft.md``."""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from fura.recipes.data.formats import Example, load_examples
from fura.recipes.data.prompts import PromptFormatter, PromptStyle

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
DATA_SUFFIXES = (".json", ".jsonl")
T = TypeVar("T")


@dataclass
class SFTDataConfig:
    """What to train on and how to tokenise it (``fura train sft`` flags of the same names; the fields in full:
    ``docs/recipes/sft.md``)."""

    train_files: list[str] = field(
        default_factory=list,
        metadata={"help": "LLM-Adapters JSON/JSONL files, folders of them, or Hub ids (online)", "aliases": ["--data"]},
    )
    prompt_style: PromptStyle = field(default="fura", metadata={"help": "prompt template (fura: train = eval)"})
    max_seq_len: int = field(default=2048, metadata={"help": "truncate rows to this many tokens"})
    val_set_size: int = field(default=100, metadata={"help": "rows held out for a held-out loss"})
    max_rows_per_file: int | None = field(default=None, metadata={"help": "seeded random subset of each file"})
    hub_split: str = field(default="train", metadata={"help": "split of a Hub dataset id"})


def tokenize_example(example: Example, formatter: PromptFormatter, max_seq_len: int = 2048) -> dict[str, list[int]]:
    """Tokenise one row as ``SFTTrainer`` does (:func:`sft_dataset`): labels are -100 over the prompt positions."""
    instruction = formatter.instruction(example)
    source = formatter.prompt(instruction, split="train")
    target = formatter.target(instruction, example.output)
    kwargs = {"truncation": True, "max_length": max_seq_len, "add_special_tokens": formatter.add_special_tokens}
    input_ids = list(formatter.tokenizer(source + target, **kwargs)["input_ids"])
    source_len = min(len(formatter.tokenizer(source, **kwargs)["input_ids"]), len(input_ids))
    labels = [IGNORE_INDEX] * source_len + input_ids[source_len:]
    return {"input_ids": input_ids, "labels": labels}


class SFTCollator(DataCollatorForLanguageModeling):
    """TRL's padding collator, as ``SFTTrainer`` uses it: right-pads ``input_ids`` with ``pad_token_id`` and
    ``labels`` with -100, and builds ``attention_mask`` from the lengths (a trained EOS used as padding stays
    visible)."""

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, pad_to_multiple_of: int | None = None) -> SFTCollator:
        """A collator padding with the tokenizer's pad id, or its EOS id when it has no pad token."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token id")
        return cls(pad_token_id=pad, pad_to_multiple_of=pad_to_multiple_of)


def train_val_split(items: Sequence[T], val_size: int, seed: int) -> tuple[list[T], list[T]]:
    """Hold out ``val_size`` random rows (seeded ``torch.Generator``); returns ``(train, val)``."""
    if val_size <= 0:
        return list(items), []
    if val_size >= len(items):
        raise ValueError(f"val_size={val_size} leaves no training rows out of {len(items)}")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in order[val_size:]], [items[i] for i in order[:val_size]]


def resolve_data_files(paths: Sequence[str | Path]) -> list[str]:
    """Expand directories to their sorted ``*.json`` / ``*.jsonl`` files; keep files and Hub ids as given."""
    resolved: list[str] = []
    for path in paths:
        local = Path(path)
        if local.is_dir():
            found = sorted(p for p in local.iterdir() if p.suffix in DATA_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{local}: directory holds no .json/.jsonl data files")
            resolved.extend(str(p) for p in found)
        else:
            resolved.append(str(path))
    return resolved


def load_mixture(
    paths: Sequence[str | Path], max_rows_per_file: int | None = None, seed: int = 43, hub_split: str = "train"
) -> list[Example]:
    """Load several task files into one shuffled list, each capped at a seeded random ``max_rows_per_file`` rows."""
    generator = torch.Generator().manual_seed(seed)
    mixture: list[Example] = []
    for path in resolve_data_files(paths):
        examples = load_examples(path, split=hub_split)
        if max_rows_per_file is not None and len(examples) > max_rows_per_file:
            keep = torch.randperm(len(examples), generator=generator)[:max_rows_per_file].sort().values.tolist()
            examples = [examples[i] for i in keep]
        mixture.extend(examples)
    order = torch.randperm(len(mixture), generator=generator).tolist()
    mixture = [mixture[i] for i in order]
    counts = Counter(e.source for e in mixture)
    logger.info("loaded %d rows: %s", len(mixture), ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return mixture


def load_sft_examples(config: SFTDataConfig, seed: int) -> tuple[list[Example], list[Example]]:
    """The training and held-out rows described by ``config`` (no tokenizer needed: checked before any model loads)."""
    if not config.train_files:
        raise ValueError("no training data: set train_files (flag --data FILE_OR_DIR ...)")
    examples = load_mixture(config.train_files, config.max_rows_per_file, seed, config.hub_split)
    if not examples:
        raise ValueError(
            f"the training data {list(config.train_files)} holds no rows. Fix: point --data at files with rows."
        )
    blank = [e for e in examples if not (e.instruction.strip() or e.input.strip()) or not e.output.strip()]
    if len(blank) == len(examples):
        raise ValueError(
            f"every training row of {list(config.train_files)} has an empty instruction or output: there is nothing "
            "to learn. Fix: point --data at rows with text in instruction and output."
        )
    if blank:
        logger.warning("%d of %d training rows have an empty instruction or output", len(blank), len(examples))
    return train_val_split(examples, config.val_set_size, seed)


def prompt_completion(example: Example, formatter: PromptFormatter) -> dict[str, Any]:
    """One row in TRL's prompt–completion format: prompt text and target text (answer + EOS), or for the ``chat``
    style the user and assistant messages (TRL renders them with the chat template)."""
    instruction = formatter.instruction(example)
    if formatter.style == "chat":
        return {
            "prompt": [{"role": "user", "content": instruction}],
            "completion": [{"role": "assistant", "content": example.output}],
        }
    return {
        "prompt": formatter.prompt(instruction, split="train"),
        "completion": formatter.target(instruction, example.output),
    }


def sft_dataset(examples: Sequence[Example], formatter: PromptFormatter) -> Any:
    """A ``datasets.Dataset`` of prompt–completion rows (None for no rows)."""
    from datasets import Dataset

    return Dataset.from_list([prompt_completion(e, formatter) for e in examples]) if examples else None


def sft_tokenizer(formatter: PromptFormatter) -> Any:
    """The tokenizer ``SFTTrainer`` tokenises the rows with: for a style tokenised without special tokens
    (``reference``), a copy of the tokenizer that adds none."""
    tokenizer = formatter.tokenizer
    if formatter.add_special_tokens or formatter.style == "chat" or not _adds_special_tokens(tokenizer):
        return tokenizer
    plain = copy.deepcopy(tokenizer)
    plain.add_bos_token, plain.add_eos_token = False, False
    if _adds_special_tokens(plain):
        raise ValueError(
            f"prompt_style={formatter.style!r} tokenises without special tokens, but {type(tokenizer).__name__} adds "
            "them and cannot be told not to. Fix: use --prompt_style fura."
        )
    return plain


def _adds_special_tokens(tokenizer: Any) -> bool:
    text = "a b"
    return tokenizer(text)["input_ids"] != tokenizer(text, add_special_tokens=False)["input_ids"]
