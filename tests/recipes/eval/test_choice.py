"""Log-likelihood multiple choice: exact scores, one sequence per row, agreement with generation, clear errors."""

from __future__ import annotations

import json
import zlib
from types import SimpleNamespace

import pytest
import torch

from fura.recipes.data.formats import Example
from fura.recipes.data.prompts import PromptFormatter
from fura.recipes.eval.choice import ChoiceItem, encode_pair, plan_sequences, score_choices, split_trailing_space
from fura.recipes.eval.commonsense import (
    ANSWER_CHOICES,
    CommonsenseEvalConfig,
    candidate_labels,
    choice_items,
    evaluate_commonsense,
)

from .conftest import build_tokenizer, tiny_causal_lm

RESPONSE = "### Response:\n"


class FormatModel:
    """A causal-LM stub that always answers in format: ``the correct answer is <choose(question)>`` then EOS.

    Both protocols read the same next-token logits: after the prompt's ``### Response:`` line, the next token of the
    scripted answer gets +20 over seeded noise; ``generate`` is greedy decoding of these logits. Its forward takes
    neither ``position_ids`` nor ``logits_to_keep`` (the fallback path of :func:`score_choices`).
    """

    def __init__(self, tokenizer, choose):
        self.tokenizer, self.choose = tokenizer, choose
        self.device, self.training, self.forward_calls = torch.device("cpu"), True, 0

    def eval(self):
        self.training = False
        return self

    def train(self, mode: bool = True):
        self.training = mode
        return self

    def next_logits(self, ids: list[int]) -> torch.Tensor:
        noise = torch.Generator().manual_seed(zlib.crc32(bytes(str(ids), "ascii")))
        logits = torch.randn(len(self.tokenizer), generator=noise)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if RESPONSE in text:
            head, _, answered = text.partition(RESPONSE)
            target = "the correct answer is " + self.choose(head.split("### Instruction:\n", 1)[-1])
            if target.startswith(answered):
                rest = target[len(answered) :]
                token = self.tokenizer(rest, add_special_tokens=False).input_ids[0] if rest else 2
                logits[token] += 20.0
        return logits

    def __call__(self, input_ids, attention_mask):
        self.forward_calls += 1
        logits = torch.zeros(*input_ids.shape, len(self.tokenizer))
        for row in range(input_ids.shape[0]):
            valid = [p for p in range(input_ids.shape[1]) if attention_mask[row, p]]
            for p in valid:
                logits[row, p] = self.next_logits([int(input_ids[row, q]) for q in valid if q <= p])
        return SimpleNamespace(logits=logits)

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **kwargs):
        rows = []
        for row in range(input_ids.shape[0]):
            ids = [int(t) for t, m in zip(input_ids[row], attention_mask[row], strict=True) if m]
            new = []
            while len(new) < max_new_tokens and (not new or new[-1] != eos_token_id):
                new.append(int(self.next_logits(ids + new).argmax()))
            rows.append(input_ids[row].tolist() + new)
        width = max(map(len, rows))
        return torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])


def _rows(task: str, questions: list[tuple[str, str, str]]) -> list[dict]:
    return [{"instruction": f"{q}\n\nAnswer format: {fmt}", "input": "", "output": "", "answer": a}
            for q, fmt, a in questions]  # fmt: skip


TASK_ROWS = {
    "boolq": [("Is snow hot?", "true/false", "false"), ("Is ice cold?", "true/false", "true"),
              ("Do fish swim?", "true/false", "true")],
    "piqa": [("Open a jar?", "solution1/solution2", "solution1"), ("Dry a towel?", "solution1/solution2", "solution2")],
    "ARC-Easy": [("Sun is a?", "answer1/answer2/answer3", "answer2"),
                 ("Water boils at?", "answer1/answer2/answer3/answer4", "answer4"),
                 ("Moon orbits?", "answer1/answer2/answer3/answer4/answer5", "answer5")],
}  # fmt: skip


def _script(question: str) -> str:
    """Some right, some wrong, always one of the row's own labels (stable across processes)."""
    for rows in TASK_ROWS.values():
        for q, fmt, _ in rows:
            if q in question:
                options = fmt.split("/")
                return options[zlib.crc32(q.encode()) % len(options)]
    raise AssertionError(f"unscripted question {question!r}")


@pytest.fixture
def data_dir(tmp_path):
    for task, rows in TASK_ROWS.items():
        (tmp_path / f"{task}.json").write_text(json.dumps(_rows(task, rows)))
    return tmp_path


