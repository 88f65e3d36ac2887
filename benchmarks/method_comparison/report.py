"""``report``: a markdown table, PNG plots and a JSON summary of a suite — only of runs that can be compared.

Before anything is written, every run is checked against the others (:func:`check_comparable`): the same training,
validation and test rows (fingerprints of the row choices and of the source files), the same base model, task,
evaluation settings, prompt style and forgetting corpus, the same training settings apart from the method and its
learning rate, and at least one seed run by every experiment. Any difference is an error that names the runs and
the field; nothing is compared "approximately".

What the report holds:

* one row per experiment (mean over the seeds every experiment ran, :func:`shared_seeds`): trainable parameters,
  chosen learning rate, validation accuracy, per-task test accuracy (Wilson 95 % intervals in a second table), macro
  average, forgetting (rise of the general-text cross-entropy over the base model, nats per token), training and
  held-out loss, train time, tokens/s, peak RSS and artifact size;
* paired tests of each experiment against the reference experiment on the same rows and seed: exact McNemar per task
  and pooled over all test rows, and a paired bootstrap interval of the macro-accuracy difference;
* ``accuracy_vs_forgetting.png`` (the headline: learn more, forget less?), ``accuracy_vs_memory.png`` and
  ``lr_grid.png`` (validation accuracy over each experiment's learning-rate grid); for GRPO suites
  ``reward_curves.png`` (the accuracy reward per step).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.method_comparison import stats
from benchmarks.method_comparison.experiment import BASE, GRID_SETTINGS
from fura.io.files import atomic_directory

#: Fingerprints every run must share (the base model is not trained, so ``train`` is not compared with it).
SHARED = ("val", "test", "model", "task", "corpus", "evaluation", "prompt_style")


class ReportError(ValueError):
    """The runs cannot be compared (or there is nothing to report)."""


def load_runs(results_dir: Path, suite: str, experiments: Sequence[str] | None = None) -> tuple[dict, list[dict]]:
    """The suite's base result and its experiments' results (optionally only ``experiments``)."""
    folder = results_dir / suite
    base_path = folder / BASE / "result.json"
    if not base_path.is_file():
        raise ReportError(f"{base_path} is missing. Fix: python -m benchmarks.method_comparison run {suite}")
    runs = []
    for path in sorted([*folder.glob("*/seed*.json"), *folder.glob("*/budget-seed*.json")]):
        if experiments and path.parent.name not in experiments:
            continue
        run = json.loads(path.read_text(encoding="utf-8"))
        run["_path"] = str(path)
        run["_budget"] = path.name.startswith("budget-")
        runs.append(run)
    missing = sorted(set(experiments or ()) - {r["experiment"] for r in runs if not r["_budget"]})
    if missing:
        raise ReportError(f"no result for experiment(s) {', '.join(missing)} under {folder}")
    if not any(not r["_budget"] for r in runs):
        raise ReportError(f"no finished experiment under {folder}. Fix: run the suite first")
    base = json.loads(base_path.read_text(encoding="utf-8"))
    base["_path"] = str(base_path)
    return base, runs


def _label(run: dict) -> str:
    return f"{run['experiment']} (seed {run['seed']})" if run.get("seed") is not None else run["experiment"]


def _training_settings(run: dict) -> dict:
    return {k: v for k, v in run["settings"]["training"].items() if k not in GRID_SETTINGS}


def _rows_of(run: dict) -> dict[str, list[int]]:
    return {task: [r["index"] for r in rows] for task, rows in run["rows"].items()}


def _by_experiment(runs: Sequence[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for run in sorted(runs, key=lambda r: (r["experiment"], r["seed"])):
        groups.setdefault(run["experiment"], []).append(run)
    return groups


def _budget_runs(choice: dict[str, Any], groups: dict, budget_groups: dict) -> list[dict]:
    """The tested runs at an experiment's within-budget point (its chosen runs, or its budget results)."""
    name = choice["experiment"]
    if choice["status"] != "tested":
        return []
    chosen = groups[name]
    return chosen if chosen[0]["learning_rate"] == choice["learning_rate"] else budget_groups.get(name, [])


