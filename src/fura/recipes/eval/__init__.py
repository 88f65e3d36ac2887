"""Evaluation harnesses: the 8-task commonsense benchmark (:mod:`~fura.recipes.eval.commonsense`, log-likelihood
scoring in :mod:`~fura.recipes.eval.choice`) and math accuracy (:mod:`~fura.recipes.eval.math`), on one batched
generation helper (:mod:`~fura.recipes.eval.generation`). Details: ``docs/recipes/eval.md``."""

from fura.recipes.eval.choice import score_choices
from fura.recipes.eval.commonsense import (
    CommonsenseEvalConfig,
    as_cloze,
    choice_items,
    evaluate_commonsense,
    option_texts,
)
from fura.recipes.eval.generation import GenerationSettings, generate_completions
from fura.recipes.eval.math import Grade, MathEvalConfig, evaluate_math, grade_math_verify, grade_numeric

__all__ = [
    "CommonsenseEvalConfig",
    "GenerationSettings",
    "Grade",
    "MathEvalConfig",
    "as_cloze",
    "choice_items",
    "evaluate_commonsense",
    "evaluate_math",
    "generate_completions",
    "grade_math_verify",
    "grade_numeric",
    "option_texts",
    "score_choices",
]
