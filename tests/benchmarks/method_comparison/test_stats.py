"""Statistics against known values: Wilson intervals, the exact McNemar test, the paired bootstrap."""

from __future__ import annotations

import random

import numpy as np
import pytest
from benchmarks.method_comparison.stats import (
    binomial_two_sided,
    bootstrap_macro,
    mcnemar_exact,
    paired_bootstrap,
    paired_mean_difference,
    wilson_interval,
)


@pytest.mark.parametrize(
    ("correct", "total", "low", "high"),
    [
        (8, 10, 0.4902, 0.9433),  # the textbook example (Wilson 1927; Newcombe 1998, Table I)
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (50, 100, 0.4038, 0.5962),
        (1, 2, 0.0945, 0.9055),
    ],
)
def test_wilson_interval_known_values(correct, total, low, high):
    interval = wilson_interval(correct, total)
    assert (interval.low, interval.high) == (pytest.approx(low, abs=1e-4), pytest.approx(high, abs=1e-4))


def test_wilson_interval_edge_cases():
    assert (wilson_interval(0, 0).low, wilson_interval(0, 0).high) == (0.0, 1.0)
    with pytest.raises(ValueError, match="0 <= correct <= total"):
        wilson_interval(3, 2)


@pytest.mark.parametrize(
    ("a_only", "b_only", "p"),
    [(1, 6, 0.125), (0, 5, 0.0625), (0, 0, 1.0), (3, 3, 1.0), (2, 8, 0.109375), (10, 0, 2 / 1024)],
)
def test_mcnemar_exact_known_values(a_only, b_only, p):
    both = 4  # concordant rows do not change the test
    a = [True] * a_only + [False] * b_only + [True] * both + [False] * both
    b = [False] * a_only + [True] * b_only + [True] * both + [False] * both
    result = mcnemar_exact(a, b)
    assert (result.a_only, result.b_only) == (a_only, b_only)
    assert result.p_value == pytest.approx(p, abs=1e-12)


def test_binomial_tail_is_exact_and_paired_rows_must_match():
    assert binomial_two_sided(2, 10) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert binomial_two_sided(0, 0) == 1.0
    with pytest.raises(ValueError, match="same rows"):
        mcnemar_exact([True], [True, False])


def test_paired_bootstrap_degenerate_and_symmetric_cases():
    rows = {"t": [True] * 20, "u": [True, False] * 10}
    same = paired_bootstrap(rows, rows, resamples=200)
    assert same.difference == 0 and (same.interval.low, same.interval.high) == (0, 0)
    right, wrong = {"t": [True] * 20}, {"t": [False] * 20}
    extreme = paired_bootstrap(right, wrong, resamples=200)
    assert extreme.difference == 1 and (extreme.interval.low, extreme.interval.high) == (1, 1)


def test_paired_bootstrap_interval_covers_the_observed_difference_and_is_seeded():
    rng = random.Random(1)
    a = {"t": [rng.random() < 0.7 for _ in range(300)], "u": [rng.random() < 0.5 for _ in range(200)]}
    b = {"t": [rng.random() < 0.6 for _ in range(300)], "u": [rng.random() < 0.5 for _ in range(200)]}
    first, again = paired_bootstrap(a, b, seed=3), paired_bootstrap(a, b, seed=3)
    assert first == again
    assert first.interval.low < first.difference < first.interval.high
    assert 0.03 < first.interval.high - first.interval.low < 0.2  # about 2 × 1.96 × sd of a 500-row macro difference
    single = bootstrap_macro(a)
    assert single.low < (sum(a["t"]) / 300 + sum(a["u"]) / 200) / 2 < single.high
    with pytest.raises(ValueError, match="same tasks"):
        paired_bootstrap(a, {"t": b["t"]})


def test_paired_mean_difference_of_real_values():
    base = [3.0 + 0.1 * (i % 7) for i in range(120)]
    shifted = paired_mean_difference([x + 0.25 for x in base], base, resamples=300)
    assert shifted.difference == pytest.approx(0.25) and shifted.interval.low == pytest.approx(0.25)
    assert shifted.interval.high == pytest.approx(0.25)  # a constant shift: no spread, whatever the windows
    rng = random.Random(2)
    noisy = [x + rng.gauss(0.1, 0.2) for x in base]
    result = paired_mean_difference(noisy, base)
    assert result.interval.low < result.difference < result.interval.high and result.interval.low > 0


def test_seed_row_bootstrap_carries_the_spread_between_seeds():
    from benchmarks.method_comparison.stats import paired_bootstrap, seed_row_bootstrap

    rng = np.random.default_rng(1)
    rows = {"t": list(rng.random(400) < 0.5)}
    other = {"t": list(rng.random(400) < 0.55)}
    one_seed, rows_only = seed_row_bootstrap([other], [rows]), paired_bootstrap(other, rows)  # one seed: rows only
    assert one_seed.difference == pytest.approx(rows_only.difference)
    width = one_seed.interval.high - one_seed.interval.low
    assert width == pytest.approx(rows_only.interval.high - rows_only.interval.low, rel=0.2)
    same = seed_row_bootstrap([other] * 3, [rows] * 3)  # three identical seeds: no spread to add
    assert same.difference == pytest.approx(one_seed.difference)
    assert same.interval.high - same.interval.low == pytest.approx(width, rel=0.2)
    # seeds that disagree (about +15, 0, -15 points on the same rows): the interval widens to cover their spread
    shifted = [{"t": [True] * 120 + other["t"][120:]}, other, {"t": [False] * 120 + other["t"][120:]}]
    spread = seed_row_bootstrap(shifted, [rows] * 3)
    assert spread.interval.high - spread.interval.low > 1.5 * (same.interval.high - same.interval.low)
    with pytest.raises(ValueError, match="same, non-zero number of seeds"):
        seed_row_bootstrap([other, other], [rows])
