"""The 8-task commonsense evaluation (reference-spec §5.1): generate an answer, extract the label, score accuracy.

Tasks, in the reference's order: boolq, piqa, social_i_qa, ARC-Challenge, ARC-Easy, openbookqa, hellaswag,
winogrande. Test files are LLM-Adapters rows (``instruction`` / ``answer``); for each task the harness looks for
``<data_dir>/<task>.json`` (the layout of ``shared/data/commonsense/test``), ``<task>.jsonl`` or
``<data_dir>/<task>/test.json`` (the LLM-Adapters ``dataset/`` layout). Missing tasks are skipped with a log line.

Kept from the reference: answer extraction (lower-case the completion, take the FIRST regex match of the task's
labels, empty string if none) and correctness (``extracted == answer.lower()``); beam search with 4 beams and no
sampling -- which is what the reference actually ran (its temperature/top_p/top_k were ignored, §7.17).

Decided differently (all configurable):

* ``max_new_tokens`` defaults to 32 instead of 256: the answers are a few tokens ("the correct answer is answer3"),
  and generation stops at EOS anyway; 32 only cuts models that ramble before answering. Set 256 for parity.
* prompts use the same ``prompt_style`` as training (default ``"fura"``: the training template for both;
  ``"reference"`` gives the reference's eval template) -- see :mod:`fura.recipes.data.prompts`;
* the average over the evaluated tasks (macro mean of per-task accuracies) is computed and saved; the reference
  never computed the 8-task average. With fewer than 8 tasks available it is the average of those, and the summary
  lists which tasks it covers.

Outputs (when ``output_dir`` is set): ``<output_dir>/<task>/model_predictions.jsonl`` (one JSON object per row:
index, prompt, completion, extracted, label, correct) and ``<output_dir>/summary.json``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fura.recipes.data.formats import Example, load_examples
from fura.recipes.data.prompts import PromptFormatter, PromptStyle
from fura.recipes.eval.generation import GenerationSettings, generate_completions
from fura.recipes.eval.records import write_json, write_jsonl

logger = logging.getLogger(__name__)

COMMONSENSE_TASKS: tuple[str, ...] = (
    "boolq", "piqa", "social_i_qa", "ARC-Challenge", "ARC-Easy", "openbookqa", "hellaswag", "winogrande",
)  # fmt: skip

_FIVE_ANSWERS = tuple(f"answer{i}" for i in range(1, 6))
#: Label vocabulary per task; extraction matches these (in this alternation order) in the lower-cased completion.
ANSWER_CHOICES: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": _FIVE_ANSWERS,
    "ARC-Challenge": _FIVE_ANSWERS,
    "ARC-Easy": _FIVE_ANSWERS,
    "openbookqa": _FIVE_ANSWERS,
    "hellaswag": tuple(f"ending{i}" for i in range(1, 5)),
    "winogrande": ("option1", "option2"),
}
_PATTERNS = {task: re.compile("|".join(choices)) for task, choices in ANSWER_CHOICES.items()}


def extract_answer(task: str, completion: str) -> str:
    """The first match of the task's labels in the lower-cased completion, or ``""`` when there is none."""
    if task not in _PATTERNS:
        raise KeyError(f"unknown commonsense task {task!r}; known: {', '.join(ANSWER_CHOICES)}")
    match = _PATTERNS[task].search(completion.lower())
    return match.group(0) if match else ""


@dataclass
class CommonsenseEvalConfig:
    """Settings of the commonsense harness.

    Attributes:
        data_dir: directory holding the test files (``<task>.json`` or ``<task>/test.json``).
        tasks: tasks to run, in order (default: the reference's 8).
        output_dir: where predictions and ``summary.json`` go (None = write nothing).
        prompt_style: ``"fura"``, ``"reference"`` or ``"chat"`` -- use the style the model was trained with.
        batch_size: prompts per ``generate`` call (reference: 32 for FuRA/Full/SVD, 16 for LoRA).
        num_beams: beam width (reference: 4; 1 = greedy).
        max_new_tokens: new-token budget (reference: 256; 32 is enough for these answers).
        max_examples: evaluate only the first N rows of each task (None = all) for quick runs.
    """

    data_dir: str
    tasks: Sequence[str] = COMMONSENSE_TASKS
    output_dir: str | None = None
    prompt_style: PromptStyle = "fura"
    batch_size: int = 16
    num_beams: int = 4
    max_new_tokens: int = 32
    max_examples: int | None = None


