"""Reward functions for GRPO math RL, in the calling convention of TRL's ``GRPOTrainer``.

Details: ``docs/recipes/grpo.md``."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fura.recipes.eval.math import extract_boxed, grading_timeout

RewardFunction = Callable[..., list[float]]


def completion_text(completion: str | Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> str:
    """The text of a completion: a string, a chat message, or a list of messages (their contents joined)."""
    if isinstance(completion, str):
        return completion
    messages = [completion] if isinstance(completion, Mapping) else completion
    return "".join(_content(message.get("content")) for message in messages)


def _content(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    # multimodal content blocks: [{"type": "text", "text": ...}, ...]
    return "".join(block.get("text", "") for block in content if isinstance(block, Mapping))


def boxed_answer(text: str) -> str | None:
    """The stripped content of the last closed ``\\boxed{...}`` of ``text``; None when absent, unclosed or empty."""
    return (extract_boxed(text) or "").strip() or None


@functools.lru_cache(maxsize=8192)
def _parse_boxed(answer: str) -> tuple[Any, ...]:
    """math-verify's parse of ``\\boxed{answer}`` (cached: every gold answer is graded num_generations times)."""
    from math_verify import parse

    return tuple(parse(f"\\boxed{{{answer}}}", parsing_timeout=grading_timeout()))


#: A plain number: sign, digits with optional thousands commas, optional decimals (the form of reasoning-gym's and
#: GSM8K's gold answers).
_PLAIN_NUMBER = re.compile(r"^\s*[-+]?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?\s*$")
#: An arithmetic operator after an operand: the mark of an answer left as an expression (``18271 \cdot 43432``).
_OPERATION = re.compile(r"[\d})]\s*(\\times|\\cdot|\\div|[-+*/^×÷])\s*[\d({\\]")


def unevaluated(prediction: str, gold: str) -> bool:
    """Whether ``prediction`` leaves as an expression what ``gold`` states as a plain number (``18271 \\cdot 43432``,
    which math-verify would evaluate: ``docs/recipes/grpo.md``); a fraction (``\\frac{3}{4}``) is a value and counts."""
    return bool(_PLAIN_NUMBER.match(gold)) and bool(_OPERATION.search(prediction))


def answers_equivalent(prediction: str, gold: str) -> bool:
    """Whether two answers (LaTeX or plain numbers, without ``\\boxed``) are equal under math-verify.

    Unparseable answers, a plain-number gold answer met with an unevaluated expression (:func:`unevaluated`) and any
    exception (timeouts included) give False.
    """
    from math_verify import verify

    if unevaluated(prediction, gold):
        return False
    try:
        gold_parsed, pred_parsed = _parse_boxed(gold.strip()), _parse_boxed(prediction.strip())
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(list(gold_parsed), list(pred_parsed), timeout_seconds=grading_timeout()))
    except Exception:  # grading failures count as wrong, as in the reference
        return False


def grade_boxed(completion: str, gold: str) -> bool:
    """Whether the last ``\\boxed{}`` of ``completion`` holds an answer equivalent to ``gold``."""
    prediction = boxed_answer(completion)
    return prediction is not None and answers_equivalent(prediction, str(gold))


def accuracy_reward(completions: Sequence[Any], answer: Sequence[str], **kwargs: Any) -> list[float]:
    """1.0 per completion whose last ``\\boxed{}`` answer math-verifies against the row's ``answer``, else 0.0."""
    return [float(grade_boxed(completion_text(c), str(gold))) for c, gold in zip(completions, answer, strict=True)]


def final_answer_reward(completions: Sequence[Any], answer: Sequence[str], **kwargs: Any) -> list[float]:
    """1.0 per completion whose final answer (math-verify's extraction from the whole completion) equals ``answer``."""
    from fura.recipes.eval.math import grade_math_verify

    grades = [grade_math_verify(completion_text(c), str(gold)) for c, gold in zip(completions, answer, strict=True)]
    return [
        float(grade.correct and not unevaluated(grade.extracted, str(gold)))
        for grade, gold in zip(grades, answer, strict=True)
    ]


#: The accuracy reward per ``--answer-source``: the last ``\boxed{}`` (the reference) or the completion's final answer.
ACCURACY_REWARDS: dict[str, RewardFunction] = {"boxed": accuracy_reward, "completion": final_answer_reward}


def format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 per completion that holds a closed, non-empty ``\\boxed{...}``, else 0.0 (right or wrong)."""
    return [float(boxed_answer(completion_text(c)) is not None) for c in completions]
