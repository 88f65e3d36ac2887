"""Offline text fixtures for the data and eval tests: a real BPE tokenizer trained in memory, a tiny Llama, data dir.

Nothing is downloaded. The tokenizer is a byte-level BPE (``tokenizers``) wrapped in ``PreTrainedTokenizerFast``
with ``<pad>``, ``<s>`` (BOS, added by a post-processor unless ``bos=False``) and ``</s>`` (EOS).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[3]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Response: Please answer the following question with true or false, question:",
    "the correct answer is true false solution1 solution2 answer1 answer2 answer3 answer4 answer5",
    "ending1 ending2 ending3 ending4 option1 option2 The answer is 576. 0123456789 \\boxed{42}",
]


def shared_data_dir() -> Path:
    """``$FURA_DATA_DIR``, else ``../shared/data`` beside the checkout (read in place, never copied)."""
    return Path(os.environ.get("FURA_DATA_DIR", REPO_ROOT / ".." / "shared" / "data")).resolve()


def require_data(*parts: str) -> Path:
    """The path under the shared data dir, or skip the test with the reason."""
    path = shared_data_dir().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not found: {path} (set FURA_DATA_DIR to the data directory)")
    return path


def build_tokenizer(bos: bool = True, chat: bool = False):
    """A byte-level BPE tokenizer (vocab ~400) trained on a few template strings, fully offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_CORPUS, trainer=trainer)
    if bos:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_causal_lm(vocab_size: int):
    """A randomly initialised 2-layer Llama (hidden 32) with the tokenizer's vocabulary (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tokenizer():
    """BPE tokenizer that adds BOS."""
    return build_tokenizer()


@pytest.fixture(scope="session")
def chat_tokenizer():
    """BPE tokenizer with a small chat template and no automatic BOS."""
    return build_tokenizer(bos=False, chat=True)
