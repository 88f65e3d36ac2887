"""Evaluation outputs are standard JSON, whatever the model scored."""

from __future__ import annotations

import json

from fura.recipes.eval.records import write_json, write_jsonl


def _strict(text: str):
    return json.loads(text, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(f"bare {name}")))


def test_non_finite_scores_are_written_as_null(tmp_path) -> None:
    records = [{"prompt": "p", "scores": [float("nan"), 1.0], "loglik": float("-inf")}]
    lines = write_jsonl(tmp_path / "model_predictions.jsonl", records).read_text().splitlines()
    assert [_strict(line) for line in lines] == [{"prompt": "p", "scores": [None, 1.0], "loglik": None}]
    assert _strict(write_json(tmp_path / "summary.json", {"accuracy": float("nan")}).read_text()) == {"accuracy": None}