def check_comparable(base: dict, runs: Sequence[dict], seeds: bool = True) -> None:
    """Raise :class:`ReportError` naming the runs and the field whenever two runs differ in what they must share
    (``seeds``: also the set of seeds of each experiment)."""
    reference = runs[0]
    for run in [base, *runs]:
        for key in SHARED:
            if run["fingerprints"].get(key) != reference["fingerprints"].get(key):
                raise ReportError(_differ(key, reference, run))
        if _rows_of(run) != _rows_of(reference):
            raise ReportError(_differ("evaluation rows", reference, run))
    for run in runs:
        if run["fingerprints"]["train"] != reference["fingerprints"]["train"]:
            raise ReportError(_differ("training data", reference, run))
        if _training_settings(run) != _training_settings(reference):
            raise ReportError(_differ("training settings", reference, run))
    if seeds and not shared_seeds(runs):
        listing = "; ".join(f"{name}: {[r['seed'] for r in g]}" for name, g in _by_experiment(runs).items())
        raise ReportError(
            f"the experiments share no seed ({listing}). Fix: run the missing seeds, or "
            "report a subset with --experiments"
        )


def shared_seeds(runs: Sequence[dict]) -> list[int]:
    """The seeds every experiment was run with: the main table and its paired tests use these only, so that each
    row averages the same seeds; an experiment's further seeds enter the across-seeds comparison."""
    found = [{r["seed"] for r in group} for group in _by_experiment(runs).values()]
    return sorted(set.intersection(*found)) if found else []


