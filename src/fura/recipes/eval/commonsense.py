"""The 8-task commonsense evaluation (the reference's run_commonsense_parallel.py): generate an answer and extract
the label, or score the candidate labels (``protocol="loglik"``); per-task accuracy and their average.

What is kept from the reference, what differs, and the output files: ``docs/recipes/eval.md``."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

from fura.recipes.data.formats import Example, load_examples
from fura.recipes.data.prompts import PromptFormatter, PromptStyle
from fura.recipes.eval.choice import ChoiceItem, score_choices
from fura.recipes.eval.generation import GenerationSettings, generate_completions
from fura.recipes.eval.records import Accuracy, write_json, write_jsonl

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
_ANSWER_FORMAT = re.compile(r"Answer format:\s*([^\n]+?)\s*$", re.IGNORECASE)
_ANSWER_FORMAT_LINE = re.compile(r"\s*Answer format:[^\n]*\s*$", re.IGNORECASE)
#: An option of an LLM-Adapters row: ``Answer2: ...``, ``Solution1: ...``, ``Option1: ...``, ``Ending3: ...``.
_OPTION = re.compile(r"(?:(?<=\s)|^)(Answer|Solution|Option|Ending)(\d+):[ \t]*")

Protocol = Literal["generate", "loglik"]
AnswerFormat = Literal["label", "cloze"]
#: How a row is asked and answered: ``label`` -- the LLM-Adapters rows as they are (options listed, the answer is a
#: label such as ``answer2``; the paper's format); ``cloze`` -- the question alone, answered with the correct
#: option's text (lm-evaluation-harness's formulation of ARC, OpenBookQA and PIQA; see :func:`as_cloze`).
ANSWER_FORMATS: tuple[str, ...] = ("label", "cloze")
#: The commonsense evaluation protocols (``docs/recipes/eval.md``).
PROTOCOLS: tuple[str, ...] = ("generate", "loglik")
#: What every LLM-Adapters commonsense target starts with; the loglik protocol scores the label after it.
ANSWER_PREFIX = "the correct answer is"


def _labels(task: str) -> tuple[str, ...]:
    if task not in ANSWER_CHOICES:
        raise KeyError(f"unknown commonsense task {task!r}; known: {', '.join(ANSWER_CHOICES)}")
    return ANSWER_CHOICES[task]


def extract_answer(task: str, completion: str) -> str:
    """The first match of the task's labels in the lower-cased completion, or ``""`` when there is none."""
    match = re.search("|".join(_labels(task)), completion.lower())
    return match.group(0) if match else ""


def candidate_labels(task: str, instruction: str) -> tuple[str, ...]:
    """The labels a row offers: those listed after ``Answer format:`` (when all belong to the task), else all.

    ``"... Answer format: answer1/answer2/answer3"`` gives ``("answer1", "answer2", "answer3")`` for a three-way
    ARC question, so that the loglik protocol never scores an ``answer4`` the question does not have.
    """
    labels = _labels(task)
    match = _ANSWER_FORMAT.search(instruction)
    if match:
        listed = tuple(label.strip().lower() for label in match.group(1).split("/"))
        if listed and all(label in labels for label in listed) and len(set(listed)) == len(listed):
            return listed
    return labels


def option_texts(instruction: str) -> dict[str, str]:
    """The options a row's instruction lists, label -> text, in order (empty for true/false questions).

    ``"...\\n\\nAnswer1: carbon dioxide Answer2: food\\n\\nAnswer format: answer1/answer2"`` gives
    ``{"answer1": "carbon dioxide", "answer2": "food"}``; PIQA's ``Solution1:`` / ``Solution2:`` paragraphs,
    WinoGrande's ``Option1:`` and HellaSwag's ``Ending1:`` are read the same way. The ``Answer format:`` line is not an
    option.
    """
    body = _ANSWER_FORMAT_LINE.sub("", instruction)
    found = [*_OPTION.finditer(body), None]  # each option's text runs to the next option
    return {f"{m[1].lower()}{m[2]}": body[m.end() : nxt and nxt.start()].strip() for m, nxt in pairwise(found)}


def _question(instruction: str) -> str:
    """The instruction's text before its first option, without the ``Answer format:`` line."""
    body = _ANSWER_FORMAT_LINE.sub("", instruction)
    first = _OPTION.search(body)
    return body[: first.start()].rstrip() if first else body.rstrip()


@dataclass(frozen=True)
class Blank:
    """A fill-in-the-blank row (WinoGrande's format: a sentence with one ``_``, ``Option1`` / ``Option2``).

    Attributes:
        lead: the instruction's text before the sentence (``"Please choose the correct answer to fill in the blank
            to complete the given sentence"``), or ``""``.
        before: the sentence up to the blank (with its trailing space).
        after: the rest of the sentence after the blank.
    """

    lead: str
    before: str
    after: str

    def filled(self, text: str) -> str:
        """The sentence with ``text`` in the blank."""
        return f"{self.before}{text} {self.after.strip()}".rstrip()


