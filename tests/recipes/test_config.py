"""Run configs: dataclass defaults < YAML < flags, clear errors, method defaults filled per track."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from fura.recipes.cli_args import parse_key_values
from fura.recipes.config import SFTRunConfig, build_config, config_to_dict, dump_yaml
from fura.recipes.sft import add_arguments, config_from_args, resolve_config


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_are_the_reference_launcher_values() -> None:
    config = SFTRunConfig()
    t = config.training
    assert (t.adam_beta1, t.adam_beta2, t.weight_decay, t.lr_scheduler_type, t.warmup_ratio) == (
        0.9, 0.95, 0.0, "linear", 0.03,
    )  # fmt: skip
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.num_train_epochs, t.seed) == (8, 2, 3, 43)
    assert (config.data.max_seq_len, config.data.val_set_size, config.data.seed) == (2048, 100, 43)


def test_flags_override_yaml_which_overrides_defaults(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "method: lora\nmethod_args: {r: 8, lora_alpha: 16}\n"
        "data: {train_files: [a.json], max_seq_len: 256}\ntraining: {learning_rate: 1.0e-3, max_steps: 7}\n"
    )
    args = parse(
        ["--config", str(path), "--lr", "5e-4", "--method-arg", "r=4", "--seed", "7", "--no-gradient-checkpointing"]
    )
    config = config_from_args(args)
    assert config.method == "lora"  # YAML
    assert config.training.learning_rate == 5e-4  # flag beats YAML
    assert config.training.max_steps == 7 and config.data.max_seq_len == 256  # YAML
    assert config.method_args == {"r": 4, "lora_alpha": 16}  # merged key by key
    assert config.training.seed == config.data.seed == 7
    assert config.training.gradient_checkpointing is False
    assert config.training.per_device_train_batch_size == 8  # default


def test_unknown_settings_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("training: {learnig_rate: 1.0e-3}\n")
    with pytest.raises(ValueError, match=r"learnig_rate.*learning_rate"):
        build_config(SFTRunConfig, path)
    with pytest.raises(ValueError, match="is a section"):
        build_config(SFTRunConfig, overrides={"training": 3})


def test_key_value_parsing() -> None:
    assert parse_key_values(["r=16", "target_modules=[q_proj, v_proj]", "use_dora=true", "name=x"]) == {
        "r": 16, "target_modules": ["q_proj", "v_proj"], "use_dora": True, "name": "x",
    }  # fmt: skip
    with pytest.raises(argparse.ArgumentTypeError):
        parse_key_values(["no-equals-sign"])


@pytest.mark.parametrize(
    ("method", "track", "lr", "optim", "checkpointing"),
    [
        ("fura", "commonsense", 2e-4, "adamw_torch", False),
        ("full", "rl", 1e-5, "adamw_torch", False),
        ("lora", "rl", 9e-5, "adamw_torch", False),
        ("qlora", "commonsense", 2e-4, "paged_adamw_8bit", True),
    ],
)
def test_method_defaults_fill_unset_training_values(method, track, lr, optim, checkpointing) -> None:
    config = build_config(SFTRunConfig, overrides={"method": method, "track": track, "data.train_files": ["x"]})
    resolved = resolve_config(config)
    assert (resolved.training.learning_rate, resolved.training.optim) == (lr, optim)
    assert resolved.training.gradient_checkpointing is checkpointing
    assert resolved.output_dir == str(Path("runs") / f"smollm2-{method}")
    assert config.training.learning_rate is None  # the input config is not modified


def test_user_values_win_over_method_defaults() -> None:
    overrides = {"method": "qlora", "training.optim": "adamw_torch", "training.learning_rate": 1e-5}
    config = build_config(SFTRunConfig, overrides={**overrides, "data.train_files": ["x"]})
    resolved = resolve_config(config)
    assert (resolved.training.learning_rate, resolved.training.optim) == (1e-5, "adamw_torch")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({}, "no training data"),
        ({"method": "nope"}, "unknown method"),
        ({"track": "vision"}, "unknown track"),
        ({"eval.kind": "commonsense"}, "needs eval.data"),
        ({"training.warmup_ratio": 3}, "warmup_ratio"),
        ({"training.eval_steps": 5, "data.val_set_size": 0}, "held-out rows"),
    ],
)
def test_validation_errors(overrides, message) -> None:
    base = {"data.train_files": ["x"]} if overrides else {}
    with pytest.raises(ValueError, match=message):
        resolve_config(build_config(SFTRunConfig, overrides={**base, **overrides}))


def test_config_round_trips_through_yaml(tmp_path: Path) -> None:
    config = build_config(SFTRunConfig, overrides={"data.train_files": ["a.json"], "eval.tasks": ["boolq"]})
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(config_to_dict(config)))
    assert yaml.safe_load(path.read_text())["data"]["train_files"] == ["a.json"]
    assert build_config(SFTRunConfig, path) == config
