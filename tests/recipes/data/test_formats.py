"""Loading LLM-Adapters JSON arrays / JSONL, validation errors, the Hub fallback, and the real shared files."""

from __future__ import annotations

import json

import pytest

from fura.recipes.data import formats
from fura.recipes.data.formats import DataFormatError, Example, load_examples, load_rows

from .conftest import require_data

ROWS = [
    {"instruction": "Is water wet?", "input": "", "output": "the correct answer is true", "answer": "true"},
    {"instruction": "Is fire cold?", "input": "", "output": "the correct answer is false", "answer": "false"},
]


def test_json_array_and_jsonl_give_the_same_examples(tmp_path):
    array, lines = tmp_path / "t.json", tmp_path / "t.jsonl"
    array.write_text(json.dumps(ROWS, indent=2))
    lines.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    expected = [Example(r["instruction"], r["output"], r["answer"], "", "t") for r in ROWS]
    assert load_examples(array) == expected
    assert load_examples(lines) == expected
    assert load_examples(array, max_rows=1) == expected[:1]


def test_missing_field_error_names_file_row_and_field(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps([ROWS[0], {"instruction": "q", "output": "o"}]))
    with pytest.raises(DataFormatError, match=r"broken\.json: row 1 lacks required field 'answer'"):
        load_examples(path)
    assert load_examples(path, required=("instruction",))[1].answer == ""


def test_not_json_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("[{not json")
    with pytest.raises(DataFormatError, match=r"bad\.json"):
        load_rows(path)


def test_non_local_path_goes_to_the_hub(monkeypatch):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return ROWS

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples = formats.load_examples("someone/commonsense", split="test")
    assert calls == [("someone/commonsense", "test")]
    assert [e.answer for e in examples] == ["true", "false"] and examples[0].source == "someone/commonsense"


def test_real_train_files_parse():
    train = require_data("commonsense", "train")
    for path in sorted(train.glob("*.json")):
        examples = load_examples(path, max_rows=20)
        assert len(examples) == 20
        assert all(e.output.startswith("the correct answer is") and e.answer in e.output for e in examples)
