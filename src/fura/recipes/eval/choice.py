"""Log-likelihood multiple choice (lm-evaluation-harness style): score every candidate answer by its summed token
log-probability, pick the best, reading candidates that share all but their last token from one sequence.

Details (the sequence plan, fill-in-the-blank rows, tokenisation): ``docs/recipes/eval.md``."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from fura.recipes.eval.generation import eval_mode, model_device


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question.

    Attributes:
        context: the text every candidate continues (prompt + answer prefix, e.g. ``"...### Response:\\nthe
            correct answer is"``).
        candidates: the candidate continuations, e.g. ``(" answer1", " answer2")`` (at least one, no duplicates).
        label: the correct candidate (one of ``candidates``), or None when unknown.
        continuation: for a fill-in-the-blank row, the rest of the sentence after the blank; candidate ``i`` then
            scores the log-probability of ``continuation`` after ``context + candidates[i]`` (WinoGrande).
    """

    context: str
    candidates: tuple[str, ...]
    label: str | None = None
    continuation: str | None = None


@dataclass(frozen=True)
class ChoiceScore:
    """The scores of one :class:`ChoiceItem`.

    Attributes:
        scores: summed log-probability of each candidate's tokens, in candidate order.
        num_tokens: how many tokens each candidate has.
        predicted: index of the best candidate (the first one on a tie).
    """

    scores: tuple[float, ...]
    num_tokens: tuple[int, ...]
    predicted: int


@dataclass(frozen=True)
class _Sequence:
    """One forward-pass sequence: ``context_ids + key``; the candidates read from it."""

    item: int
    ids: tuple[int, ...]
    context_len: int
    reads: tuple[tuple[int, tuple[int, ...]], ...]  # (candidate index, candidate token ids)


def split_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """Move the context's trailing whitespace to the front of the continuation (lm-evaluation-harness convention)."""
    stripped = context.rstrip()
    return stripped, context[len(stripped) :] + continuation


def encode_pair(tokenizer: Any, context: str, continuation: str, add_special_tokens: bool) -> tuple[list[int], ...]:
    """``(context_ids, continuation_ids)`` as lm-evaluation-harness tokenises them (``docs/recipes/eval.md``)."""
    context, continuation = split_trailing_space(context, continuation)
    context_ids = list(tokenizer(context, add_special_tokens=add_special_tokens)["input_ids"])
    whole = list(tokenizer(context + continuation, add_special_tokens=add_special_tokens)["input_ids"])
    if whole[: len(context_ids)] == context_ids:
        continuation_ids = whole[len(context_ids) :]
    else:
        continuation_ids = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
    return context_ids, continuation_ids


def _check_item(item: ChoiceItem, index: int) -> None:
    if not item.candidates:
        raise ValueError(f"multiple-choice item {index} has no candidates. Fix: give each item at least one.")
    if len(set(item.candidates)) != len(item.candidates):
        raise ValueError(f"multiple-choice item {index} repeats a candidate: {list(item.candidates)}")
    if item.label is not None and item.label not in item.candidates:
        raise ValueError(
            f"multiple-choice item {index}: its label {item.label!r} is not one of its candidates "
            f"{list(item.candidates)}. Fix: include the correct answer among the candidates."
        )


def plan_sequences(item: ChoiceItem, index: int, tokenizer: Any, add_special_tokens: bool) -> list[_Sequence]:
    """The fewest sequences from which every candidate's log-probability can be read (``docs/recipes/eval.md``)."""
    _check_item(item, index)
    if item.continuation is not None:
        return _blank_sequences(item, index, tokenizer, add_special_tokens)
    context_ids: list[int] | None = None
    encoded: list[tuple[int, tuple[int, ...]]] = []
    for c, candidate in enumerate(item.candidates):
        ctx, cont = encode_pair(tokenizer, item.context, candidate, add_special_tokens)
        if not cont:
            raise ValueError(f"multiple-choice item {index}: candidate {candidate!r} gives no token to score")
        if context_ids is not None and ctx != context_ids:
            raise ValueError(f"multiple-choice item {index}: candidates tokenise the shared context differently")
        context_ids = ctx
        encoded.append((c, tuple(cont)))
    keys: list[tuple[int, ...]] = []
    for key in sorted({cont[:-1] for _, cont in encoded}, key=len, reverse=True):
        if not any(longer[: len(key)] == key for longer in keys):
            keys.append(key)
    assert context_ids is not None
    sequences = []
    for key in keys:
        reads = tuple((c, cont) for c, cont in encoded if key[: len(cont) - 1] == cont[:-1])
        encoded = [(c, cont) for c, cont in encoded if key[: len(cont) - 1] != cont[:-1]]
        sequences.append(_Sequence(index, tuple(context_ids) + key, len(context_ids), reads))
    return sequences


