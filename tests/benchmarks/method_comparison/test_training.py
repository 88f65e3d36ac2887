"""The training child: only real ``fura train sft`` flags, per-child peak memory from ``os.wait4``, failures shown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml
from benchmarks.method_comparison.experiment import ExperimentError, base_experiment
from benchmarks.method_comparison.training import Launcher, check_child, method_arg_flags, run_child, train_command

from benchmarks.method_comparison import training

from .conftest import suite_settings, write_suite


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "method_args":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[key] = value  # leaf name: the same for nested (older) and flat (newer) config dumps
    return out


def test_the_command_uses_only_flags_of_fura_train_sft_and_means_what_it_says(tmp_path):
    """The CLI itself parses the command (``--print-config``): an unknown flag or a changed meaning fails here."""
    settings = suite_settings(tmp_path / "model", tmp_path / "text.txt")
    experiment = base_experiment(write_suite(tmp_path, "cs", settings, {}))
    experiment.method = "lora"
    experiment.method_args = {"r": 18, "lora_alpha": 36, "target_modules": ["q_proj", "down_proj"], "use_dora": False}
    command = train_command(experiment, tmp_path / "train.json", 3e-4, 7, tmp_path / "run")
    assert command[:5] == [sys.executable, "-m", "fura_cli", "train", "sft"]
    done = subprocess.run([*command, "--print-config"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    config = _flat(yaml.safe_load(done.stdout))
    pairs = [item.partition("=") for item in config.get("method_arg") or []]
    method_args = config.get("method_args") or {key: yaml.safe_load(value) for key, _, value in pairs}
    assert config["method"] == "lora" and method_args == experiment.method_args
    assert config["train_files"] == [str(tmp_path / "train.json")] and config["val_set_size"] == 0
    assert (config["max_steps"], config["per_device_train_batch_size"], config["gradient_accumulation_steps"]) == (
        2,
        4,
        1,
    )
    assert config["learning_rate"] == 3e-4 and config["seed"] == 7 and config["save_steps"] == 3
    assert config["max_seq_len"] == 256 and config["output_dir"] == str(tmp_path / "run")
    assert config["warmup_steps"] == experiment.training.warmup_ratio and config["bf16"] is False


def test_method_args_round_trip_as_yaml_values():
    assert method_arg_flags({"r": 8, "init_lora_weights": "pissa_niter_4", "x": [1, "a"]}) == [
        "--method-arg",
        "r=8",
        "--method-arg",
        "init_lora_weights=pissa_niter_4",
        "--method-arg",
        "x=[1, a]",
    ]


def test_peak_memory_is_the_childs_own(tmp_path):
    """Not the harness's (pytest holds ~1 GB; a child forked from it would report that), nor an earlier child's."""
    ballast = bytearray(400 * 2**20)  # make this process clearly bigger than the small child
    ballast[::4096] = b"1" * len(ballast[::4096])
    allocate = [sys.executable, "-c", "x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096])"]
    with Launcher() as launcher:
        big = run_child(allocate, tmp_path / "big", threads=1, cpus=None, steps=1, label="big", launcher=launcher)
        small = run_child([sys.executable, "-c", "pass"], tmp_path / "small", 1, None, 1, "small", launcher)
    assert big.returncode == 0 and small.returncode == 0
    assert big.peak_rss_bytes > 300 * 2**20 and small.peak_rss_bytes < 100 * 2**20
    assert big.wall_s > 0 and big.log_path.read_text().startswith(sys.executable)
    del ballast


def test_a_failed_child_is_an_error_with_its_log(tmp_path):
    failing = [sys.executable, "-c", "import sys; print('boom: bad flag'); sys.exit(3)"]
    result = run_child(failing, tmp_path / "run", threads=1, cpus=[0], steps=1, label="fail")
    assert result.returncode == 3
    with pytest.raises(ExperimentError, match=r"exit status 3(.|\n)*boom: bad flag"):
        check_child(result, tmp_path / "run")


@pytest.mark.parametrize("bf16_instructions", [True, False])
def test_bf16_on_a_cpu_without_bf16_instructions_is_named(monkeypatch, caplog, bf16_instructions):
    import torch
    from benchmarks.method_comparison.training import precision_flags

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16_instructions)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert precision_flags("bf16") == ["--bf16", "true", "--use-cpu", "true"]
    assert ("20x slower than float32" in caplog.text) is not bf16_instructions
    assert precision_flags("no") == ["--bf16", "false", "--fp16", "false"]


def test_the_progress_bar_ignores_the_metrics_of_an_earlier_attempt(tmp_path, monkeypatch):
    """A run cut off at step 140 is trained again from scratch: its progress starts at 0, not at the old file's 140."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stale = run_dir / "metrics.jsonl"
    stale.write_text(json.dumps({"step": 140, "loss": 1.0}) + "\n")
    os.utime(stale, (time.time() - 60, time.time() - 60))
    shown = []

    class Bar:
        n = 0

        def __init__(self, **kwargs):
            pass

        def update(self, by):
            self.n += by
            shown.append(self.n)

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            pass

    monkeypatch.setattr(training, "tqdm", Bar)
    child = (  # the new attempt logs its first step after a while, as a real child does
        "import json, pathlib, time; time.sleep(2.5); "
        f"pathlib.Path({str(stale)!r}).write_text(json.dumps({{'step': 10, 'loss': 2.0}}) + '\\n'); time.sleep(2.5)"
    )
    assert run_child([sys.executable, "-c", child], run_dir, 1, None, 150, "again").returncode == 0
    assert shown and max(shown) == 10
