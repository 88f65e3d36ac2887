"""``run``: train, validate, choose the learning rate, test — resumable, one experiment after another.

For each suite the untrained base model is evaluated first (validation, test rows, held-out loss, general-text
cross-entropy: the reference point of forgetting). Then, for each experiment:

1. **Grid** (first seed): for every learning rate, train with ``fura train sft`` (``rl``: ``fura train grpo``) in a
   child process (measured: wall time, the recipe's train time, peak RSS, tokens/s) and evaluate on the validation
   rows (accuracy and held-out loss). Each run folder is named by a hash of everything that determines it, so
   editing an experiment never reuses a stale model.
2. **Choice**: the rate with the best validation accuracy (macro average over the training files' validation rows);
   a tie goes to the lower validation loss.
3. **Test** (every seed, at the chosen rate): test-row accuracy, forgetting, saved as
   ``<results>/<suite>/<experiment>/seed<S>.json`` with per-row predictions (no question text).
4. **Equal forgetting** (first seed): the grid point with the best validation accuracy among those forgetting at most
   the report's budget is tested too when it is not the chosen one: ``budget-seed<S>.json``.

Every stage writes its output atomically and is skipped when its output exists, so a killed ``run`` continues where it
stopped (an interrupted training run restarts from scratch: its time and memory would not be comparable otherwise).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.method_comparison import evaluation, stats
from benchmarks.method_comparison.corpus import CORPUS_CACHE, build_corpus
from benchmarks.method_comparison.data import REPO_ROOT, Row, Splits, build_splits, default_data_root
from benchmarks.method_comparison.experiment import (
    BASE,
    Experiment,
    ExperimentError,
    base_experiment,
    load_experiment,
    stable_hash,
)
from benchmarks.method_comparison.report import budget_point
from benchmarks.method_comparison.training import Launcher, check_child, run_child, train_command
from fura.io.files import atomic_write_text
from fura.recipes.data.prompts import PromptFormatter
from fura.recipes.data.sft import tokenize_example

logger = logging.getLogger(__name__)

#: Default folder of the per-run result files (committed: they hold no shared data).
RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: Default work folder (data splits, run folders, models): outside the repository.
WORK_DIR = Path.home() / ".cache" / "fura" / "method_comparison"
SCHEMA = 1


@dataclass
class Paths:
    """Where things are read and written.

    Attributes:
        work: data splits, training run folders and evaluation caches (large; outside the repository).
        results: one JSON file per finished run (small; no question text).
        data_root: the shared LLM-Adapters data folder (read in place).
        corpus_cache: the forgetting corpus's downloads and cleaned texts.
    """

    work: Path = WORK_DIR
    results: Path = RESULTS_DIR
    data_root: Path = field(default_factory=default_data_root)
    corpus_cache: Path = CORPUS_CACHE


def write_json(path: Path, payload: Any) -> Path:
    """Indented JSON, written atomically."""
    return atomic_write_text(path, json.dumps(payload, indent=1, ensure_ascii=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it does not exist."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


class Runner:
    """Runs experiments (see the module docstring).

    Args:
        paths: folders to use.
    """

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self._corpus: dict[str, Any] = {}
        self._launcher: Launcher | None = None

    # ------------------------------------------------------------------------------------------------------------
    # Entry point
    # ------------------------------------------------------------------------------------------------------------

    def run(self, folders: Sequence[Path], grid_only: bool = False) -> list[Path]:
        """Run every experiment folder (the suite's base model first); returns the result files.

        ``grid_only``: train and validate every grid point, nothing else (no base model, no choice, no test); lets
        several processes share one experiment's grid (give each a copy of the experiment with part of the grid:
        the run folders do not depend on the grid) before one ``run`` chooses and tests.
        """
        try:
            return self._run(folders, grid_only)
        finally:
            if self._launcher is not None:
                self._launcher.close()
                self._launcher = None

    def _run(self, folders: Sequence[Path], grid_only: bool) -> list[Path]:
        written: list[Path] = []
        suites: dict[Path, list[Path]] = {}
        for folder in folders:
            suites.setdefault(folder.parent, []).append(folder)
        for suite_dir, experiments in suites.items():
            if not grid_only:
                written.append(self.run_base(base_experiment(suite_dir)))
            for folder in experiments:
                experiment = load_experiment(folder)
                if grid_only:
                    splits = self._setup(experiment)
                    for lr in experiment.training.learning_rates:
                        written.append(
                            Path(
                                self.train_and_validate(experiment, splits, lr, experiment.training.seeds[0])["run_dir"]
                            )
                        )
                else:
                    written.extend(self.run_experiment(experiment))
        return written

    def _setup(self, experiment: Experiment) -> Splits:
        torch.set_num_threads(experiment.threads)
        if experiment.cpus:
            os.sched_setaffinity(0, set(experiment.cpus))
        work = self.paths.work / experiment.suite
        return build_splits(experiment, self.paths.data_root, work)

    # ------------------------------------------------------------------------------------------------------------
    # Base model
    # ------------------------------------------------------------------------------------------------------------

    def run_base(self, experiment: Experiment) -> Path:
        """Evaluate the untrained base model of a suite (validation, test, held-out loss, general-text CE)."""
        splits = self._setup(experiment)
        target = self.paths.results / experiment.suite / BASE / "result.json"
        fingerprints = self._fingerprints(experiment, splits)
        if (done := read_json(target)) is not None and done.get("fingerprints") == fingerprints:
            if "windows" not in done["forgetting"]:  # written before per-window values were kept: add them
                logger.info("[%s] base model: scoring the general text per window", experiment.suite)
                model, tokenizer = evaluation.load_model(experiment.model)
                done["forgetting"] = self._forgetting(experiment, model, tokenizer, None)
                self._release(model)
                write_json(target, done)
            logger.info("[%s] base model: done (%s)", experiment.suite, target)
            return target
        logger.info("[%s] base model %s: evaluating", experiment.suite, experiment.model)
        model, tokenizer = evaluation.load_model(experiment.model)
        validation = self._validate(experiment, splits, model, tokenizer)
        payload = self._test_payload(experiment, splits, model, tokenizer, base=None)
        payload.update(validation=validation, fingerprints=fingerprints, seed=None, learning_rate=None)
        write_json(target, payload)
        self._release(model)
        logger.info(
            "[%s] base model: test %s, general-text CE %.4f",
            experiment.suite,
            _percent(payload["test"]["macro_accuracy"]),
            payload["forgetting"]["cross_entropy"],
        )
        return target

    # ------------------------------------------------------------------------------------------------------------
    # Experiments
    # ------------------------------------------------------------------------------------------------------------

    def run_experiment(self, experiment: Experiment) -> list[Path]:
        """Grid on the first seed, choose the rate on validation (or take the suite's ``chosen_learning_rate``), test
        every seed at it, and the best point within the forgetting budget; returns the result files."""
        splits = self._setup(experiment)
        seeds, rates = experiment.training.seeds, experiment.training.learning_rates
        grid = [self.train_and_validate(experiment, splits, lr, seeds[0]) for lr in rates]
        fixed = experiment.training.chosen_learning_rate
        chosen = choose_learning_rate(grid) if fixed is None else next(g for g in grid if g["learning_rate"] == fixed)
        logger.info(
            "[%s] learning rate %g %s (%s)",
            experiment.key,
            chosen["learning_rate"],
            "chosen on validation" if fixed is None else "fixed by the suite",
            ", ".join(f"{g['learning_rate']:g}: {_percent(g['validation']['macro_accuracy'])}" for g in grid),
        )
        written = []
        for seed in seeds:
            point = (
                chosen
                if seed == seeds[0]
                else self.train_and_validate(experiment, splits, chosen["learning_rate"], seed)
            )
            written.append(self.test(experiment, splits, point, grid))
        if (budget := self._budget_point(experiment, grid)) is not None and budget is not chosen:
            written.append(self.test(experiment, splits, budget, grid, kind="budget-"))
        return written

    def _budget_point(self, experiment: Experiment, grid: list[dict]) -> dict | None:
        """The first seed's grid point of :func:`~benchmarks.method_comparison.report.budget_point` (accuracy at equal
        forgetting), or None when none forgets at most the budget."""
        base = read_json(self.paths.results / experiment.suite / BASE / "result.json")
        best = budget_point(self._grid_record(experiment, grid, base))
        return None if best is None else next(g for g in grid if g["learning_rate"] == best["learning_rate"])

    def run_dir(self, experiment: Experiment, learning_rate: float, seed: int) -> Path:
        """``<work>/<suite>/<experiment>/lr<rate>-seed<seed>-<settings hash>``."""
        fingerprint = experiment.training_fingerprint(learning_rate, seed)
        return self.paths.work / experiment.suite / experiment.name / f"lr{learning_rate:g}-seed{seed}-{fingerprint}"

    def train_and_validate(self, experiment: Experiment, splits: Splits, learning_rate: float, seed: int) -> dict:
        """Train one (rate, seed) point if needed, validate it if needed; returns its record."""
        run_dir = self.run_dir(experiment, learning_rate, seed)
        label = f"[{experiment.key}] lr {learning_rate:g} seed {seed}"
        training = read_json(run_dir / "harness_train.json")
        if training is None or not (run_dir / "results.json").is_file():
            training = self._train(experiment, splits, learning_rate, seed, run_dir, label)
        else:
            logger.info("%s: trained before (%s)", label, run_dir)
        validation = read_json(run_dir / "harness_validation.json")
        evaluated_as = self._evaluation_fingerprint(experiment, splits)
        if validation is None or validation.get("evaluation_fingerprint") != evaluated_as:
            logger.info("%s: validating on %d rows", label, sum(len(r) for r in splits.val.values()))
            model, tokenizer = evaluation.load_model(run_dir)
            validation = {
                **self._validate(experiment, splits, model, tokenizer),
                "evaluation_fingerprint": evaluated_as,
            }
            self._release(model)
            write_json(run_dir / "harness_validation.json", validation)
        general_text = self._general_text(experiment, run_dir, label)
        logger.info(
            "%s: validation %s, held-out loss %s, general-text CE %.4f",
            label,
            _percent(validation["macro_accuracy"]),
            "n/a" if validation["held_out_loss"] is None else f"{validation['held_out_loss']:.4f}",
            general_text["cross_entropy"],
        )
        return {
            "learning_rate": learning_rate,
            "seed": seed,
            "run_dir": str(run_dir),
            "training": training,
            "validation": validation,
            "general_text_cross_entropy": general_text["cross_entropy"],
        }

    def _general_text(self, experiment: Experiment, run_dir: Path, label: str) -> dict[str, Any]:
        """The trained model's general-text cross-entropy record (:meth:`_forgetting` without a base), scored once per
        run folder and scoring settings; the test reuses its per-window values."""
        general_text = read_json(run_dir / "harness_general_text.json")
        scored_as = stable_hash([experiment.model, vars(experiment.forgetting), experiment.evaluation.precision])
        if general_text is None or general_text.get("fingerprint") != scored_as:
            logger.info("%s: scoring the general text", label)
            model, tokenizer = evaluation.load_model(run_dir)
            general_text = {**self._forgetting(experiment, model, tokenizer, None), "fingerprint": scored_as}
            self._release(model)
            write_json(run_dir / "harness_general_text.json", general_text)
        return general_text

    def _train(
        self, experiment: Experiment, splits: Splits, learning_rate: float, seed: int, run_dir: Path, label: str
    ) -> dict:
        command = train_command(experiment, splits.train_path, learning_rate, seed, run_dir, splits.val_path)
        logger.info(
            "%s: training %d steps × batch %d (%s)",
            label,
            experiment.training.max_steps,
            experiment.training.batch_size,
            run_dir,
        )
        self._launcher = self._launcher or Launcher()
        t = experiment.training
        child = run_child(command, run_dir, experiment.threads, experiment.cpus, t.max_steps, label, self._launcher)
        check_child(child, run_dir)
        results = read_json(run_dir / "results.json")
        metrics = _metrics(run_dir)
        tokens = self._rl_tokens(metrics) if experiment.task == "rl" else self._train_tokens(experiment, splits)
        runtime = float(results["train"]["train_runtime"])
        losses = [r["loss"] for r in metrics if "loss" in r]
        record = {
            "command": command[1:],
            "returncode": child.returncode,
            "wall_s": round(child.wall_s, 2),
            "train_runtime_s": runtime,
            "peak_rss_bytes": child.peak_rss_bytes,
            "tokens": tokens["tokens"],
            "target_tokens": tokens["target_tokens"],
            "tokens_per_s": tokens["tokens"] / runtime if runtime > 0 else None,
            "train_loss": results["train"].get("train_loss"),
            "loss_curve": losses,
            "reward_curve": [[r["step"], r["reward"]] for r in metrics if "reward" in r],
            "trainable_params": results["method"]["trainable_params"],
            "total_params": results["method"]["total_params"],
            "artifact": results["artifact"],
            "artifact_bytes": artifact_bytes(Path(results["artifact"])),
        }
        write_json(run_dir / "harness_train.json", record)
        logger.info(
            "%s: trained in %.0f s (wall %.0f s), peak RSS %.0f MiB, %.0f tokens/s, train loss %.4f, last reward %s",
            label,
            runtime,
            child.wall_s,
            child.peak_rss_bytes / 2**20,
            record["tokens_per_s"] or 0,
            float("nan") if record["train_loss"] is None else record["train_loss"],  # GRPO logs a loss of 0
            record["reward_curve"][-1][1] if record["reward_curve"] else "n/a",
        )
        return record

    def _train_tokens(self, experiment: Experiment, splits: Splits) -> dict[str, int]:
        """Non-pad tokens (and target tokens) of the training file, tokenised as the recipe's ``SFTTrainer`` does (a row
        that truncation leaves without a target token is dropped); cached."""
        t = experiment.training
        fingerprint = [splits.fingerprints["train"], experiment.model, t.max_seq_len, t.prompt_style, "sft-trainer"]
        key = stable_hash(fingerprint)[:16]
        cache = self.paths.work / experiment.suite / "data" / f"tokens-{key}.json"
        if (found := read_json(cache)) is not None:
            return found
        from fura.recipes.data.formats import load_examples
        from fura.recipes.sft import load_tokenizer

        formatter = PromptFormatter(t.prompt_style, load_tokenizer(experiment.model))
        rows = [tokenize_example(e, formatter, t.max_seq_len) for e in load_examples(splits.train_path)]
        rows = [r for r in rows if any(x != -100 for x in r["labels"])]
        counts = {
            "tokens": sum(len(r["input_ids"]) for r in rows),
            "target_tokens": sum(sum(x != -100 for x in r["labels"]) for r in rows),
            "rows": len(rows),
            "rows_at_max_seq_len": sum(len(r["input_ids"]) >= t.max_seq_len for r in rows),
        }
        write_json(cache, counts)
        return counts

    @staticmethod
    def _rl_tokens(metrics: list[dict[str, Any]]) -> dict[str, int | None]:
        """Tokens a GRPO run processed (prompts and sampled completions: TRL's cumulative ``num_tokens``)."""
        seen = [r["num_tokens"] for r in metrics if "num_tokens" in r]
        return {"tokens": int(seen[-1]) if seen else 0, "target_tokens": None}

    def _validate(self, experiment: Experiment, splits: Splits, model: Any, tokenizer: Any) -> dict:
        start = time.monotonic()
        records = self._accuracy_records(experiment, model, tokenizer, splits.val)
        e, t = experiment.evaluation, experiment.training
        all_rows = [row for rows in splits.val.values() for row in rows]
        if experiment.task == "rl":  # no reference answers to score: the accuracy is the validation measure
            return {**summarise(records), "held_out_loss": None, "seconds": round(time.monotonic() - start, 1)}
        with evaluation.precision(e.precision):
            loss = evaluation.held_out_loss(
                model,
                tokenizer,
                all_rows,
                t.prompt_style,
                t.max_seq_len,
                e.held_out_batch_size,
                experiment.data.answer_format,
            )
        summary = summarise(records)
        return {**summary, "held_out_loss": loss, "seconds": round(time.monotonic() - start, 1)}

    def _accuracy_records(self, experiment: Experiment, model: Any, tokenizer: Any, rows: dict[str, list[Row]]) -> dict:
        e, style = experiment.evaluation, experiment.training.prompt_style
        with evaluation.precision(e.precision):
            if experiment.task == "commonsense":
                return evaluation.evaluate_choice(
                    model, tokenizer, rows, style, e.batch_size, experiment.data.answer_format
                )
            t = experiment.training
            rl = experiment.task == "rl"
            budget = t.max_completion_length if rl else e.max_new_tokens
            source = t.answer_source if rl else None
            records, _ = evaluation.evaluate_generation(model, tokenizer, rows, style, e.batch_size, budget, source)
            return records

    def _corpus_for(self, experiment: Experiment, tokenizer: Any) -> Any:
        key = stable_hash([experiment.model, vars(experiment.forgetting)])
        if key not in self._corpus:
            self._corpus[key] = build_corpus(tokenizer, experiment.forgetting, self.paths.corpus_cache)
        return self._corpus[key]

    def _forgetting(
        self,
        experiment: Experiment,
        model: Any,
        tokenizer: Any,
        base: dict | None,
        windows: list[float] | None = None,
    ) -> dict[str, Any]:
        """General-text cross-entropy per window and overall; against ``base`` (its forgetting record) when given.

        ``windows``: the model's per-window values when they were scored before (the validation's record), so that
        the test does not score the same text again. ``delta_ci95`` is the paired bootstrap interval of the rise over
        the same windows (None without the base model's per-window values).
        """
        corpus = self._corpus_for(experiment, tokenizer)
        start = time.monotonic()
        if windows is None or len(windows) != len(corpus.windows):
            with evaluation.precision(experiment.evaluation.precision):
                windows = evaluation.window_cross_entropy(model, corpus.windows, experiment.forgetting.batch_size)
        ce = sum(windows) / len(windows)
        base_ce = None if base is None else base["cross_entropy"]
        interval = None
        if base is not None and len(base.get("windows") or []) == len(windows):
            boot = stats.paired_mean_difference(windows, base["windows"])
            interval = [boot.interval.low, boot.interval.high]
        return {
            "cross_entropy": ce,
            "base_cross_entropy": base_ce,
            "delta": None if base_ce is None else ce - base_ce,
            "delta_ci95": interval,
            "tokens": corpus.tokens,
            "sources": corpus.sources,
            "windows": [round(x, 6) for x in windows],
            "seconds": round(time.monotonic() - start, 1),
        }

    def _test_payload(
        self,
        experiment: Experiment,
        splits: Splits,
        model: Any,
        tokenizer: Any,
        base: dict | None,
        windows: list[float] | None = None,
    ) -> dict:
        start = time.monotonic()
        records = self._accuracy_records(experiment, model, tokenizer, splits.test)
        test_seconds = time.monotonic() - start
        return {
            "schema": SCHEMA,
            "suite": experiment.suite,
            "experiment": experiment.name,
            "method": experiment.method,
            "method_args": experiment.method_args,
            "description": experiment.description,
            "model": experiment.model,
            "task": experiment.task,
            "settings": experiment.as_dict(),
            "protocol": _protocol(experiment),
            "test": {**summarise(records), "seconds": round(test_seconds, 1)},
            "forgetting": self._forgetting(experiment, model, tokenizer, base, windows),
            "rows": records,
            "environment": environment(),
        }

    def _evaluation_fingerprint(self, experiment: Experiment, splits: Splits) -> str:
        """What a cached validation depends on besides the model: its rows and how they are evaluated."""
        return stable_hash([splits.fingerprints["val"], _scoring(experiment), experiment.training.prompt_style])

    def _fingerprints(self, experiment: Experiment, splits: Splits) -> dict[str, Any]:
        return {
            **splits.fingerprints,
            "model": experiment.model,
            "task": experiment.task,
            "corpus": stable_hash(vars(experiment.forgetting)),
            "evaluation": stable_hash(_scoring(experiment)),
            "prompt_style": experiment.training.prompt_style,
        }

    @staticmethod
    def _grid_record(experiment: Experiment, grid: list[dict], base: dict | None) -> list[dict]:
        """The grid as a result file records it: rate, validation accuracy and loss, training loss, forgetting."""
        if base is None:
            raise ExperimentError(f"{experiment.suite}: the base model's result is missing; run the suite again")
        return [
            {
                "learning_rate": g["learning_rate"],
                "validation_accuracy": g["validation"]["macro_accuracy"],
                "held_out_loss": g["validation"]["held_out_loss"],
                "train_loss": g["training"]["train_loss"],
                "forgetting": g["general_text_cross_entropy"] - base["forgetting"]["cross_entropy"],
                **({"reward_curve": g["training"]["reward_curve"]} if experiment.task == "rl" else {}),
            }
            for g in grid
        ]

    def test(self, experiment: Experiment, splits: Splits, point: dict, grid: list[dict], kind: str = "") -> Path:
        """Test one trained (rate, seed) point; writes and returns its result file, ``<kind>seed<S>.json``: the rate
        chosen on validation accuracy (``kind`` empty), or the best one within the forgetting budget (``budget-``)."""
        seed = point["seed"]
        target = self.paths.results / experiment.suite / experiment.name / f"{kind}seed{seed}.json"
        fingerprints = {**self._fingerprints(experiment, splits), "run": Path(point["run_dir"]).name}
        base = read_json(self.paths.results / experiment.suite / BASE / "result.json")
        grid_record = self._grid_record(experiment, grid, base)
        if (done := read_json(target)) is not None and done.get("fingerprints") == fingerprints:
            # the grid grew, or the rate was fixed, but the same rate won: same model, same test, new grid and settings
            refreshed = {**done, "grid": grid_record, "settings": experiment.as_dict()}
            if refreshed != done:
                write_json(target, refreshed)
            logger.info("[%s] seed %d: tested before (%s)", experiment.key, seed, target)
            return target
        logger.info(
            "[%s] seed %d: testing lr %g on %d rows",
            experiment.key,
            seed,
            point["learning_rate"],
            sum(len(r) for r in splits.test.values()),
        )
        scored = self._general_text(experiment, Path(point["run_dir"]), f"[{experiment.key}] seed {seed}")
        model, tokenizer = evaluation.load_model(point["run_dir"])
        payload = self._test_payload(experiment, splits, model, tokenizer, base["forgetting"], scored.get("windows"))
        self._release(model)
        payload.update(
            seed=seed,
            learning_rate=point["learning_rate"],
            fingerprints=fingerprints,
            training=point["training"],
            validation=point["validation"],
            grid=grid_record,
        )
        write_json(target, payload)
        logger.info(
            "[%s] seed %d: test %s, forgetting %+.4f nats/token -> %s",
            experiment.key,
            seed,
            _percent(payload["test"]["macro_accuracy"]),
            payload["forgetting"]["delta"],
            target,
        )
        return target

    @staticmethod
    def _release(model: Any) -> None:
        del model
        gc.collect()


def _scoring(experiment: Experiment) -> dict[str, Any]:
    """What scoring a model depends on besides its rows: the evaluation settings, and for ``rl`` the generation budget
    and the answer's grader, which live with the training settings (the reward uses the same)."""
    if experiment.task != "rl":
        return vars(experiment.evaluation)  # as before rl suites existed, so that earlier results still match
    t = experiment.training
    return {**vars(experiment.evaluation), "max_new_tokens": t.max_completion_length, "answer_source": t.answer_source}


def _protocol(experiment: Experiment) -> str:
    if experiment.task == "rl":
        where = "the last boxed answer" if experiment.training.answer_source == "boxed" else "the final answer"
        return f"greedy generation, GRPO prompt, math-verify on {where}"
    if experiment.task != "commonsense":
        return "greedy generation, numeric grading"
    return (
        "loglik"
        if experiment.data.answer_format == "label"
        else "loglik, cloze (option texts after the question alone)"
    )


def choose_learning_rate(grid: Sequence[dict]) -> dict:
    """The grid point with the best validation accuracy; ties go to the lower held-out loss (none in ``rl``), then
    the lower rate."""
    if not grid:
        raise ExperimentError("empty learning-rate grid")

    def key(g: dict) -> tuple[float, float, float]:
        loss = g["validation"]["held_out_loss"]
        return (-g["validation"]["macro_accuracy"], math.inf if loss is None else loss, g["learning_rate"])

    return min(grid, key=key)


def summarise(records: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per-task accuracy with its Wilson 95 % interval, the macro average and the pooled (micro) accuracy."""
    tasks = {}
    for task, rows in records.items():
        correct = sum(bool(r["correct"]) for r in rows)
        interval = stats.wilson_interval(correct, len(rows))
        tasks[task] = {
            "correct": correct,
            "total": len(rows),
            "accuracy": correct / len(rows) if rows else 0.0,
            "ci95": [interval.low, interval.high],
        }
    macro = sum(t["accuracy"] for t in tasks.values()) / len(tasks) if tasks else 0.0
    correct, total = sum(t["correct"] for t in tasks.values()), sum(t["total"] for t in tasks.values())
    return {"tasks": tasks, "macro_accuracy": macro, "pooled_accuracy": correct / total if total else 0.0}


def artifact_bytes(folder: Path) -> int:
    """Bytes of the weight files (``*.safetensors``, ``*.bin``) of a saved adapter / model folder."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def environment() -> dict[str, Any]:
    """Library versions, the checkout's commit and the machine (for the record)."""
    import peft
    import transformers

    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=False
            ).stdout.strip()
            or None
        )
    except OSError:
        commit = None
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "commit": commit,
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "threads": torch.get_num_threads(),
    }
