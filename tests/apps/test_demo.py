"""The offline demo (``fura demo``): the teacher-forced accuracy, the data, and a quick end-to-end run."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

import fura_cli.commands as cli
from fura.apps import demo
from fura.recipes.runs import MetricsLog

from ..recipes.data.conftest import build_tokenizer, tiny_causal_lm

QUESTIONS = [f"What is {a} plus {b}?" for a, b in [(3, 4), (12, 5), (7, 7), (40, 2), (9, 13), (1, 1), (25, 30), (6, 0)]]
ANSWERS = ["7", "17", "14", "42", "22", "2", "55", "6"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def chat_tokenizer():
    """The offline BPE tokenizer with a small chat template whose turns end with EOS ``</s>``."""
    return build_tokenizer(bos=False, chat=True)


def problems(questions: list[str] = QUESTIONS, answers: list[str] = ANSWERS) -> list[demo.Problem]:
    return [demo.Problem(q, a, {}) for q, a in zip(questions, answers, strict=True)]


def greedy_generate_ids(model, tokenizer, rows: list[demo.Encoded], max_new_tokens: int) -> list[list[int]]:
    """Real ``generate`` (greedy, one prompt at a time): the new tokens, cut after the first EOS."""
    outputs = []
    for row in rows:
        ids = torch.tensor([row.prompt_ids])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )[0, ids.shape[1] :].tolist()
        if tokenizer.eos_token_id in out:
            out = out[: out.index(tokenizer.eos_token_id) + 1]
        outputs.append(out)
    return outputs


def test_teacher_forced_exact_match_equals_generate(chat_tokenizer, tmp_path: Path) -> None:
    """One forward pass per batch gives exactly greedy generation's exact match, row by row (padded batches)."""
    tokenizer = chat_tokenizer
    model = tiny_causal_lm(len(tokenizer))
    rows = [demo.encode(tokenizer, p) for p in problems()]
    pad = tokenizer.pad_token_id
    # fit half of the problems so that some rows are answered exactly and others are not
    config = demo.DemoConfig(steps=60, batch_size=4, lr=1e-2, warmup_steps=1)
    demo.train(model, rows[:4] * 60, pad, config, MetricsLog(tmp_path / "metrics.jsonl"))

    fast = demo.greedy_exact_match(model, rows, pad, batch_size=3)
    generated = greedy_generate_ids(model, tokenizer, rows, max_new_tokens=8)
    slow = [out == row.target_ids for out, row in zip(generated, rows, strict=True)]
    assert fast.correct == slow
    assert any(slow) and not all(slow), "the fixture should give both outcomes"

    # the demo's string-level check on real generations (generate_completions, batched, left-padded) agrees too
    samples = demo.generate_samples(model, tokenizer, problems(), scorer=None, max_new_tokens=8, desc="generate")
    assert [s["exact_match"] for s in samples] == fast.correct
    assert all(s["score"] is None for s in samples)  # no scorer: no lenient score, no crash


def test_exact_match_is_independent_of_batching(chat_tokenizer) -> None:
    """Left padding with explicit position ids: the per-row results and the loss do not depend on the batch size."""
    model = tiny_causal_lm(len(chat_tokenizer))
    rows = [demo.encode(chat_tokenizer, p) for p in problems()]
    gold = [[*out, chat_tokenizer.eos_token_id] for out in greedy_generate_ids(model, chat_tokenizer, rows, 3)]
    own = [demo.Encoded(row.prompt_ids, ids) for row, ids in zip(rows, gold, strict=True)]  # its own greedy output
    one = demo.greedy_exact_match(model, own, chat_tokenizer.pad_token_id, batch_size=1)
    many = demo.greedy_exact_match(model, own, chat_tokenizer.pad_token_id, batch_size=8)
    assert one.correct == many.correct
    assert one.loss == pytest.approx(many.loss, rel=1e-5)
    # the first three tokens are its own greedy choice; the row is a match iff it would then stop (emit EOS)
    generated = greedy_generate_ids(model, chat_tokenizer, rows, 4)
    assert many.correct == [out[:4] == ids for out, ids in zip(generated, gold, strict=True)]


def test_problem_sets_are_disjoint_and_distinct() -> None:
    sets = demo.demo_problem_sets(demo.TASKS["chain_sum"], n_train=300, n_held_out=50, seed=0)
    held = [p.question for p in sets.held_out]
    assert len(sets.train) == 300 and len(held) == 50 == len(set(held))
    assert not set(held) & {p.question for p in sets.train}
    assert sets.scorer.score_answer(sets.held_out[0].answer, sets.held_out[0].entry) == 1.0
    again = demo.demo_problem_sets(demo.TASKS["chain_sum"], n_train=300, n_held_out=50, seed=0)
    assert [p.question for p in again.train] == [p.question for p in sets.train]  # seeded


