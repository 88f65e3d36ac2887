"""Math grading: numeric extraction, math-verify, and the evaluation loop incl. the n-sample protocol."""

from __future__ import annotations

import json

import pytest

from fura.recipes.eval.math import (
    MathEvalConfig,
    evaluate_math,
    extract_boxed,
    extract_numeric_answer,
    grade_math_verify,
    grade_numeric,
)

from .conftest import ScriptedModel, require_data


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("so we get \\boxed{576} tiles; 24 per foot", 576.0),
        ("first \\boxed{3}, corrected: \\boxed{\\frac{3}{4}}", 0.75),
        ("He needs 24 * 24 = 576 tiles. The answer is 576.", 576.0),
        ("The answer is $1,234.50 in total, not 7", 1234.5),
        ("The answer is -12. Check: 3 + 4 = 7", -12.0),
        ("Step 1: 12 apples. Step 2: 7 apples", 7.0),
        ("the answer is: 3/4 of a pie", 0.75),
        ("A: it costs $2,000,000", 2_000_000.0),
        ("The Answer Is 0.5", 0.5),
        ("no number at all", None),
    ],
)
def test_numeric_extraction(completion, expected):
    assert extract_numeric_answer(completion) == expected


def test_boxed_handles_nested_braces_and_unclosed():
    assert extract_boxed("x \\boxed{\\frac{1}{2}} y") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{12") is None and extract_boxed("none") is None


@pytest.mark.parametrize(
    ("completion", "gold", "correct"),
    [
        ("The answer is 576.", "576.0", True),
        ("The answer is 576.0", "576", True),
        ("The answer is 1,200", "1200.0", True),
        ("The answer is -3", "-3.0", True),
        ("The answer is 575", "576.0", False),
        ("I cannot tell", "576.0", False),
    ],
)
def test_grade_numeric(completion, gold, correct):
    assert grade_numeric(completion, gold).correct is correct


def test_grade_math_verify_latex_cases():
    assert grade_math_verify("Hence \\boxed{\\frac{1}{2}}.", "0.5").correct
    assert grade_math_verify("so the result is $\\boxed{2\\sqrt{2}}$", "\\sqrt{8}").correct
    assert not grade_math_verify("Hence \\boxed{3}", "\\frac{1}{2}").correct
    assert grade_math_verify("", "1") == grade_math_verify("no math here", "1")
    assert not grade_math_verify("no math here", "1").correct


def _write_problems(path, rows, question="instruction"):
    path.write_text(json.dumps([{question: q, "answer": a} for q, a in rows]))


def test_evaluate_math_numeric_with_outputs(tmp_path, tokenizer):
    _write_problems(tmp_path / "toy.json", [("What is 2+2?", "4.0"), ("What is 3*3?", "9.0")])
    model = ScriptedModel(tokenizer, lambda p: "The answer is 4." if "2+2" in p else "The answer is 8.")
    config = MathEvalConfig(data_path=str(tmp_path / "toy.json"), output_dir=str(tmp_path / "out"))
    result = evaluate_math(model, tokenizer, config)
    assert (result.correct, result.total, result.problems, result.accuracy) == (1, 2, 2, 0.5)
    records = [json.loads(x) for x in (tmp_path / "out" / "toy.predictions.jsonl").read_text().splitlines()]
    assert [(r["extracted"], r["label"], r["correct"]) for r in records] == [("4", "4.0", True), ("8", "9.0", False)]
    assert json.loads((tmp_path / "out" / "toy.summary.json").read_text())["accuracy"] == 0.5


def test_sampling_protocol_counts_every_completion(tmp_path, tokenizer):
    _write_problems(tmp_path / "aime.json", [("Find x.", "\\frac{1}{2}"), ("Find y.", "7")], question="problem")
    samples = {"x": ["\\boxed{\\frac{1}{2}}"] * 3 + ["\\boxed{1}"] * 5, "y": ["\\boxed{7}"] + ["\\boxed{0}"] * 7}
    model = ScriptedModel(tokenizer, lambda p: samples["x" if "Find x" in p else "y"])
    config = MathEvalConfig.for_protocol("AIME-24", str(tmp_path / "aime.json"), max_new_tokens=8)
    result = evaluate_math(model, tokenizer, config)
    assert (result.correct, result.total, result.problems) == (4, 16, 2)  # avg@8, not pass@8
    kwargs = model.calls[0]["kwargs"]
    assert kwargs["do_sample"] and kwargs["num_return_sequences"] == 8 and kwargs["temperature"] == 0.6
    assert "\\boxed{}" in model.tokenizer.decode(model.calls[0]["input_ids"][0])  # the boxed RL instruction


def test_greedy_protocol_scores_one_completion_per_problem(tmp_path, tokenizer):
    _write_problems(tmp_path / "m.json", [("Find z.", "2")], question="problem")
    model = ScriptedModel(tokenizer, lambda p: "\\boxed{2}")
    config = MathEvalConfig.for_protocol("MATH-500", str(tmp_path / "m.json"), n_samples=4)
    result = evaluate_math(model, tokenizer, config)
    assert (result.correct, result.total) == (1, 1) and model.calls[0]["kwargs"]["do_sample"] is False


def test_missing_field_names_the_file(tmp_path, tokenizer):
    _write_problems(tmp_path / "q.json", [("Find z.", "2")], question="question")
    with pytest.raises(ValueError, match=r"q\.json: row 0 lacks field 'problem'"):
        evaluate_math(None, tokenizer, MathEvalConfig.for_protocol("MATH-500", str(tmp_path / "q.json")))


def test_real_gsm8k_rows_half_answered_correctly(tokenizer):
    path = require_data("math", "test", "gsm8k.json")
    rows = json.loads(path.read_text())[:20]
    golds = {r["instruction"]: float(r["answer"]) for r in rows}  # gold is a number string such as "576.0"
    replies = {q: f"The answer is {g + (i % 2):,.2f}." for i, (q, g) in enumerate(golds.items())}  # odd rows off by 1
    model = ScriptedModel(tokenizer, lambda p: next(v for k, v in replies.items() if k in p))
    result = evaluate_math(model, tokenizer, MathEvalConfig(data_path=str(path), max_examples=20, batch_size=10))
    assert (result.correct, result.total) == (10, 20)
