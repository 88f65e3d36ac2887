"""The report: refuses runs that differ in data, seed or evaluation rows; otherwise a table, tests and plots."""

from __future__ import annotations

import copy
import json

import pytest
from benchmarks.method_comparison.report import ReportError, build_summary, check_comparable, markdown, write_report
from benchmarks.method_comparison.runner import choose_learning_rate, summarise

TRAINING = {
    "max_steps": 10,
    "batch_size": 8,
    "max_seq_len": 256,
    "learning_rates": [1e-3],
    "seeds": [0],
    "warmup_ratio": 0.03,
    "mixed_precision": "no",
    "logging_steps": 10,
    "prompt_style": "fura",
}
FINGERPRINTS = {
    "train": "t",
    "val": "v",
    "test": "x",
    "model": "m",
    "task": "commonsense",
    "corpus": "c",
    "evaluation": "e",
    "prompt_style": "fura",
}


def make_run(experiment: str, seed: int | None, correct: dict[str, list[bool]], **extra) -> dict:
    rows = {
        task: [
            {"index": 10 + i, "predicted": "x", "label": "x", "correct": c, "scores": [0.0]}
            for i, c in enumerate(values)
        ]
        for task, values in correct.items()
    }
    run = {
        "suite": "cs",
        "experiment": experiment,
        "method": "fura" if experiment.startswith("fura") else experiment,
        "method_args": {},
        "model": "m",
        "task": "commonsense",
        "protocol": "loglik",
        "seed": seed,
        "learning_rate": 1e-3,
        "settings": {"training": dict(TRAINING)},
        "fingerprints": dict(FINGERPRINTS),
        "rows": rows,
        "test": summarise(rows),
        "validation": {"macro_accuracy": 0.5, "held_out_loss": 1.0},
        "forgetting": {"cross_entropy": 3.1, "delta": 0.1, "tokens": 64},
        "_path": f"{experiment}/seed{seed}.json",
        "grid": [{"learning_rate": 1e-3, "validation_accuracy": 0.5, "held_out_loss": 1.0, "train_loss": 1.0}],
        "training": {
            "trainable_params": 100,
            "train_loss": 1.0,
            "train_runtime_s": 5.0,
            "tokens_per_s": 50.0,
            "peak_rss_bytes": 2**30,
            "artifact_bytes": 10**6,
        },
    }
    run.update(extra)
    return run


ROWS_A = {"boolq": [True, True, False, True] * 5, "piqa": [True, False] * 10}
ROWS_B = {"boolq": [False, True, False, False] * 5, "piqa": [True, True] * 10}


def _runs():
    base = make_run("base", None, ROWS_B)
    return base, [make_run("fura", 0, ROWS_A), make_run("lora", 0, ROWS_B)]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["fingerprints"].update(test="other"), "test differ"),
        (lambda r: r["fingerprints"].update(train="other"), "training data differ"),
        (lambda r: r["fingerprints"].update(corpus="other"), "corpus differ"),
        (lambda r: r["rows"]["piqa"][0].update(index=999), "evaluation rows differ"),
        (lambda r: r["settings"]["training"].update(max_steps=11), "training settings differ"),
        (lambda r: r.update(seed=1), "share no seed"),
    ],
)
def test_mismatched_runs_are_refused(change, message):
    base, runs = _runs()
    check_comparable(base, runs)  # the unchanged runs are comparable
    change(runs[1])
    with pytest.raises(ReportError, match=message) as err:
        check_comparable(base, runs)
    assert "lora" in str(err.value) or "seeds" in message


def test_a_base_model_evaluated_on_other_rows_is_refused():
    base, runs = _runs()
    base["fingerprints"]["val"] = "other"
    with pytest.raises(ReportError, match=r"cannot compare .*base.* val differ"):
        check_comparable(base, runs)


def test_summary_table_and_paired_tests():
    base, runs = _runs()
    summary = build_summary(base, runs)
    assert summary["reference"] == "fura"
    lora = summary["paired_tests"]["lora"][0]
    # boolq: fura right / lora wrong on rows 0 and 3 of each block of 4 (10 rows), never the reverse
    assert lora["tasks"]["boolq"] == {"a_only": 0, "b_only": 10, "p_value": pytest.approx(2 / 1024)}
    assert lora["tasks"]["piqa"]["a_only"] == 10 and lora["tasks"]["piqa"]["b_only"] == 0
    fura_macro = (15 / 20 + 10 / 20) / 2
    lora_macro = (5 / 20 + 20 / 20) / 2
    assert lora["macro_difference"] == pytest.approx(lora_macro - fura_macro)
    text = markdown(summary)
    assert "| fura | 100 | 0.001 | 50.0 | 75.0 | 50.0 | **62.5**" in text
    assert "| +0.1000 | 1.0000 |" in text  # forgetting without an interval (no per-window values)
    runs[0]["forgetting"]["delta_ci95"] = [0.05, 0.15]
    runs[0]["grid"][0]["forgetting"] = 0.25
    text = markdown(build_summary(base, runs))
    assert "| +0.1000 [+0.050, +0.150] | 1.0000 |" in text and "* fura: 0.001: 50.0 (+0.250) → **0.001**" in text
    assert "| lora | 0 | 0/10 0.00195 | 10/0 0.00195 | 10/10 1 |" in text


