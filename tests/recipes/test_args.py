"""Recipe settings through TRL's TrlParser: defaults < YAML < flags, clear errors, method defaults filled per track."""

from __future__ import annotations

from pathlib import Path

import pytest

from fura.recipes.args import RecipeArgumentError, parse_key_values
from fura.recipes.sft import parse_settings, resolve_settings

DATA = ["--data", "x.json"]


def test_defaults_are_the_reference_launcher_values() -> None:
    t = parse_settings(DATA).training
    assert (t.adam_beta1, t.adam_beta2, t.weight_decay, t.lr_scheduler_type, t.warmup_steps) == (
        0.9, 0.95, 0.0, "linear", 0.03,
    )  # fmt: skip
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.num_train_epochs, t.seed) == (8, 2, 3, 43)
    assert (t.max_grad_norm, t.optim, t.save_steps, t.logging_steps) == (0.0, "adamw_torch", 500, 10)
    data = parse_settings(DATA).data
    assert (data.max_seq_len, data.val_set_size) == (2048, 100)


def test_flags_override_yaml_which_overrides_defaults(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "method: lora\nmethod_arg: [r=8, lora_alpha=16]\ntrain_files: [a.json]\nmax_seq_len: 256\n"
        "learning_rate: 1e-3\nmax_steps: 7\n"  # YAML reads 1e-3 as a string: converted like the flag
    )
    settings = parse_settings(["--config", str(path), "--learning-rate", "5e-4", "--method-arg", "r=4", "--seed", "7"])
    assert settings.run.method == "lora"  # YAML
    assert settings.training.learning_rate == 5e-4  # the flag beats the YAML
    assert settings.training.max_steps == 7 and settings.data.max_seq_len == 256  # YAML
    assert settings.run.method_args() == {"r": 4, "lora_alpha": 16}  # flags extend the YAML's list; the last wins
    assert settings.training.seed == 7
    assert settings.training.per_device_train_batch_size == 8  # default
    assert {"method", "learning_rate", "max_steps", "seed"} <= settings.explicit
    assert "per_device_train_batch_size" not in settings.explicit


def test_repeated_method_args_extend_each_other() -> None:
    settings = parse_settings(
        [*DATA, "--method-arg", "r=18", "--method-arg", "lora_alpha=36", "--max-rows-per-file", "3"]
    )
    assert settings.run.method_args() == {"r": 18, "lora_alpha": 36}
    assert settings.data.max_rows_per_file == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--learning-rat", "1"], r"unknown flag --learning-rat \(did you mean --learning-rate\?\)"),
        (["--lerning_rate=1"], r"unknown flag --lerning_rate \(did you mean --learning_rate\?\)"),
        (["--config", "missing.yaml"], r"missing.yaml: no such file"),
    ],
)
def test_unknown_flags_are_errors_and_prefixes_do_not_match(argv, message) -> None:
    with pytest.raises(RecipeArgumentError, match=message):
        parse_settings([*DATA, *argv])


def test_yaml_errors_name_the_file_the_key_and_the_fix(tmp_path: Path) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text("learnig_rate: 1.0e-3\n")
    expected = r"typo.yaml: unknown setting 'learnig_rate' \(did you mean learning_rate"
    with pytest.raises(RecipeArgumentError, match=expected):
        parse_settings(["--config", str(typo)])
    broken = tmp_path / "broken.yaml"
    broken.write_text("method: lora\nlearning_rate: [1\n")
    with pytest.raises(RecipeArgumentError, match=r"broken.yaml: line \d+, column \d+ is not valid YAML"):
        parse_settings(["--config", str(broken)])
    wrong_type = tmp_path / "type.yaml"
    wrong_type.write_text("max_steps: many\n")
    with pytest.raises(RecipeArgumentError, match=r"type.yaml: max_steps: cannot read 'many' \(int expected\)"):
        parse_settings(["--config", str(wrong_type)])


