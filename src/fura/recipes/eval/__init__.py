"""Evaluation harnesses: the 8-task commonsense benchmark and math accuracy, on one batched-generation helper.

* :mod:`fura.recipes.eval.generation` — :func:`generate_completions` (left padding, greedy / beam / sampling, stop at
EOS).
* :mod:`fura.recipes.eval.commonsense` — per-task answer extraction, accuracy, average, predictions JSONL (the
  reference's run_commonsense_parallel.py); ``protocol="loglik"`` scores the candidate labels instead of generating.
* :mod:`fura.recipes.eval.choice` — :func:`score_choices`, log-likelihood multiple choice (lm-evaluation-harness style,
  one batched forward pass per row).
* :mod:`fura.recipes.eval.math` — numeric and math-verify grading, MATH-500 / AIME / AMC protocols (the reference's
  rl/ evaluation).
* :mod:`fura.recipes.eval.records` — JSON / JSONL writers.
"""

from fura.recipes.eval.choice import ChoiceItem, ChoiceScore, score_choices
from fura.recipes.eval.commonsense import (
    ANSWER_CHOICES,
    ANSWER_FORMATS,
    ANSWER_PREFIX,
    COMMONSENSE_TASKS,
    PROTOCOLS,
    Blank,
    CommonsenseEvalConfig,
    CommonsenseReport,
    TaskResult,
    as_cloze,
    candidate_labels,
    choice_items,
    evaluate_commonsense,
    evaluate_task,
    evaluate_task_loglik,
    extract_answer,
    fill_in_blank,
    find_task_file,
    option_texts,
)
from fura.recipes.eval.generation import GenerationSettings, generate_completions
from fura.recipes.eval.math import (
    GRADERS,
    MATH_PROTOCOLS,
    Grade,
    MathEvalConfig,
    MathProtocol,
    MathResult,
    evaluate_math,
    extract_numeric_answer,
    grade_math_verify,
    grade_numeric,
)

__all__ = [
    "ANSWER_CHOICES",
    "ANSWER_FORMATS",
    "ANSWER_PREFIX",
    "COMMONSENSE_TASKS",
    "GRADERS",
    "MATH_PROTOCOLS",
    "PROTOCOLS",
    "Blank",
    "ChoiceItem",
    "ChoiceScore",
    "CommonsenseEvalConfig",
    "CommonsenseReport",
    "GenerationSettings",
    "Grade",
    "MathEvalConfig",
    "MathProtocol",
    "MathResult",
    "TaskResult",
    "as_cloze",
    "candidate_labels",
    "choice_items",
    "evaluate_commonsense",
    "evaluate_math",
    "evaluate_task",
    "evaluate_task_loglik",
    "extract_answer",
    "extract_numeric_answer",
    "fill_in_blank",
    "find_task_file",
    "generate_completions",
    "grade_math_verify",
    "grade_numeric",
    "option_texts",
    "score_choices",
]
