"""GRPO's evaluations (``fura train grpo``): held-out accuracy during training (:class:`GRPORunCallback`) and after
it, then the GSM8K-format data files and the MATH-500 / AIME / AMC protocols, all through :mod:`fura.recipes.eval.math`
with the training prompt."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from fura.recipes.data.formats import load_rows
from fura.recipes.data.math_problems import QUESTION_FIELDS
from fura.recipes.data.prompts import BOXED_MATH_INSTRUCTION
from fura.recipes.eval.math import MathEvalConfig, MathResult, evaluate_math
from fura.recipes.grpo_settings import GRPOSettings
from fura.recipes.plots import plot_reward_curve
from fura.recipes.runs import RunFolder

logger = logging.getLogger("fura.recipes.grpo")

#: New-token budget of the MATH-500 / AIME / AMC protocols (reference ``--math-verify-max-tokens``).
PROTOCOL_MAX_NEW_TOKENS = 2048


def _question_field(path: str) -> str | None:
    """The question field of a local file's first row (None for Hub ids: the protocol's own field)."""
    if not Path(path).exists():
        return None
    rows = load_rows(path)
    return next((name for name in QUESTION_FIELDS if rows and name in rows[0]), None)


def _shared(settings: GRPOSettings, style: str, output: Path | None, budget: int | None = None) -> dict[str, Any]:
    """The ``MathEvalConfig`` fields every evaluation of the run shares: the training prompt, the batch size, the
    problem cap, the new-token budget (default ``budget``, else ``max_completion_length``) and the output folder."""
    evaluation = settings.evaluation
    return {
        "question_template": BOXED_MATH_INSTRUCTION,
        "prompt_style": style,
        "batch_size": evaluation.eval_batch_size,
        "max_examples": evaluation.eval_max_examples,
        "max_new_tokens": evaluation.eval_max_new_tokens or budget or settings.training.max_completion_length,
        "output_dir": None if output is None else str(output),
    }


def protocol_eval_config(
    settings: GRPOSettings, protocol: str, path: str | None, style: str, output: Path
) -> MathEvalConfig:
    """A MATH-500 / AIME / AMC protocol (its sampling settings, math-verify) on a local file or the Hub id."""
    overrides = _shared(settings, style, output, PROTOCOL_MAX_NEW_TOKENS)
    if path and (field_name := _question_field(path)):
        overrides["question_field"] = field_name
    return MathEvalConfig.for_protocol(protocol, path, **overrides)


def evaluate_after_training(
    model: Any, tokenizer: Any, settings: GRPOSettings, run: RunFolder, style: str, held_out: Path | None, step: int
) -> dict[str, Any]:
    """Held-out accuracy (also logged to ``metrics.jsonl``), then numeric accuracy on the GSM8K-format data files and
    the protocols of the settings."""
    out = run.eval_dir / "math"
    results: dict[str, Any] = {}
    if settings.evaluation.held_out_eval and held_out is not None:
        results["held_out"] = score_held_out(model, tokenizer, settings, run, style, held_out, step, out).summary()
    for path in settings.evaluation.eval_data:
        question_field = _question_field(path) or "instruction"
        config = MathEvalConfig(path, grader="numeric", question_field=question_field, **_shared(settings, style, out))
        result = evaluate_math(model, tokenizer, config)
        results[result.name] = result.summary()
    for protocol, path in settings.evaluation.protocols().items():
        result = evaluate_math(model, tokenizer, protocol_eval_config(settings, protocol, path, style, out))
        results[protocol] = result.summary()
    return results


def score_held_out(
    model: Any, tokenizer: Any, settings: GRPOSettings, run: RunFolder, style: str, held_out: Path, step: int,
    output: Path | None = None,
) -> MathResult:  # fmt: skip
    """Greedy math-verify held-out accuracy at ``step`` with the training prompt, logged and appended to
    ``metrics.jsonl`` (predictions under ``output``)."""
    shared = _shared(settings, style, output)
    config = MathEvalConfig(str(held_out), name="held_out", grader="math_verify", question_field="problem", **shared)
    result = evaluate_math(model, tokenizer, config)
    record = {"held_out_accuracy": result.accuracy, "held_out_correct": result.correct, "held_out_total": result.total}
    run.metrics.append({"step": step, **record})
    logger.info("step %d: held-out accuracy %.1f%% (%d/%d)", step, 100 * result.accuracy, result.correct, result.total)
    return result


class GRPORunCallback(TrainerCallback):
    """Log one line per step, redraw ``<run>/rewards.png`` (titled ``title``) at every save (the recipe redraws it
    after the final evaluation), and run ``evaluate(model, step) -> accuracy``, the in-loop held-out evaluation, every
    ``every`` steps and before the first (either None: none; the final step is left to the post-training evaluation)."""

    def __init__(
        self,
        run: RunFolder,
        title: str = "",
        evaluate: Callable[[Any, int], float] | None = None,
        every: int | None = None,
    ) -> None:
        self.run = run
        self.title = title
        self.evaluate = evaluate if every else None
        self.every = every

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.evaluate is not None and state.global_step == 0 and state.max_steps > 0:
            self.evaluate(kwargs["model"], 0)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        step = state.global_step
        if self.evaluate is not None and step % self.every == 0 and step < state.max_steps:
            self.evaluate(kwargs["model"], step)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs and "reward" in logs and state.is_world_process_zero:
            logger.info(
                "step %d/%d: reward %.3f ± %.3f, completion length %.0f, lr %.2e",
                state.global_step,
                state.max_steps,
                logs["reward"],
                logs.get("reward_std") or 0.0,
                logs.get("completions/mean_length") or 0.0,
                logs.get("learning_rate") or 0.0,
            )

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if state.is_world_process_zero:
            self.plot()

    def plot(self) -> Path | None:
        """Redraw ``<run>/rewards.png`` from ``metrics.jsonl``."""
        return plot_reward_curve(self.run.metrics.records(), self.run.root / "rewards.png", self.title)


def in_loop_evaluator(settings: GRPOSettings, run: RunFolder, tokenizer: Any, style: str, held_out: Path) -> Callable:
    """``(model, step) -> accuracy``: :func:`score_held_out` without a predictions file."""
    return lambda model, step: score_held_out(model, tokenizer, settings, run, style, held_out, step).accuracy
