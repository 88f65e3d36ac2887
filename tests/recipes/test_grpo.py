"""``fura train grpo``: rewards, problem sets, and GRPO end to end on a tiny Llama (run folder, adapter, resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

import fura_cli.commands as cli
from fura.recipes.data.math_problems import (
    MathProblem,
    MathProblemsConfig,
    build_problem_sets,
    grpo_rows,
    resolve_prompt_style,
)
from fura.recipes.data.prompts import BOXED_MATH_INSTRUCTION
from fura.recipes.grpo import GRPORunConfig, GRPOTrainingConfig, parse_protocols, resolve_config, run_grpo
from fura.recipes.rewards import accuracy_reward, completion_text, format_reward, grade_boxed
from fura.recipes.runs import RunFolder

from .conftest import build_tokenizer, require_data
from .data.conftest import CHAT_TEMPLATE
from .test_runs import PNG_MAGIC
from .test_sft import KillAtStep, SimulatedKillError

INSTRUCTION_HEAD = BOXED_MATH_INSTRUCTION.split("{question}")[0]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded (and 2 threads on a busy 2-core machine crawl)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def chat_template_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' minimal chat template as a file (the tiny model's tokenizer has none)."""
    path = tmp_path_factory.mktemp("template") / "chat.jinja"
    path.write_text(CHAT_TEMPLATE)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------------------------


def test_accuracy_reward_grades_the_last_boxed_answer() -> None:
    completions = [
        "2 + 10 = 12, so \\boxed{12}",  # correct
        "\\boxed{12.0}",  # numerically equal
        "\\boxed{ 12 }",  # spaces
        "\\boxed{13}",  # wrong
        "the answer is 12",  # no box: no reward, as the reference
        "\\boxed{7} no wait \\boxed{12}",  # the last box counts
        "\\boxed{12} no wait \\boxed{7}",
        "\\boxed{12",  # unclosed
        "\\boxed{}",  # empty
    ]
    assert accuracy_reward(completions, ["12"] * len(completions)) == [1, 1, 1, 0, 0, 1, 0, 0, 0]


@pytest.mark.parametrize(
    ("prediction", "gold", "correct"),
    [
        ("12", "12.0", True),
        ("1,000", "1000", True),
        ("0.5", "\\frac{1}{2}", True),
        ("\\dfrac{1}{2}", "\\frac12", True),
        ("1/2", "\\frac{1}{2}", True),
        ("\\frac{3}{4}", "0.75", True),
        ("x=3", "3", True),
        ("1+x^2", "x^2+1", True),
        ("\\frac{1}{3}", "\\frac{1}{2}", False),
        ("-12", "12", False),
    ],
)
def test_math_verify_equivalence(prediction: str, gold: str, correct: bool) -> None:
    assert grade_boxed(f"so \\boxed{{{prediction}}}.", gold) is correct


@pytest.mark.parametrize("completion", ["\\boxed{\\frac{1}{}}", "\\boxed{)(}", "\\boxed{{{}", "\\boxed{\\sqrt}", "}{"])
def test_malformed_answers_score_zero_without_raising(completion: str) -> None:
    assert accuracy_reward([completion], ["12"]) == [0.0]
    assert accuracy_reward(["\\boxed{12}"], ["}{"]) == [0.0]  # an unparseable gold answer never rewards


def test_chat_completions_and_the_format_reward() -> None:
    chat = [[{"role": "assistant", "content": "so \\boxed{5}"}], [{"role": "assistant", "content": "5"}]]
    assert completion_text(chat[0]) == "so \\boxed{5}"
    assert accuracy_reward(chat, ["5", "5"]) == [1.0, 0.0]
    assert format_reward(["\\boxed{4}", "\\boxed{}", "\\boxed{4", "4"]) == [1.0, 0.0, 0.0, 0.0]


# ----------------------------------------------------------------------------------------------------------------
# Problem sets and prompts
# ----------------------------------------------------------------------------------------------------------------


def test_gsm_symbolic_sets_are_fixed_distinct_and_disjoint() -> None:
    config = MathProblemsConfig(train_size=40, held_out_size=12, seed=7)
    sets = build_problem_sets(config)
    assert build_problem_sets(config) == sets  # a fixed seed gives the same problems
    train, held_out = [p.problem for p in sets.train], [p.problem for p in sets.held_out]
    assert len(set(train)) == 40 and len(set(held_out)) == 12
    assert not set(train) & set(held_out)
    assert all(isinstance(float(p.answer), float) for p in sets.train + sets.held_out)  # numeric answers
    assert all(p.source == "gsm_symbolic" for p in sets.train)
    other = build_problem_sets(MathProblemsConfig(train_size=40, held_out_size=0, seed=8))
    assert [p.problem for p in other.train] != train and other.held_out == []


