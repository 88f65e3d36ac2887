"""Data splits: validation rows out of the training files, disjoint, deterministic, exactly one epoch, fingerprinted."""

from __future__ import annotations

import json

import pytest
from benchmarks.method_comparison.data import allocate, build_splits
from benchmarks.method_comparison.experiment import ExperimentError, base_experiment

from .conftest import suite_settings, write_suite


def _experiment(tmp_path, data_root, **training):
    settings = suite_settings(tmp_path / "model", tmp_path / "text.txt")
    settings["training"].update(training)
    return base_experiment(write_suite(tmp_path / "experiments", "cs", settings, {}))


def test_splits_are_disjoint_one_epoch_and_never_use_test_rows(tmp_path, data_root):
    experiment = _experiment(tmp_path, data_root, max_steps=3, batch_size=5)
    splits = build_splits(experiment, data_root, tmp_path / "work")
    train = json.loads(splits.train_path.read_text())
    assert splits.train_rows == len(train) == 15  # max_steps × batch_size
    for task, source in (("boolq", "commonsense/train/boolq.json"), ("ARC-Easy", "commonsense/train/ARC-Easy.json")):
        rows = json.loads((data_root / source).read_text())
        val = splits.val[task]
        assert len(val) == 4 and all(r.source == source for r in val)
        val_questions = {rows[r.index]["instruction"] for r in val}
        train_questions = {r["instruction"] for r in train if r["instruction"] in {x["instruction"] for x in rows}}
        assert len(train_questions) in (7, 8) and not (val_questions & train_questions)
    test_questions = {r.example.instruction for rows in splits.test.values() for r in rows}
    assert not test_questions & {r["instruction"] for r in train}
    assert [len(v) for v in splits.test.values()] == [6, 6, 6]
    assert all([r.index for r in rows] == sorted(r.index for r in rows) for rows in splits.test.values())


def test_splits_are_deterministic_and_fingerprinted(tmp_path, data_root):
    experiment = _experiment(tmp_path, data_root)
    first = build_splits(experiment, data_root, tmp_path / "w1")
    again = build_splits(experiment, data_root, tmp_path / "w2")
    assert first.fingerprints == again.fingerprints
    assert first.train_path.read_text() == again.train_path.read_text()
    experiment.data.split_seed = 1
    other = build_splits(experiment, data_root, tmp_path / "w3")
    assert all(other.fingerprints[k] != first.fingerprints[k] for k in ("train", "val", "test"))
    experiment.data.split_seed = 0
    path = data_root / "commonsense/test/piqa.json"
    rows = json.loads(path.read_text())
    rows[0]["answer"] = "solution2" if rows[0]["answer"] == "solution1" else "solution1"
    path.write_text(json.dumps(rows))
    edited = build_splits(experiment, data_root, tmp_path / "w4")
    assert edited.fingerprints["test"] != first.fingerprints["test"]
    assert edited.fingerprints["train"] == first.fingerprints["train"]


def test_too_few_training_rows_and_missing_files_are_clear_errors(tmp_path, data_root):
    experiment = _experiment(tmp_path, data_root, max_steps=10, batch_size=8)
    with pytest.raises(ExperimentError, match=r"too few rows after 4 validation rows each \(80 rows needed, the files"):
        build_splits(experiment, data_root, tmp_path / "work")
    experiment = _experiment(tmp_path, data_root)
    experiment.data.test_files = ["commonsense/test/hellaswag.json"]
    with pytest.raises(ExperimentError, match=r"hellaswag\.json does not exist"):
        build_splits(experiment, data_root, tmp_path / "work")


def test_rows_are_shared_equally_as_far_as_each_file_allows():
    assert allocate(10, [100, 100, 100]) == [4, 3, 3]
    assert allocate(12, [2, 100, 100]) == [2, 5, 5]  # a small file gives all it has, the others make up the rest
    assert allocate(7, [3, 3, 1]) == [3, 3, 1]
    with pytest.raises(ValueError, match="8 rows needed, the files have 7"):
        allocate(8, [3, 3, 1])


def test_the_cloze_format_rewrites_training_rows_and_changes_every_fingerprint(tmp_path, data_root):
    experiment = _experiment(tmp_path, data_root)
    label = build_splits(experiment, data_root, tmp_path / "w1")
    experiment.data.answer_format = "cloze"
    cloze = build_splits(experiment, data_root, tmp_path / "w2")
    assert all(cloze.fingerprints[k] != label.fingerprints[k] for k in ("train", "val", "test"))
    label_rows, cloze_rows = (json.loads(s.train_path.read_text()) for s in (label, cloze))
    for before, after in zip(label_rows, cloze_rows, strict=True):
        assert after["instruction"] == before["instruction"].split("\n\n")[0]
        options = {"answer1": "a", "answer2": "b", "answer3": "c", "answer4": "d"}
        assert after["answer"] == options.get(before["answer"], before["answer"])
        assert after["output"] == f"the correct answer is {after['answer']}"
    assert [r.example for r in cloze.val["ARC-Easy"]] == [r.example for r in label.val["ARC-Easy"]]
