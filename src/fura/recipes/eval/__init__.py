"""Evaluation harnesses: the 8-task commonsense benchmark and math accuracy, on one batched-generation helper.

* :mod:`fura.recipes.eval.generation` — :func:`generate_completions` (left padding, greedy / beam / sampling, stop at
EOS).
* :mod:`fura.recipes.eval.commonsense` — per-task answer extraction, accuracy, average, predictions JSONL (reference
§5.1).
* :mod:`fura.recipes.eval.math` — numeric and math-verify grading, MATH-500 / AIME / AMC protocols (reference §5.2).
* :mod:`fura.recipes.eval.records` — JSON / JSONL writers.
"""

from fura.recipes.eval.commonsense import (
    ANSWER_CHOICES,
    COMMONSENSE_TASKS,
    CommonsenseEvalConfig,
    CommonsenseReport,
    TaskResult,
    evaluate_commonsense,
    evaluate_task,
    extract_answer,
    find_task_file,
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
    "COMMONSENSE_TASKS",
    "GRADERS",
    "MATH_PROTOCOLS",
    "CommonsenseEvalConfig",
    "CommonsenseReport",
    "GenerationSettings",
    "Grade",
    "MathEvalConfig",
    "MathProtocol",
    "MathResult",
    "TaskResult",
    "evaluate_commonsense",
    "evaluate_math",
    "evaluate_task",
    "extract_answer",
    "extract_numeric_answer",
    "find_task_file",
    "generate_completions",
    "grade_math_verify",
    "grade_numeric",
]
