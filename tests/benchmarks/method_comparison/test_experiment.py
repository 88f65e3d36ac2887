"""Experiment files: suite defaults merged under each experiment, strict keys, clear errors, the shipped suites load."""

from __future__ import annotations

import json

import pytest
from benchmarks.method_comparison.experiment import (
    EXPERIMENTS_DIR,
    ExperimentError,
    base_experiment,
    load_experiment,
    method_available,
    resolve_targets,
    suite_dirs,
)
from benchmarks.method_comparison.runner import RESULTS_DIR

from fura.recipes.registry import METHODS

from .conftest import write_suite

SUITE = {
    "task": "commonsense",
    "data": {"train_files": ["a.json"], "test_files": ["b.json"], "val_rows_per_file": 7},
    "training": {"max_steps": 10, "learning_rates": [1e-4]},
}


def test_experiment_merges_over_its_suite(tmp_path):
    suite = write_suite(
        tmp_path,
        "cs",
        SUITE,
        {"lora": {"method": "lora", "method_args": {"r": 18}, "training": {"learning_rates": [1e-3, 3e-3]}}},
    )
    experiment = load_experiment(suite / "lora")
    assert (experiment.name, experiment.suite, experiment.key) == ("lora", "cs", "cs/lora")
    assert experiment.training.learning_rates == [1e-3, 3e-3] and experiment.training.max_steps == 10
    assert experiment.data.val_rows_per_file == 7 and experiment.method_args == {"r": 18}
    base = base_experiment(suite)
    assert base.method == "base" and base.name == "base" and base.training.max_steps == 10


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"method": "lora", "training": {"lr": 1}}, r"unknown setting\(s\) lr\. Valid: .*learning_rates"),
        ({"method": "lora", "learning_rate": 1}, r"unknown setting\(s\) learning_rate"),
        ({"method": "lora", "name": "x"}, "comes from the folder names"),
        ({"method": "lora", "training": {"learning_rates": []}}, "learning_rates is empty"),
        ({"method": "lora", "training": {"learning_rates": [-1]}}, "positive number"),
        ({"method": "lora", "training": {"chosen_learning_rate": 1e-3}}, r"chosen_learning_rate 0\.001 is not in"),
        ({"method": "lora", "training": {"max_steps": 0}}, "max_steps must be a positive integer"),
        ({"method": "lora", "task": "vision"}, "task must be one of"),
        ({"method": "lora", "data": "all"}, "data must be a mapping"),
        ({"method": "lora", "data": {"answer_format": "text"}}, "answer_format must be label or cloze"),
        ({"method": "lora", "task": "math", "data": {"answer_format": "cloze"}}, "cloze is for commonsense suites"),
    ],
)
def test_bad_settings_name_the_file_and_the_fix(tmp_path, values, message):
    suite = write_suite(tmp_path, "cs", SUITE, {"bad": values})
    with pytest.raises(ExperimentError, match=message) as err:
        load_experiment(suite / "bad")
    assert str(suite / "bad" / "experiment.yaml") in str(err.value)


def test_targets_resolve_suites_and_experiments_and_unknown_ones_fail(tmp_path):
    write_suite(tmp_path, "cs", SUITE, {"a": {"method": "fura"}, "b": {"method": "full"}})
    assert [p.name for p in resolve_targets(["cs"], tmp_path)] == ["a", "b"]
    assert [p.name for p in resolve_targets(["cs/b"], tmp_path)] == ["b"]
    assert [p.name for p in suite_dirs(tmp_path)] == ["cs"]
    with pytest.raises(ExperimentError, match=r"no experiment or suite 'nope'.*Suites: cs"):
        resolve_targets(["nope"], tmp_path)


def test_every_registry_method_and_oft_are_available_and_an_unknown_one_is_refused(tmp_path):
    assert all(method_available(name) for name in [*METHODS, "oft", "base"])
    assert not method_available("nonsense")
    write_suite(tmp_path, "cs", SUITE, {"x": {"method": "nonsense"}})
    with pytest.raises(ExperimentError, match=r"method 'nonsense' is not a fura method; known: fura, lora"):
        load_experiment(tmp_path / "cs" / "x")


def test_every_shipped_experiment_loads():
    folders = [folder for suite in suite_dirs(EXPERIMENTS_DIR) for folder in resolve_targets([suite.name])]
    assert {"commonsense", "math", "smoke"} <= {suite.name for suite in suite_dirs(EXPERIMENTS_DIR)}
    for folder in folders:
        experiment = load_experiment(folder)
        assert experiment.method in METHODS, folder


@pytest.mark.parametrize("suite", ["commonsense-cloze-fp32", "rl-products"])
def test_the_run_folders_of_committed_results_are_found_again(suite):
    """A new setting must not rename the run folders of trained models (hours of CPU each): the harness would train
    them again. The committed results record the folder each was tested from."""
    results = sorted((RESULTS_DIR / suite).glob("*/seed*.json"))
    assert results
    for path in results:
        result = json.loads(path.read_text())
        experiment = load_experiment(EXPERIMENTS_DIR / suite / path.parent.name)
        rate, seed = result["learning_rate"], result["seed"]
        assert result["fingerprints"]["run"] == f"lr{rate:g}-seed{seed}-{experiment.training_fingerprint(rate, seed)}"
