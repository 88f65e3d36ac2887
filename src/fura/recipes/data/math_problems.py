"""Math problem sets for GRPO: a training set and a disjoint held-out set, and the prompts built from them.

Details: ``docs/recipes/data.md``."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fura.recipes.data.formats import DataFormatError, load_rows
from fura.recipes.data.prompts import BOXED_MATH_INSTRUCTION, PromptFormatter
from fura.recipes.eval.math import extract_boxed
from fura.recipes.eval.records import write_jsonl

logger = logging.getLogger(__name__)

#: Seed distance between a reasoning-gym training set and its held-out set: item ``i`` of seed ``s`` is drawn with
#: ``Random(s + i)``, so neighbouring seeds share almost every item (used by the GRPO recipe and the demo alike).
HELD_OUT_SEED_OFFSET = 1_000_003
#: Candidate fields, in order of preference.
QUESTION_FIELDS: tuple[str, ...] = ("problem", "question", "instruction")
ANSWER_FIELDS: tuple[str, ...] = ("answer",)
SOLUTION_FIELD = "solution"
GRPO_PROMPT_STYLES: tuple[str, ...] = ("auto", "chat", "fura")


@dataclass
class MathProblemsConfig:
    """Where the GRPO problems come from and how they become prompts (each field's ``help`` says what it is; the
    reference's values: 7,500 training problems, the first 1,000 of MATH test held out)."""

    dataset: str = field(
        default="gsm_symbolic",
        metadata={"help": "a reasoning-gym dataset, a JSON/JSONL file of problem/answer rows, or a Hub id"},
    )
    train_size: int = field(default=7500, metadata={"help": "training problems"})
    held_out_size: int = field(default=1000, metadata={"help": "held-out problems, disjoint from the training ones"})
    held_out_dataset: str | None = field(
        default=None, metadata={"help": "separate held-out problems: a file or a Hub id; None: split off --dataset"}
    )
    split: str = field(default="train", metadata={"help": "Hub split of --dataset"})
    held_out_split: str = field(default="train", metadata={"help": "Hub split of --held_out_dataset"})
    question_field: str | None = field(
        default=None, metadata={"help": "row field of the question; None: the first of problem, question, instruction"}
    )
    answer_field: str | None = field(
        default=None, metadata={"help": "row field of the gold answer; None: answer, else solution's last \\boxed{}"}
    )
    seed: int = field(default=42, metadata={"help": "seed of a reasoning-gym training set (held out: + an offset)"})
    prompt_style: str = field(
        default="auto",
        metadata={"help": "auto: chat if the tokenizer has a chat template, else fura", "choices": GRPO_PROMPT_STYLES},
    )
    chat_template: str | None = field(
        default=None, metadata={"help": "Jinja chat-template file replacing the tokenizer's (training and evaluation)"}
    )

    def validate(self) -> None:
        """Raise ``ValueError`` for impossible settings."""
        if self.train_size < 1:
            raise ValueError(f"data.train_size must be >= 1, got {self.train_size}")
        if self.held_out_size < 0:
            raise ValueError(f"data.held_out_size must be >= 0, got {self.held_out_size}")
        if self.prompt_style not in GRPO_PROMPT_STYLES:
            raise ValueError(f"data.prompt_style must be one of {GRPO_PROMPT_STYLES}, got {self.prompt_style!r}")


@dataclass(frozen=True)
class MathProblem:
    """One problem.

    Attributes:
        problem: the question text.
        answer: the gold answer (a number or a LaTeX expression, without ``\\boxed``).
        source: where it came from (dataset name, file stem or Hub id).
    """

    problem: str
    answer: str
    source: str = ""


@dataclass
class ProblemSets:
    """The training and held-out problems of a run.

    Attributes:
        train: training problems.
        held_out: held-out problems (no question shared with ``train``).
        source: a description of the source, for logs and ``results.json``.
    """

    train: list[MathProblem]
    held_out: list[MathProblem]
    source: str


def _key(text: str) -> str:
    """The de-duplication key of a question: its words, whitespace-normalised."""
    return " ".join(text.split())


def is_reasoning_gym_dataset(name: str) -> bool:
    """Whether ``name`` is a registered reasoning-gym dataset (and not a local path)."""
    if Path(name).exists():
        return False
    try:
        from reasoning_gym.factory import DATASETS
    except ImportError:  # pragma: no cover - reasoning-gym is an install extra
        return False
    return name in DATASETS


def reasoning_gym_split(
    name: str, n_train: int, n_held_out: int, seed: int, **dataset_config: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Any]:
    """The one train / held-out split of a reasoning-gym dataset: ``(train items, held-out items, held-out dataset)``.

    Held out: the first ``n_held_out`` distinct questions generated with ``seed + HELD_OUT_SEED_OFFSET``. Train: the
    ``n_train + n_held_out`` items generated with ``seed``, without any held-out question, in order; when fewer than
    ``n_train`` remain (a task with few distinct problems) the list repeats, reshuffled with ``Random(seed)`` each
    pass. The sets are disjoint by construction and the same seed gives the same sets. The held-out dataset is
    returned too: its ``score_answer(answer, entry)`` grades completions.
    """
    import reasoning_gym

    held_pool = reasoning_gym.create_dataset(
        name, seed=seed + HELD_OUT_SEED_OFFSET, size=max(1, 4 * n_held_out), **dataset_config
    )
    held_out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for item in held_pool:
        if len(held_out) == n_held_out:
            break
        if (key := _key(str(item["question"]))) not in seen:
            seen.add(key)
            held_out.append(item)
    if len(held_out) < n_held_out:
        raise DataFormatError(
            f"reasoning-gym {name!r} gave only {len(held_out)} distinct problems of {n_held_out} held-out ones asked. "
            "Fix: ask for fewer held-out problems."
        )
    train_pool = reasoning_gym.create_dataset(name, seed=seed, size=n_train + n_held_out, **dataset_config)
    candidates = [item for item in train_pool if _key(str(item["question"])) not in seen]
    if not candidates:
        raise DataFormatError(f"reasoning-gym {name!r}: every training problem is also a held-out problem")
    rng = random.Random(seed)
    train: list[dict[str, Any]] = []
    while len(train) < n_train:
        chunk = candidates[:]
        if train:
            rng.shuffle(chunk)
        train.extend(chunk[: n_train - len(train)])
    return train, held_out, held_pool


def _pick_field(row: dict[str, Any], wanted: str | None, candidates: Sequence[str]) -> str | None:
    if wanted is not None:
        return wanted
    return next((name for name in candidates if row.get(name) is not None), None)


def row_to_problem(
    row: dict[str, Any], question_field: str | None = None, answer_field: str | None = None, source: str = ""
) -> MathProblem | None:
    """A :class:`MathProblem` from a data row (question: the first of :data:`QUESTION_FIELDS`; answer: ``answer``,
    else the ``solution``'s last ``\\boxed{}``); None when it has no answer.

    Raises:
        DataFormatError: the row has no question field.
    """
    q_field = _pick_field(row, question_field, QUESTION_FIELDS)
    if q_field is None or row.get(q_field) is None:
        raise DataFormatError(f"{source}: row lacks a question field ({question_field or QUESTION_FIELDS})")
    a_field = _pick_field(row, answer_field, ANSWER_FIELDS)
    if a_field is not None and row.get(a_field) is not None:
        answer: str | None = str(row[a_field]).strip()
    elif answer_field is None and row.get(SOLUTION_FIELD) is not None:
        answer = extract_boxed(str(row[SOLUTION_FIELD]))
    else:
        answer = None
    if not answer:
        return None
    return MathProblem(str(row[q_field]), answer, source)


def load_problems(
    path: str, split: str = "train", question_field: str | None = None, answer_field: str | None = None
) -> list[MathProblem]:
    """Problems of a local JSON/JSONL file or a Hub dataset, in row order (rows without an answer are skipped)."""
    rows = load_rows(path, split)
    source = Path(path).stem if Path(path).exists() else path
    problems = []
    for index, row in enumerate(rows):
        try:
            problem = row_to_problem(row, question_field, answer_field, source)
        except DataFormatError as err:
            raise DataFormatError(f"{path}: row {index}: {err} (it has: {', '.join(row)})") from None
        if problem is not None:
            problems.append(problem)
    if len(problems) < len(rows):
        logger.warning("%s: skipped %d row(s) without a gold answer", path, len(rows) - len(problems))
    if not problems:
        raise DataFormatError(f"{path}: no row with a gold answer")
    return problems


def disjoint(held_out: Sequence[MathProblem], train: Sequence[MathProblem]) -> list[MathProblem]:
    """``held_out`` without the questions that also occur in ``train`` (and without its own repeats)."""
    seen = {_key(p.problem) for p in train}
    kept = []
    for problem in held_out:
        if (key := _key(problem.problem)) not in seen:
            seen.add(key)
            kept.append(problem)
    if len(kept) < len(held_out):
        logger.info("dropped %d held-out problem(s) that repeat a training question", len(held_out) - len(kept))
    return kept


def build_problem_sets(config: MathProblemsConfig) -> ProblemSets:
    """The training and held-out problems described by ``config`` (``docs/recipes/data.md``)."""
    config.validate()
    name = config.dataset
    if is_reasoning_gym_dataset(name):
        splits = reasoning_gym_split(name, config.train_size, config.held_out_size, config.seed)[:2]
        train, held_out = ([MathProblem(str(i["question"]), str(i["answer"]), name) for i in s] for s in splits)
        return ProblemSets(train, held_out, f"reasoning-gym {name} (seed {config.seed})")
    problems = load_problems(config.dataset, config.split, config.question_field, config.answer_field)
    if config.held_out_dataset:
        train = problems[: config.train_size]
        extra = load_problems(
            config.held_out_dataset, config.held_out_split, config.question_field, config.answer_field
        )
        held_out = disjoint(extra, train)[: config.held_out_size]
        return ProblemSets(train, held_out, f"{config.dataset} (held out: {config.held_out_dataset})")
    n_train = min(config.train_size, len(problems) - config.held_out_size)
    if n_train < 1:
        raise DataFormatError(
            f"{config.dataset}: {len(problems)} problems cannot give {config.held_out_size} held-out ones and a "
            "training set. Fix: lower --held-out-size or pass --held-out-dataset."
        )
    if n_train < config.train_size:
        logger.warning(
            "%s: %d problems; training on %d, holding out the last %d",
            config.dataset,
            len(problems),
            n_train,
            config.held_out_size,
        )
    train = problems[:n_train]
    held_out = disjoint(problems[n_train : n_train + config.held_out_size], train)
    return ProblemSets(train, held_out, config.dataset)


def write_problems(problems: Sequence[MathProblem], path: str | Path) -> Path:
    """Write problems as JSONL (``problem``, ``answer``, ``source``), e.g. the held-out set of a run folder."""
    return write_jsonl(path, map(asdict, problems))


def math_instruction(problem: str, template: str = BOXED_MATH_INSTRUCTION) -> str:
    """The user message: ``template`` with ``{question}`` replaced by ``problem`` (``str.replace``, no formatting)."""
    return template.replace("{question}", problem)


def resolve_prompt_style(style: str, tokenizer: Any) -> str:
    """``chat`` or ``fura`` for a configured ``auto`` / ``chat`` / ``fura`` and this tokenizer."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if style not in GRPO_PROMPT_STYLES:
        raise ValueError(f"prompt_style must be one of {GRPO_PROMPT_STYLES}, got {style!r}")
    if style == "auto":
        style = "chat" if has_template else "fura"
        if style == "fura":
            logger.info("the tokenizer has no chat template: prompts use the fura text template")
    if style == "chat" and not has_template:
        raise ValueError(
            "prompt_style 'chat' needs a tokenizer with a chat template. Fix: pass --chat-template FILE "
            "or --prompt-style fura."
        )
    return style


def grpo_prompt(problem: str, style: str, tokenizer: Any = None) -> str | list[dict[str, str]]:
    """The TRL prompt of one problem: a one-message conversation (``chat``) or the ``fura`` template text."""
    text = math_instruction(problem)
    if style == "chat":
        return [{"role": "user", "content": text}]
    if style == "fura":
        return PromptFormatter("fura", tokenizer).prompt(text)
    raise ValueError(f"prompt style must be 'chat' or 'fura' here, got {style!r}")


def grpo_rows(problems: Sequence[MathProblem], style: str, tokenizer: Any = None) -> list[dict[str, Any]]:
    """Rows for TRL's ``GRPOTrainer``: ``prompt`` plus ``answer`` (passed to the rewards) and ``problem``."""
    return [
        {"prompt": grpo_prompt(p.problem, style, tokenizer), "answer": p.answer, "problem": p.problem} for p in problems
    ]