def test_yaml_false_for_a_field_that_defaults_to_true(tmp_path: Path) -> None:
    """A bool field defaulting to True has two flags (--x, --no_x) sharing one destination: the YAML sets both."""
    path = tmp_path / "run.yaml"
    path.write_text("train_files: [a.json]\ndataloader_pin_memory: false\n")
    settings = parse_settings(["--config", str(path)])
    assert settings.training.dataloader_pin_memory is False and "dataloader_pin_memory" in settings.explicit


def test_parser_level_defaults_do_not_count_as_set_by_the_user() -> None:
    from fura.recipes.sft import build_parser

    parser = build_parser()
    parser.set_defaults(track="rl")
    parsed = parser.parse(DATA)
    assert parsed.values[0].track == "rl" and "track" not in parsed.explicit


def test_key_value_parsing() -> None:
    assert parse_key_values(["r=16", "target_modules=[q_proj, v_proj]", "use_dora=true", "name=x"]) == {
        "r": 16, "target_modules": ["q_proj", "v_proj"], "use_dora": True, "name": "x",
    }  # fmt: skip
    assert parse_key_values({"r": 8}) == {"r": 8}
    with pytest.raises(RecipeArgumentError, match="KEY=VALUE"):
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
    settings = parse_settings([*DATA, "--method", method, "--track", track])
    resolved = resolve_settings(settings)
    assert (resolved.training.learning_rate, resolved.training.optim) == (lr, optim)
    assert bool(resolved.training.gradient_checkpointing) is checkpointing
    assert resolved.training.output_dir == str(Path("runs") / f"smollm2-{method}")
    assert "output_dir" not in settings.explicit and not resolved.explicit - settings.explicit


def test_user_values_win_over_method_defaults() -> None:
    settings = parse_settings([*DATA, "--method", "qlora", "--optim", "adamw_torch", "--learning_rate", "1e-5"])
    resolved = resolve_settings(settings)
    assert (resolved.training.learning_rate, resolved.training.optim) == (1e-5, "adamw_torch")


def test_checkpointing_set_under_its_old_name_wins_over_the_method_default() -> None:
    """qlora defaults to activation checkpointing; the user's gradient_checkpointing (transformers' old name) wins."""
    resolved = resolve_settings(parse_settings([*DATA, "--method", "qlora", "--gradient_checkpointing", "false"]))
    assert resolved.training.activation_checkpointing is False
    new_name = resolve_settings(parse_settings([*DATA, "--method", "qlora", "--activation-checkpointing", "false"]))
    assert new_name.training.activation_checkpointing is False


def test_written_settings_hold_no_masked_secrets() -> None:
    assert not [k for k, v in parse_settings(DATA).to_dict().items() if isinstance(v, str) and v.endswith("_TOKEN>")]


def test_eval_steps_alone_turns_on_the_periodic_held_out_loss() -> None:
    assert resolve_settings(parse_settings([*DATA, "--eval-steps", "5"])).training.eval_strategy == "steps"
    assert resolve_settings(parse_settings(DATA)).training.eval_strategy == "no"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "nope"], "unknown method 'nope'"),
        (["--track", "vision"], "unknown track 'vision'"),
        (["--eval", "commonsense"], "needs eval_data"),
        (["--eval", "sometimes"], "invalid choice"),
    ],
)
def test_validation_errors(argv, message) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_settings(parse_settings([*DATA, *argv]))


def test_written_settings_are_a_config_file_that_reproduces_them(tmp_path: Path) -> None:
    from fura.recipes.args import dump_yaml

    settings = resolve_settings(parse_settings([*DATA, "--eval-tasks", "boolq", "--method-arg", "r=3"]))
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(settings.to_dict()))
    again = parse_settings(["--config", str(path)])
    assert again.to_dict() == settings.to_dict()


@pytest.mark.parametrize(
    ("bf16", "cpu_bf16", "warned"), [(True, False, True), (True, True, False), (False, False, False)]
)
def test_bf16_on_a_cpu_without_bf16_instructions_is_named(monkeypatch, caplog, bf16, cpu_bf16, warned):
    import types

    import torch

    from fura.recipes.args import warn_slow_bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: cpu_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert warn_slow_bf16(types.SimpleNamespace(bf16=bf16)) is warned
    assert ("20x slower than float32" in caplog.text) is warned