def test_learning_rate_choice_prefers_accuracy_then_loss_then_the_smaller_rate():
    def point(lr, acc, loss):
        return {"learning_rate": lr, "validation": {"macro_accuracy": acc, "held_out_loss": loss}}

    assert choose_learning_rate([point(1e-4, 0.5, 1.0), point(1e-3, 0.6, 2.0)])["learning_rate"] == 1e-3
    assert choose_learning_rate([point(1e-4, 0.6, 1.5), point(1e-3, 0.6, 1.0)])["learning_rate"] == 1e-3
    assert choose_learning_rate([point(1e-3, 0.6, 1.0), point(1e-4, 0.6, 1.0)])["learning_rate"] == 1e-4


def test_write_report_files_and_refusal_from_disk(tmp_path):
    base, runs = _runs()
    for run in [base, *runs]:
        folder = tmp_path / "cs" / run["experiment"]
        folder.mkdir(parents=True)
        name = "result.json" if run["seed"] is None else f"seed{run['seed']}.json"
        (folder / name).write_text(json.dumps({k: v for k, v in run.items() if k != "_path"}))
    out = write_report(tmp_path, "cs")
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy_vs_forgetting.png",
        "accuracy_vs_memory.png",
        "lr_grid.png",
        "report.md",
        "summary.json",
    ]
    assert json.loads((out / "summary.json").read_text())["paired_tests"]["lora"][0]["pooled"]["a_only"] == 10
    changed = copy.deepcopy(runs[1])
    changed["fingerprints"]["test"] = "other"
    (tmp_path / "cs" / "lora" / "seed0.json").write_text(json.dumps(changed))
    with pytest.raises(ReportError, match="test differ"):
        write_report(tmp_path, "cs")
    with pytest.raises(ReportError, match="no result for experiment"):
        write_report(tmp_path, "cs", experiments=["dora"])


def test_accuracy_at_equal_forgetting_picks_the_best_point_within_the_budget():
    from benchmarks.method_comparison.report import within_budget

    grid = [
        {"learning_rate": 1e-4, "validation_accuracy": 0.40, "forgetting": -0.01},
        {"learning_rate": 3e-4, "validation_accuracy": 0.44, "forgetting": 0.03},
        {"learning_rate": 1e-3, "validation_accuracy": 0.44, "forgetting": 0.02},  # same accuracy, forgets less
        {"learning_rate": 3e-3, "validation_accuracy": 0.46, "forgetting": 0.30},  # the best, but over the budget
    ]
    row = {"experiment": "fura", "grid": grid, "learning_rate": 3e-3, "macro_accuracy": 0.5, "macro_ci95": [0.4, 0.6]}
    choice = within_budget(row, budget=0.05)
    assert (choice["learning_rate"], choice["status"], choice["macro_accuracy"]) == (1e-3, "untested", None)
    assert within_budget({**row, "learning_rate": 1e-3}, 0.05)["macro_accuracy"] == 0.5  # tested: its test accuracy
    assert within_budget(row, budget=-0.05)["status"] == "none within budget"
    unmeasured = [{k: v for k, v in g.items() if k != "forgetting"} for g in grid]
    assert within_budget({**row, "grid": unmeasured})["status"] == "not measured"
    text = markdown({**build_summary(*_runs_with_grid(grid)), "equal_forgetting": [choice]})
    assert "| fura | 0.001 | 44.0 | +0.020 | not tested yet: run the suite again (it tests lr 0.001) |" in text
    budget_row = {"learning_rate": 1e-3, "macro_accuracy": 0.47, "macro_ci95": [0.42, 0.52]}  # that point, tested
    tested = within_budget(row, budget=0.05, budget_row=budget_row)
    assert (tested["status"], tested["macro_accuracy"], tested["macro_ci95"]) == ("tested", 0.47, [0.42, 0.52])
    stale = within_budget(row, budget=0.05, budget_row={**budget_row, "learning_rate": 3e-4})  # an older grid's
    assert stale["status"] == "untested"


