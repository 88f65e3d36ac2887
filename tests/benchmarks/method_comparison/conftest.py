"""Fixtures of the harness tests: a tiny Llama folder, a tiny LLM-Adapters data root, a small text, suite writers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ...recipes.conftest import build_tokenizer, save_tiny_model

__all__ = ["build_tokenizer", "save_tiny_model", "suite_settings", "write_data_root", "write_suite"]

BOOLQ = "Please answer the following question with true or false, question: is {} even?\n\nAnswer format: true/false"
ARC = (
    "Please choose the correct answer to the question: {} plus one?\n\nAnswer1: a Answer2: b Answer3: c Answer4: d"
    "\n\nAnswer format: answer1/answer2/answer3/answer4"
)
PIQA = "Please choose the correct solution to the question: {}?\n\nAnswer format: solution1/solution2"
MATH = "What is {} plus 2?"


def _rows(template: str, n: int, answer, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        label = answer(i)
        rows.append(
            {
                "instruction": template.format(i),
                "input": "",
                "output": f"the correct answer is {label}",
                "answer": label,
            }
        )
    return rows


def write_data_root(root: Path) -> Path:
    """A shared-data lookalike: two commonsense training files, three test files, a math train and test file."""
    files = {
        "commonsense/train/boolq.json": _rows(BOOLQ, 24, lambda i: "true" if i % 2 == 0 else "false"),
        "commonsense/train/ARC-Easy.json": _rows(ARC, 24, lambda i: f"answer{i % 4 + 1}"),
        "commonsense/test/boolq.json": _rows(BOOLQ, 12, lambda i: "true" if i % 2 == 0 else "false", 100),
        "commonsense/test/piqa.json": _rows(PIQA, 12, lambda i: f"solution{i % 2 + 1}", 100),
        "commonsense/test/ARC-Easy.json": _rows(ARC, 12, lambda i: f"answer{i % 4 + 1}", 100),
    }
    math_rows = [
        {"instruction": MATH.format(i), "input": "", "output": f"The answer is {i + 2}.", "answer": f"{i + 2}.0"}
        for i in range(30)
    ]
    files["math/train/math_data.json"] = math_rows[:20]
    files["math/test/gsm8k.json"] = math_rows[20:]
    for relative, rows in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows))
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama + offline tokenizer folder (read-only by convention)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    """A tiny LLM-Adapters data root."""
    return write_data_root(tmp_path / "data")


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """A small general text (instead of the book corpus)."""
    path = tmp_path / "text.txt"
    path.write_text("Below is an instruction that describes a task. The answer is 576. " * 40)
    return path


def suite_settings(model: Path, text: Path, task: str = "commonsense") -> dict:
    """Suite settings sized for a test: 2 steps of batch 4, a few rows, a 64-token text probe, fp32."""
    training = {"max_steps": 2, "batch_size": 4, "max_seq_len": 256, "logging_steps": 1}
    if task == "rl":  # reasoning-gym problems, 2 GRPO steps of 2 problems × 2 completions of 8 tokens
        data = {"generator": "products"}
        training.update(prompts_per_step=2, num_generations=2, max_completion_length=8, answer_source="completion")
    elif task == "commonsense":
        data = {
            "train_files": ["commonsense/train/boolq.json", "commonsense/train/ARC-Easy.json"],
            "test_files": [
                "commonsense/test/boolq.json",
                "commonsense/test/piqa.json",
                "commonsense/test/ARC-Easy.json",
            ],
        }
    else:
        data = {"train_files": ["math/train/math_data.json"], "test_files": ["math/test/gsm8k.json"]}
    return {
        "task": task,
        "model": str(model),
        "threads": 1,
        "data": {**data, "val_rows_per_file": 4, "test_rows_per_file": 6},
        "training": training,
        "evaluation": {"batch_size": 4, "max_new_tokens": 4, "precision": "fp32"},
        "forgetting": {"corpus": str(text), "tokens": 64, "window": 32, "batch_size": 2},
    }


def write_suite(root: Path, name: str, settings: dict, experiments: dict[str, dict]) -> Path:
    """``root/<name>/suite.yaml`` and one ``<experiment>/experiment.yaml`` per entry; returns the suite folder."""
    suite = root / name
    suite.mkdir(parents=True, exist_ok=True)
    (suite / "suite.yaml").write_text(yaml.safe_dump(settings))
    for experiment, values in experiments.items():
        (suite / experiment).mkdir(exist_ok=True)
        (suite / experiment / "experiment.yaml").write_text(yaml.safe_dump(values))
    return suite
