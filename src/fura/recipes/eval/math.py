"""Math evaluation: numeric accuracy on GSM8K-style files, math-verify grading, and the reference's sampling protocols
(:data:`MATH_PROTOCOLS`; accuracy = correct completions / all completions). Details: ``docs/recipes/eval.md``."""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from fura.recipes.data.formats import DataFormatError, load_rows
from fura.recipes.data.prompts import BOXED_MATH_INSTRUCTION, PromptFormatter, PromptStyle
from fura.recipes.eval.generation import GenerationSettings, generate_completions
from fura.recipes.eval.records import Accuracy, write_json, write_jsonl

logger = logging.getLogger(__name__)

_NUM = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_VALUE = re.compile(
    rf"(?P<sign>-?)\\[dt]?frac\{{\s*(?P<fnum>{_NUM})\s*\}}\{{\s*(?P<fden>{_NUM})\s*\}}"
    rf"|(?P<num>{_NUM})(?:\s*/\s*(?P<den>{_NUM}))?"
)
_ANSWER_IS = re.compile(r"answer\s+is", re.IGNORECASE)
#: Seconds math-verify may spend parsing / verifying one answer (main thread only: it uses ``signal.alarm``).
GRADING_TIMEOUT_S = 5


@dataclass(frozen=True)
class Grade:
    """Grading outcome of one completion: the extracted answer as text (``""`` if none) and whether it is right."""

    extracted: str
    correct: bool


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), with nested braces; None if absent/unclosed."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    open_at = text.index("{", start)
    depth = 0
    for pos in range(open_at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[pos], 0)
        if depth == 0:
            return text[open_at + 1 : pos]
    return None


def parse_number(text: str, last: bool = True) -> float | None:
    """The last (or first) number in ``text``; ``\\frac{a}{b}`` and ``a/b`` count as one number (their ratio)."""
    text = text.replace("$", "").replace("\u2212", "-")
    matches = list(_VALUE.finditer(text))
    if not matches:
        return None
    return _value(matches[-1] if last else matches[0])


def _value(match: re.Match[str]) -> float | None:
    num, den = match.group("fnum") or match.group("num"), match.group("fden") or match.group("den")
    value = float(num.replace(",", ""))
    if den is not None:
        denominator = float(den.replace(",", ""))
        if denominator == 0:
            return None
        value /= denominator
    return -value if match.group("sign") else value


def extract_numeric_answer(completion: str) -> float | None:
    """The final answer: last ``\\boxed{}`` value, else the number after the last "answer is", else the last number."""
    boxed = extract_boxed(completion)
    if boxed is not None and (value := parse_number(boxed)) is not None:
        return value
    matches = list(_ANSWER_IS.finditer(completion))
    if matches:
        tail = completion[matches[-1].end() :].split("\n", 1)[0]
        if (value := parse_number(tail, last=False)) is not None:
            return value
    return parse_number(completion)


def grade_numeric(completion: str, gold: str) -> Grade:
    """Grade a completion against a numeric gold string such as ``"576.0"`` or ``"1,200"`` (equal within a relative
    1e-6 or an absolute 1e-4; no number on either side is wrong)."""
    pred, gold_value = extract_numeric_answer(completion), parse_number(gold)
    correct = pred is not None and gold_value is not None and math.isclose(pred, gold_value, rel_tol=1e-6, abs_tol=1e-4)
    return Grade("" if pred is None else f"{pred:g}", correct)


def grading_timeout() -> int | None:
    """math-verify's timeout: :data:`GRADING_TIMEOUT_S` in the main thread, None (no timeout) in any other."""
    return GRADING_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def grade_math_verify(completion: str, gold: str) -> Grade:
    """Grade with math-verify (``verify(parse(gold), parse(completion))``); unparseable or any exception → wrong."""
    from math_verify import parse, verify

    timeout = grading_timeout()
    try:
        pred = parse(completion, parsing_timeout=timeout)
        if not pred:
            return Grade("", False)
        extracted = str(pred[-1])
        gold_parsed = parse(gold, parsing_timeout=timeout) or parse(f"${gold}$", parsing_timeout=timeout)
        return Grade(extracted, bool(verify(gold_parsed, pred, timeout_seconds=timeout)))
    except Exception:  # the reference counts every grading failure as wrong
        return Grade("", False)


GRADERS: dict[str, Callable[[str, str], Grade]] = {"numeric": grade_numeric, "math_verify": grade_math_verify}


@dataclass(frozen=True)
class MathProtocol:
    """A benchmark's evaluation protocol (the reference's rl/ evaluation).

    Attributes:
        dataset_id: Hugging Face Hub id the reference loads (used only when no local file is given).
        split: Hub split.
        question_field: row field holding the problem.
        answer_field: row field holding the gold answer.
        n_samples: completions per problem.
        temperature: sampling temperature (0 = greedy).
        top_p: nucleus mass.
    """

    dataset_id: str
    split: str
    question_field: str
    answer_field: str
    n_samples: int
    temperature: float
    top_p: float


MATH_PROTOCOLS: dict[str, MathProtocol] = {
    "MATH-500": MathProtocol("HuggingFaceH4/MATH-500", "test", "problem", "answer", 1, 0.0, 1.0),
    "AIME-24": MathProtocol("HuggingFaceH4/aime_2024", "train", "problem", "answer", 8, 0.6, 0.95),
    "AIME-25": MathProtocol("yentinglin/aime_2025", "train", "problem", "answer", 8, 0.6, 0.95),
    "AMC23": MathProtocol("math-ai/amc23", "test", "question", "answer", 1, 0.0, 1.0),
}


@dataclass
class MathEvalConfig:
    """Settings of one math evaluation.

    Attributes:
        data_path: local JSON/JSONL file (or a Hub id when online).
        name: label for logs and output files (default: the file stem).
        split: Hub split when ``data_path`` is a Hub id.
        grader: ``"numeric"`` (GSM8K-style numbers) or ``"math_verify"`` (MATH-style LaTeX).
        question_field: row field holding the problem (LLM-Adapters files: ``instruction``).
        answer_field: row field holding the gold answer.
        question_template: text wrapped around the problem before the prompt style is applied; ``{question}`` is
            replaced (e.g. :data:`fura.recipes.data.prompts.BOXED_MATH_INSTRUCTION`, the reference's RL prompt).
        prompt_style: ``"fura"``, ``"reference"`` or ``"chat"`` (see :mod:`fura.recipes.data.prompts`).
        n_samples: completions per problem; accuracy = correct completions / all completions.
        temperature: 0 = greedy; > 0 samples with ``top_p``.
        top_p: nucleus mass when sampling.
        num_beams: beam width for greedy decoding (1 = plain greedy).
        max_new_tokens: new-token budget (reference post-training eval: 2048).
        batch_size: prompts per ``generate`` call.
        max_examples: evaluate only the first N problems (None = all).
        output_dir: where ``<name>.predictions.jsonl`` and ``<name>.summary.json`` go (None = write nothing).
    """

    data_path: str
    name: str | None = None
    split: str = "test"
    grader: Literal["numeric", "math_verify"] = "numeric"
    question_field: str = "instruction"
    answer_field: str = "answer"
    question_template: str = "{question}"
    prompt_style: PromptStyle = "fura"
    n_samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    num_beams: int = 1
    max_new_tokens: int = 512
    batch_size: int = 8
    max_examples: int | None = None
    output_dir: str | None = None

    @classmethod
    def for_protocol(cls, protocol: str, data_path: str | None = None, **overrides: Any) -> MathEvalConfig:
        """A config following :data:`MATH_PROTOCOLS` ``[protocol]`` (math-verify grading, the boxed RL prompt)."""
        if protocol not in MATH_PROTOCOLS:
            raise KeyError(f"unknown math protocol {protocol!r}; known: {', '.join(MATH_PROTOCOLS)}")
        spec = MATH_PROTOCOLS[protocol]
        config = cls(
            data_path=data_path or spec.dataset_id, name=protocol, split=spec.split, grader="math_verify",
            question_field=spec.question_field, answer_field=spec.answer_field,
            question_template=BOXED_MATH_INSTRUCTION, n_samples=spec.n_samples,
            temperature=spec.temperature, top_p=spec.top_p, max_new_tokens=2048,
        )  # fmt: skip
        return replace(config, **overrides)


@dataclass
class MathResult(Accuracy):
    """Outcome of a math evaluation.

    Attributes:
        name: benchmark label.
        correct: correct completions.
        total: all completions (problems × samples).
        problems: problems evaluated.
        predictions_path: the predictions JSONL, when written.
    """

    name: str
    correct: int
    total: int
    problems: int
    predictions_path: str | None = None

    def summary(self) -> dict[str, Any]:
        """The name, accuracy, counts and predictions file, as JSON."""
        counts = {"correct": self.correct, "total": self.total, "problems": self.problems}
        return {"name": self.name, "accuracy": self.accuracy, **counts, "predictions_path": self.predictions_path}


def load_math_problems(config: MathEvalConfig) -> list[tuple[str, str]]:
    """``(question, gold)`` pairs from ``config.data_path``; a clear error names a missing field."""
    rows = load_rows(config.data_path, config.split)[: config.max_examples]
    problems = []
    for index, row in enumerate(rows):
        for field in (config.question_field, config.answer_field):
            if row.get(field) is None:
                raise DataFormatError(f"{config.data_path}: row {index} lacks field {field!r} (has: {', '.join(row)})")
        problems.append((str(row[config.question_field]), str(row[config.answer_field])))
    return problems


def _settings(config: MathEvalConfig) -> GenerationSettings:
    sampling = config.temperature > 0
    if not sampling and config.n_samples > 1:
        logger.info("temperature 0: the %d samples would be identical; scoring one greedy completion", config.n_samples)
    return GenerationSettings(
        max_new_tokens=config.max_new_tokens, num_beams=1 if sampling else config.num_beams, do_sample=sampling,
        temperature=config.temperature, top_p=config.top_p,
        num_return_sequences=config.n_samples if sampling else 1, batch_size=config.batch_size,
    )  # fmt: skip


def evaluate_math(model: Any, tokenizer: Any, config: MathEvalConfig) -> MathResult:
    """Generate, grade and score one math data set; writes predictions and a summary when ``output_dir`` is set."""
    name = config.name or Path(config.data_path).stem
    grader = GRADERS[config.grader]
    formatter = PromptFormatter(config.prompt_style, tokenizer)
    problems = load_math_problems(config)
    prompts = [formatter.prompt(config.question_template.replace("{question}", q), split="eval") for q, _ in problems]
    completions = generate_completions(
        model, tokenizer, prompts, _settings(config), add_special_tokens=formatter.add_special_tokens, desc=name
    )
    records = []
    for index, (prompt, samples, (_, gold)) in enumerate(zip(prompts, completions, problems, strict=True)):
        for sample, completion in enumerate(samples):
            grade = grader(completion, gold)
            records.append({"index": index, "sample": sample, "prompt": prompt, "completion": completion,
                            "extracted": grade.extracted, "label": gold, "correct": grade.correct})  # fmt: skip
    result = MathResult(name, sum(r["correct"] for r in records), len(records), len(problems))
    logger.info("%s: accuracy %.1f%% (%d/%d completions)", name, 100 * result.accuracy, result.correct, result.total)
    if config.output_dir is not None:
        out = Path(config.output_dir)
        result.predictions_path = str(write_jsonl(out / f"{name}.predictions.jsonl", records))
        write_json(out / f"{name}.summary.json", {**result.summary(), "config": asdict(config)})
    return result
