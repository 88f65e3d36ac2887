"""Statistics for comparing methods on the same evaluation rows: Wilson intervals, exact McNemar, paired bootstrap.

The exact tests use the standard library (``math.comb`` for the binomial tail) and the bootstrap NumPy (already a
dependency of torch and transformers), so the harness needs no SciPy.

* :func:`wilson_interval` — the 95 % Wilson score interval of an accuracy ``k / n``. Unlike the normal ("Wald")
  interval it stays inside [0, 1] and keeps its coverage near 0 % and 100 %.
* :func:`mcnemar_exact` — the exact (binomial) McNemar test of two classifiers scored on the same rows: only the
  discordant rows count (``b`` = A right and B wrong, ``c`` = A wrong and B right); under the null hypothesis of
  equal accuracy each discordant row is a fair coin, so the two-sided p-value is
  ``min(1, 2 · P[Binomial(b + c, 1/2) <= min(b, c)])``.
* :func:`paired_bootstrap` — (NumPy) a percentile confidence interval of the difference in (macro-averaged) accuracy,
  resampling rows with replacement within each task, the same resampled rows for both methods.
* :func:`seed_row_bootstrap` — the same across training seeds: seeds and rows are both resampled (a two-way
  bootstrap), so the interval of the mean difference carries the run-to-run spread of training as well as the
  sampling of test rows. With one seed it is :func:`paired_bootstrap`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: The 97.5 % quantile of the standard normal distribution (two-sided 95 % intervals).
Z_95 = 1.959963984540054


@dataclass(frozen=True)
class Interval:
    """A confidence interval.

    Attributes:
        low: lower bound.
        high: upper bound.
    """

    low: float
    high: float


def wilson_interval(correct: int, total: int, z: float = Z_95) -> Interval:
    """The Wilson score interval of the proportion ``correct / total`` (``(0, 1)`` when ``total`` is 0)."""
    if correct < 0 or total < 0 or correct > total:
        raise ValueError(f"need 0 <= correct <= total, got correct={correct}, total={total}")
    if total == 0:
        return Interval(0.0, 1.0)
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return Interval(max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class McNemar:
    """The exact McNemar test of A against B on paired rows.

    Attributes:
        a_only: rows A got right and B got wrong (``b``).
        b_only: rows B got right and A got wrong (``c``).
        p_value: two-sided exact p-value.
    """

    a_only: int
    b_only: int
    p_value: float


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> McNemar:
    """The exact two-sided McNemar test of two correctness vectors over the same rows (same order)."""
    if len(a_correct) != len(b_correct):
        raise ValueError(f"paired test needs the same rows: {len(a_correct)} against {len(b_correct)}")
    a_only = sum(1 for a, b in zip(a_correct, b_correct, strict=True) if a and not b)
    b_only = sum(1 for a, b in zip(a_correct, b_correct, strict=True) if b and not a)
    return McNemar(a_only, b_only, binomial_two_sided(min(a_only, b_only), a_only + b_only))


def binomial_two_sided(k: int, n: int) -> float:
    """``min(1, 2 · P[Binomial(n, 1/2) <= k])`` with exact integer arithmetic (1.0 when ``n`` is 0)."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)


@dataclass(frozen=True)
class BootstrapDifference:
    """Paired bootstrap of ``accuracy(A) - accuracy(B)`` (macro average over tasks).

    Attributes:
        difference: the observed difference.
        interval: the percentile confidence interval.
        resamples: bootstrap resamples drawn.
    """

    difference: float
    interval: Interval
    resamples: int


def macro_accuracy(correct: Mapping[str, Sequence[float]]) -> float:
    """Mean over tasks of each task's accuracy (the mean of its 0/1 rows; any real values average the same way)."""
    if not correct:
        raise ValueError("no task to average")
    return sum(sum(rows) / len(rows) for rows in correct.values()) / len(correct)


def percentile_interval(values: np.ndarray, level: float = 0.95) -> Interval:
    """The central ``level`` percentile interval of bootstrap statistics ``values``."""
    ordered = np.sort(values)
    tail = (1 - level) / 2
    last = len(ordered) - 1
    return Interval(float(ordered[math.floor(tail * last)]), float(ordered[math.ceil((1 - tail) * last)]))


