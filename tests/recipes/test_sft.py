"""``fura train sft`` end to end on a tiny Llama and real LLM-Adapters rows: run folder contents, kill + resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import fura_cli.commands as cli
from fura.recipes.args import dump_yaml
from fura.recipes.runs import RunFolder, RunFolderError
from fura.recipes.sft import SFTSettings, parse_settings, resolve_settings, run_sft

from .test_runs import PNG_MAGIC, fake_checkpoint

STEPS, SAVE_EVERY = 6, 3


pytestmark = pytest.mark.usefixtures("one_thread")


def make_argv(model_dir: Path, data_dir: Path, out: Path, method: str = "fura", **flags: object) -> list[str]:
    """6 optimizer steps of batch 2 × 2 on 16 ARC-Challenge rows, a checkpoint every 3 steps (``fura train sft``
    flags; ``flags`` add or replace some, e.g. ``save_steps=100``)."""
    values: dict[str, object] = {
        "model": model_dir, "method": method, "dtype": "float32", "output_dir": out,
        "train_files": data_dir / "train" / "ARC-Challenge.json", "max_seq_len": 512, "val_set_size": 2,
        "max_rows_per_file": 16, "max_steps": STEPS, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2, "logging_steps": 1, "save_steps": SAVE_EVERY,
    }  # fmt: skip
    values.update(flags)
    argv: list[str] = []
    for name, value in values.items():
        argv += [f"--{name}", str(value)]
    return argv


def make_settings(model_dir: Path, data_dir: Path, out: Path, method: str = "fura", **flags: object) -> SFTSettings:
    return parse_settings(make_argv(model_dir, data_dir, out, method, **flags))


class SimulatedKillError(Exception):
    """Raised from a callback to stop a run abruptly, as a kill would (no final save, no cleanup)."""


class KillAtStep(TrainerCallback):
    """Kill the run right after it logged ``step`` (i.e. after the checkpoint before it was written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.global_step == self.step and logs and "loss" in logs:
            raise SimulatedKillError(f"killed at step {self.step}")


def train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)), f"duplicated or unordered steps: {steps}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_cli_sft_fura_writes_the_whole_run_folder(tiny_model_dir, commonsense_dir, tmp_path) -> None:
    out = tmp_path / "run"
    status = cli.main([
        "-q", "train", "sft", "--model", str(tiny_model_dir), "--method", "fura", "--dtype", "float32",
        "--data", str(commonsense_dir / "train" / "ARC-Challenge.json"), "--max-rows-per-file", "12",
        "--val-set-size", "2", "--max-seq-len", "512", "--per-device-train-batch-size", "2",
        "--gradient-accumulation-steps", "1",
        "--max-steps", "4", "--save-steps", "2", "--logging-steps", "1", "--output-dir", str(out),
        "--eval", "commonsense", "--eval-data", str(commonsense_dir / "test"), "--eval-tasks", "ARC-Challenge",
        "boolq", "--eval-max-examples", "2", "--eval-num-beams", "1", "--eval-max-new-tokens", "4",
    ])  # fmt: skip
    assert status == 0

    config = __import__("yaml").safe_load((out / "config.yaml").read_text())
    assert config["method"] == "fura" and config["learning_rate"] == 2e-4  # resolved method default
    assert config["max_steps"] == 4 and config["max_rows_per_file"] == 12
    assert parse_settings(["--config", str(out / "config.yaml")]).to_dict() == config  # a valid --config file

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for record in train:
        assert set(record) >= {"step", "epoch", "loss", "lr", "grad_norm", "elapsed"}
        assert record["loss"] > 0 and record["grad_norm"] > 0
    assert [r["elapsed"] for r in train] == sorted(r["elapsed"] for r in train)
    assert any("eval_loss" in r for r in records)  # the held-out loss at the end

    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "FURA" and adapter_config["base_model_name_or_path"] == str(tiny_model_dir)
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert weights and all("fura_" in key for key in weights)
    assert (out / "adapter" / "tokenizer_config.json").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] != []

    method = json.loads((out / "method.json").read_text())
    assert method["trainable_params"] == 4608
    summary = json.loads((out / "eval" / "commonsense" / "summary.json").read_text())
    assert summary["average_over"] == ["ARC-Challenge", "boolq"]
    assert all(0.0 <= t["accuracy"] <= 1.0 and t["total"] == 2 for t in summary["tasks"].values())
    predictions = (out / "eval" / "commonsense" / "boolq" / "model_predictions.jsonl").read_text().splitlines()
    assert {"prompt", "completion", "extracted", "label", "correct"} <= set(json.loads(predictions[0]))
    results = json.loads((out / "results.json").read_text())
    assert results["train"]["global_step"] == 4 and results["eval"]["kind"] == "commonsense"