def test_both_protocols_agree_on_a_model_that_always_answers_in_format(data_dir, tmp_path, tokenizer):
    model = FormatModel(tokenizer, _script)
    common = dict(data_dir=str(data_dir), tasks=list(TASK_ROWS), batch_size=2)
    generated = evaluate_commonsense(model, tokenizer, CommonsenseEvalConfig(**common, num_beams=1, max_new_tokens=12))
    out = tmp_path / "loglik"
    loglik = evaluate_commonsense(
        model, tokenizer, CommonsenseEvalConfig(**common, output_dir=str(out)), protocol="loglik"
    )
    assert loglik.protocol == "loglik" and generated.protocol == "generate"
    for task, rows in TASK_ROWS.items():
        records = [json.loads(line) for line in (out / task / "model_predictions.jsonl").read_text().splitlines()]
        assert [r["predicted"] for r in records] == [_script(q) for q, _, _ in rows]
        expected = sum(_script(q) == a for q, _, a in rows)
        assert loglik.results[task].correct == generated.results[task].correct == expected
        assert set(records[0]) == {"index", "label", "candidates", "scores", "num_tokens", "predicted", "correct"}
        assert [len(r["candidates"]) for r in records] == [len(fmt.split("/")) for _, fmt, _ in rows]
    assert 0 < loglik.average < 1  # the script is wrong on some rows: agreement is not just "all correct"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"] == "loglik" and summary["config"]["protocol"] == "loglik"