@dataclass
class TaskResult:
    """Accuracy of one task.

    Attributes:
        task: task name.
        correct: rows whose extracted answer equals the label.
        total: rows evaluated.
        predictions_path: the predictions JSONL, when written.
    """

    task: str
    correct: int
    total: int
    predictions_path: str | None = None

    @property
    def accuracy(self) -> float:
        """Fraction correct in [0, 1] (0 for an empty task)."""
        return self.correct / self.total if self.total else 0.0


@dataclass
class CommonsenseReport:
    """Per-task results, the average over evaluated tasks, and the tasks skipped for lack of data.

    Attributes:
        results: task name -> :class:`TaskResult`, in evaluation order.
        skipped: tasks whose test file was not found.
    """

    results: dict[str, TaskResult] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    @property
    def average(self) -> float | None:
        """Macro average accuracy over the evaluated tasks (None when no task ran)."""
        if not self.results:
            return None
        return sum(r.accuracy for r in self.results.values()) / len(self.results)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary."""
        return {
            "tasks": {
                name: {"accuracy": r.accuracy, "correct": r.correct, "total": r.total}
                for name, r in self.results.items()
            },
            "average": self.average,
            "average_over": list(self.results),
            "skipped": list(self.skipped),
        }


def find_task_file(data_dir: str | Path, task: str) -> Path | None:
    """``<task>.json``, ``<task>.jsonl`` or ``<task>/test.json`` under ``data_dir``, whichever exists first."""
    root = Path(data_dir)
    for candidate in (root / f"{task}.json", root / f"{task}.jsonl", root / task / "test.json"):
        if candidate.is_file():
            return candidate
    return None


def evaluate_task(
    model: Any, tokenizer: Any, task: str, examples: Sequence[Example], config: CommonsenseEvalConfig
) -> tuple[TaskResult, list[dict[str, Any]]]:
    """Generate, extract and score one task; returns the result and the prediction records."""
    formatter = PromptFormatter(config.prompt_style, tokenizer)
    prompts = [formatter.prompt(formatter.instruction(e), split="eval") for e in examples]
    settings = GenerationSettings(
        max_new_tokens=config.max_new_tokens, num_beams=config.num_beams, batch_size=config.batch_size
    )
    completions = generate_completions(
        model, tokenizer, prompts, settings, add_special_tokens=formatter.add_special_tokens, desc=task
    )
    records = [
        _record(i, task, prompt, outs[0], example.answer)
        for i, (prompt, outs, example) in enumerate(zip(prompts, completions, examples, strict=True))
    ]
    result = TaskResult(task, correct=sum(r["correct"] for r in records), total=len(records))
    if config.output_dir is not None:
        result.predictions_path = str(write_jsonl(Path(config.output_dir) / task / "model_predictions.jsonl", records))
    return result, records


def _record(index: int, task: str, prompt: str, completion: str, label: str) -> dict[str, Any]:
    extracted = extract_answer(task, completion)
    return {
        "index": index,
        "prompt": prompt,
        "completion": completion,
        "extracted": extracted,
        "label": label,
        "correct": extracted == label.lower(),
    }


def evaluate_commonsense(model: Any, tokenizer: Any, config: CommonsenseEvalConfig) -> CommonsenseReport:
    """Run every configured task that has a test file; log and save per-task accuracy and the average."""
    report = CommonsenseReport()
    for task in config.tasks:
        path = find_task_file(config.data_dir, task)
        if path is None:
            logger.info("skipping %s: no %s.json / %s/test.json under %s", task, task, task, config.data_dir)
            report.skipped.append(task)
            continue
        examples = load_examples(path, required=("instruction", "answer"), max_rows=config.max_examples)
        result, _ = evaluate_task(model, tokenizer, task, examples, config)
        report.results[task] = result
        logger.info("%s: accuracy %.1f%% (%d/%d)", task, 100 * result.accuracy, result.correct, result.total)
    if report.average is not None:
        logger.info("average over %d task(s): %.1f%%", len(report.results), 100 * report.average)
    if config.output_dir is not None:
        summary = {**report.to_dict(), "config": {**asdict(config), "tasks": list(config.tasks)}}
        write_json(Path(config.output_dir) / "summary.json", summary)
    return report
