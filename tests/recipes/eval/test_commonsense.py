"""Commonsense harness: answer extraction per task, accuracy against known labels, outputs, real test files."""

from __future__ import annotations

import json

import pytest

from fura.recipes.data.formats import Example, load_examples
from fura.recipes.data.prompts import PromptFormatter
from fura.recipes.eval.commonsense import (
    ANSWER_CHOICES,
    COMMONSENSE_TASKS,
    CommonsenseEvalConfig,
    as_cloze,
    choice_items,
    evaluate_commonsense,
    extract_answer,
    fill_in_blank,
    find_task_file,
    option_texts,
)

from .conftest import ScriptedModel, require_data

EXTRACTION_CASES = {
    "boolq": ("The correct answer is FALSE, not true", "false"),
    "piqa": ("the correct answer is Solution2 (solution1 is wrong)", "solution2"),
    "social_i_qa": ("answer3 because answer1 fails", "answer3"),
    "ARC-Challenge": ("ANSWER4", "answer4"),
    "ARC-Easy": ("I pick answer1.", "answer1"),
    "openbookqa": ("the correct answer is answer5", "answer5"),
    "hellaswag": ("ending2 then ending4", "ending2"),
    "winogrande": ("Option1", "option1"),
}


@pytest.mark.parametrize("task", COMMONSENSE_TASKS)
def test_extraction_first_match_case_insensitive_empty_when_none(task):
    completion, expected = EXTRACTION_CASES[task]
    assert extract_answer(task, completion) == expected
    assert extract_answer(task, "I do not know") == ""
    assert all(extract_answer(task, f"x {choice.upper()} y") == choice for choice in ANSWER_CHOICES[task])


def test_unknown_task_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown commonsense task"):
        extract_answer("mmlu", "answer1")


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"instruction": q, "input": "", "output": "", "answer": a} for q, a in rows]))


