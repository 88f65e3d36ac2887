"""Evaluation glue: turn :class:`~fura.recipes.config.EvalSettings` into a :mod:`fura.recipes.eval` harness run.

Used after training (results land in ``<run>/eval``) and by ``fura eval commonsense|math``. The harnesses themselves
(answer extraction, grading, protocols, predictions JSONL) live in :mod:`fura.recipes.eval`; unset settings keep the
harness defaults.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from fura.recipes.config import EvalSettings

logger = logging.getLogger(__name__)


def _set(settings: EvalSettings, **mapping: str) -> dict[str, Any]:
    """Harness keyword arguments for the settings that are set (``harness_name=settings_name``)."""
    values = {harness: getattr(settings, ours) for harness, ours in mapping.items()}
    return {k: v for k, v in values.items() if v is not None}


def evaluate_commonsense_settings(
    model: Any, tokenizer: Any, settings: EvalSettings, prompt_style: str, output_dir: Path | None
) -> dict[str, Any]:
    """Run the commonsense harness; returns its summary (per-task accuracy, average, skipped tasks)."""
    from fura.recipes.eval import CommonsenseEvalConfig, evaluate_commonsense

    kwargs = _set(
        settings,
        max_examples="max_examples",
        batch_size="batch_size",
        num_beams="num_beams",
        max_new_tokens="max_new_tokens",
    )
    if settings.tasks:
        kwargs["tasks"] = list(settings.tasks)
    config = CommonsenseEvalConfig(
        data_dir=str(settings.data),
        output_dir=None if output_dir is None else str(output_dir / "commonsense"),
        prompt_style=prompt_style,
        **kwargs,
    )
    report = evaluate_commonsense(model, tokenizer, config)
    if not report.results:
        logger.warning("commonsense evaluation found no test file under %s", settings.data)
    return report.to_dict()


def evaluate_math_settings(
    model: Any, tokenizer: Any, settings: EvalSettings, prompt_style: str, output_dir: Path | None
) -> dict[str, Any]:
    """Run the math harness (a protocol's settings when ``settings.protocol`` is set); returns its summary."""
    from fura.recipes.eval import MathEvalConfig, evaluate_math

    kwargs = _set(
        settings,
        grader="grader",
        max_examples="max_examples",
        batch_size="batch_size",
        num_beams="num_beams",
        max_new_tokens="max_new_tokens",
        n_samples="n_samples",
        temperature="temperature",
    )
    out = None if output_dir is None else str(output_dir / "math")
    if settings.protocol:
        config = MathEvalConfig.for_protocol(settings.protocol, settings.data, prompt_style=prompt_style, **kwargs)
    else:
        config = MathEvalConfig(data_path=str(settings.data), prompt_style=prompt_style, **kwargs)
    config = replace(config, output_dir=out)
    result = evaluate_math(model, tokenizer, config)
    return {
        "name": result.name,
        "accuracy": result.accuracy,
        "correct": result.correct,
        "total": result.total,
        "problems": result.problems,
        "predictions_path": result.predictions_path,
    }


def run_evaluation(
    model: Any, tokenizer: Any, settings: EvalSettings, prompt_style: str = "fura", output_dir: Path | None = None
) -> dict[str, Any] | None:
    """Evaluate per ``settings.kind`` (``none`` → None); outputs go under ``output_dir`` when given."""
    if settings.kind == "none":
        return None
    runners = {"commonsense": evaluate_commonsense_settings, "math": evaluate_math_settings}
    if settings.kind not in runners:
        raise ValueError(f"unknown evaluation kind {settings.kind!r}; use commonsense or math")
    return {"kind": settings.kind, **runners[settings.kind](model, tokenizer, settings, prompt_style, output_dir)}
