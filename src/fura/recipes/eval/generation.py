"""Batched text generation shared by the evaluation harnesses (left padding, longest first, new tokens
decoded). Details: ``docs/recipes/eval.md``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm


@dataclass
class GenerationSettings:
    """Decoding settings.

    Attributes:
        max_new_tokens: new-token budget per completion.
        num_beams: beam width (1 = greedy when ``do_sample`` is off).
        do_sample: sample instead of greedy / beam search.
        temperature: sampling temperature (used only when ``do_sample``).
        top_p: nucleus sampling mass (used only when ``do_sample``).
        num_return_sequences: completions per prompt (must be <= ``num_beams`` for beam search).
        batch_size: prompts per ``generate`` call.
    """

    max_new_tokens: int = 32
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_return_sequences: int = 1
    batch_size: int = 16


@contextmanager
def left_padding(tokenizer: Any) -> Iterator[Any]:
    """Temporarily pad on the left (borrowing EOS as the pad token if there is none); restore everything after."""
    side, had_pad = tokenizer.padding_side, tokenizer.pad_token is not None
    tokenizer.padding_side = "left"
    if not had_pad:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = side
        if not had_pad:
            tokenizer.pad_token = None


@contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """Put ``model`` in eval mode, restore its training flag afterwards."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield model
    finally:
        if was_training:
            model.train()


def model_device(model: Any) -> torch.device:
    """The device to put inputs on: ``model.device``, else the first parameter's device, else CPU."""
    device = getattr(model, "device", None)
    if device is not None:
        return torch.device(device)
    params = getattr(model, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


def generate_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    settings: GenerationSettings | None = None,
    add_special_tokens: bool = True,
    desc: str = "generate",
) -> list[list[str]]:
    """Generate ``settings.num_return_sequences`` completions for every prompt with ``model.generate`` (default
    settings: greedy, 32 new tokens, batch 16), batched with left padding (the tokenizer's ``padding_side`` is
    restored); one list of completions (decoded new tokens, special tokens skipped) per prompt, in order.
    ``add_special_tokens``: let the tokenizer add BOS (False for chat-templated or literal-"<s>" prompts); ``desc``:
    the progress bar label."""
    settings = settings or GenerationSettings()
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[list[str]] = [[] for _ in prompts]
    batches = [order[i : i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
    with left_padding(tokenizer), eval_mode(model), torch.inference_mode():
        kwargs = _generate_kwargs(tokenizer, settings)
        for batch in tqdm(batches, desc=desc, disable=not batches):
            texts = _generate_batch(model, tokenizer, [prompts[i] for i in batch], kwargs, add_special_tokens)
            n = settings.num_return_sequences
            for slot, index in enumerate(batch):
                results[index] = texts[slot * n : (slot + 1) * n]
    return results


def _generate_kwargs(tokenizer: Any, settings: GenerationSettings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "num_beams": settings.num_beams,
        "do_sample": settings.do_sample,
        "num_return_sequences": settings.num_return_sequences,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
    return kwargs


def _generate_batch(
    model: Any, tokenizer: Any, texts: list[str], kwargs: dict[str, Any], add_special_tokens: bool
) -> list[str]:
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    device = model_device(model)
    input_ids, attention_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    new_tokens = output[:, input_ids.shape[1] :]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