def test_prompts_hold_the_question_and_the_boxed_instruction() -> None:
    problems = [MathProblem("How many legs do 3 cats have?", "12", "test")]
    chat_tokenizer, plain_tokenizer = build_tokenizer(bos=False, chat=True), build_tokenizer()
    assert resolve_prompt_style("auto", chat_tokenizer) == "chat"
    assert resolve_prompt_style("auto", plain_tokenizer) == "fura"
    with pytest.raises(ValueError, match="chat-template"):
        resolve_prompt_style("chat", plain_tokenizer)

    (row,) = grpo_rows(problems, "chat")
    assert row["answer"] == "12" and row["problem"] == problems[0].problem
    (message,) = row["prompt"]
    assert message["role"] == "user"
    assert message["content"] == INSTRUCTION_HEAD + problems[0].problem
    assert "\\boxed{}" in message["content"] and "\\\\boxed" not in message["content"]  # single backslashes
    (text_row,) = grpo_rows(problems, "fura", plain_tokenizer)
    assert problems[0].problem in text_row["prompt"] and INSTRUCTION_HEAD in text_row["prompt"]
    assert "### Response:" in text_row["prompt"]


def test_local_file_split_keeps_positions_and_drops_repeats() -> None:
    path = require_data("math", "train", "math_data.json")
    sets = build_problem_sets(MathProblemsConfig(dataset=str(path), train_size=50, held_out_size=5))
    rows = json.loads(path.read_text())
    assert [p.problem for p in sets.train] == [r["instruction"] for r in rows[:50]]
    assert sets.train[0].answer == rows[0]["answer"] and sets.train[0].source == "math_data"
    expected = [r["instruction"] for r in rows[50:55] if r["instruction"] not in {p.problem for p in sets.train}]
    assert [p.problem for p in sets.held_out] == expected


def test_math_style_rows_take_the_boxed_solution(tmp_path: Path) -> None:
    rows = [
        {"problem": "What is $1/2 + 1/4$?", "solution": "We get $\\boxed{\\frac{3}{4}}$."},
        {"problem": "No final answer here.", "solution": "Some text."},  # skipped: no gold answer
        {"problem": "Compute $2^3$.", "solution": "First \\boxed{4}, then $\\boxed{8}$."},
    ]
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held = tmp_path / "held.json"
    held.write_text(json.dumps([{"question": "Compute $2^3$.", "answer": "8"}, {"question": "1+1?", "answer": "2"}]))
    sets = build_problem_sets(
        MathProblemsConfig(dataset=str(path), train_size=10, held_out_size=5, held_out_dataset=str(held))
    )
    assert [(p.problem, p.answer) for p in sets.train] == [
        (rows[0]["problem"], "\\frac{3}{4}"),
        (rows[2]["problem"], "8"),
    ]
    assert [(p.problem, p.answer) for p in sets.held_out] == [("1+1?", "2")]  # the repeat of a training one is dropped


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------


def test_reference_defaults_per_method(tiny_model_dir: Path) -> None:
    fura_run = resolve_config(GRPORunConfig(model=str(tiny_model_dir), method="fura"))
    t = fura_run.training
    assert (t.learning_rate, t.per_device_train_batch_size, t.gradient_accumulation_steps) == (9e-5, 2, 128)
    assert (t.max_steps, t.prompts_per_step, t.num_generations, t.max_completion_length) == (50, 32, 8, 1024)
    assert (t.beta, t.scale_rewards, t.loss_type, t.num_iterations, t.max_grad_norm) == (0.0, "none", "grpo", 1, 1.0)
    assert t.gradient_checkpointing is False and t.use_vllm is False
    full = resolve_config(GRPORunConfig(model=str(tiny_model_dir), method="full")).training
    assert (full.learning_rate, full.per_device_train_batch_size, full.gradient_accumulation_steps) == (1e-5, 4, 64)
    with pytest.raises(ValueError, match="must divide"):
        resolve_config(GRPORunConfig(training=GRPOTrainingConfig(prompts_per_step=3, per_device_train_batch_size=5)))
    assert parse_protocols(["MATH-500=m.jsonl", "AIME-24"]) == {"MATH-500": "m.jsonl", "AIME-24": None}


# ----------------------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------------------


