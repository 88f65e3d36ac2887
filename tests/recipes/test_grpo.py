"""``fura train grpo``: rewards, problem sets, settings (TrlParser + GRPOConfig), and GRPO end to end on a tiny Llama
(run folder, adapter, resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import TrainerCallback

import fura_cli.commands as cli
from fura.recipes.args import RecipeArgumentError, dump_yaml
from fura.recipes.data.math_problems import (
    MathProblem,
    MathProblemsConfig,
    build_problem_sets,
    grpo_rows,
    resolve_prompt_style,
)
from fura.recipes.data.prompts import BOXED_MATH_INSTRUCTION
from fura.recipes.grpo import GRPOSettings, parse_settings, resolve_settings, run_grpo
from fura.recipes.rewards import accuracy_reward, completion_text, format_reward, grade_boxed
from fura.recipes.runs import RunFolder, RunFolderError

from .conftest import build_tokenizer, require_data
from .data.conftest import CHAT_TEMPLATE
from .test_runs import PNG_MAGIC, fake_checkpoint
from .test_sft import KillAtStep, SimulatedKillError

INSTRUCTION_HEAD = BOXED_MATH_INSTRUCTION.split("{question}")[0]


pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_answer_source_completion_rewards_the_final_answer_outside_a_box() -> None:
    from fura.recipes.grpo import reward_functions
    from fura.recipes.grpo_settings import RolloutArguments

    completions = ["the answer is 12.", "12 * 1 = 12", "so \\boxed{12}", "it is 13", "12, no: 13", "no idea"]
    (boxed,), _ = reward_functions(RolloutArguments())
    (anywhere,), _ = reward_functions(RolloutArguments(answer_source="completion"))
    assert boxed(completions, ["12"] * 6) == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]  # the reference: only a boxed answer
    assert anywhere(completions, ["12"] * 6) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]  # the final answer, boxed or not


@pytest.mark.parametrize("source", ["boxed", "completion"])
def test_an_unevaluated_expression_never_earns_a_numeric_answers_reward(source: str) -> None:
    from fura.recipes.rewards import ACCURACY_REWARDS

    reward = ACCURACY_REWARDS[source]
    hacks = ["\\boxed{18271 \\cdot 43432}", "\\boxed{18271 * 43432}", "\\boxed{18271 \\times 43432}"]
    assert reward(hacks, ["793546072"] * 3) == [0.0, 0.0, 0.0]  # math-verify alone accepts each: sympy multiplies
    fine = ["\\boxed{793,546,072}", "\\boxed{793546072}"]
    assert reward(fine, ["793546072"] * 2) == [1.0, 1.0]
    assert reward(["\\boxed{\\frac{3}{4}}", "\\boxed{-12}"], ["0.75", "-12"]) == [1.0, 1.0]  # values, not operations


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
# Settings
# ----------------------------------------------------------------------------------------------------------------


def test_reference_defaults_per_method() -> None:
    resolved = resolve_settings(parse_settings([]))
    t = resolved.training
    assert (t.learning_rate, t.per_device_train_batch_size, t.gradient_accumulation_steps) == (9e-5, 2, 128)
    assert (t.max_steps, resolved.rollouts.prompts_per_step, t.num_generations, t.max_completion_length) == (
        50, 32, 8, 1024,
    )  # fmt: skip
    assert (t.beta, t.scale_rewards, t.loss_type, t.num_iterations, t.max_grad_norm) == (0.0, "none", "grpo", 1, 1.0)
    assert (t.lr_scheduler_type, t.optim, t.seed, t.logging_steps, t.save_steps, t.save_total_limit) == (
        "constant", "adamw_torch", 42, 1, 10, 2,
    )  # fmt: skip
    assert (t.generation_batch_size, t.steps_per_generation) == (256, 128)  # one generation per optimizer step
    assert t.activation_checkpointing is False and t.use_vllm is False
    assert t.bf16 is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert resolved.run.track == "rl" and t.output_dir == str(Path("runs") / "smollm2-grpo-fura")
    full = resolve_settings(parse_settings(["--method", "full"])).training
    assert (full.learning_rate, full.per_device_train_batch_size, full.gradient_accumulation_steps) == (1e-5, 4, 64)
    qlora = resolve_settings(parse_settings(["--method", "qlora"])).training  # no rl values: its commonsense ones
    assert (qlora.learning_rate, qlora.optim, qlora.activation_checkpointing) == (2e-4, "paged_adamw_8bit", True)
    unset = resolve_settings(
        parse_settings(["--method", "qlora", "--activation-checkpointing", "false", "--learning-rate", "1e-5"])
    )
    assert (unset.training.activation_checkpointing, unset.training.learning_rate) == (False, 1e-5)  # the user's


def test_prompts_per_step_sets_the_gradient_accumulation() -> None:
    assert (
        resolve_settings(parse_settings(["--per-device-train-batch-size", "4"])).training.gradient_accumulation_steps
        == 64
    )
    small = resolve_settings(parse_settings(["--prompts_per_step", "2", "--num_generations", "2"]))
    assert (small.training.gradient_accumulation_steps, small.training.generation_batch_size) == (2, 4)
    given = resolve_settings(parse_settings(["--gradient_accumulation_steps", "8", "--num_generations", "4"]))
    assert given.rollouts.prompts_per_step == 4  # 2 completions × 8 micro-batches / 4 per problem
    with pytest.raises(ValueError, match=r"= 3 × 8 = 24\. Fix: choose a divisor"):
        resolve_settings(parse_settings(["--prompts-per-step", "3", "--per-device-train-batch-size", "5"]))
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=4 disagrees .* = 32 / 2 = 16"):
        resolve_settings(parse_settings(["--prompts_per_step", "4", "--gradient_accumulation_steps", "4"]))


def test_flags_override_yaml_which_overrides_defaults(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "method: lora\nloss_type: dapo\nbeta: 0.04\nnum_generations: 4\nlearning_rate: 3e-5\nprompts_per_step: 4\n"
        "format_reward_weight: 0.5\ntrain_size: 16\neval_protocol: {MATH-500: m.jsonl, AIME-24: null}\n"
    )
    settings = parse_settings(["--config", str(path), "--beta", "0.1", "--num-generations", "2"])
    assert settings.training.beta == 0.1  # the flag beats the YAML
    assert settings.training.num_generations == 2  # so does this one
    assert (settings.training.loss_type, settings.training.learning_rate) == ("dapo", 3e-5)  # YAML (3e-5: a float)
    assert (settings.rollouts.format_reward_weight, settings.problems.train_size) == (0.5, 16)
    assert settings.evaluation.protocols() == {"MATH-500": "m.jsonl", "AIME-24": None}
    assert settings.training.scale_rewards == "none"  # default
    assert {"beta", "loss_type", "num_generations", "learning_rate", "prompts_per_step"} <= settings.explicit
    assert "scale_rewards" not in settings.explicit
    resolved = resolve_settings(settings)
    assert resolved.training.learning_rate == 3e-5  # the user's value, not lora's rl default 9e-5
    assert resolved.training.gradient_accumulation_steps == 4  # 4 problems × 2 completions / micro-batch 2


def test_the_documented_flags_set_their_fields() -> None:
    s = parse_settings([
        "--model", "m", "--method", "lora", "--track", "rl", "--method-arg", "r=4", "--method-arg", "lora_alpha=8",
        "--dtype", "float32", "--output-dir", "runs/x", "--trust-remote-code",
        "--dataset", "d.jsonl", "--train-size", "10", "--held-out-size", "3", "--held-out-dataset", "h.jsonl",
        "--split", "test", "--question-field", "q", "--answer-field", "a", "--prompt-style", "fura",
        "--chat-template", "t.jinja",
        "--max-steps", "7", "--prompts-per-step", "4", "--num-generations", "4", "--max-completion-length", "64",
        "--temperature", "0.7", "--top-p", "0.9", "--beta", "0.04", "--loss-type", "dr_grpo", "--scale-rewards",
        "group", "--num-iterations", "2", "--epsilon", "0.3", "--mask-truncated-completions",
        "--format-reward-weight", "0.5", "--use-vllm", "false", "--vllm-mode", "server",
        "--vllm-gpu-memory-utilization", "0.5", "--log-completions",
        "--learning-rate", "1e-4", "--per-device-train-batch-size", "4", "--lr-scheduler-type", "cosine",
        "--warmup-steps", "0.1", "--weight-decay", "0.01", "--max-grad-norm", "0.5", "--optim", "adamw_torch",
        "--activation-checkpointing", "--bf16", "false", "--fp16", "false",
        "--seed", "7", "--logging-steps", "2", "--save-steps", "5", "--save-total-limit", "3",
        "--no-held-out-eval", "--held-out-eval-steps", "2", "--eval-data", "a.json", "b.json", "--eval-protocol",
        "MATH-500=m.jsonl", "--eval-protocol", "AIME-24", "--eval-max-examples", "5", "--eval-batch-size", "8",
        "--eval-max-new-tokens", "32",
    ])  # fmt: skip
    r, p, o, e, t = s.run, s.problems, s.rollouts, s.evaluation, s.training
    assert (r.model, r.method, r.track, r.method_args(), r.dtype, r.trust_remote_code) == (
        "m", "lora", "rl", {"r": 4, "lora_alpha": 8}, "float32", True,
    )  # fmt: skip
    assert (t.output_dir, s.run_dir()) == ("runs/x", Path("runs/x"))
    assert (p.dataset, p.train_size, p.held_out_size, p.held_out_dataset, p.split) == (
        "d.jsonl",
        10,
        3,
        "h.jsonl",
        "test",
    )
    assert (p.question_field, p.answer_field, p.prompt_style, p.chat_template) == ("q", "a", "fura", "t.jinja")
    assert (t.max_steps, o.prompts_per_step, t.num_generations, t.max_completion_length) == (7, 4, 4, 64)
    assert (t.temperature, t.top_p, t.beta, t.loss_type, t.scale_rewards) == (0.7, 0.9, 0.04, "dr_grpo", "group")
    assert (t.num_iterations, t.epsilon, t.mask_truncated_completions, o.format_reward_weight) == (2, 0.3, True, 0.5)
    assert (t.use_vllm, t.vllm_mode, t.vllm_gpu_memory_utilization, t.log_completions) == (False, "server", 0.5, True)
    assert (t.learning_rate, t.per_device_train_batch_size, t.lr_scheduler_type, t.warmup_steps) == (
        1e-4, 4, "cosine", 0.1,
    )  # fmt: skip
    assert (t.weight_decay, t.max_grad_norm, t.optim, t.activation_checkpointing, t.bf16, t.fp16) == (
        0.01, 0.5, "adamw_torch", True, False, False,
    )  # fmt: skip
    assert (t.seed, t.logging_steps, t.save_steps, t.save_total_limit) == (7, 2, 5, 3)
    assert (e.held_out_eval, e.held_out_eval_steps, e.eval_data) == (False, 2, ["a.json", "b.json"])
    assert e.protocols() == {"MATH-500": "m.jsonl", "AIME-24": None}
    assert (e.eval_max_examples, e.eval_batch_size, e.eval_max_new_tokens) == (5, 8, 32)
    s = parse_settings([
        "--learning-rate", "2e-4", "--output-dir", "runs/y", "--num-generations", "4",
        "--mask-truncated-completions", "false", "--log-completions", "false", "--activation-checkpointing", "false",
        "--use-vllm", "--held-out-eval", "--bf16", "true", "--use_cpu", "--resume", "--overwrite", "--print-config",
    ])  # fmt: skip
    t = s.training
    assert (t.learning_rate, t.output_dir, t.num_generations, t.mask_truncated_completions) == (
        2e-4,
        "runs/y",
        4,
        False,
    )
    assert (t.log_completions, t.activation_checkpointing, t.use_vllm, t.bf16) == (False, False, True, True)
    assert s.evaluation.held_out_eval and s.run.resume and s.run.overwrite and s.run.print_config


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompts-per-stp", "2"], r"unknown flag --prompts-per-stp \(did you mean --prompts-per-step\?\)"),
        (["--num_generation=4"], r"unknown flag --num_generation \(did you mean --num_generations\?\)"),
        (["--loss_type", "ppo"], r"argument --loss_type.*invalid choice: 'ppo'"),
        (["--eval-protocol", "MATH-5000"], r"eval_protocol: unknown protocol\(s\) MATH-5000"),
    ],
)
def test_unknown_flags_and_values_are_errors(argv: list[str], message: str) -> None:
    with pytest.raises(RecipeArgumentError, match=message):
        parse_settings(argv)


def test_print_config_is_a_config_file_that_reproduces_the_settings(tmp_path: Path, capsys) -> None:
    argv = ["train", "grpo", "--method", "full", "--prompts-per-step", "4", "--eval-protocol", "AIME-24",
            "--print-config"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    values = yaml.safe_load(printed)
    assert (values["learning_rate"], values["per_device_train_batch_size"], values["gradient_accumulation_steps"]) == (
        1e-5, 4, 8,
    )  # fmt: skip  # full's rl values; 4 problems × 8 completions / micro-batch 4
    assert values["track"] == "rl" and values["eval_protocol"] == ["AIME-24"] and "print_config" not in values
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    again = parse_settings(["--config", str(path)])
    assert again.to_dict() == values
    assert resolve_settings(again).to_dict() == values


def test_bad_input_fails_before_the_run_folder(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "run"
    small = ["--train-size", "4", "--held-out-size", "0"]
    cases = [
        (["--dataset", str(empty)], "empty.jsonl: no row with a gold answer"),
        ([*small, "--eval-data", str(empty)], "empty.jsonl: the evaluation file holds no rows"),
        ([*small, "--chat-template", str(tmp_path / "none.jinja")], "--chat_template"),
        ([*small, "--prompt-style", "chat"], "chat-template"),  # the tiny tokenizer has no chat template
        (["--learning-rat", "1"], "unknown flag --learning-rat"),
        ([*small, "--reward_weights", "1", "2"], "reward_weights: the recipe weighs its rewards itself"),
    ]
    for extra, message in cases:
        argv = ["train", "grpo", "--model", str(tiny_model_dir), "--output-dir", str(out), *extra]
        assert cli.main(argv) == cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_resume_refuses_a_changed_method_or_problem_set(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    base = ["--model", str(tiny_model_dir), "--output_dir", str(out), "--train_size", "4", "--held_out_size", "0"]
    run = RunFolder(out)
    run.prepare()
    run.write_config(dump_yaml(resolve_settings(parse_settings([*base, "--prompt_style", "fura"])).to_dict()))
    fake_checkpoint(out, 1)
    with pytest.raises(RunFolderError, match=r"cannot resume .*: method, train_size differ"):
        run_grpo(parse_settings([*base, "--method", "lora", "--train_size", "5", "--resume"]))


# ----------------------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------------------


def test_cli_grpo_fura_writes_the_run_folder(
    tiny_model_dir: Path, chat_template_file: Path, tmp_path: Path, capsys
) -> None:
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

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["learning_rate"] == 9e-5 and config["gradient_accumulation_steps"] == 2
    assert config["prompt_style"] == "chat" and config["max_steps"] == 2
    assert parse_settings(["--config", str(out / "config.yaml")]).to_dict() == config  # a valid --config file
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
    assert (out / "train.log").read_text()

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

    capsys.readouterr()
    finished = {path: path.read_bytes() for path in (out / "metrics.jsonl", out / "results.json", out / "config.yaml")}
    assert cli.main(["train", "grpo", "--config", str(out / "config.yaml"), "--resume"]) == 0
    assert f"{out} holds a finished run (2 GRPO steps): nothing to resume" in capsys.readouterr().out
    assert {path: path.read_bytes() for path in finished} == finished  # a clear no-op


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


def grpo_settings(model_dir: Path, template: Path, out: Path, *flags: str) -> GRPOSettings:
    """3 GRPO steps of 2 problems × 2 completions, a checkpoint at every step, no held-out set."""
    return parse_settings([
        "--model", str(model_dir), "--method", "fura", "--dtype", "float32", "--output_dir", str(out),
        "--train_size", "8", "--held_out_size", "0", "--chat_template", str(template), "--max_steps", "3",
        "--prompts_per_step", "2", "--num_generations", "2", "--max_completion_length", "8", "--save_steps", "1",
        "--learning_rate", "1e-2", "--no_held_out_eval", *flags,
    ])  # fmt: skip


def rewards_by_step(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)), f"duplicated or unordered steps: {steps}"
    return {r["step"]: r["reward"] for r in records if "loss" in r}


def test_only_the_adapter_trains_and_a_killed_run_resumes(
    tiny_model_dir: Path, chat_template_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("fura.recipes.runs.plot_loss_curve", lambda *args, **kwargs: None)  # plots: tested above
    monkeypatch.setattr("fura.recipes.grpo_eval.plot_reward_curve", lambda *args, **kwargs: None)
    out = tmp_path / "run"
    snapshot = ParameterSnapshot()
    with pytest.raises(SimulatedKillError):
        run_grpo(
            grpo_settings(tiny_model_dir, chat_template_file, out),
            callbacks=[snapshot, KillAtStep(2)],
            extra_rewards=[length_reward],
        )
    assert snapshot.changed and snapshot.changed <= snapshot.trainable
    assert all("fura_" in name for name in snapshot.changed)  # only adapter tensors moved; the base is untouched
    assert RunFolder(out).last_checkpoint().name == "checkpoint-1"
    before_kill = rewards_by_step(out)
    assert list(before_kill) == [1, 2]  # step 2 was logged, but not checkpointed

    resumed = run_grpo(
        grpo_settings(tiny_model_dir, chat_template_file, out, "--resume"), extra_rewards=[length_reward]
    )
    assert resumed.global_step == 3
    rewards = rewards_by_step(out)
    assert list(rewards) == [1, 2, 3]  # every step exactly once
    assert rewards[1] == before_kill[1]
    assert rewards[2] == pytest.approx(before_kill[2], abs=1e-6)  # step 2 redone from checkpoint-1: same rollouts
    assert RunFolder(out).last_checkpoint().name == "checkpoint-3"
    assert json.loads((out / "results.json").read_text())["train"]["global_step"] == 3
