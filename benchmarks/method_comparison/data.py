"""Explicit, hashed data splits: training and validation rows from the training files, a fixed sample of test rows.

* **Validation rows come out of the training files** (``val_rows_per_file`` of each, a seeded random choice) and are
  never trained on; they choose the learning rate and give the held-out loss. Test rows are never used for any
  choice.
* **The training set is exactly** ``max_steps × batch_size`` rows — an equal share of each training file's remaining
  rows (the first files take one more when it does not divide; a file with fewer rows than its share gives them all
  and the others make up the difference) — so every run is one epoch and sees each row once.
* **Test rows** are a seeded random sample of ``test_rows_per_file`` rows of each test file (sorted by index).
* With ``answer_format: cloze`` the training rows are rewritten by :func:`fura.recipes.eval.as_cloze` (the question
  alone, answered with the option's text); validation and test rows keep their original form here and are rewritten
  where they are evaluated.
* Everything depends only on the files, ``split_seed`` and ``answer_format``, not on the training seed or the method,
  so all runs of a suite share their rows. Each split has a fingerprint (sha256 over the source files' hashes, the
  chosen row indices and a ``cloze`` answer format) that the report compares before it puts two runs side by side.

The training rows are written to ``<work>/data/train-<fingerprint>.json`` for ``fura train sft --data``; the work
folder lives outside the repository (the shared data must never be copied into it).

Task ``rl`` reads no file: its problems are generated offline by reasoning-gym (:func:`rl_splits`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from benchmarks.method_comparison.experiment import Experiment, ExperimentError, stable_hash
from fura.io.files import atomic_write_text
from fura.recipes.data.formats import Example, load_rows
from fura.recipes.eval import as_cloze

#: Default shared data folder: ``$FURA_DATA_DIR``, else ``../shared/data`` beside the checkout.
REPO_ROOT = Path(__file__).resolve().parents[2]


def default_data_root() -> Path:
    """``$FURA_DATA_DIR`` or ``<checkout>/../shared/data``."""
    return Path(os.environ.get("FURA_DATA_DIR", REPO_ROOT.parent / "shared" / "data")).resolve()


@dataclass(frozen=True)
class Row:
    """One evaluation row.

    Attributes:
        source: the file's path relative to the data root.
        index: the row's index in that file.
        example: the row.
    """

    source: str
    index: int
    example: Example


@dataclass
class Splits:
    """The rows of one suite.

    Attributes:
        train_path: the training rows as an LLM-Adapters JSON file (for ``--data``).
        train_rows: how many training rows.
        val: validation rows per training-file name (``boolq`` for ``commonsense/train/boolq.json``).
        test: test rows per test-file name.
        fingerprints: sha256 of the ``train``, ``val`` and ``test`` row choices.
        val_path: task ``rl``: the validation problems as JSONL (the GRPO recipe's ``--held-out-dataset``).
    """

    train_path: Path
    train_rows: int
    val: dict[str, list[Row]]
    test: dict[str, list[Row]]
    fingerprints: dict[str, str]
    val_path: Path | None = None


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (cached while the file's size and modification time stay the same)."""
    stat = path.stat()
    return _sha256(path.resolve(), stat.st_size, stat.st_mtime_ns)


@cache
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load(root: Path, relative: str) -> tuple[Path, list[dict[str, Any]]]:
    path = root / relative
    if not path.is_file():
        raise ExperimentError(
            f"data file {path} does not exist. Fix: check data.train_files / data.test_files "
            f"(relative to the data root {root}; set --data-root or $FURA_DATA_DIR)"
        )
    return path, load_rows(path)


def _example(row: dict[str, Any], source: str, index: int) -> Example:
    for field in ("instruction", "answer"):
        if row.get(field) is None:
            raise ExperimentError(f"{source}: row {index} lacks the field {field!r}")
    return Example(
        str(row["instruction"]),
        str(row.get("output") or ""),
        str(row["answer"]),
        str(row.get("input") or ""),
        Path(source).stem,
    )


def _order(seed: int, salt: str, n: int) -> list[int]:
    order = list(range(n))
    random.Random(f"{seed}:{salt}").shuffle(order)
    return order


def allocate(total: int, capacities: list[int]) -> list[int]:
    """Split ``total`` rows over files as equally as their ``capacities`` allow (water-filling).

    Equal shares (the first files take one more when it does not divide); a file that has fewer rows than its share
    gives all it has and the others share the rest. Raises when all files together have too few rows.
    """
    shares = [0] * len(capacities)
    open_ = [i for i, c in enumerate(capacities) if c > 0]
    while (remaining := total - sum(shares)) > 0 and open_:
        for rank, i in enumerate(open_):
            equal = remaining // len(open_) + (1 if rank < remaining % len(open_) else 0)
            shares[i] += min(equal, capacities[i] - shares[i])
        open_ = [i for i in open_ if shares[i] < capacities[i]]
    if sum(shares) < total:
        raise ValueError(f"{total} rows needed, the files have {sum(capacities)}")
    return shares


def build_splits(experiment: Experiment, data_root: Path, work_dir: Path) -> Splits:
    """Choose, fingerprint and write the rows of ``experiment`` (deterministic; see the module docstring)."""
    if experiment.task == "rl":
        return rl_splits(experiment, work_dir)
    spec, training = experiment.data, experiment.training
    total = training.max_steps * training.batch_size
    train_raw: list[dict[str, Any]] = []
    val: dict[str, list[Row]] = {}
    train_choice, val_choice = [], []
    loaded = [(relative, *_load(data_root, relative)) for relative in spec.train_files]
    orders = [_order(spec.split_seed, relative, len(rows)) for relative, _, rows in loaded]
    try:
        shares = allocate(total, [max(0, len(order) - spec.val_rows_per_file) for order in orders])
    except ValueError as err:
        raise ExperimentError(
            f"{experiment.key}: the training files have too few rows after {spec.val_rows_per_file} validation rows "
            f"each ({err}; max_steps × batch_size = {total}). Fix: fewer training.max_steps / batch_size or "
            "data.val_rows_per_file, or more files."
        ) from None
    for (relative, path, rows), order, share in zip(loaded, orders, shares, strict=True):
        val_idx, pool = order[: spec.val_rows_per_file], order[spec.val_rows_per_file :]
        val[Path(relative).stem] = [Row(relative, i, _example(rows[i], relative, i)) for i in sorted(val_idx)]
        train_raw.extend(_training_row(rows[i], relative, i, spec.answer_format) for i in pool[:share])
        train_choice.append((relative, file_sha256(path), sorted(pool[:share])))
        val_choice.append((relative, file_sha256(path), sorted(val_idx)))
    random.Random(f"{spec.split_seed}:mix").shuffle(train_raw)
    test, test_choice = _test_rows(experiment, data_root)
    # the label format hashes the row choice alone (as before the cloze format existed), so older results still match
    fmt = [] if spec.answer_format == "label" else [spec.answer_format]
    fingerprints = {
        "train": stable_hash([train_choice, *fmt] if fmt else train_choice),
        "val": stable_hash([val_choice, *fmt] if fmt else val_choice),
        "test": stable_hash([test_choice, *fmt] if fmt else test_choice),
    }
    train_path = work_dir / "data" / f"train-{fingerprints['train'][:12]}.json"
    if not train_path.is_file():
        atomic_write_text(train_path, json.dumps(train_raw, ensure_ascii=False))
    return Splits(train_path, len(train_raw), val, test, fingerprints)


def rl_splits(experiment: Experiment, work_dir: Path) -> Splits:
    """Problems of an ``rl`` suite: reasoning-gym's ``data.generator`` with ``split_seed``, one epoch of training.

    The recipe's own problem builder (:func:`fura.recipes.data.math_problems.build_problem_sets`) makes a training
    set of ``max_steps × prompts_per_step + val_rows_per_file`` problems and a disjoint held-out set of
    ``test_rows_per_file`` test problems; the first ``val_rows_per_file`` training problems are the validation
    problems, never trained on. The training and validation problems are written as JSONL (``problem``, ``answer``)
    for ``fura train grpo --dataset`` / ``--held-out-dataset``.
    """
    from fura.recipes.data.math_problems import MathProblemsConfig, build_problem_sets

    spec, training = experiment.data, experiment.training
    train_size = training.max_steps * training.prompts_per_step
    config = MathProblemsConfig(
        dataset=spec.generator,
        train_size=train_size + spec.val_rows_per_file,
        held_out_size=spec.test_rows_per_file,
        seed=spec.split_seed,
    )
    sets = build_problem_sets(config)
    val, train = sets.train[: spec.val_rows_per_file], sets.train[spec.val_rows_per_file :]
    if len(train) < train_size or len(val) < spec.val_rows_per_file or len(sets.held_out) < spec.test_rows_per_file:
        raise ExperimentError(
            f"{experiment.key}: reasoning-gym {spec.generator} gave {len(sets.train)} distinct training and "
            f"{len(sets.held_out)} held-out problems, fewer than asked. Fix: fewer steps, prompts or rows."
        )

    def rows(problems: list[Any]) -> list[Row]:
        return [
            Row(spec.generator, i, Example(instruction=p.problem, output="", answer=p.answer, source=spec.generator))
            for i, p in enumerate(problems)
        ]

    def choice(problems: list[Any]) -> str:
        return stable_hash([spec.generator, spec.split_seed, [(p.problem, p.answer) for p in problems]])

    fingerprints = {"train": choice(train), "val": choice(val), "test": choice(sets.held_out)}
    folder = work_dir / "data"
    train_path = folder / f"rl-train-{fingerprints['train'][:12]}.jsonl"
    val_path = folder / f"rl-val-{fingerprints['val'][:12]}.jsonl"
    for path, problems in ((train_path, train), (val_path, val)):
        if not path.is_file():  # written whole or not at all: a killed run never leaves half a file to reuse
            lines = (json.dumps({"problem": p.problem, "answer": p.answer}, ensure_ascii=False) for p in problems)
            atomic_write_text(path, "".join(line + "\n" for line in lines))
    name = spec.generator
    return Splits(train_path, len(train), {name: rows(val)}, {name: rows(sets.held_out)}, fingerprints, val_path)


def _training_row(row: dict[str, Any], source: str, index: int, answer_format: str = "label") -> dict[str, Any]:
    for field in ("instruction", "output", "answer"):
        if row.get(field) is None:
            raise ExperimentError(f"{source}: training row {index} lacks the field {field!r}")
    if answer_format == "cloze":
        try:
            row = dataclasses.asdict(as_cloze(Path(source).stem, _example(row, source, index)))
        except ValueError as err:
            raise ExperimentError(f"{source}: training row {index}: {err}") from None
    return {
        "instruction": row["instruction"],
        "input": row.get("input") or "",
        "output": row["output"],
        "answer": row["answer"],
    }


def _test_rows(experiment: Experiment, data_root: Path) -> tuple[dict[str, list[Row]], list[Any]]:
    spec = experiment.data
    test: dict[str, list[Row]] = {}
    choice = []
    for relative in spec.test_files:
        path, rows = _load(data_root, relative)
        picked = sorted(_order(spec.split_seed, f"test:{relative}", len(rows))[: spec.test_rows_per_file])
        name = Path(relative).stem
        if name in test:
            raise ExperimentError(f"{experiment.key}: two test files are named {name}; rename one")
        test[name] = [Row(relative, i, _example(rows[i], relative, i)) for i in picked]
        choice.append((relative, file_sha256(path), picked))
    return test, choice