def _differ(what: str, a: dict, b: dict) -> str:
    return (
        f"cannot compare {_label(a)} ({a['_path']}) with {_label(b)} ({b['_path']}): their {what} differ. "
        "Fix: run both with the same suite settings, or report them separately (--experiments)"
    )


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _sd(values: Sequence[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def _correct(run: dict) -> dict[str, list[bool]]:
    return {task: [bool(r["correct"]) for r in rows] for task, rows in run["rows"].items()}


def experiment_row(name: str, runs: Sequence[dict]) -> dict[str, Any]:
    """One table row: means over the experiment's seeds; the row-bootstrap intervals only for a single seed (an
    interval of one seed's rows beside a mean over seeds would not describe it)."""
    first = runs[0]
    tasks = list(first["test"]["tasks"])
    macro = [r["test"]["macro_accuracy"] for r in runs]
    train = [r.get("training") or {} for r in runs]
    return {
        "experiment": name,
        "method": first["method"],
        "method_args": first["method_args"],
        "description": first.get("description", ""),
        "seeds": [r["seed"] for r in runs],
        "learning_rate": first["learning_rate"],
        "rate_fixed": first["settings"]["training"].get("chosen_learning_rate") is not None,
        "grid": _grid_with_chosen_forgetting(first),
        "trainable_params": train[0].get("trainable_params"),
        "validation_accuracy": _mean([r["validation"]["macro_accuracy"] for r in runs]),
        "tasks": {t: _mean([r["test"]["tasks"][t]["accuracy"] for r in runs]) for t in tasks},
        "ci95": {t: first["test"]["tasks"][t]["ci95"] for t in tasks},
        "totals": {t: first["test"]["tasks"][t]["total"] for t in tasks},
        "macro_accuracy": _mean(macro),
        "macro_accuracy_sd": _sd(macro),
        "macro_ci95": _bootstrap_ci(first) if len(runs) == 1 else None,  # one run's rows; seeds: across-seeds table
        "forgetting": _mean([r["forgetting"]["delta"] for r in runs]),
        "forgetting_ci95": first["forgetting"].get("delta_ci95") if len(runs) == 1 else None,
        "cross_entropy": _mean([r["forgetting"]["cross_entropy"] for r in runs]),
        "train_loss": _mean([t.get("train_loss") for t in train]),
        "held_out_loss": _mean([r["validation"]["held_out_loss"] for r in runs]),
        "train_runtime_s": _mean([t.get("train_runtime_s") for t in train]),
        "tokens_per_s": _mean([t.get("tokens_per_s") for t in train]),
        "peak_rss_mib": _mean([t["peak_rss_bytes"] / 2**20 if t.get("peak_rss_bytes") else None for t in train]),
        "artifact_mb": _mean([t["artifact_bytes"] / 1e6 if t.get("artifact_bytes") else None for t in train]),
        "reward_curves": [t["reward_curve"] for t in train if t.get("reward_curve")],
    }


def _grid_with_chosen_forgetting(run: dict) -> list[dict] | None:
    """The run's grid records, where the chosen point's forgetting, if its record lacks it (grids run before forgetting
    was measured per grid point), is the one the run measured at that rate: the same trained model."""
    grid = run.get("grid")
    if grid is None:
        return None
    return [
        {**g, "forgetting": run["forgetting"]["delta"]}
        if g.get("forgetting") is None and g["learning_rate"] == run["learning_rate"]
        else g
        for g in grid
    ]


def _bootstrap_ci(run: dict) -> list[float]:
    interval = stats.bootstrap_macro(_correct(run))
    return [interval.low, interval.high]


def paired_tests(reference: Sequence[dict], other: Sequence[dict]) -> list[dict[str, Any]]:
    """McNemar (per task and pooled) and a paired bootstrap of the macro difference, per shared seed."""
    by_seed = {r["seed"]: r for r in reference}
    out = []
    for run in other:
        ref = by_seed.get(run["seed"])
        if ref is None:  # pragma: no cover - check_comparable guarantees equal seed sets
            continue
        a, b = _correct(run), _correct(ref)
        per_task = {t: vars(stats.mcnemar_exact(a[t], b[t])) for t in a}
        pooled = stats.mcnemar_exact([x for t in a for x in a[t]], [x for t in b for x in b[t]])
        boot = stats.paired_bootstrap(a, b)
        out.append(
            {
                "seed": run["seed"],
                "tasks": per_task,
                "pooled": vars(pooled),
                "macro_difference": boot.difference,
                "macro_difference_ci95": [boot.interval.low, boot.interval.high],
            }
        )
    return out


def across_seeds(reference: Sequence[dict], other: Sequence[dict]) -> dict[str, Any] | None:
    """Seed-mean macro difference ``other − reference`` over their shared seeds, with the two-way (seeds × rows)
    bootstrap interval of :func:`~benchmarks.method_comparison.stats.seed_row_bootstrap`; None under two seeds."""
    by_seed = {r["seed"]: r for r in reference}
    pairs = [(run, by_seed[run["seed"]]) for run in other if run["seed"] in by_seed]
    if len(pairs) < 2:
        return None
    boot = stats.seed_row_bootstrap([_correct(a) for a, _ in pairs], [_correct(b) for _, b in pairs])
    return {
        "seeds": [a["seed"] for a, _ in pairs],
        "macro": [a["test"]["macro_accuracy"] for a, _ in pairs],
        "reference_macro": [b["test"]["macro_accuracy"] for _, b in pairs],
        "mean_difference": boot.difference,
        "mean_difference_ci95": [boot.interval.low, boot.interval.high],
        **_forgetting_across_seeds(pairs),
    }


def _forgetting_across_seeds(pairs: Sequence[tuple[dict, dict]]) -> dict[str, Any]:
    """Forgetting per seed of both sides and the seed-mean difference ``other − reference`` (nats/token). Both are
    measured against the same base model, so the difference is that of their general-text cross-entropies; its
    interval resamples seeds and text windows (:func:`~benchmarks.method_comparison.stats.seed_row_bootstrap` with
    the windows as the rows of one task), and is None when a run kept no per-window values."""
    out: dict[str, Any] = {
        "forgetting": [a["forgetting"]["delta"] for a, _ in pairs],
        "reference_forgetting": [b["forgetting"]["delta"] for _, b in pairs],
    }
    differences = [a - b for a, b in zip(out["forgetting"], out["reference_forgetting"], strict=True)]
    out["forgetting_difference"] = sum(differences) / len(pairs)
    out["forgetting_difference_ci95"] = None
    if all("windows" in run["forgetting"] for pair in pairs for run in pair):
        boot = stats.seed_row_bootstrap(
            [{"windows": a["forgetting"]["windows"]} for a, _ in pairs],
            [{"windows": b["forgetting"]["windows"]} for _, b in pairs],
        )
        out["forgetting_difference_ci95"] = [boot.interval.low, boot.interval.high]
    return out


#: The forgetting budget of "accuracy at equal forgetting" (nats/token of general-text cross-entropy over the base
#: model), fixed before any test row was looked at: about what PEFT's own benchmark measures for LoRA.
FORGETTING_BUDGET = 0.05


def budget_point(grid: Sequence[dict[str, Any]] | None, budget: float = FORGETTING_BUDGET) -> dict[str, Any] | None:
    """The grid point (a result file's ``grid`` record) with the best validation accuracy among those forgetting at
    most ``budget``; a tie goes to the lower forgetting. None when no measured point is within the budget."""
    points = [g for g in grid or [] if g.get("forgetting") is not None and g["forgetting"] <= budget]
    return max(points, key=lambda g: (g["validation_accuracy"], -g["forgetting"])) if points else None


def within_budget(
    row: dict[str, Any], budget: float = FORGETTING_BUDGET, budget_row: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The experiment's :func:`budget_point` and its test accuracy: the experiment's own when that point is the one
    chosen on validation accuracy, else ``budget_row``'s (the result of testing that point, ``budget-seed<S>.json``).

    When only the chosen point's forgetting is known (an older grid), that point, if it is within the budget, is the
    answer: it has the grid's best validation accuracy.

    ``status``: ``tested``, ``untested`` (run the suite again: ``run`` tests the point), ``none within budget`` (add
    grid points below the grid's lowest forgetting), or ``not measured`` (some grid points were run before forgetting
    was measured per grid point, and none of the measured ones is within the budget: run the grid again).
    """
    best = budget_point(row["grid"], budget)
    if best is None:
        measured = all(g.get("forgetting") is not None for g in row["grid"] or [])
        status = "none within budget" if measured else "not measured"
        return {"experiment": row["experiment"], "budget": budget, "status": status}
    tested = row if best["learning_rate"] == row["learning_rate"] else budget_row
    if tested is not None and tested["learning_rate"] != best["learning_rate"]:
        tested = None  # a budget result of an older grid
    return {
        "experiment": row["experiment"],
        "budget": budget,
        "learning_rate": best["learning_rate"],
        "validation_accuracy": best["validation_accuracy"],
        "forgetting": best["forgetting"],
        "status": "untested" if tested is None else "tested",
        "macro_accuracy": None if tested is None else tested["macro_accuracy"],
        "macro_ci95": None if tested is None else tested["macro_ci95"],
    }


def build_summary(base: dict, runs: Sequence[dict], reference: str | None = None) -> dict[str, Any]:
    """Everything the report shows, as JSON-serialisable data (after :func:`check_comparable`)."""
    budget_runs = [r for r in runs if r.get("_budget")]
    runs = [r for r in runs if not r.get("_budget")]
    check_comparable(base, runs)
    if budget_runs:
        check_comparable(base, [runs[0], *budget_runs], seeds=False)
    all_seeds = _by_experiment(runs)
    common = shared_seeds(runs)
    groups = {name: [r for r in group if r["seed"] in common] for name, group in all_seeds.items()}
    budget_groups = _by_experiment(budget_runs)
    reference = reference or next((n for n, g in groups.items() if g[0]["method"] == "fura"), next(iter(groups)))
    if reference not in groups:
        raise ReportError(f"reference experiment {reference!r} has no result; have: {', '.join(groups)}")
    rows = [experiment_row(name, group) for name, group in groups.items()]
    budget_rows = {name: experiment_row(name, group) for name, group in budget_groups.items()}
    base_row = {
        "experiment": BASE,
        "method": BASE,
        "tasks": {t: v["accuracy"] for t, v in base["test"]["tasks"].items()},
        "ci95": {t: v["ci95"] for t, v in base["test"]["tasks"].items()},
        "totals": {t: v["total"] for t, v in base["test"]["tasks"].items()},
        "macro_accuracy": base["test"]["macro_accuracy"],
        "macro_ci95": _bootstrap_ci(base),
        "validation_accuracy": base["validation"]["macro_accuracy"],
        "forgetting": 0.0,
        "cross_entropy": base["forgetting"]["cross_entropy"],
        "held_out_loss": base["validation"]["held_out_loss"],
    }
    tests = {name: paired_tests(groups[reference], group) for name, group in groups.items() if name != reference}
    tests[BASE] = paired_tests(groups[reference], [{**base, "seed": s["seed"]} for s in groups[reference]])
    seed_tests = {
        name: across_seeds(all_seeds[reference], group) for name, group in all_seeds.items() if name != reference
    }
    choices = [within_budget(row, budget_row=budget_rows.get(row["experiment"])) for row in rows]
    at_budget = {c["experiment"]: _budget_runs(c, groups, budget_groups) for c in choices}
    budget_tests = {
        name: paired_tests(at_budget[reference], found)
        for name, found in at_budget.items()
        if name != reference and found and at_budget[reference]
    }
    first = runs[0]
    return {
        "suite": first["suite"],
        "task": first["task"],
        "model": first["model"],
        "protocol": first["protocol"],
        "reference": reference,
        "base": base_row,
        "experiments": rows,
        "across_seeds": {name: test for name, test in seed_tests.items() if test is not None},
        "equal_forgetting": choices,
        "equal_forgetting_tests": budget_tests,
        "paired_tests": tests,
        "fingerprints": {k: first["fingerprints"][k] for k in (*SHARED, "train")},
        "training": _training_settings(first),
        "seeds": common,
        "rows_per_task": {t: v["total"] for t, v in first["test"]["tasks"].items()},
        "forgetting_tokens": first["forgetting"]["tokens"],
        "environment": first.get("environment"),
    }


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _forgetting_cell(row: dict[str, Any]) -> str:
    ci = row.get("forgetting_ci95")
    cell = _num(row.get("forgetting"), "+.4f")
    return f"{cell} [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else cell


def _fixed_note(summary: dict[str, Any]) -> str:
    fixed = [row["experiment"] for row in summary["experiments"] if row.get("rate_fixed")]
    return f" (fixed by the suite for {', '.join(fixed)}: see the grids)" if fixed else ""


def markdown(summary: dict[str, Any]) -> str:
    """The report's markdown: settings, the main table, the intervals, the paired tests."""
    tasks = list(summary["base"]["tasks"])
    t = summary["training"]
    lines = [
        f"# Method comparison: {summary['suite']} ({summary['model']})",
        "",
        f"Accuracy protocol: **{summary['protocol']}**; test rows per task: "
        + ", ".join(f"{k} {v}" for k, v in summary["rows_per_task"].items())
        + f"; seeds {summary['seeds']} (those every experiment ran; any further seeds are in the across-seeds table)"
        + f"; {_training_line(summary['task'], t)}; learning rate chosen per "
        f"method on validation rows held out of the training data{_fixed_note(summary)}; forgetting = rise of the "
        "mean cross-entropy "
        f"(nats/token) on {summary['forgetting_tokens']:,} tokens of general text over the base model.",
        "",
        "| experiment | trainable params | lr | val acc | "
        + " | ".join(tasks)
        + " | macro avg [95% CI] | forgetting ΔCE [95% CI] | train loss | held-out loss | train time (s) | tokens/s "
        "| peak RSS (MiB) | artifact (MB) |",
        "|---|---:|---:|---:|" + "---:|" * len(tasks) + "---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in [summary["base"], *summary["experiments"]]:
        ci = row.get("macro_ci95")
        macro = (
            f"**{_pct(row['macro_accuracy'])}** [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else _pct(row["macro_accuracy"])
        )
        cells = [
            row["experiment"],
            _num(row.get("trainable_params"), ","),
            _num(row.get("learning_rate"), "g"),
            _pct(row.get("validation_accuracy")),
            *[_pct(row["tasks"][k]) for k in tasks],
            macro,
            _forgetting_cell(row),
            _num(row.get("train_loss"), ".4f"),
            _num(row.get("held_out_loss"), ".4f"),
            _num(row.get("train_runtime_s"), ".0f"),
            _num(row.get("tokens_per_s"), ".0f"),
            _num(row.get("peak_rss_mib"), ",.0f"),
            _num(row.get("artifact_mb"), ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Wilson 95 % intervals of the test accuracies (first seed):",
        "",
        "| experiment | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for row in [summary["base"], *summary["experiments"]]:
        lines.append(
            f"| {row['experiment']} | "
            + " | ".join(f"{_pct(row['ci95'][k][0])}–{_pct(row['ci95'][k][1])}" for k in tasks)
            + " |"
        )
    lines += [
        "",
        f"Paired tests against **{summary['reference']}** on the same rows (exact McNemar: rows only "
        "one of the two got right, `b`/`c`, and the two-sided p-value; paired bootstrap 95 % interval of the "
        "macro-accuracy difference):",
        "",
        "| experiment | seed | " + " | ".join(f"{k} b/c p" for k in tasks) + " | pooled b/c p | Δ macro [95% CI] |",
        "|---|---:|" + "---:|" * (len(tasks) + 2),
    ]
    for name, results in summary["paired_tests"].items():
        for r in results:
            cells = [f"{v['a_only']}/{v['b_only']} {v['p_value']:.3g}" for v in (r["tasks"][k] for k in tasks)]
            p = r["pooled"]
            ci = r["macro_difference_ci95"]
            lines.append(
                f"| {name} | {r['seed']} | " + " | ".join(cells) + f" | {p['a_only']}/{p['b_only']} "
                f"{p['p_value']:.3g} | {100 * r['macro_difference']:+.1f} [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}] |"
            )
    lines += [
        "",
        "Learning-rate grids (validation accuracy, first seed; forgetting ΔCE of every grid point where measured):",
        "",
    ]
    for row in summary["experiments"]:
        grid = ", ".join(_grid_point(g) for g in row["grid"] or [])
        fixed = " (fixed by the suite, not chosen on this grid's validation)" if row.get("rate_fixed") else ""
        lines.append(f"* {row['experiment']}: {grid} → **{row['learning_rate']:g}**{fixed}")
    lines += _seed_lines(summary)
    equal = _equal_forgetting_lines(summary.get("equal_forgetting") or [])
    tests = summary.get("equal_forgetting_tests") or {}
    if tests:
        equal += [
            "",
            f"Paired tests at equal forgetting against **{summary['reference']}**'s within-budget point (pooled exact "
            "McNemar, paired bootstrap of the macro difference):",
            "",
            "| experiment | seed | pooled b/c p | Δ macro [95% CI] |",
            "|---|---:|---:|---:|",
        ]
        for name, results in tests.items():
            for r in results:
                p, ci = r["pooled"], r["macro_difference_ci95"]
                equal.append(
                    f"| {name} | {r['seed']} | {p['a_only']}/{p['b_only']} {p['p_value']:.3g} | "
                    f"{100 * r['macro_difference']:+.1f} [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}] |"
                )
    return "\n".join(lines + equal) + "\n"


def _training_line(task: str, t: dict[str, Any]) -> str:
    if task == "rl":
        return (
            f"GRPO {t['max_steps']} steps × {t['prompts_per_step']} problems × {t['num_generations']} sampled "
            f"completions of at most {t['max_completion_length']} tokens ({t['mixed_precision']} mixed precision)"
        )
    return (
        f"training {t['max_steps']} steps × batch {t['batch_size']} (max_seq_len {t['max_seq_len']}, "
        f"{t['mixed_precision']} mixed precision)"
    )


def _seed_lines(summary: dict[str, Any]) -> list[str]:
    tests = summary.get("across_seeds") or {}
    if not tests:
        return []
    reference = summary["reference"]
    lines = [
        "",
        f"Across seeds, against **{reference}** (test macro accuracy and forgetting per seed; each mean difference "
        "with a two-way bootstrap 95 % interval that resamples seeds and rows, or seeds and text windows for "
        "forgetting, so it carries training noise as well as row noise):",
        "",
        f"| experiment | seeds | macro per seed | {reference} per seed | mean Δ macro [95% CI] "
        f"| forgetting ΔCE per seed | {reference} per seed | mean Δ forgetting [95% CI] |",
        "|---|---|---|---|---:|---|---|---:|",
    ]
    for name, t in tests.items():
        ci, fci = t["mean_difference_ci95"], t["forgetting_difference_ci95"]
        forgetting = f"{t['forgetting_difference']:+.4f}" + (f" [{fci[0]:+.4f}, {fci[1]:+.4f}]" if fci else "")
        lines.append(
            f"| {name} | {', '.join(map(str, t['seeds']))} | {', '.join(_pct(v) for v in t['macro'])} | "
            f"{', '.join(_pct(v) for v in t['reference_macro'])} | "
            f"{100 * t['mean_difference']:+.1f} [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}] | "
            f"{', '.join(f'{v:+.4f}' for v in t['forgetting'])} | "
            f"{', '.join(f'{v:+.4f}' for v in t['reference_forgetting'])} | {forgetting} |"
        )
    return lines


def _equal_forgetting_lines(choices: Sequence[dict[str, Any]]) -> list[str]:
    if not choices:
        return []
    lines = [
        "",
        f"Accuracy at equal forgetting: each method's best validation accuracy among its grid points that forget at "
        f"most {choices[0]['budget']:g} nats/token (a budget fixed before looking at test rows), then that point "
        "tested (`run` tests it beside the point chosen on validation accuracy alone):",
        "",
        "| experiment | lr within budget | val acc | forgetting ΔCE | test macro [95% CI] |",
        "|---|---:|---:|---:|---|",
    ]
    for choice in choices:
        if choice["status"] in ("none within budget", "not measured"):
            why = "none: add lower rates to the grid" if choice["status"] == "none within budget" else "not measured"
            lines.append(f"| {choice['experiment']} | {why} | – | – | – |")
            continue
        ci = choice.get("macro_ci95")
        test = (
            _pct(choice["macro_accuracy"]) + (f" [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else " (mean over seeds)")
            if choice["status"] == "tested"
            else f"not tested yet: run the suite again (it tests lr {choice['learning_rate']:g})"
        )
        lines.append(
            f"| {choice['experiment']} | {choice['learning_rate']:g} | {_pct(choice['validation_accuracy'])} | "
            f"{choice['forgetting']:+.3f} | {test} |"
        )
    return lines


def _grid_point(point: dict[str, Any]) -> str:
    text = f"{point['learning_rate']:g}: {_pct(point['validation_accuracy'])}"
    return text if point.get("forgetting") is None else f"{text} ({point['forgetting']:+.3f})"


def plots(summary: dict[str, Any], folder: Path) -> list[Path]:
    """Accuracy vs forgetting, accuracy vs peak memory, validation accuracy over the learning-rate grid (and against
    each grid point's forgetting, where measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [summary["base"], *summary["experiments"]]
    written = []
    for name, key, xlabel in [
        (
            "accuracy_vs_forgetting.png",
            "forgetting",
            "forgetting: Δ cross-entropy on general text (nats/token, lower is better)",
        ),
        ("accuracy_vs_memory.png", "peak_rss_mib", "peak RSS of the training process (MiB)"),
    ]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for row in rows:
            if row.get(key) is None:
                continue
            y, ci = 100 * row["macro_accuracy"], row["macro_ci95"]  # no interval for a mean over seeds
            yerr = [[y - 100 * ci[0]], [100 * ci[1] - y]] if ci else None
            ax.errorbar(row[key], y, yerr=yerr, fmt="o", capsize=3)
            ax.annotate(row["experiment"], (row[key], y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy, macro average (%) ± 95% CI")
        ax.set_title(f"{summary['suite']}: {summary['model']} ({summary['protocol']})", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=120)
        plt.close(fig)
        written.append(folder / name)
    with_forgetting = any(g.get("forgetting") is not None for row in summary["experiments"] for g in row["grid"] or [])
    fig, axes = plt.subplots(1, 2 if with_forgetting else 1, figsize=(12 if with_forgetting else 7, 4.5), squeeze=False)
    for row in summary["experiments"]:
        grid = row["grid"] or []
        axes[0][0].plot(
            [g["learning_rate"] for g in grid],
            [100 * g["validation_accuracy"] for g in grid],
            "o-",
            label=row["experiment"],
        )
        if with_forgetting:
            points = [g for g in grid if g.get("forgetting") is not None]
            axes[0][1].plot(
                [g["forgetting"] for g in points],
                [100 * g["validation_accuracy"] for g in points],
                "o-",
                label=row["experiment"],
            )
            for g in points:
                axes[0][1].annotate(
                    f"{g['learning_rate']:g}", (g["forgetting"], 100 * g["validation_accuracy"]), fontsize=7,
                    textcoords="offset points", xytext=(3, 3),
                )  # fmt: skip
    axes[0][0].set_xscale("log")
    axes[0][0].set_xlabel("learning rate")
    axes[0][0].set_ylabel("validation accuracy, macro (%)")
    if with_forgetting:
        budget = FORGETTING_BUDGET
        axes[0][1].axvline(budget, color="black", ls="--", lw=0.8, label=f"forgetting budget {budget:g}")
        for choice in summary.get("equal_forgetting") or []:
            if choice["status"] in ("tested", "untested"):
                axes[0][1].plot(choice["forgetting"], 100 * choice["validation_accuracy"], "*", color="black", ms=9)
        axes[0][1].set_xlabel("forgetting: Δ cross-entropy on general text (nats/token)")
        axes[0][1].set_title("every grid point (★ best within the forgetting budget)", fontsize=9)
    for ax in axes[0]:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "lr_grid.png", dpi=120)
    plt.close(fig)
    written.append(folder / "lr_grid.png")
    if any(row.get("reward_curves") for row in summary["experiments"]):
        written.append(reward_plot(summary, folder / "reward_curves.png"))
    return written


def reward_plot(summary: dict[str, Any], path: Path) -> Path:
    """GRPO runs: the mean accuracy reward per step (left: each experiment's chosen rate, one line per seed; right:
    every grid point of the first seed) — the training-time accuracy on the problems being trained on."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, row in enumerate(summary["experiments"]):
        colour = colours[i % len(colours)]
        for seed, curve in zip(row["seeds"], row.get("reward_curves") or [], strict=False):
            steps, rewards = zip(*curve, strict=True)
            label = f"{row['experiment']} lr {row['learning_rate']:g} seed {seed}"
            axes[0].plot(
                steps, _running_mean(rewards), color=colour, alpha=0.9 if seed == row["seeds"][0] else 0.5, label=label
            )
        for g in row["grid"] or []:
            if g.get("reward_curve"):
                steps, rewards = zip(*g["reward_curve"], strict=True)
                style = "-" if g["learning_rate"] == row["learning_rate"] else ":"
                label = f"{row['experiment']} lr {g['learning_rate']:g}"
                axes[1].plot(steps, _running_mean(rewards), color=colour, ls=style, label=label)
    axes[0].set_title("chosen learning rate (running mean over 5 steps)", fontsize=9)
    axes[1].set_title("every grid point, first seed (solid: the chosen rate)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("GRPO step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean accuracy reward of the step's completions")
    fig.suptitle(f"{summary['suite']}: {summary['model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _running_mean(values: Sequence[float], width: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        window = values[max(0, i - width + 1) : i + 1]
        out.append(sum(window) / len(window))
    return out


def write_report(
    results_dir: Path,
    suite: str,
    out: Path | None = None,
    reference: str | None = None,
    experiments: Sequence[str] | None = None,
) -> Path:
    """Check, summarise and write ``report.md``, ``summary.json`` and the plots to ``out`` (atomically)."""
    base, runs = load_runs(results_dir, suite, experiments)
    summary = build_summary(base, runs, reference)
    out = out or results_dir / suite / "report"
    with atomic_directory(out, force=True) as staging:
        (staging / "report.md").write_text(markdown(summary), encoding="utf-8")
        (staging / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
        plots(summary, staging)
    return out
