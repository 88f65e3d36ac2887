"""The harness end to end on a tiny random Llama: run (a real ``fura train sft`` child), resume, report; math eval."""

from __future__ import annotations

import json

import pytest
from benchmarks.method_comparison.__main__ import main
from benchmarks.method_comparison.experiment import base_experiment
from benchmarks.method_comparison.runner import Paths, Runner

from benchmarks.method_comparison import runner as runner_module

from .conftest import suite_settings, write_suite


def _no_question_text(folder, data_root):
    """No question of the shared data may land in the result files (they are committed)."""
    questions = [row["instruction"] for path in data_root.rglob("*.json") for row in json.loads(path.read_text())]
    for path in folder.rglob("*.json"):
        text = path.read_text()
        assert not any(q in text for q in questions), path


def test_run_resume_and_report(tmp_path, tiny_model, data_root, text_file, monkeypatch, caplog):
    experiments = {
        "fura": {"method": "fura", "training": {"learning_rates": [0.01]}},
        "oft": {"method": "oft", "method_args": {"r": 0, "oft_block_size": 8}},
    }
    write_suite(tmp_path / "experiments", "cs", suite_settings(tiny_model, text_file), experiments)
    results, work = tmp_path / "results", tmp_path / "work"
    common = ["--experiments-dir", str(tmp_path / "experiments"), "--results", str(results)]
    run = [*common, "run", "cs", "--work", str(work), "--data-root", str(data_root)]
    scored = []  # the general text is scored once per model: the test reuses the validation's per-window values
    score = runner_module.evaluation.window_cross_entropy
    monkeypatch.setattr(runner_module.evaluation, "window_cross_entropy", lambda *a: scored.append(1) or score(*a))
    assert main(run) == 0
    assert len(scored) == 3  # the base model, fura, oft

    result = json.loads((results / "cs" / "fura" / "seed0.json").read_text())
    assert result["learning_rate"] == 0.01 and result["protocol"] == "loglik"
    assert result["grid"][0]["validation_accuracy"] == result["validation"]["macro_accuracy"]
    assert set(result["rows"]) == {"boolq", "piqa", "ARC-Easy"} and all(len(r) == 6 for r in result["rows"].values())
    for rows in result["rows"].values():
        for row in rows:  # the prediction is the best-scored candidate, correct iff it is the label
            assert row["predicted"] == row["candidates"][max(range(len(row["scores"])), key=row["scores"].__getitem__)]
            assert row["correct"] == (row["predicted"] == row["label"])
    train = result["training"]
    assert train["trainable_params"] > 0 and train["peak_rss_bytes"] > 50 * 2**20 and train["artifact_bytes"] > 0
    assert train["tokens"] > 8 and train["tokens_per_s"] == pytest.approx(train["tokens"] / train["train_runtime_s"])
    assert "--val-set-size" in train["command"] and len(train["loss_curve"]) == 2
    base = json.loads((results / "cs" / "base" / "result.json").read_text())
    assert result["forgetting"]["delta"] == pytest.approx(
        result["forgetting"]["cross_entropy"] - base["forgetting"]["cross_entropy"]
    )
    assert base["fingerprints"]["test"] == result["fingerprints"]["test"]
    forgetting = result["forgetting"]  # per-window values, paired with the base model's: an interval of the rise
    assert len(forgetting["windows"]) == len(base["forgetting"]["windows"]) == 2
    assert sum(forgetting["windows"]) / 2 == pytest.approx(forgetting["cross_entropy"], abs=1e-5)
    assert forgetting["delta_ci95"][0] <= forgetting["delta"] <= forgetting["delta_ci95"][1]
    (point,) = result["grid"]  # every grid point's forgetting is measured; the chosen one's is the test's
    assert point["forgetting"] == pytest.approx(forgetting["delta"], abs=1e-5)
    assert json.loads((results / "cs" / "oft" / "seed0.json").read_text())["training"]["trainable_params"] > 0
    _no_question_text(results, data_root)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runner_module, "run_child", no_training)
    stamp = (results / "cs" / "fura" / "seed0.json").stat().st_mtime_ns
    base_file = results / "cs" / "base" / "result.json"
    del base["forgetting"]["windows"]  # a base result of an older harness: the windows are scored again, nothing else
    base_file.write_text(json.dumps(base))
    assert main(run) == 0  # resumable: everything is done, nothing is trained or rewritten
    assert (results / "cs" / "fura" / "seed0.json").stat().st_mtime_ns == stamp
    upgraded = json.loads(base_file.read_text())
    assert upgraded["forgetting"]["windows"] and upgraded["test"] == base["test"]

    validated = next(work.glob("cs/fura/lr*/harness_validation.json"))
    before = json.loads(validated.read_text())
    settings = suite_settings(tiny_model, text_file)
    settings["evaluation"]["batch_size"] = 3
    write_suite(tmp_path / "experiments", "cs", settings, experiments)
    assert main(run) == 0  # new evaluation settings: validated and tested again, not trained again
    after = json.loads(validated.read_text())
    assert after["evaluation_fingerprint"] != before["evaluation_fingerprint"]
    assert after["macro_accuracy"] == pytest.approx(before["macro_accuracy"])

    assert main([*common, "report", "cs"]) == 0
    report = (results / "cs" / "report" / "report.md").read_text()
    assert "| fura | " in report and "| base | " in report and "Accuracy protocol: **loglik**" in report
    assert (results / "cs" / "report" / "accuracy_vs_forgetting.png").stat().st_size > 1000