def paired_bootstrap(
    a_correct: Mapping[str, Sequence[float]],
    b_correct: Mapping[str, Sequence[float]],
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> BootstrapDifference:
    """Percentile interval of the macro-accuracy difference A − B, resampling rows within each task (paired)."""
    if set(a_correct) != set(b_correct):
        raise ValueError(f"paired bootstrap needs the same tasks: {sorted(a_correct)} against {sorted(b_correct)}")
    for task in a_correct:
        if len(a_correct[task]) != len(b_correct[task]) or not a_correct[task]:
            raise ValueError(f"task {task}: paired bootstrap needs the same, non-empty rows for both methods")
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    for task in sorted(a_correct):
        diff = np.asarray(a_correct[task], dtype=float) - np.asarray(b_correct[task], dtype=float)
        total += diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    observed = macro_accuracy(a_correct) - macro_accuracy(b_correct)
    return BootstrapDifference(observed, percentile_interval(total / len(a_correct), level), resamples)


def seed_row_bootstrap(
    a_runs: Sequence[Mapping[str, Sequence[float]]],
    b_runs: Sequence[Mapping[str, Sequence[float]]],
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> BootstrapDifference:
    """Percentile interval of the seed-mean macro-accuracy difference A − B (or of a macro mean of real values per
    row, e.g. the cross-entropy of each text window).

    ``a_runs[s]`` and ``b_runs[s]`` are the per-task correctness of seed ``s`` of each method, on the same rows. Each
    resample draws ``S`` seeds with replacement and one set of rows per task (the rows are shared by every seed and
    method), and takes the mean over the drawn seeds of the difference on the drawn rows. Shape: per task the
    differences form an ``(S, n)`` array; a resample averages it over ``(S,)`` drawn seed indices × ``(n,)`` drawn
    row indices.
    """
    if not a_runs or len(a_runs) != len(b_runs):
        raise ValueError(f"need the same, non-zero number of seeds for both methods: {len(a_runs)} and {len(b_runs)}")
    tasks = sorted(a_runs[0])
    for run in (*a_runs, *b_runs):
        if sorted(run) != tasks or any(len(run[t]) != len(a_runs[0][t]) or not run[t] for t in tasks):
            raise ValueError("every seed of both methods needs the same tasks and the same, non-empty rows")
    rng = np.random.default_rng(seed)
    seeds = len(a_runs)
    total = np.zeros(resamples)
    for task in tasks:
        diff = np.asarray([a[task] for a in a_runs], dtype=float) - np.asarray([b[task] for b in b_runs], dtype=float)
        drawn_seeds = rng.integers(0, seeds, size=(resamples, seeds))
        drawn_rows = rng.integers(0, diff.shape[1], size=(resamples, diff.shape[1]))
        per_seed_row = diff[drawn_seeds[:, :, None], drawn_rows[:, None, :]]  # (resamples, S, n)
        total += per_seed_row.mean(axis=(1, 2))
    observed = float(np.mean([macro_accuracy(a) - macro_accuracy(b) for a, b in zip(a_runs, b_runs, strict=True)]))
    return BootstrapDifference(observed, percentile_interval(total / len(tasks), level), resamples)


def bootstrap_macro(
    correct: Mapping[str, Sequence[bool]], resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> Interval:
    """Percentile interval of one method's macro accuracy, resampling rows within each task."""
    zeros = {task: [False] * len(rows) for task, rows in correct.items()}
    return paired_bootstrap(correct, zeros, resamples, seed, level).interval


def paired_mean_difference(
    a: Sequence[float], b: Sequence[float], resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> BootstrapDifference:
    """Percentile interval of ``mean(a) - mean(b)`` over paired items (e.g. the same text windows scored by two models).

    The paired bootstrap of :func:`paired_bootstrap` with one "task" whose rows are real values instead of 0/1.
    """
    return paired_bootstrap({"items": list(a)}, {"items": list(b)}, resamples, seed, level)