def tiny_gpt2(vocab_size: int):
    """A random 2-layer GPT-2: learned *absolute* position embeddings, so left padding needs explicit positions."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_positions=256, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                        eos_token_id=2, pad_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("build", [tiny_causal_lm, tiny_gpt2], ids=["llama-rope", "gpt2-absolute-positions"])
def test_scores_equal_an_unbatched_per_candidate_computation(tokenizer, build):
    model = build(len(tokenizer))
    items = [
        ChoiceItem("Is the sky blue? the correct answer is", (" true", " false"), " true"),
        ChoiceItem("Pick one: the correct answer is", (" answer1", " answer12 ending3", " solution2 option1 x")),
        ChoiceItem("Short", (" a", " ab", " abc", " b"), " b"),
        ChoiceItem("A much longer context so that left padding is needed in the batch ok ", ("yes", "no")),
    ]
    scores = score_choices(model, tokenizer, items, batch_size=2)
    for item, score in zip(items, scores, strict=True):
        expected = []
        for candidate in item.candidates:
            context_ids, cont = encode_pair(tokenizer, item.context, candidate, add_special_tokens=True)
            with torch.no_grad():
                logits = model(torch.tensor([context_ids + cont])).logits[0]
            log_probs = torch.log_softmax(logits.float(), -1)
            expected.append(sum(float(log_probs[len(context_ids) - 1 + i, t]) for i, t in enumerate(cont)))
            assert score.num_tokens[item.candidates.index(candidate)] == len(cont)
        assert score.scores == pytest.approx(expected, abs=1e-4)
        assert score.predicted == max(range(len(expected)), key=lambda i: expected[i])


def test_a_blank_item_scores_the_continuation_after_each_filled_context(tokenizer):
    model = tiny_causal_lm(len(tokenizer))
    item = ChoiceItem("The cat sat on the ", ("mat", "dog"), "mat", continuation=" and purred loudly.")
    (score,) = score_choices(model, tokenizer, [item], batch_size=1)
    expected = []
    for candidate in item.candidates:
        context_ids, cont = encode_pair(tokenizer, item.context + candidate, item.continuation, add_special_tokens=True)
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([context_ids + cont])).logits[0].float(), -1)
        expected.append(sum(float(log_probs[len(context_ids) - 1 + i, t]) for i, t in enumerate(cont)))
        assert score.num_tokens[item.candidates.index(candidate)] == len(cont)
    assert score.scores == pytest.approx(expected, abs=1e-4)


def test_candidates_sharing_all_but_their_last_token_need_one_sequence(tokenizer):
    answers = tuple(f" answer{i}" for i in range(1, 6))
    assert len(plan_sequences(ChoiceItem("Q: the correct answer is", answers), 0, tokenizer, True)) == 1
    assert len(plan_sequences(ChoiceItem("Q:", (" true", " false")), 0, tokenizer, True)) == 1
    diverging = ChoiceItem("Q:", (" answer1 answer2", " answer1 answer3", " solution2 option1"))
    sequences = plan_sequences(diverging, 0, tokenizer, True)
    assert 1 < len(sequences) <= 3
    assert sorted(c for s in sequences for c, _ in s.reads) == [0, 1, 2]  # every candidate read exactly once


def test_ties_pick_the_first_candidate_and_the_model_mode_is_restored(tokenizer):
    class Flat(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, len(tokenizer)))

    model = Flat().train()
    (score,) = score_choices(model, tokenizer, [ChoiceItem("Q:", (" answer3", " answer1", " answer2"))])
    assert len(set(score.num_tokens)) == 1 and len(set(score.scores)) == 1 and score.predicted == 0
    assert model.training


def test_trailing_space_moves_to_the_continuation():
    assert split_trailing_space("answer is ", "true") == ("answer is", " true")
    assert split_trailing_space("answer is", " true") == ("answer is", " true")


@pytest.mark.parametrize(
    ("task", "instruction", "expected"),
    [
        ("ARC-Challenge", "Q?\n\nAnswer format: answer1/answer2/answer3", ("answer1", "answer2", "answer3")),
        ("boolq", "Q?\n\nAnswer format: true/false", ("true", "false")),
        ("piqa", "Q? with no format line", ANSWER_CHOICES["piqa"]),
        ("openbookqa", "Q?\n\nAnswer format: A/B/C", ANSWER_CHOICES["openbookqa"]),
    ],
)
def test_candidate_labels_follow_the_rows_answer_format(task, instruction, expected):
    assert candidate_labels(task, instruction) == expected


def test_choice_items_use_the_training_prompt_and_prefix(tokenizer):
    formatter = PromptFormatter("fura", tokenizer)
    (item,) = choice_items("boolq", [Example("Is ice cold?\n\nAnswer format: true/false", "", "true")], formatter)
    assert item.context.endswith(RESPONSE + "the correct answer is")
    assert item.candidates == (" true", " false") and item.label == " true"


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (ChoiceItem("Q", ()), "has no candidates"),
        (ChoiceItem("Q", (" a", " a")), "repeats a candidate"),
        (ChoiceItem("Q", (" a", " b"), " c"), "is not one of its candidates"),
        (ChoiceItem("Q", (" a", "")), "gives no token to score"),
    ],
)
def test_bad_items_are_clear_errors(tokenizer, item, message):
    with pytest.raises(ValueError, match=message):
        score_choices(tiny_causal_lm(len(tokenizer)), tokenizer, [item])


def test_bad_settings_are_clear_errors(tokenizer, tmp_path):
    model = tiny_causal_lm(len(tokenizer))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        score_choices(model, tokenizer, [ChoiceItem("Q", (" a",))], batch_size=0)
    bare = build_tokenizer()
    bare.pad_token, bare.eos_token = None, None
    with pytest.raises(ValueError, match="neither a pad nor an eos"):
        score_choices(model, bare, [ChoiceItem("Q", (" a",))])
    with pytest.raises(ValueError, match="protocol must be one of"):
        CommonsenseEvalConfig(data_dir=str(tmp_path), protocol="mc")
    with pytest.raises(KeyError, match="unknown commonsense task"):
        candidate_labels("mmlu", "Answer format: answer1/answer2")
    (tmp_path / "boolq.json").write_text(json.dumps(_rows("boolq", [("Is it?", "true/false", "maybe")])))
    config = CommonsenseEvalConfig(data_dir=str(tmp_path), tasks=["boolq"], protocol="loglik")
    with pytest.raises(ValueError, match="boolq row 0: its answer 'maybe' is not one of the row's labels"):
        evaluate_commonsense(model, tokenizer, config)


@pytest.mark.slow
def test_real_smollm2_scores_match_per_candidate_forward_passes():
    """SmolLM2 splits ' answer3' into ' answer' + '3': one sequence per row, same scores as one pass per candidate."""
    from fura.recipes.artifacts import load_for_inference

    model, tokenizer, _ = load_for_inference("smollm2", dtype="float32")
    formatter = PromptFormatter("fura", tokenizer)
    question = "Which is a fruit?\n\nAnswer1: {} Answer2: {}\n\nAnswer format: answer1/answer2"
    examples = [Example(question.format(a, b), "", "answer1") for a, b in [("apple", "stone"), ("car", "pear")]]
    items = choice_items("ARC-Easy", examples, formatter)
    assert all(len(plan_sequences(item, 0, tokenizer, False)) == 1 for item in items)
    for item, score in zip(items, score_choices(model, tokenizer, items, add_special_tokens=False), strict=True):
        for candidate, value in zip(item.candidates, score.scores, strict=True):
            ids = tokenizer(item.context + candidate, add_special_tokens=False)["input_ids"]
            start = len(tokenizer(item.context, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            assert value == pytest.approx(
                sum(float(log_probs[p - 1, ids[p]]) for p in range(start, len(ids))), abs=1e-3
            )