def test_cloze_suite_grid_in_one_process_test_in_another(tmp_path, tiny_model, data_root, text_file, monkeypatch):
    settings = suite_settings(tiny_model, text_file)
    settings["data"]["answer_format"] = "cloze"
    experiments = {"lora": {"method": "lora", "method_args": {"r": 2}, "training": {"learning_rates": [0.01, 0.02]}}}
    write_suite(tmp_path / "experiments", "cloze", settings, experiments)
    results, work = tmp_path / "results", tmp_path / "work"
    common = ["--experiments-dir", str(tmp_path / "experiments"), "--results", str(results)]
    run = [*common, "run", "cloze", "--work", str(work), "--data-root", str(data_root)]
    assert main([*run, "--grid-only"]) == 0
    assert len(list(work.glob("cloze/lora/lr*/harness_validation.json"))) == 2 and not results.exists()
    train = json.loads(next(work.glob("cloze/data/train-*.json")).read_text())
    assert all("Answer format" not in r["instruction"] and "Answer1" not in r["instruction"] for r in train)
    assert {r["output"] for r in train} <= {f"the correct answer is {x}" for x in ("a", "b", "c", "d", "true", "false")}

    def no_training(*args, **kwargs):
        raise AssertionError("a validated grid point was trained again")

    monkeypatch.setattr(runner_module, "run_child", no_training)
    assert main(run) == 0
    result = json.loads((results / "cloze" / "lora" / "seed0.json").read_text())
    assert "cloze" in result["protocol"] and len(result["grid"]) == 2
    labels = ("answer1", "answer2", "answer3", "answer4")  # the options' labels: result files hold no data text
    assert {tuple(r["candidates"]) for r in result["rows"]["ARC-Easy"]} == {labels}
    assert result["rows"]["boolq"][0]["candidates"] == ["true", "false"]
    _no_question_text(results, data_root)

    monkeypatch.undo()  # the grid grows by one rate, the suite fixes the chosen one: the result records the whole grid
    chosen = result["learning_rate"]
    experiments["lora"]["training"].update(learning_rates=[0.01, 0.02, 0.03], chosen_learning_rate=chosen)
    write_suite(tmp_path / "experiments", "cloze", settings, experiments)
    assert main(run) == 0
    again = json.loads((results / "cloze" / "lora" / "seed0.json").read_text())
    assert [g["learning_rate"] for g in again["grid"]] == [0.01, 0.02, 0.03] and again["rows"] == result["rows"]
    assert again["settings"]["training"]["chosen_learning_rate"] == chosen  # the report says the rate was fixed

    # a fixed rate overrides this grid's validation choice, without training anything again
    monkeypatch.setattr(runner_module, "run_child", no_training)
    other = 0.02 if chosen == 0.01 else 0.01
    experiments["lora"]["training"]["chosen_learning_rate"] = other
    write_suite(tmp_path / "experiments", "cloze", settings, experiments)
    assert main(run) == 0
    assert json.loads((results / "cloze" / "lora" / "seed0.json").read_text())["learning_rate"] == other
    assert main([*common, "report", "cloze"]) == 0
    assert f"→ **{other:g}** (fixed by the suite" in (results / "cloze" / "report" / "report.md").read_text()


def test_math_suite_base_model_generation_and_grading(tmp_path, tiny_model, data_root, text_file):
    suite = write_suite(tmp_path / "experiments", "math", suite_settings(tiny_model, text_file, "math"), {})
    paths = Paths(work=tmp_path / "work", results=tmp_path / "results", data_root=data_root)
    target = Runner(paths).run_base(base_experiment(suite))
    result = json.loads(target.read_text())
    assert result["protocol"] == "greedy generation, numeric grading"
    rows = result["rows"]["gsm8k"]
    assert len(rows) == 6 and {"index", "predicted", "label", "correct", "completion_tokens"} <= set(rows[0])
    assert all(isinstance(r["completion_tokens"], int) and isinstance(r["correct"], bool) for r in rows)
    assert result["validation"]["tasks"]["math_data"]["total"] == 4
    assert result["forgetting"]["cross_entropy"] > 0 and result["forgetting"]["delta"] is None