def fill_in_blank(instruction: str) -> Blank | None:
    """The row as a :class:`Blank` when its options are ``Option<n>`` and its question has exactly one ``_`` with text
    after it; None otherwise."""
    options = option_texts(instruction)
    if not options or not all(label.startswith("option") for label in options):
        return None
    question = _question(instruction)
    lead, colon, sentence = question.partition(": ")
    if not colon:
        lead, sentence = "", question
    if sentence.count("_") != 1 or not sentence.split("_", 1)[1].strip():
        return None  # no blank, several, or nothing after it to score
    blank = sentence.index("_")
    return Blank(lead.strip(), sentence[:blank], sentence[blank + 1 :])


def as_cloze(task: str, example: Example) -> Example:
    """``example`` as a cloze question: the question alone, answered with the correct option's text.

    The instruction keeps its text up to the first option (``"Please choose the correct answer to the question:
    ..."``) and loses the options and the ``Answer format:`` line; the target becomes ``"the correct answer is <text
    of the correct option>"`` and ``answer`` that text. A fill-in-the-blank row (:func:`fill_in_blank`) keeps only
    its lead-in as the instruction, and its target is the sentence with the correct option in the blank: it is
    scored the way lm-evaluation-harness scores WinoGrande (:func:`choice_items`). True/false rows (BoolQ) lose only
    the ``Answer format:`` line; their labels are their texts. Why cloze: ``docs/recipes/eval.md``.

    Raises:
        ValueError: the row's answer is not one of its options (naming the task and the answer).
    """
    options = option_texts(example.instruction)
    label = example.answer.strip().lower()
    if options and label not in options:
        raise ValueError(
            f"{task}: the answer {example.answer!r} is not one of the row's options {list(options)}. "
            "Fix: check the row's 'answer' field and its option lines."
        )
    text = options[label] if options else label
    blank = fill_in_blank(example.instruction)
    if blank is not None:
        return replace(example, instruction=blank.lead, output=blank.filled(text), answer=text)
    return replace(example, instruction=_question(example.instruction), output=f"{ANSWER_PREFIX} {text}", answer=text)


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
        protocol: ``"generate"`` (the paper's, default) or ``"loglik"`` (score each candidate label; the
            generation settings ``num_beams`` / ``max_new_tokens`` are then unused, ``batch_size`` is sequences per
            forward pass).
        answer_prefix: loglik: the text between the prompt and the label (the start of the training targets).
    """

    data_dir: str
    tasks: Sequence[str] = COMMONSENSE_TASKS
    output_dir: str | None = None
    prompt_style: PromptStyle = "fura"
    batch_size: int = 16
    num_beams: int = 4
    max_new_tokens: int = 32
    max_examples: int | None = None
    protocol: Protocol = "generate"
    answer_prefix: str = ANSWER_PREFIX

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")


@dataclass
class TaskResult(Accuracy):
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


@dataclass
class CommonsenseReport:
    """Per-task results, the average over evaluated tasks, and the tasks skipped for lack of data.

    Attributes:
        results: task name -> :class:`TaskResult`, in evaluation order.
        skipped: tasks whose test file was not found.
        protocol: the protocol that produced the accuracies (``"generate"`` or ``"loglik"``).
    """

    results: dict[str, TaskResult] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    protocol: str = "generate"

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
            "protocol": self.protocol,
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
    """Score one task with ``config.protocol``; returns the result and the prediction records."""
    if config.protocol == "loglik":
        return evaluate_task_loglik(model, tokenizer, task, examples, config)
    formatter = PromptFormatter(config.prompt_style, tokenizer)
    prompts = [formatter.prompt(formatter.instruction(e), split="eval") for e in examples]
    settings = GenerationSettings(
        max_new_tokens=config.max_new_tokens, num_beams=config.num_beams, batch_size=config.batch_size
    )
    completions = generate_completions(
        model, tokenizer, prompts, settings, add_special_tokens=formatter.add_special_tokens, desc=task
    )
    records = []
    for index, (prompt, (completion, *_), example) in enumerate(zip(prompts, completions, examples, strict=True)):
        extracted = extract_answer(task, completion)
        records.append({"index": index, "prompt": prompt, "completion": completion, "extracted": extracted,
                        "label": example.answer, "correct": extracted == example.answer.lower()})  # fmt: skip
    return _task_result(task, records, config), records


def _task_result(task: str, records: list[dict[str, Any]], config: CommonsenseEvalConfig) -> TaskResult:
    """The task's accuracy over ``records``; the records are written as ``<task>/model_predictions.jsonl``."""
    result = TaskResult(task, correct=sum(r["correct"] for r in records), total=len(records))
    if config.output_dir is not None:
        result.predictions_path = str(write_jsonl(Path(config.output_dir) / task / "model_predictions.jsonl", records))
    return result


