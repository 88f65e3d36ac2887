"""Evaluation glue: :class:`EvalArguments` (after ``fura train sft`` and in ``fura eval commonsense|math``) → a
:mod:`fura.recipes.eval` harness run; unset settings keep the harness defaults."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

EVAL_KINDS = ("none", "commonsense", "math")


@dataclass
class EvalArguments:
    """Evaluation after training (and of ``fura eval``); None = the harness's own default. The fields in full:
    ``docs/recipes/eval.md``."""

    eval: str = field(default="none", metadata={"help": "evaluate the trained model", "choices": list(EVAL_KINDS)})
    eval_data: str | None = field(default=None, metadata={"help": "commonsense: test folder; math: a JSON/JSONL file"})
    eval_tasks: list[str] | None = field(default=None, metadata={"help": "commonsense tasks (default: all found)"})
    eval_scoring: str = field(
        default="generate",
        metadata={
            "help": "commonsense: generate (the paper's) or loglik (candidate log-likelihoods)",
            "choices": ["generate", "loglik"],
        },
    )
    eval_protocol: str | None = field(default=None, metadata={"help": "math: MATH-500, AIME-24, AIME-25 or AMC23"})
    eval_grader: str | None = field(
        default=None, metadata={"help": "math grader (default numeric)", "choices": ["numeric", "math_verify"]}
    )
    eval_max_examples: int | None = field(default=None, metadata={"help": "rows per task / file (default: all)"})
    eval_batch_size: int | None = field(default=None, metadata={"help": "prompts per generate call"})
    eval_num_beams: int | None = field(default=None, metadata={"help": "beam width (commonsense default 4)"})
    eval_max_new_tokens: int | None = field(default=None, metadata={"help": "new-token budget"})
    eval_n_samples: int | None = field(default=None, metadata={"help": "math: completions per problem"})
    eval_temperature: float | None = field(default=None, metadata={"help": "math: sampling temperature (0 = greedy)"})

    def __post_init__(self) -> None:
        if self.eval not in EVAL_KINDS:
            raise ValueError(f"eval must be one of {EVAL_KINDS}, got {self.eval!r}")
        if self.eval != "none" and not (self.eval_data or self.eval_protocol):
            raise ValueError(f"eval={self.eval!r} needs eval_data (flag --eval-data PATH)")


def check_eval_data(settings: EvalArguments, flag: str = "--eval-data") -> None:
    """Fail before any model is loaded (or trained) when the evaluation data is missing or empty.

    Commonsense: the folder must exist and hold a test file with rows for at least one of the tasks; math: a local
    file must hold rows (Hub ids and protocols are resolved when evaluating). ``flag`` is the option that set the
    data, named in the fix (``--eval-data`` of the training recipes, ``--data`` of ``fura eval``).
    """
    if settings.eval == "none" or not settings.eval_data:
        return
    from fura.recipes.data.formats import load_examples

    path = Path(settings.eval_data)
    if settings.eval == "commonsense":
        from fura.recipes.eval.commonsense import COMMONSENSE_TASKS, find_task_file

        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such folder of commonsense test files. Fix: {flag} DIR.")
        tasks = settings.eval_tasks or COMMONSENSE_TASKS
        files = {task: file for task in tasks if (file := find_task_file(path, task)) is not None}
        if not files:
            raise ValueError(
                f"{path} holds no test file for {', '.join(tasks)} (<task>.json or <task>/test.json). Fix: point "
                f"{flag} at the folder of the test files."
            )
    elif path.exists():
        files = {"math": path}
    else:
        return  # a Hub dataset id (online), checked when it is loaded
    for name, file in files.items():
        if not load_examples(file):
            raise ValueError(f"{file}: the {name} test file holds no rows. Fix: evaluate on a file with rows.")


#: Harness settings both harnesses take, each from the flag ``--eval-<name>`` (``settings.eval_<name>``).
DECODING_SETTINGS = ("max_examples", "batch_size", "num_beams", "max_new_tokens")


def _set(settings: EvalArguments, *names: str) -> dict[str, Any]:
    """Harness keyword arguments ``{name: settings.eval_<name>}`` for the named settings that are set."""
    values = {name: getattr(settings, f"eval_{name}") for name in names}
    return {k: v for k, v in values.items() if v is not None}


def evaluate_commonsense_settings(
    model: Any, tokenizer: Any, settings: EvalArguments, prompt_style: str, output_dir: Path | None
) -> dict[str, Any]:
    """Run the commonsense harness; returns its summary (per-task accuracy, average, skipped tasks)."""
    from fura.recipes.eval import CommonsenseEvalConfig, evaluate_commonsense

    kwargs = _set(settings, *DECODING_SETTINGS)
    if settings.eval_tasks:
        kwargs["tasks"] = list(settings.eval_tasks)
    config = CommonsenseEvalConfig(
        data_dir=str(settings.eval_data),
        output_dir=None if output_dir is None else str(output_dir / "commonsense"),
        prompt_style=prompt_style,
        protocol=settings.eval_scoring,
        **kwargs,
    )
    report = evaluate_commonsense(model, tokenizer, config)
    if not report.results:
        logger.warning("commonsense evaluation found no test file under %s", settings.eval_data)
    return report.to_dict()


def evaluate_math_settings(
    model: Any, tokenizer: Any, settings: EvalArguments, prompt_style: str, output_dir: Path | None
) -> dict[str, Any]:
    """Run the math harness (a protocol's settings when ``settings.protocol`` is set); returns its summary."""
    from fura.recipes.eval import MathEvalConfig, evaluate_math

    kwargs = _set(settings, *DECODING_SETTINGS, "grader", "n_samples", "temperature")
    kwargs.update(prompt_style=prompt_style, output_dir=None if output_dir is None else str(output_dir / "math"))
    if settings.eval_protocol:
        config = MathEvalConfig.for_protocol(settings.eval_protocol, settings.eval_data, **kwargs)
    else:
        config = MathEvalConfig(data_path=str(settings.eval_data), **kwargs)
    return evaluate_math(model, tokenizer, config).summary()


def run_evaluation(
    model: Any, tokenizer: Any, settings: EvalArguments, prompt_style: str = "fura", output_dir: Path | None = None
) -> dict[str, Any] | None:
    """Evaluate per ``settings.eval`` (``none`` → None); outputs go under ``output_dir`` when given."""
    if settings.eval == "none":
        return None
    runners = {"commonsense": evaluate_commonsense_settings, "math": evaluate_math_settings}
    return {"kind": settings.eval, **runners[settings.eval](model, tokenizer, settings, prompt_style, output_dir)}