def test_cli_grpo_fura_writes_the_run_folder(tiny_model_dir: Path, chat_template_file: Path, tmp_path: Path) -> None:
    gsm8k = require_data("math", "test", "gsm8k.json")
    math500 = tmp_path / "math500.jsonl"  # a local file in the MATH-500 protocol's format
    math500.write_text('{"problem": "What is $1/2+1/4$?", "answer": "\\\\frac{3}{4}"}\n')
    out = tmp_path / "run"
    status = cli.main([
        "-q", "train", "grpo", "--model", str(tiny_model_dir), "--method", "fura", "--dtype", "float32",
        "--chat-template", str(chat_template_file), "--train-size", "8", "--held-out-size", "2",
        "--max-steps", "2", "--prompts-per-step", "2", "--num-generations", "2", "--max-completion-length", "8",
        "--save-steps", "2", "--held-out-eval-steps", "1", "--eval-data", str(gsm8k),
        "--eval-protocol", f"MATH-500={math500}", "--eval-max-examples", "2", "--eval-max-new-tokens", "8",
        "--output-dir", str(out),
    ])  # fmt: skip
    assert status == 0

    config = __import__("yaml").safe_load((out / "config.yaml").read_text())
    assert config["training"]["learning_rate"] == 9e-5 and config["training"]["gradient_accumulation_steps"] == 2
    assert config["data"]["prompt_style"] == "chat"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    for record in train:
        assert {"reward", "reward_std", "rewards/accuracy_reward/mean", "completions/mean_length", "lr"} <= set(record)
        assert 0.0 <= record["reward"] <= 1.0 and record["completions/mean_length"] <= 8
    assert [r["step"] for r in records if "held_out_accuracy" in r] == [0, 1, 2]  # in the loop, then at the end
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC and (out / "rewards.png").read_bytes()[:8] == PNG_MAGIC
    assert RunFolder(out).last_checkpoint().name == "checkpoint-2"
    assert json.loads((out / "method.json").read_text())["route"] == "peft_config"

    results = json.loads((out / "results.json").read_text())
    assert results["train"]["global_step"] == 2 and set(results["eval"]) == {"held_out", "gsm8k", "MATH-500"}
    assert results["eval"]["gsm8k"]["total"] == 2 and results["eval"]["held_out"]["total"] == 2
    assert results["eval"]["MATH-500"]["total"] == 1
    assert (out / "eval" / "math" / "gsm8k.predictions.jsonl").exists()
    assert len((out / "data" / "held_out.jsonl").read_text().splitlines()) == 2

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "FURA"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter")
    assert any("fura_" in name for name, _ in model.named_parameters())


class ParameterSnapshot(TrainerCallback):
    """Record which parameters the first optimizer step changed."""

    def __init__(self) -> None:
        self.before: dict[str, torch.Tensor] = {}
        self.trainable: set[str] = set()
        self.changed: set[str] | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.changed is None:
            after = dict(model.named_parameters())
            self.changed = {n for n, before in self.before.items() if not torch.equal(before, after[n].detach())}


def length_reward(completions, **kwargs) -> list[float]:
    """A reward that varies between completions of a random model, so the advantages (and gradients) are non-zero."""
    return [len(completion_text(c)) / 32 for c in completions]


def grpo_config(model_dir: Path, template: Path, out: Path) -> GRPORunConfig:
    config = GRPORunConfig(model=str(model_dir), method="fura", dtype="float32", output_dir=str(out))
    config.data = MathProblemsConfig(train_size=8, held_out_size=0, chat_template=str(template))
    config.training = GRPOTrainingConfig(
        max_steps=3, prompts_per_step=2, num_generations=2, max_completion_length=8, save_steps=1, learning_rate=1e-2
    )
    config.eval.held_out = False
    return config


def rewards_by_step(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)), f"duplicated or unordered steps: {steps}"
    return {r["step"]: r["reward"] for r in records if "loss" in r}


def test_only_the_adapter_trains_and_a_killed_run_resumes(
    tiny_model_dir: Path, chat_template_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("fura.recipes.runs.plot_loss_curve", lambda *args, **kwargs: None)  # plots: tested above
    monkeypatch.setattr("fura.recipes.grpo.plot_reward_curve", lambda *args, **kwargs: None)
    out = tmp_path / "run"
    snapshot = ParameterSnapshot()
    with pytest.raises(SimulatedKillError):
        run_grpo(
            grpo_config(tiny_model_dir, chat_template_file, out),
            callbacks=[snapshot, KillAtStep(2)],
            extra_rewards=[length_reward],
        )
    assert snapshot.changed and snapshot.changed <= snapshot.trainable
    assert all("fura_" in name for name in snapshot.changed)  # only adapter tensors moved; the base is untouched
    assert RunFolder(out).last_checkpoint().name == "checkpoint-1"
    before_kill = rewards_by_step(out)
    assert list(before_kill) == [1, 2]  # step 2 was logged, but not checkpointed

    resumed = run_grpo(grpo_config(tiny_model_dir, chat_template_file, out), resume=True, extra_rewards=[length_reward])
    assert resumed.global_step == 3
    rewards = rewards_by_step(out)
    assert list(rewards) == [1, 2, 3]  # every step exactly once
    assert rewards[1] == before_kill[1]
    assert rewards[2] == pytest.approx(before_kill[2], abs=1e-6)  # step 2 redone from checkpoint-1: same rollouts
    assert RunFolder(out).last_checkpoint().name == "checkpoint-3"
    assert json.loads((out / "results.json").read_text())["train"]["global_step"] == 3