def choice_items(
    task: str,
    examples: Sequence[Example],
    formatter: PromptFormatter,
    answer_prefix: str = ANSWER_PREFIX,
    answer_format: AnswerFormat = "label",
) -> list[ChoiceItem]:
    """The loglik protocol's questions: context = prompt + answer prefix, candidates = the row's labels.

    Candidates are continuations ``" " + label`` (a space after the prefix, as in the training targets); a row
    whose gold answer is not among its candidates is an error naming the row. ``answer_format="cloze"`` scores the
    options' texts instead, after the question alone (:func:`as_cloze`; options whose texts coincide are one
    candidate: choosing either is choosing that answer); a fill-in-the-blank row compares the log-probability of the
    rest of its sentence after the sentence up to the blank with each option filled in.
    """
    if answer_format == "cloze":
        return [
            _cloze_choice_item(task, example, index, formatter, answer_prefix) for index, example in enumerate(examples)
        ]
    if answer_format != "label":
        raise ValueError(f"answer_format must be one of {', '.join(ANSWER_FORMATS)}, got {answer_format!r}")
    items = []
    for index, example in enumerate(examples):
        labels = candidate_labels(task, example.instruction)
        gold = example.answer.strip().lower()
        if gold not in labels:
            raise ValueError(
                f"{task} row {index}: its answer {example.answer!r} is not one of the row's labels {list(labels)}. "
                "Fix: check the row's 'answer' field and its 'Answer format:' line."
            )
        context = formatter.prompt(formatter.instruction(example), split="eval") + answer_prefix
        items.append(ChoiceItem(context, tuple(f" {label}" for label in labels), f" {gold}"))
    return items


def _cloze_choice_item(
    task: str, example: Example, index: int, formatter: PromptFormatter, answer_prefix: str
) -> ChoiceItem:
    try:
        rewritten = as_cloze(task, example)
    except ValueError as err:
        raise ValueError(f"{task} row {index}: {err}") from None
    options = option_texts(example.instruction)
    texts = tuple(dict.fromkeys(options.values())) if options else candidate_labels(task, example.instruction)
    prompt = formatter.prompt(formatter.instruction(rewritten), split="eval")
    blank = fill_in_blank(example.instruction)
    if blank is not None:  # each option fills the blank; the rest of the sentence is what is scored
        return ChoiceItem(prompt + blank.before, texts, rewritten.answer, continuation=" " + blank.after.strip())
    return ChoiceItem(prompt + answer_prefix, tuple(f" {text}" for text in texts), f" {rewritten.answer}")


def evaluate_task_loglik(
    model: Any, tokenizer: Any, task: str, examples: Sequence[Example], config: CommonsenseEvalConfig
) -> tuple[TaskResult, list[dict[str, Any]]]:
    """Score one task with the loglik protocol; returns the result and per-row records (no prompt text)."""
    formatter = PromptFormatter(config.prompt_style, tokenizer)
    items = choice_items(task, examples, formatter, config.answer_prefix)
    scored = score_choices(
        model, tokenizer, items, config.batch_size, add_special_tokens=formatter.add_special_tokens, desc=task
    )
    records = []
    for index, (item, score) in enumerate(zip(items, scored, strict=True)):
        labels = [c.strip() for c in item.candidates]
        predicted = labels[score.predicted]
        records.append({"index": index, "label": item.label.strip() if item.label else None, "candidates": labels,
                        "scores": list(score.scores), "num_tokens": list(score.num_tokens), "predicted": predicted,
                        "correct": item.candidates[score.predicted] == item.label})  # fmt: skip
    return _task_result(task, records, config), records


def evaluate_commonsense(
    model: Any, tokenizer: Any, config: CommonsenseEvalConfig, protocol: Protocol | None = None
) -> CommonsenseReport:
    """Run every configured task that has a test file with ``protocol`` (default: ``config.protocol``); log and save
    per-task accuracy and the average."""
    if protocol is not None:
        config = replace(config, protocol=protocol)
    report = CommonsenseReport(protocol=config.protocol)
    for task in config.tasks:
        path = find_task_file(config.data_dir, task)
        if path is None:
            logger.info("skipping %s: no %s.json / %s/test.json under %s", task, task, task, config.data_dir)
            report.skipped.append(task)
            continue
        examples = load_examples(path, required=("instruction", "answer"), max_rows=config.max_examples)
        result, _ = evaluate_task(model, tokenizer, task, examples, config)
        report.results[task] = result
        accuracy = 100 * result.accuracy
        logger.info("%s: accuracy %.1f%% (%d/%d, %s)", task, accuracy, result.correct, result.total, config.protocol)
    if report.average is not None:
        logger.info("average over %d task(s): %.1f%%", len(report.results), 100 * report.average)
    if config.output_dir is not None:
        summary = {**report.to_dict(), "config": {**asdict(config), "tasks": list(config.tasks)}}
        write_json(Path(config.output_dir) / "summary.json", summary)
    return report
