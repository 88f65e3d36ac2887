"""Every error a user can cause ends in one line on stderr and exit status 2 (130 for Ctrl-C) — never a traceback,
never a deleted input, never a success on a broken model."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fura_cli.commands as cli

from .test_cli import one_line_error, run_cli, trained_adapter  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = "adapter_model.safetensors"


def _edit_config(folder: Path, change) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _edit_tensors(folder: Path, change) -> None:
    tensors = load_file(folder / WEIGHTS)
    save_file(change(tensors), folder / WEIGHTS)


def _first(tensors: dict, part: str) -> str:
    return next(key for key in sorted(tensors) if part in key)


def _reshape_core(tensors: dict) -> dict:
    key = _first(tensors, "fura_core")
    tensors[key] = torch.zeros(*tensors[key].shape[:-1], tensors[key].shape[-1] + 1)
    return tensors


def _extra_key(tensors: dict) -> dict:
    key = _first(tensors, "fura_core")
    tensors[key.replace(".weight", ".bias")] = torch.zeros(3, 3)
    return tensors


def _poison(value: float, part: str):
    def change(tensors: dict) -> dict:
        key = _first(tensors, part)
        tensors[key] = tensors[key].clone().reshape(-1)
        tensors[key][0] = value
        tensors[key] = tensors[key].reshape(load_shape(tensors, key))
        return tensors

    return change


def load_shape(tensors: dict, key: str) -> tuple[int, ...]:
    return tuple(tensors[key].shape)


def _as_dtype(dtype: torch.dtype, scale: float = 1.0):
    def change(tensors: dict) -> dict:
        return {k: (v * scale).to(dtype) for k, v in tensors.items()}

    return change


def _html(folder: Path) -> None:
    (folder / WEIGHTS).write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>")


def _symlink_to_system_file(folder: Path) -> None:
    (folder / WEIGHTS).unlink()
    (folder / WEIGHTS).symlink_to("/etc/passwd")


def _huge_header(folder: Path) -> None:
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", 4 << 30) + b"{}")


def _no_tensors(folder: Path) -> None:
    save_file({}, folder / WEIGHTS)


def _pickle_bin(folder: Path) -> None:
    torch.save(load_file(folder / WEIGHTS), folder / "adapter_model.bin")
    (folder / WEIGHTS).unlink()


ADAPTER_PROBES = {
    "peft_type LORA": (lambda f: _edit_config(f, lambda c: {**c, "peft_type": "LORA"}), "adapter"),
    "bogus peft_type": (lambda f: _edit_config(f, lambda c: {**c, "peft_type": "NOPE"}), "peft_type"),
    "no peft_type": (
        lambda f: _edit_config(f, lambda c: {k: v for k, v in c.items() if k != "peft_type"}),
        "peft_type",
    ),
    "config not an object": (lambda f: _edit_config(f, lambda c: [1, 2]), "adapter_config.json"),
    "rank does not match the file": (lambda f: _edit_config(f, lambda c: {**c, "rank": 3}), "adapter"),
    "core of the wrong shape": (lambda f: _edit_tensors(f, _reshape_core), "adapter"),
    "extra key of a wrong shape": (lambda f: _edit_tensors(f, _extra_key), "adapter"),
    "no tensors": (_no_tensors, "adapter"),
    "HTML page": (_html, WEIGHTS),
    "symlink to a system file": (_symlink_to_system_file, WEIGHTS),
    "header claiming 4 GiB": (_huge_header, WEIGHTS),
    ".bin pickle": (_pickle_bin, "adapter_model.bin"),
    "NaN in a core": (lambda f: _edit_tensors(f, _poison(float("nan"), "fura_core")), "non-finite"),
    "Inf in a singular value": (lambda f: _edit_tensors(f, _poison(float("inf"), "sigma")), "non-finite"),
    "int32 tensors": (lambda f: _edit_tensors(f, _as_dtype(torch.int32)), "int32"),
    "int64 tensors x1000": (lambda f: _edit_tensors(f, _as_dtype(torch.int64, 1000.0)), "int64"),
}


@pytest.mark.parametrize("probe", list(ADAPTER_PROBES))
def test_a_broken_adapter_is_one_line_and_nothing_is_written(trained_adapter, tmp_path, capsys, probe) -> None:  # noqa: F811
    _, adapter_dir, _ = trained_adapter
    broken = tmp_path / "adapter"
    shutil.copytree(adapter_dir, broken)
    damage, expected = ADAPTER_PROBES[probe]
    damage(broken)
    line = one_line_error(*run_cli(["merge", "--adapter", str(broken), "-o", str(tmp_path / "merged")], capsys)[::2])
    assert expected in line and "Fix" in line, line
    assert not (tmp_path / "merged").exists()


def test_merge_and_export_never_write_over_their_inputs_even_forced(trained_adapter, tmp_path, capsys) -> None:  # noqa: F811
    base_dir, adapter_dir, _ = trained_adapter
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(base_dir, base)
    shutil.copytree(adapter_dir, adapter)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for output in (adapter, base, tmp_path, base / "merged"):
        for command in (["merge"], ["export", "lora", "--rank", "2"]):
            argv = [*command, "--adapter", str(adapter), "--model", str(base), "-o", str(output), "--force"]
            line = one_line_error(*run_cli(argv, capsys)[::2])
            assert "which this command reads" in line
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_second_merge_into_a_folder_in_use_fails_at_once(trained_adapter, tmp_path, capsys) -> None:  # noqa: F811
    from fura.io.ownership import locked_output

    _, adapter_dir, _ = trained_adapter
    out = tmp_path / "merged"
    with locked_output(out):  # the first merge is still running
        line = one_line_error(*run_cli(["merge", "--adapter", str(adapter_dir), "-o", str(out)], capsys)[::2])
    assert "in use by another fura command" in line and not out.exists()


@pytest.mark.parametrize(
    ("model", "expected"),
    [("someorg/somemodel", "someorg/somemodel"), ("a-file", "a-file")],
)
def test_a_base_that_cannot_be_loaded_is_one_line(trained_adapter, tmp_path, capsys, model, expected) -> None:  # noqa: F811
    _, adapter_dir, _ = trained_adapter
    if model == "a-file":
        model = str(tmp_path / "a-file")
        Path(model).write_text("not a model")
    argv = ["merge", "--adapter", str(adapter_dir), "--model", model, "-o", str(tmp_path / "merged")]
    line = one_line_error(*run_cli(argv, capsys)[::2])
    assert expected in line


def test_an_adapter_whose_base_is_an_offline_hub_id_is_one_line(trained_adapter, tmp_path, capsys) -> None:  # noqa: F811
    _, adapter_dir, _ = trained_adapter
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir, adapter)
    _edit_config(adapter, lambda c: {**c, "base_model_name_or_path": "someorg/somemodel"})
    line = one_line_error(*run_cli(["merge", "--adapter", str(adapter), "-o", str(tmp_path / "merged")], capsys)[::2])
    assert "someorg/somemodel" in line


def test_a_read_only_or_full_output_is_one_line(trained_adapter, tmp_path, monkeypatch, capsys) -> None:  # noqa: F811
    import errno

    import fura.recipes.artifacts as artifacts

    _, adapter_dir, _ = trained_adapter
    argv = ["merge", "--adapter", str(adapter_dir), "-o", str(tmp_path / "merged")]
    for error in (PermissionError(errno.EACCES, "Permission denied"), OSError(errno.ENOSPC, "No space left on device")):

        def fail(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(artifacts, "atomic_directory", fail)  # root ignores chmod, so the OS error is simulated
        assert error.strerror in one_line_error(*run_cli(argv, capsys)[::2])


def test_ctrl_c_is_one_line_with_exit_130_and_says_how_to_resume(monkeypatch, capsys) -> None:
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_plugin", interrupted)
    status, _, err = run_cli(["train", "sft", "--data", "x.json"], capsys)
    assert status == 130 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "--resume" in err


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [("max_steps: [1, 2]", "max_steps"), ("max_steps: 2.9", "max_steps"), ("max_steps: true", "max_steps"),
     ("train_files: 5", "train_files"), ("seed: null", "seed")],
)  # fmt: skip
def test_yaml_values_of_the_wrong_type_are_one_line(tmp_path, capsys, yaml_text, field, monkeypatch) -> None:
    import fura.recipes.sft as sft

    monkeypatch.setattr(sft, "load_model_for_method", lambda *a, **k: pytest.fail("loaded a model"))
    config = tmp_path / "run.yaml"
    config.write_text(f"{yaml_text}\n")
    argv = ["train", "sft", "--config", str(config), "--output-dir", str(tmp_path / "run")]
    line = one_line_error(*run_cli(argv, capsys)[::2])
    assert field in line and "run.yaml" in line, line


@pytest.mark.parametrize("switch", ["--resume", "--overwrite"])
def test_training_never_writes_into_or_deletes_its_model(tmp_path, capsys, switch) -> None:
    from ..recipes.conftest import save_tiny_model
    from ..recipes.data.conftest import require_data

    model = save_tiny_model(tmp_path / "model")
    before = sorted(p.name for p in model.iterdir())
    data = require_data("commonsense", "train", "ARC-Challenge.json")
    for output in (model, tmp_path):
        argv = ["train", "sft", "--model", str(model), "--data", str(data), "--output-dir", str(output), switch]
        assert "which this command reads" in one_line_error(*run_cli(argv, capsys)[::2])
    assert sorted(p.name for p in model.iterdir()) == before


@pytest.mark.parametrize("model", ["someorg/somemodel", "a-file", "no-tokenizer"])
def test_training_a_model_that_cannot_be_loaded_is_one_line(tmp_path, capsys, model) -> None:
    from ..recipes.data.conftest import require_data, tiny_causal_lm

    if model == "a-file":
        model = str(tmp_path / "a-file")
        Path(model).write_text("not a model")
    elif model == "no-tokenizer":
        model = str(tmp_path / "no-tokenizer")
        tiny_causal_lm(96).save_pretrained(model)
    data = require_data("commonsense", "train", "ARC-Challenge.json")
    argv = ["train", "sft", "--model", model, "--data", str(data), "--max-rows-per-file", "4",
            "--val-set-size", "0", "--output-dir", str(tmp_path / "r")]  # fmt: skip
    line = one_line_error(*run_cli(argv, capsys)[::2])
    assert Path(model).name in line and "Fix" in line, line


def _rows(text: str | bytes):
    def write(path: Path) -> None:
        path.write_bytes(text if isinstance(text, bytes) else text.encode())

    return write


ROW = '{"instruction": "q", "input": "", "output": "the answer is true", "answer": "true"}'
DATA_PROBES = {
    "one JSON object": (_rows('{\n  "rows": [' + ROW + "]\n}"), [], "holds one JSON object"),
    "invalid UTF-8": (_rows(b'[{"instruction": "\xff\xfe"}]'), [], "not UTF-8"),
    "rows of empty strings": (_rows('[{"instruction": "", "input": "", "output": "", "answer": ""}]'), [], "empty"),
    "--max-steps 0": (_rows(f"[{ROW}]"), ["--max-steps", "0"], "max_steps 0 trains nothing"),
}


@pytest.mark.parametrize("probe", list(DATA_PROBES))
def test_bad_training_data_or_steps_are_one_line_before_a_model_loads(tmp_path, monkeypatch, capsys, probe) -> None:
    import fura.recipes.sft as sft

    monkeypatch.setattr(sft, "load_model_for_method", lambda *a, **k: pytest.fail("loaded a model"))
    write, flags, expected = DATA_PROBES[probe]
    data = tmp_path / "rows.json"
    write(data)
    argv = ["train", "sft", "--data", str(data), "--val-set-size", "0", "--output-dir", str(tmp_path / "run"), *flags]
    line = one_line_error(*run_cli(argv, capsys)[::2])
    assert expected in line and "Fix" in line, line


def test_fura_eval_names_its_own_data_flag(tmp_path, capsys) -> None:
    argv = ["eval", "commonsense", "--model", "smollm2", "--data", str(tmp_path / "missing")]
    line = one_line_error(*run_cli(argv, capsys)[::2])
    assert "Fix: --data" in line and "--eval-data" not in line


def test_a_second_training_on_a_folder_in_use_fails_at_once_and_deletes_nothing(tmp_path, capsys) -> None:
    import subprocess
    import sys

    from fura.io import ownership
    from fura.recipes.runs import RunFolder

    from ..io.test_ownership import HOLDER
    from ..recipes.conftest import save_tiny_model
    from ..recipes.data.conftest import require_data

    model = save_tiny_model(tmp_path / "model")
    run = RunFolder(tmp_path / "run")
    run.prepare()
    run.write_config("method: fura\n")  # the first run, still loading its model
    lock = run.root / ownership.LOCK_NAME
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, ownership.__file__, str(lock)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        data = require_data("commonsense", "train", "ARC-Challenge.json")
        for switch in ([], ["--overwrite"], ["--resume"]):
            argv = ["train", "sft", "--model", str(model), "--data", str(data), "--output-dir", str(run.root), *switch]
            line = one_line_error(*run_cli(argv, capsys)[::2])
            assert f"in use by another fura command (process {holder.pid})" in line
        assert run.config_path.read_text() == "method: fura\n"
    finally:
        holder.kill()
        holder.wait()