def test_an_older_grid_uses_the_forgetting_measured_at_the_chosen_rate():
    unmeasured = [
        {"learning_rate": 3e-4, "validation_accuracy": 0.40},
        {"learning_rate": 1e-3, "validation_accuracy": 0.50},  # chosen: the run measured its forgetting
    ]
    base, runs = _runs_with_grid(unmeasured)
    within = build_summary(base, runs)["equal_forgetting"][0]  # make_run's forgetting: +0.1
    assert within["status"] == "not measured"  # over a 0.05 budget, and 3e-4 might be within it
    runs[0]["forgetting"]["delta"] = 0.02
    within = build_summary(base, runs)["equal_forgetting"][0]
    assert (within["status"], within["learning_rate"], within["forgetting"]) == ("tested", 1e-3, 0.02)
    assert within["macro_accuracy"] == runs[0]["test"]["macro_accuracy"]


def _runs_with_grid(grid):
    base = make_run("base", None, {"boolq": [True, False]})
    run = make_run("fura", 0, {"boolq": [True, True]}, grid=grid)
    return base, [run]


def test_several_seeds_give_a_mean_difference_with_a_seeds_and_rows_interval():
    base = make_run("base", None, ROWS_B)
    fura = [make_run("fura", s, ROWS_A) for s in (0, 1, 2)]
    lora = [make_run("lora", s, rows) for s, rows in zip((0, 1, 2), (ROWS_B, ROWS_A, ROWS_B), strict=True)]
    summary = build_summary(base, [*fura, *lora])
    seeds = summary["across_seeds"]["lora"]
    per_seed = [r["test"]["macro_accuracy"] - f["test"]["macro_accuracy"] for r, f in zip(lora, fura, strict=True)]
    assert seeds["seeds"] == [0, 1, 2] and seeds["mean_difference"] == pytest.approx(sum(per_seed) / 3)
    low, high = seeds["mean_difference_ci95"]
    assert low <= seeds["mean_difference"] <= high and low < min(per_seed)  # seed 1 agrees with FuRA: wide
    assert "| lora | 0, 1, 2 | " in markdown(summary)
    assert (
        "across_seeds" in build_summary(base, fura[:1] + lora[:1])
        and not build_summary(base, fura[:1] + lora[:1])["across_seeds"]
    )  # one seed: no across-seeds line
    full = make_run("full", 0, ROWS_B)  # an experiment run on the first seed only
    mixed = build_summary(base, [*fura, *lora, full])
    assert mixed["seeds"] == [0] and mixed["across_seeds"]["lora"]["seeds"] == [0, 1, 2]
    rows = {r["experiment"]: r for r in mixed["experiments"]}
    assert rows["lora"]["seeds"] == [0] and rows["lora"]["macro_accuracy"] == lora[0]["test"]["macro_accuracy"]
    three = {r["experiment"]: r for r in summary["experiments"]}["lora"]  # a mean over three seeds
    assert three["macro_ci95"] is None and three["forgetting_ci95"] is None and rows["lora"]["macro_ci95"]
    assert [t["seed"] for t in mixed["paired_tests"]["lora"]] == [0]


def _forgetting(windows: list[float], base_ce: float = 3.0) -> dict:
    mean = sum(windows) / len(windows)
    return {"cross_entropy": mean, "delta": mean - base_ce, "tokens": 64 * len(windows), "windows": windows}


def test_forgetting_across_seeds_has_a_seeds_and_windows_interval():
    base = make_run("base", None, ROWS_B, forgetting=_forgetting([3.0, 3.0, 3.0, 3.0]))
    fura = [make_run("fura", s, ROWS_A, forgetting=_forgetting([3.1, 3.3, 3.2, 3.2])) for s in (0, 1, 2)]
    shifts = (0.0, 0.2, 0.4)  # LoRA forgets more on every window, by a different amount per seed
    lora = [
        make_run("lora", s, ROWS_B, forgetting=_forgetting([3.1 + d, 3.3 + d, 3.2 + d, 3.2 + d]))
        for s, d in zip((0, 1, 2), shifts, strict=True)
    ]
    seeds = build_summary(base, [*fura, *lora])["across_seeds"]["lora"]
    assert seeds["forgetting"] == pytest.approx([0.2, 0.4, 0.6]) and seeds["reference_forgetting"] == pytest.approx(
        [0.2] * 3
    )
    assert seeds["forgetting_difference"] == pytest.approx(0.2)
    low, high = seeds["forgetting_difference_ci95"]
    assert low == pytest.approx(0.0) and high == pytest.approx(0.4)  # the windows agree: only the seeds spread it
    assert "| +0.2000 [+0.0000, +0.4000] |" in markdown(build_summary(base, [*fura, *lora]))
    del lora[1]["forgetting"]["windows"]  # a run that kept no per-window values: the mean, no interval
    kept = build_summary(base, [*fura, *lora])["across_seeds"]["lora"]
    assert kept["forgetting_difference"] == pytest.approx(0.2) and kept["forgetting_difference_ci95"] is None
