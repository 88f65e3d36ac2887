"""benchmarks/gpu_check.py: its CPU dry run end to end (so the GPU script cannot rot), goals, install plan, failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks.goals import gpu_goals

from benchmarks import gpu_check

SCRIPT = Path(gpu_check.__file__)
CHECKS = [
    "environment",
    "install",
    "cuda-marked tests",
    "core tests",
    "bench 8b (tiny)",
    "bench 3b (tiny)",
    "init exactness",
    "merge/unmerge exactness",
    "qfura-nf4 forward/backward",
    "qfura forward/backward (bitsandbytes 4-bit base)",
]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu-check")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
        cwd=gpu_check.ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**gpu_check.child_env(), "OMP_NUM_THREADS": "1"},
    )
    return done, out


def test_dry_run_passes_every_check_and_writes_one_report(dry_run) -> None:
    done, out = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.json", "gpu-check.md"]
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["ok"] and report["dry_run"]
    statuses = {check["name"]: check["status"] for check in report["checks"]}
    assert list(statuses) == CHECKS
    assert statuses.pop("install") == "skipped"  # the dry run prints the pip commands instead of running them
    assert set(statuses.values()) == {"passed"}, statuses
    assert report["checks"][1]["data"]["commands"][-1].endswith(
        "--no-deps --no-build-isolation -e " + str(SCRIPT.parents[1])
    )
    for key, methods in (("8b", gpu_check.METHODS_8B), ("3b", gpu_check.METHODS_3B)):
        bench = report["bench"][key]
        assert list(bench["methods"]) == list(methods)
        assert bench["environment"]["dtype"] == "bfloat16"
    assert "memory" in report["bench"]["8b"]["methods"]["fura"]  # the 8B run measures peak memory
    assert all(goal["value"] is not None and goal["met"] is not None for goal in report["goals"])
    markdown = (out / "gpu-check.md").read_text()
    assert "DRY RUN" in markdown and "## Goals" in markdown and "| fura |" in markdown


def test_goals_are_met_or_not_from_the_bench_figures() -> None:
    def bench(steps: dict[str, float], peaks: dict[str, int] | None = None, tokens: dict[str, float] | None = None):
        methods = {}
        for label, step in steps.items():
            methods[label] = {"step": {"median": step}, "tokens_per_second": (tokens or {}).get(label)}
            if peaks:
                methods[label]["memory"] = {"peak_bytes": peaks[label]}
        return {"methods": methods}

    eight_b = bench({"fura": 0.046, "lora-r64": 0.050, "full": 0.201}, peaks={"fura": 85, "lora-r64": 100, "full": 1})
    three_b = bench({"fura": 1.0, "lora-r32": 1.0}, tokens={"fura": 7000.0, "lora-r32": 7174.0})
    goals = gpu_goals({"8b": eight_b, "3b": three_b})
    assert [goal["met"] for goal in goals] == [True, True, True, False]
    assert goals[0]["value"] == pytest.approx(0.92) and goals[2]["value"] == pytest.approx(0.201 / 0.046)
    missing = gpu_goals({"8b": None, "3b": None})
    assert [goal["met"] for goal in missing] == [None] * 4


def test_every_cuda_test_file_states_what_it_needs() -> None:
    assert set(gpu_check.cuda_test_files()) == set(gpu_check.CUDA_TEST_NEEDS)


def test_install_plan_takes_missing_requirements_from_the_wheel_folder(tmp_path: Path) -> None:
    versions = {"transformers": "5.17.0", "peft": "0.21.2", "tqdm": None, "pytest": "8.3.0"}
    assert gpu_check.unsatisfied(["transformers>=5.0", "peft>=0.22", "tqdm>=4.66", "pytest>=8"], versions.get) == [
        "peft>=0.22",
        "tqdm>=4.66",
    ]
    (tmp_path / "bitsandbytes-0.50.0-py3-none-manylinux_2_24_x86_64.whl").touch()
    pin = tmp_path / "torch.txt"
    commands = gpu_check.install_commands(tmp_path, ["tqdm>=4.66"], ["bitsandbytes>=0.45", "other>=1"], pin)
    assert commands[0][-4:] == [f"--find-links={tmp_path}", f"--constraint={pin}", "tqdm>=4.66", "bitsandbytes>=0.45"]
    assert "--no-index" in commands[0]
    assert commands[1][-4:] == ["--no-deps", "--no-build-isolation", "-e", str(gpu_check.ROOT)]
    assert len(gpu_check.install_commands(None, ["tqdm>=4.66"], [], pin)) == 1  # no wheel folder: fura alone


def test_a_failing_step_is_a_failed_check_with_its_reason(tmp_path: Path) -> None:
    run = gpu_check.BenchRun("x", "a broken run", "tiny", ("fura", "lora-huge"), 1, 8, 1, 0, False, 120)
    check, report = gpu_check.check_bench(run, gpu_check.make_plan(dry_run=True), gpu_check.Budget(300), tmp_path)
    assert check.status == "failed" and report is None
    assert "exit status" in check.detail and "lora-huge" in "\n".join(check.data["tail"])
    slow = gpu_check.run_child([sys.executable, "-c", "import time; time.sleep(30)"], timeout=1, label="slow")
    assert slow.returncode is None and not slow.ok and "killed at its time limit" in slow.tail[-1]
    assert gpu_check.run_child(["true"], timeout=0, label="late").returncode is None  # the budget is spent