def test_rl_suite_grpo_children_choice_test_and_report(tmp_path, tiny_model, data_root, text_file, monkeypatch):
    experiments = {
        "fura": {"method": "fura", "training": {"learning_rates": [0.01, 0.02]}},
        "lora": {"method": "lora", "method_args": {"r": 2}, "training": {"learning_rates": [0.01]}},
    }
    write_suite(tmp_path / "experiments", "rl", suite_settings(tiny_model, text_file, "rl"), experiments)
    results, work = tmp_path / "results", tmp_path / "work"
    common = ["--experiments-dir", str(tmp_path / "experiments"), "--results", str(results)]
    run = [*common, "run", "rl", "--work", str(work), "--data-root", str(data_root)]
    # FuRA's rate 0.02 wins on validation, 0.01 is its best within the forgetting budget: both are tested
    monkeypatch.setattr(runner_module, "choose_learning_rate", lambda grid: grid[-1])
    monkeypatch.setattr(runner_module, "budget_point", lambda record: record[0])
    assert main(run) == 0

    result = json.loads((results / "rl" / "fura" / "seed0.json").read_text())
    assert result["protocol"] == "greedy generation, GRPO prompt, math-verify on the final answer"
    assert len(result["grid"]) == 2
    command = result["training"]["command"]
    assert "grpo" in command and command[command.index("--answer-source") + 1] == "completion"
    assert [step for step, _ in result["training"]["reward_curve"]] == [1, 2]  # one reward per GRPO step
    assert result["training"]["tokens"] > 0 and result["validation"]["held_out_loss"] is None
    assert len(result["rows"]["products"]) == 6 and result["validation"]["tasks"]["products"]["total"] == 4
    train = [json.loads(line) for line in next(work.glob("rl/data/rl-train-*.jsonl")).read_text().splitlines()]
    val = [json.loads(line) for line in next(work.glob("rl/data/rl-val-*.jsonl")).read_text().splitlines()]
    assert len(train) == 4 and len(val) == 4  # max_steps × prompts_per_step problems, one epoch
    tested = {r["index"] for r in result["rows"]["products"]}
    assert len(tested) == 6 and not {p["problem"] for p in train} & {p["problem"] for p in val}
    base = json.loads((results / "rl" / "base" / "result.json").read_text())
    assert base["fingerprints"]["test"] == result["fingerprints"]["test"]
    assert result["forgetting"]["delta"] is not None

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    budget = json.loads((results / "rl" / "fura" / "budget-seed0.json").read_text())
    assert (result["learning_rate"], budget["learning_rate"]) == (0.02, 0.01)
    assert budget["fingerprints"]["run"] != result["fingerprints"]["run"]  # another trained model, the same rows
    assert budget["fingerprints"]["test"] == result["fingerprints"]["test"] and budget["grid"] == result["grid"]
    assert not (results / "rl" / "lora" / "budget-seed0.json").exists()  # its one point is the chosen one

    monkeypatch.setattr(runner_module, "run_child", no_training)
    assert main(run) == 0  # resumable
    assert main([*common, "report", "rl"]) == 0
    report = (results / "rl" / "report" / "report.md").read_text()
    assert "| fura | " in report and "| lora | " in report
    summary = json.loads((results / "rl" / "report" / "summary.json").read_text())
    fura = next(c for c in summary["equal_forgetting"] if c["experiment"] == "fura")
    assert (fura["learning_rate"], fura["status"]) == (0.01, "tested")
    assert fura["macro_accuracy"] == budget["test"]["macro_accuracy"]
    assert [t["seed"] for t in summary["equal_forgetting_tests"]["lora"]] == [0]

    settings = suite_settings(tiny_model, text_file, "rl")  # the grader changes: the base model is scored again
    settings["training"]["answer_source"] = "boxed"
    suite = write_suite(tmp_path / "experiments", "rl", settings, experiments)
    Runner(Paths(work=work, results=results, data_root=data_root)).run_base(base_experiment(suite))
    rescored = json.loads((results / "rl" / "base" / "result.json").read_text())
    assert rescored["protocol"].endswith("on the last boxed answer")
    assert rescored["fingerprints"]["evaluation"] != base["fingerprints"]["evaluation"]
    assert (results / "rl" / "report" / "reward_curves.png").stat().st_size > 1000


def test_a_bad_target_is_a_clear_error(tmp_path, capsys):
    assert main(["--experiments-dir", str(tmp_path), "run", "nope"]) == 2
    assert "no experiment or suite 'nope'" in capsys.readouterr().err
