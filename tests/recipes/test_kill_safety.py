"""Runs killed with SIGKILL (no cleanup, no exception handlers) resume to the uninterrupted result.

Each scenario runs ``fura train sft`` (or ``fura merge``) in a subprocess that kills itself at a chosen point — or is
killed from outside after a random delay — and then runs the same command again with ``--resume``. A patched
function in the subprocess picks the point; the library itself has no test hooks.
"""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STEPS = 4

#: Runs the fura CLI in a fresh interpreter; KILL_AT names the moment it SIGKILLs itself.
DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    kill_at = os.environ.get("KILL_AT", "")

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if kill_at.startswith("rename:"):  # inside an atomic save: files written to staging, before the rename
        from fura.io import files
        real = files.normal_permissions
        prefix = "." + kill_at.split(":", 1)[1] + ".staging-"
        files.normal_permissions = lambda path: die() if os.path.basename(path).startswith(prefix) else real(path)
    elif kill_at == "after_save":  # the trained adapter is saved; results.json is not written yet
        from fura.recipes import sft
        sft.run_evaluation = die
    import fura_cli.commands as cli
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def fura(argv: list[str], kill_at: str = "", **popen) -> subprocess.Popen:
    env = {**os.environ, "KILL_AT": kill_at, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-c", DRIVER, *argv], env=env, **popen)


def run(argv: list[str], kill_at: str = "") -> int:
    process = fura(argv, kill_at, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = process.communicate(timeout=600)
    if process.returncode not in (0, -signal.SIGKILL):
        print(err.decode())
    return process.returncode


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    rows = [
        {"instruction": f"Is {i} even? Answer format: true/false", "input": "", "output": f"the correct answer is "
         f"{'true' if i % 2 == 0 else 'false'}", "answer": "true" if i % 2 == 0 else "false"}
        for i in range(24)
    ]  # fmt: skip
    path = tmp_path_factory.mktemp("data") / "even.json"
    path.write_text(json.dumps(rows))
    return path


def train_argv(model_dir: Path, data: Path, out: Path) -> list[str]:
    return [
        "-q", "train", "sft", "--model", str(model_dir), "--dtype", "float32", "--data", str(data),
        "--val-set-size", "2", "--max-seq-len", "256", "--per-device-train-batch-size", "2",
        "--gradient-accumulation-steps", "1", "--max-steps", str(STEPS), "--save-steps", "2", "--logging-steps", "1",
        "--output-dir", str(out),
    ]  # fmt: skip


def steps(out: Path) -> list[int]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5, msg=key)


def hidden(folder: Path) -> list[str]:
    """Hidden leftovers of a write (staging copies), not fura's ownership marker or a lock file."""
    from fura.io.ownership import MARKER_NAME

    return sorted(
        p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != MARKER_NAME and p.suffix != ".lock"
    )


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, data_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "straight"
    assert run(train_argv(tiny_model_dir, data_file, out)) == 0
    assert steps(out) == list(range(1, STEPS + 1))
    return out


@pytest.mark.parametrize("kill_at", ["rename:adapter", "after_save"])
def test_killed_during_or_after_the_final_save_resumes_to_the_same_adapter(
    tiny_model_dir, data_file, uninterrupted, tmp_path, kill_at
) -> None:
    out = tmp_path / "run"
    argv = train_argv(tiny_model_dir, data_file, out)
    assert run(argv, kill_at) == -signal.SIGKILL
    assert not (out / "results.json").exists()
    if kill_at.startswith("rename"):
        assert not (out / "adapter").exists() and hidden(out)  # the half-saved adapter is a staging folder
    assert run([*argv, "--resume"]) == 0
    assert steps(out) == list(range(1, STEPS + 1))  # nothing trained past --max-steps, no step twice
    assert json.loads((out / "results.json").read_text())["train"]["global_step"] == STEPS
    assert_same_adapter(adapter(out), adapter(uninterrupted))
    assert hidden(out) == []  # staging swept


def test_resuming_a_finished_run_is_a_clear_no_op(tiny_model_dir, data_file, uninterrupted, tmp_path) -> None:
    out = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(uninterrupted), str(out)], check=True)
    stamp = (out / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    argv = train_argv(tiny_model_dir, data_file, out)
    process = fura([*argv[1:], "--resume"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0
    assert "holds a finished run" in output.decode() and "nothing to resume" in output.decode()
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    assert steps(out) == list(range(1, STEPS + 1))


def test_killed_at_random_moments_ends_at_the_uninterrupted_result(
    tiny_model_dir, data_file, uninterrupted, tmp_path
) -> None:
    out = tmp_path / "random"
    argv = train_argv(tiny_model_dir, data_file, out)
    delays = random.Random(7).sample([2.0, 4.0, 5.0, 6.0, 7.0, 8.0], 3)
    for attempt, delay in enumerate(delays):
        process = fura([*argv, "--resume"] if attempt else argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert run([*argv, "--resume"]) == 0
    assert steps(out) == list(range(1, STEPS + 1))
    assert_same_adapter(adapter(out), adapter(uninterrupted))
    assert hidden(out) == []


def test_a_run_that_failed_before_its_first_step_does_not_block_the_corrected_command(
    tiny_model_dir, data_file, tmp_path
) -> None:
    out = tmp_path / "run"
    argv = train_argv(tiny_model_dir, data_file, out)
    assert run([*argv, "--method-arg", "bogus=1"]) == 2  # found after the run folder was prepared
    assert (out / "config.yaml").exists() and not (out / "checkpoints").exists()
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert run([*argv[:8], str(empty), *argv[9:]]) == 2  # empty data: refused before anything is written
    assert run(argv) == 0  # no --overwrite needed
    assert steps(out) == list(range(1, STEPS + 1))


def test_run_folders_are_written_with_the_users_normal_permissions(uninterrupted) -> None:
    mask = os.umask(0o022)
    os.umask(mask)
    for path in (uninterrupted / "adapter", uninterrupted / "checkpoints"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~mask, path
    checkpoint_files = [p.relative_to(uninterrupted) for p in uninterrupted.glob("checkpoints/*/*") if p.is_file()]
    assert checkpoint_files
    for path in ("config.yaml", "results.json", "method.json", "adapter/adapter_model.safetensors", *checkpoint_files):
        assert stat.S_IMODE((uninterrupted / path).stat().st_mode) == 0o666 & ~mask, path


def test_a_killed_merge_leaves_nothing_the_next_merge_does_not_sweep(uninterrupted, tmp_path) -> None:
    target = tmp_path / "merged"
    argv = ["merge", "--adapter", str(uninterrupted), "-o", str(target), "--dtype", "float32"]
    assert run(argv, "rename:merged") == -signal.SIGKILL
    assert not target.exists() and len(hidden(tmp_path)) == 1  # a full-size model copy in staging
    assert run(argv) == 0
    assert hidden(tmp_path) == [] and (target / "config.json").exists()
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((target / "config.json").stat().st_mode) == 0o666 & ~mask
