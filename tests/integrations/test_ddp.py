"""DDP on CPU: ``accelerate launch`` (configs/accelerate/ddp.yaml, 2 processes, gloo) of ``fura train sft`` on a tiny
FuRA model gives the losses and the adapter file of a single-process run with the same global batch and seed.

Global batch 8 both ways: single process 2 x grad-accum 4, DDP 2 x 2 processes x grad-accum 2. Each optimizer step
sees the same eight rows in the same micro-batches (``accelerate``'s seedable sampler gives every rank the same order
and rank ``r`` takes micro-batches ``r, r+2, ...``), and ``transformers`` divides every rank's token-summed loss by the
token count of the whole global batch, so the two runs differ only by the order of floating-point sums.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import CONFIGS, PYTHON, finish, free_port, start

STEPS = 3
LOSS_ATOL = 1e-5
ADAPTER_ATOL = 1e-6
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sft_args(model_dir: Path, data: Path, out: Path, grad_accum: int) -> list[str]:
    return [
        "-m", "fura_cli", "train", "sft",
        "--model", str(model_dir), "--method", "fura", "--dtype", "float32",
        "--data", str(data), "--val-set-size", "4", "--max-seq-len", "256",
        "--max-steps", str(STEPS), "--per-device-train-batch-size", "2",
        "--gradient-accumulation-steps", str(grad_accum), "--learning-rate", "1e-2", "--warmup-steps", "0",
        "--logging-steps", "1", "--save-steps", "2", "--bf16", "false", "--fp16", "false", "--seed", "7",
        "--output-dir", str(out),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, sft_data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The single-process and the 2-process DDP run, launched side by side."""
    root = tmp_path_factory.mktemp("ddp-vs-single")
    single = [PYTHON, *sft_args(tiny_model_dir, sft_data_file, root / "single", grad_accum=4)]
    launch = [PYTHON, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "ddp.yaml")]
    launch += ["--num_processes", "2", "--main_process_port", str(free_port())]
    ddp = [*launch, *sft_args(tiny_model_dir, sft_data_file, root / "ddp", grad_accum=2)]
    processes = {"single": start(single, root / "single.log"), "ddp": start(ddp, root / "ddp.log")}
    for name, process in processes.items():
        finish(process, root / f"{name}.log")
    return {"single": root / "single", "ddp": root / "ddp"}


def records(run: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "eval_loss" in r]


def test_ddp_losses_equal_single_process(runs: dict[str, Path]) -> None:
    (single, single_eval), (ddp, ddp_eval) = records(runs["single"]), records(runs["ddp"])
    assert [r["step"] for r in single] == [r["step"] for r in ddp] == list(range(1, STEPS + 1))
    for one, two in zip(single, ddp, strict=True):
        assert abs(one["loss"] - two["loss"]) <= LOSS_ATOL, (one, two)
        assert one["lr"] == pytest.approx(two["lr"], rel=1e-12)
        assert one["epoch"] == pytest.approx(two["epoch"])
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    assert len(single_eval) == len(ddp_eval) == 1
    assert abs(single_eval[0]["eval_loss"] - ddp_eval[0]["eval_loss"]) <= LOSS_ATOL
    # the runs really trained (otherwise equal losses would prove nothing)
    assert single[0]["loss"] - single[-1]["loss"] > 1e-3


def test_ddp_adapter_equals_single_process_adapter(runs: dict[str, Path]) -> None:
    single = load_file(runs["single"] / "adapter" / "adapter_model.safetensors")
    ddp = load_file(runs["ddp"] / "adapter" / "adapter_model.safetensors")
    assert sorted(single) == sorted(ddp) and single
    for key, tensor in single.items():
        assert ddp[key].dtype == tensor.dtype and ddp[key].shape == tensor.shape, key
        assert torch.allclose(ddp[key], tensor, rtol=0.0, atol=ADAPTER_ATOL), key
    configs = [json.loads((runs[name] / "adapter" / "adapter_config.json").read_text()) for name in ("single", "ddp")]
    for config in configs:  # saved from a set: the order depends on the process's hash seed
        config["target_modules"] = sorted(config["target_modules"])
    assert configs[0] == configs[1]


def test_ddp_run_folder_is_written_once_by_the_main_process(runs: dict[str, Path]) -> None:
    run = runs["ddp"]
    for name in ("config.yaml", "method.json", "results.json", "adapter/adapter_config.json", "adapter/tokenizer.json"):
        assert (run / name).is_file(), name
    assert (run / "loss.png").read_bytes().startswith(PNG_MAGIC)
    log = (run / "train.log").read_text()
    assert log.count("run folder ") == 1 and log.count("done: ") == 1  # rank 1 logs to the console only
    # two processes in one process group: each saved its RNG state into the same checkpoint
    checkpoint = run / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    results = json.loads((run / "results.json").read_text())
    assert results["train"]["global_step"] == STEPS
    assert not list(run.glob(".*tmp*")), "a staging folder or temporary file was left behind"
