"""Data loading, prompt formatting and SFT tokenisation for the fura pipelines.

* :mod:`fura.recipes.data.formats` — LLM-Adapters JSON / JSONL rows (or a Hub dataset id) → :class:`Example`.
* :mod:`fura.recipes.data.prompts` — the prompt templates and the ``prompt_style`` decision (see its docstring).
* :mod:`fura.recipes.data.sft` — prompt–completion rows for TRL's SFTTrainer, held-out split, file mixing.
"""

from fura.recipes.data.formats import DataFormatError, Example, load_examples, load_rows
from fura.recipes.data.prompts import PROMPT_STYLES, PromptFormatter, PromptStyle
from fura.recipes.data.sft import (
    IGNORE_INDEX,
    SFTCollator,
    SFTDataConfig,
    load_mixture,
    prompt_completion,
    sft_dataset,
    tokenize_example,
    train_val_split,
)

__all__ = [
    "IGNORE_INDEX",
    "PROMPT_STYLES",
    "DataFormatError",
    "Example",
    "PromptFormatter",
    "PromptStyle",
    "SFTCollator",
    "SFTDataConfig",
    "load_examples",
    "load_mixture",
    "load_rows",
    "prompt_completion",
    "sft_dataset",
    "tokenize_example",
    "train_val_split",
]