def test_killed_run_resumes_on_the_same_curve(tiny_model_dir, commonsense_dir, tmp_path) -> None:
    # saving does not change the trajectory; only the final save happens
    reference = run_sft(make_settings(tiny_model_dir, commonsense_dir, tmp_path / "straight", save_steps=100))
    assert reference.global_step == STEPS
    expected = train_losses(tmp_path / "straight")

    killed_dir = tmp_path / "killed"
    settings = make_settings(tiny_model_dir, commonsense_dir, killed_dir)
    with pytest.raises(SimulatedKillError):
        run_sft(settings, callbacks=[KillAtStep(SAVE_EVERY + 1)])
    assert list(train_losses(killed_dir)) == list(range(1, SAVE_EVERY + 2))  # step k+1 logged, not checkpointed
    assert RunFolder(killed_dir).last_checkpoint().name == f"checkpoint-{SAVE_EVERY}"
    assert not (killed_dir / "adapter").exists()

    yaml_path = tmp_path / "killed.yaml"
    yaml_path.write_text(dump_yaml(settings.to_dict()))
    assert cli.main(["-q", "train", "sft", "--config", str(yaml_path), "--resume"]) == 0

    resumed = train_losses(killed_dir)
    assert list(resumed) == list(range(1, STEPS + 1))  # every step exactly once
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(expected[step], abs=1e-5), f"step {step}"
    elapsed = [json.loads(line)["elapsed"] for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert elapsed == sorted(elapsed)  # the clock continues across the resume
    assert (killed_dir / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((killed_dir / "results.json").read_text())["train"]["global_step"] == STEPS


def test_resume_refuses_a_changed_method_or_data(tiny_model_dir, commonsense_dir, tmp_path) -> None:
    out = tmp_path / "run"
    run = RunFolder(out)
    run.prepare()
    run.write_config(dump_yaml(resolve_settings(make_settings(tiny_model_dir, commonsense_dir, out)).to_dict()))
    fake_checkpoint(out, SAVE_EVERY)
    changed = make_settings(tiny_model_dir, commonsense_dir, out, method="lora", max_rows_per_file=8, resume=True)
    with pytest.raises(RunFolderError, match=r"max_rows_per_file, method"):
        run_sft(changed)


def test_existing_run_needs_resume_or_overwrite(tiny_model_dir, commonsense_dir, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    RunFolder(out).prepare()
    RunFolder(out).write_config("method: fura\n")
    fake_checkpoint(out, 1)  # it trained: never deleted without --overwrite
    data = tmp_path / "rows.json"
    row = {"instruction": "q", "input": "", "output": "the correct answer is true", "answer": "true"}
    data.write_text(json.dumps([row] * 4))
    argv = ["train", "sft", "--model", str(tiny_model_dir), "--data", str(data), "--val-set-size", "0",
            "--output-dir", str(out)]  # fmt: skip
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "--resume" in capsys.readouterr().err


def test_print_config_shows_resolved_settings(tiny_model_dir, capsys) -> None:
    argv = ["train", "sft", "--model", str(tiny_model_dir), "--method", "full", "--track", "rl", "--data", "a.json",
            "--print-config"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = __import__("yaml").safe_load(capsys.readouterr().out)
    assert printed["learning_rate"] == 1e-5 and printed["method"] == "full"
    assert printed["eval"] == "none"


def test_a_4bit_base_keeps_its_trainable_tensors_in_float32(tiny_model_dir, tmp_path) -> None:
    """SFTTrainer casts the trainable tensors of a quantised model to bf16; the recipe keeps PEFT's fp32 ones."""
    from fura.recipes.data.formats import Example
    from fura.recipes.data.prompts import PromptFormatter
    from fura.recipes.data.sft import sft_dataset
    from fura.recipes.loading import load_model_for_method
    from fura.recipes.sft import SFTTrainingArguments, build_trainer, load_tokenizer

    model, _ = load_model_for_method("qlora", str(tiny_model_dir), "float32")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert before and all(p.dtype == torch.float32 for p in before.values())
    formatter = PromptFormatter("fura", load_tokenizer(str(tiny_model_dir)))
    rows = sft_dataset([Example(instruction="q", output="the correct answer is true", answer="true")] * 2, formatter)
    trainer = build_trainer(
        model, formatter.tokenizer, rows, None, SFTTrainingArguments(str(tmp_path), use_cpu=True), []
    )
    after = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert after.keys() == before.keys()
    assert all(after[n].dtype == torch.float32 and torch.equal(after[n], before[n]) for n in before)


@pytest.mark.parametrize(
    ("flags", "refused"),
    [
        (["--padding_free"], "padding_free"),
        (["--assistant_only_loss"], "assistant_only_loss"),
        (["--dataset_kwargs", '{"skip_prepare_dataset": true}'], "dataset_kwargs"),
    ],
)
def test_sft_config_settings_that_do_not_fit_the_rows_are_refused(tiny_model_dir, capsys, flags, refused) -> None:
    argv = ["train", "sft", "--model", str(tiny_model_dir), "--data", "a.json", "--print-config", *flags]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert f"--{refused}:" in capsys.readouterr().err