def _blank_sequences(item: ChoiceItem, index: int, tokenizer: Any, add_special_tokens: bool) -> list[_Sequence]:
    """One sequence per candidate of a fill-in-the-blank item: ``context + candidate``, then the continuation read."""
    sequences = []
    for c, candidate in enumerate(item.candidates):
        ctx, cont = encode_pair(tokenizer, item.context + candidate, item.continuation or "", add_special_tokens)
        if not cont:
            raise ValueError(f"multiple-choice item {index}: its continuation {item.continuation!r} gives no token")
        sequences.append(_Sequence(index, tuple(ctx) + tuple(cont[:-1]), len(ctx), ((c, tuple(cont)),)))
    return sequences


def _forward_parameters(model: Any) -> set[str]:
    """Keyword names the model's forward accepts explicitly (the base model's, for a PEFT wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = getattr(base, "forward", None) or base
    try:
        return set(inspect.signature(forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return set()


def _logits(model: Any, sequences: Sequence[_Sequence], pad_id: int, accepted: set[str]) -> tuple[torch.Tensor, int]:
    """Left-padded forward of ``sequences``; returns the kept logits and how many final positions they cover."""
    ids = [torch.tensor(s.ids, dtype=torch.long) for s in sequences]
    input_ids = pad_sequence(ids, batch_first=True, padding_value=pad_id, padding_side="left")
    attention_mask = pad_sequence([torch.ones_like(i) for i in ids], batch_first=True, padding_side="left")
    device = model_device(model)
    kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    if "position_ids" in accepted:
        kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0).to(device)
    if "use_cache" in accepted:
        kwargs["use_cache"] = False
    keep = input_ids.shape[1]
    if "logits_to_keep" in accepted:
        keep = max(len(s.ids) - s.context_len + 1 for s in sequences)
        kwargs["logits_to_keep"] = keep
    output = model(**kwargs)
    logits = output.logits if hasattr(output, "logits") else output[0]
    return logits[:, -keep:, :].float(), keep


def _read_scores(logits: torch.Tensor, keep: int, sequences: Sequence[_Sequence]) -> list[tuple[int, int, float, int]]:
    """``(item, candidate, summed log-prob, tokens)`` for every candidate read from this batch."""
    log_probs = torch.log_softmax(logits, dim=-1)
    found = []
    for row, seq in enumerate(sequences):
        for candidate, cont in seq.reads:
            # logits at sequence position p predict token p + 1; kept column = p - (len(ids) - keep)
            positions = [seq.context_len - 1 + i - (len(seq.ids) - keep) for i in range(len(cont))]
            total = sum(float(log_probs[row, pos, token]) for pos, token in zip(positions, cont, strict=True))
            found.append((seq.item, candidate, total, len(cont)))
    return found


def score_choices(
    model: Any,
    tokenizer: Any,
    items: Sequence[ChoiceItem],
    batch_size: int = 16,
    add_special_tokens: bool = True,
    desc: str = "loglik",
) -> list[ChoiceScore]:
    """Score every candidate of every :class:`ChoiceItem` by its summed token log-probability with ``model`` (a causal
    LM returning ``.logits``), in forward passes of ``batch_size`` sequences (a row usually needs one) left-padded with
    the tokenizer's pad id, else its EOS id; one :class:`ChoiceScore` per item, in order. ``add_special_tokens``: let
    the tokenizer add BOS to the context (False for chat-templated prompts); ``desc``: the progress bar label."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token id; set tokenizer.pad_token")
    sequences = [s for i, item in enumerate(items) for s in plan_sequences(item, i, tokenizer, add_special_tokens)]
    sequences.sort(key=lambda s: -len(s.ids))
    scores: list[list[float | None]] = [[None] * len(item.candidates) for item in items]
    lengths: list[list[int]] = [[0] * len(item.candidates) for item in items]
    accepted = _forward_parameters(model)
    batches = [sequences[i : i + batch_size] for i in range(0, len(sequences), batch_size)]
    with eval_mode(model), torch.inference_mode():
        for batch in tqdm(batches, desc=desc, disable=not batches):
            logits, keep = _logits(model, batch, pad_id, accepted)
            for item, candidate, total, count in _read_scores(logits, keep, batch):
                scores[item][candidate], lengths[item][candidate] = total, count
    return [_choice_score(s, n) for s, n in zip(scores, lengths, strict=True)]


def _choice_score(scores: Sequence[float | None], lengths: Sequence[int]) -> ChoiceScore:
    if any(s is None for s in scores):  # pragma: no cover - plan_sequences reads every candidate
        raise RuntimeError("a candidate was not scored")
    values = tuple(float(s) for s in scores)  # type: ignore[arg-type]
    return ChoiceScore(values, tuple(lengths), max(range(len(values)), key=lambda i: (values[i], -i)))