def test_accuracy_outputs_and_skipped_tasks_with_a_scripted_model(tmp_path, tokenizer):
    data = tmp_path / "data"
    _write(data / "boolq.json", [("Is the sky blue?", "true"), ("Is snow hot?", "false")])
    _write(data / "piqa" / "test.json", [("Open a jar?", "solution1"), ("Dry a towel?", "solution2")])
    _write(data / "winogrande.json", [("Fill the blank.", "option2")])
    answers = {"sky": "the correct answer is true", "snow": "the correct answer is true", "jar": "solution1",
               "towel": "Solution2", "blank": "no idea"}  # fmt: skip
    model = ScriptedModel(tokenizer, lambda p: next(v for k, v in answers.items() if k in p))
    config = CommonsenseEvalConfig(data_dir=str(data), output_dir=str(tmp_path / "out"), batch_size=2)
    report = evaluate_commonsense(model, tokenizer, config)

    assert {t: r.accuracy for t, r in report.results.items()} == {"boolq": 0.5, "piqa": 1.0, "winogrande": 0.0}
    assert report.average == pytest.approx(0.5)
    assert report.skipped == ["social_i_qa", "ARC-Challenge", "ARC-Easy", "openbookqa", "hellaswag"]
    assert model.calls[0]["kwargs"]["num_beams"] == 4 and model.calls[0]["kwargs"]["max_new_tokens"] == 32

    lines = (tmp_path / "out" / "boolq" / "model_predictions.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [set(r) for r in records] == [{"index", "prompt", "completion", "extracted", "label", "correct"}] * 2
    assert [(r["extracted"], r["label"], r["correct"]) for r in records] == [("true", "true", 1), ("true", "false", 0)]
    assert "### Instruction:\nIs the sky blue?" in records[0]["prompt"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["tasks"]["piqa"] == {"accuracy": 1.0, "correct": 2, "total": 2}
    assert summary["average"] == pytest.approx(0.5) and summary["average_over"] == ["boolq", "piqa", "winogrande"]


def test_max_examples_and_no_output_dir(tmp_path, tokenizer):
    _write(tmp_path / "boolq.json", [("q1", "true"), ("q2", "true"), ("q3", "false")])
    model = ScriptedModel(tokenizer, lambda p: "true")
    config = CommonsenseEvalConfig(data_dir=str(tmp_path), tasks=["boolq"], max_examples=2, num_beams=1)
    report = evaluate_commonsense(model, tokenizer, config)
    assert report.results["boolq"].total == 2 and report.average == 1.0
    assert report.results["boolq"].predictions_path is None and not (tmp_path / "summary.json").exists()


def test_real_test_files_parse_with_labels_in_the_task_vocabulary():
    test_dir = require_data("commonsense", "test")
    found = [task for task in COMMONSENSE_TASKS if find_task_file(test_dir, task)]
    assert {"boolq", "piqa"} <= set(found)
    for task in found:
        examples = load_examples(find_task_file(test_dir, task), max_rows=20)
        assert len(examples) == 20
        assert all(e.answer.lower() in ANSWER_CHOICES[task] for e in examples), task
        assert all(extract_answer(task, e.output) == e.answer.lower() for e in examples), task  # gold output scores


ARC_ROW = (
    "Please choose the correct answer to the question: What do plants need?\n\nAnswer1: light Answer2: noise "
    "Answer3: rust\n\nAnswer format: answer1/answer2/answer3"
)
PIQA_ROW = (
    "Please choose the correct solution to the question: Dry a towel.\n\nSolution1: Hang it up.\n\n"
    "Solution2: Fold it wet.\n\nAnswer format: solution1/solution2"
)
BOOLQ_ROW = (
    "Please answer the following question with true or false, question: is ice cold?\n\nAnswer format: true/false"
)


@pytest.mark.parametrize(
    ("instruction", "expected"),
    [
        (ARC_ROW, {"answer1": "light", "answer2": "noise", "answer3": "rust"}),
        (PIQA_ROW, {"solution1": "Hang it up.", "solution2": "Fold it wet."}),
        (BOOLQ_ROW, {}),
        ("Pick one.\n\nOption1: Ann Option2: Bob", {"option1": "Ann", "option2": "Bob"}),
    ],
)
def test_option_texts_read_every_row_layout(instruction, expected):
    assert option_texts(instruction) == expected


def test_as_cloze_keeps_the_question_and_answers_with_the_options_text():
    arc = as_cloze("ARC-Easy", Example(ARC_ROW, "the correct answer is answer3", "answer3", "", "ARC-Easy"))
    assert arc.instruction == "Please choose the correct answer to the question: What do plants need?"
    assert (arc.output, arc.answer, arc.source) == ("the correct answer is rust", "rust", "ARC-Easy")
    piqa = as_cloze("piqa", Example(PIQA_ROW, "", "solution1"))
    assert piqa.instruction.endswith("Dry a towel.") and piqa.answer == "Hang it up."
    boolq = as_cloze("boolq", Example(BOOLQ_ROW, "the correct answer is false", "false"))
    assert boolq.instruction.endswith("is ice cold?") and boolq.output == "the correct answer is false"
    with pytest.raises(ValueError, match=r"ARC-Easy: the answer 'answer4' is not one of the row's options"):
        as_cloze("ARC-Easy", Example(ARC_ROW, "", "answer4"))


def test_cloze_choice_items_score_the_option_texts_after_the_question_alone(tokenizer):
    formatter = PromptFormatter("fura", tokenizer)
    duplicated = ARC_ROW.replace("Answer2: noise", "Answer2: light")
    rows = [Example(ARC_ROW, "", "answer1"), Example(duplicated, "", "answer2"), Example(BOOLQ_ROW, "", "true")]
    arc, dup, boolq = choice_items("ARC-Easy", rows[:2], formatter, answer_format="cloze") + choice_items(
        "boolq", rows[2:], formatter, answer_format="cloze"
    )
    assert arc.candidates == (" light", " noise", " rust") and arc.label == " light"
    assert "Answer1" not in arc.context and "Answer format" not in arc.context
    assert "What do plants need?\n" in arc.context and arc.context.endswith("### Response:\nthe correct answer is")
    assert dup.candidates == (" light", " rust") and dup.label == " light"  # equal texts are one answer
    assert boolq.candidates == (" true", " false") and boolq.label == " true"
    with pytest.raises(ValueError, match="answer_format must be one of label, cloze"):
        choice_items("boolq", rows[2:], formatter, answer_format="text")
    with pytest.raises(ValueError, match="ARC-Easy row 0: ARC-Easy: the answer 'answer9'"):
        choice_items("ARC-Easy", [Example(ARC_ROW, "", "answer9")], formatter, answer_format="cloze")


WINOGRANDE_ROW = (
    "Please choose the correct answer to fill in the blank to complete the given sentence: Sarah was a much better "
    "surgeon than Maria so _ always got the harder cases.\n\nOption1: Sarah\nOption2: Maria\n\n"
    "Answer format: option1/option2"
)


def test_fill_in_the_blank_rows_train_on_the_filled_sentence_and_score_the_rest_of_it(tokenizer):
    """WinoGrande's format, as lm-evaluation-harness scores it: each option fills the blank (the context), and the
    rest of the sentence (one shared continuation) is what is scored."""
    example = Example(WINOGRANDE_ROW, "the correct answer is option1", "option1", "", "winogrande")
    cloze = as_cloze("winogrande", example)
    lead = "Please choose the correct answer to fill in the blank to complete the given sentence"
    assert cloze.instruction == lead and cloze.answer == "Sarah"
    assert cloze.output == "Sarah was a much better surgeon than Maria so Sarah always got the harder cases."
    (item,) = choice_items("winogrande", [example], PromptFormatter("fura", tokenizer), answer_format="cloze")
    assert item.candidates == ("Sarah", "Maria") and item.label == "Sarah"
    assert item.continuation == " always got the harder cases."
    assert item.context.endswith("### Response:\nSarah was a much better surgeon than Maria so ")
    assert (
        item.context + item.label + item.continuation
        == PromptFormatter("fura", tokenizer).prompt(lead, split="eval") + cloze.output
    )  # scored exactly as trained
    no_blank = WINOGRANDE_ROW.replace(" _ ", " she ")
    assert fill_in_blank(no_blank) is None
    assert as_cloze("winogrande", Example(no_blank, "", "option2")).output == "the correct answer is Maria"


def test_every_real_row_reads_as_a_cloze_question():
    """Each shared commonsense row has its answer among its parsed options, and its cloze form lists no option."""
    for split in ("train", "test"):
        folder = require_data("commonsense", split)
        for path in sorted(folder.glob("*.json")):
            for example in load_examples(path):
                options = option_texts(example.instruction)
                assert path.stem == "boolq" or (options and all(options.values())), (path, example.instruction)
                cloze = as_cloze(path.stem, example)
                assert "Answer format" not in cloze.instruction and not option_texts(cloze.instruction)