def test_labels_cover_only_the_answer_and_end_of_turn(chat_tokenizer) -> None:
    rows = [demo.encode(chat_tokenizer, p) for p in problems()[:3]]
    batch = demo.collate(rows, chat_tokenizer.pad_token_id)
    for i, row in enumerate(rows):
        labels, mask = batch["labels"][i], batch["attention_mask"][i]
        labelled = labels[labels != demo.IGNORE_INDEX].tolist()
        assert labelled == row.target_ids
        assert chat_tokenizer.decode(labelled) == ANSWERS[i] + chat_tokenizer.eos_token
        real = batch["input_ids"][i][mask.bool()].tolist()
        assert real == row.prompt_ids + row.target_ids  # left padded: the sequence ends the row
        assert batch["position_ids"][i][mask.bool()].tolist() == list(range(len(real)))
    prompt = chat_tokenizer.decode(rows[0].prompt_ids)
    assert prompt.startswith("<|user|>") and prompt.endswith("<|assistant|>\n") and ANSWERS[0] not in prompt


def test_a_template_that_does_not_end_turns_with_eos_is_refused() -> None:
    tokenizer = build_tokenizer(bos=False, chat=True)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="does not end an assistant turn with the EOS token"):
        demo.encode(tokenizer, problems()[0])


def test_learning_rate_schedule() -> None:
    factors = [demo.lr_factor(step, 10, 2) for step in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0] and factors[-1] == pytest.approx(1 / 8)
    assert all(a >= b for a, b in itertools.pairwise(factors[1:]))  # then it only decreases


@pytest.fixture
def tiny_chat_model(tmp_path: Path, chat_tokenizer) -> Path:
    """A tiny random Llama + the chat tokenizer saved as a model folder."""
    folder = tmp_path / "tiny-chat"
    tiny_causal_lm(len(chat_tokenizer)).save_pretrained(folder)
    chat_tokenizer.save_pretrained(folder)
    return folder


def test_demo_quick_end_to_end(tiny_chat_model: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    status = cli.main(["demo", "--quick", "--model", str(tiny_chat_model), "--out", str(out), "--seed", "1"])
    printed = capsys.readouterr().out
    assert status == 0
    assert "FuRA demo summary" in printed and "greedy exact match" in printed

    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "task",
        "n_held_out",
        "accuracy_before",
        "accuracy_after",
        "trainable_params",
        "trainable_percent",
        "adapter_mb",
        "adapter_tensors",
        "conversion_s",
        "train_s",
        "total_s",
    ):
        assert key in summary, key
    assert summary["task"] == demo.DEFAULT_TASK and summary["n_held_out"] == 16 and summary["steps"] == 3
    assert 0 <= summary["accuracy_before"] <= 1 and 0 <= summary["accuracy_after"] <= 1
    assert 0 < summary["trainable_percent"] < 100 and summary["adapter_tensors"] > 0 and summary["adapter_mb"] > 0
    assert summary["reload_max_logit_diff"] < 1e-4  # the reloaded adapter is the trained model
    assert len(summary["samples_before"]) == len(summary["samples_after"]) == 2
    assert summary["samples_after"][0]["score"] is not None  # reasoning-gym's lenient score

    records = MetricsLog(out / "metrics.jsonl").records()
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 3]
    png = (out / "loss.png").read_bytes()
    assert png.startswith(PNG_MAGIC)
    from matplotlib import pyplot as plt

    assert plt.imread(out / "loss.png").ndim == 3
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_demo_help_lists_the_flags(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    text = capsys.readouterr().out
    for flag in ("--out", "--steps", "--task", "--seed", "--quick", "--model"):
        assert flag in text


@pytest.mark.slow
def test_demo_quick_on_smollm2(tmp_path: Path) -> None:
    """The real model, tiny settings (CI: < 90 s on 2 CPU cores)."""
    from fura.io.assets import smollm2_path

    try:
        smollm2_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    torch.set_num_threads(2)
    summary = demo.run_demo(demo.DemoConfig.quick(out=tmp_path / "demo"))
    assert summary["n_held_out"] == 16
    assert summary["reload_max_logit_diff"] < 1e-3
    assert 3 < summary["trainable_percent"] < 6  # 5.5 M of 134.5 M
