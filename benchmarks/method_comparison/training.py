"""Training through the project's own recipes: ``python -m fura_cli train sft ...`` (task ``rl``: ``train grpo``) in a
child process, measured.

The child is the command a user would type (only flags of ``fura train sft``), so the comparison measures the
product, not a copy of it. A small launcher process (:mod:`benchmarks.method_comparison.launcher`) starts it and reaps
it with :func:`os.wait4`, whose ``ru_maxrss`` is the child's own peak resident memory — not the harness's, which
Linux would carry into any child the (large) harness started itself, and not an earlier child's. While it waits the
harness follows the run's ``metrics.jsonl`` and shows the step and the loss.

The child runs with ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` = ``threads``, pinned to ``cpus`` when given
(``os.sched_setaffinity``), offline (``HF_HUB_OFFLINE=1``), and its output goes to ``<run>/child.log``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from benchmarks.method_comparison.experiment import Experiment, ExperimentError

logger = logging.getLogger(__name__)


@dataclass
class ChildResult:
    """How a training child went.

    Attributes:
        returncode: the exit status (negative: killed by that signal).
        wall_s: wall-clock seconds from start to exit (model loading and saving included).
        peak_rss_bytes: the child's peak resident set size.
        log_path: where its output went.
    """

    returncode: int
    wall_s: float
    peak_rss_bytes: int
    log_path: Path


def method_arg_flags(method_args: dict[str, Any]) -> list[str]:
    """``--method-arg KEY=VALUE`` pairs; values as YAML flow scalars / lists (what the CLI parses back)."""
    flags = []
    for key, value in method_args.items():
        text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
        text = text.removesuffix("\n...").strip()
        flags += ["--method-arg", f"{key}={text}"]
    return flags


def precision_flags(mode: str) -> list[str]:
    """transformers' flags for ``training.mixed_precision``: ``no`` → float32 compute; ``bf16`` → bf16 autocast,
    with ``--use-cpu true`` on a machine without CUDA (transformers accepts bf16 on the CPU only with it)."""
    if mode == "no":
        return ["--bf16", "false", "--fp16", "false"]
    import torch

    if torch.cuda.is_available():
        return ["--bf16", "true"]
    if not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        logger.warning(
            "training.mixed_precision bf16 on a CPU without AVX512-BF16 or AMX (%s): bf16 autocast runs about 20x "
            'slower than float32 here. Fix: mixed_precision: "no" (a different setting, so new runs)',
            torch.backends.cpu.get_cpu_capability(),
        )
    return ["--bf16", "true", "--use-cpu", "true"]


def train_command(
    experiment: Experiment,
    train_file: Path,
    learning_rate: float,
    seed: int,
    run_dir: Path,
    val_file: Path | None = None,
) -> list[str]:
    """The ``fura train sft`` command line of one run (one epoch over ``train_file``, no held-out rows); task ``rl``:
    :func:`grpo_command`."""
    if experiment.task == "rl":
        return grpo_command(experiment, train_file, val_file, learning_rate, seed, run_dir)
    t = experiment.training
    return [
        sys.executable,
        "-m",
        "fura_cli",
        "train",
        "sft",
        "--model",
        experiment.model,
        "--method",
        experiment.method,
        *method_arg_flags(experiment.method_args),
        "--data",
        str(train_file),
        "--prompt-style",
        t.prompt_style,
        "--max-steps",
        str(t.max_steps),
        "--per-device-train-batch-size",
        str(t.batch_size),
        "--gradient-accumulation-steps",
        "1",
        "--max-seq-len",
        str(t.max_seq_len),
        "--val-set-size",
        "0",
        "--seed",
        str(seed),
        "--learning-rate",
        repr(float(learning_rate)),
        "--warmup-steps",  # below 1: a fraction of the steps
        repr(float(t.warmup_ratio)),
        *precision_flags(t.mixed_precision),
        "--logging-steps",
        str(t.logging_steps),
        "--save-steps",
        str(t.max_steps + 1),
        "--dtype",
        "float32",
        "--output-dir",
        str(run_dir),
        "--overwrite",
    ]


def grpo_command(
    experiment: Experiment, train_file: Path, val_file: Path | None, learning_rate: float, seed: int, run_dir: Path
) -> list[str]:
    """The ``fura train grpo`` command line of one run: one epoch over the problems of ``train_file`` (each problem
    rolled out once, ``num_generations`` completions, the math-verify accuracy reward); the harness scores the
    validation and test problems itself, so the recipe's own held-out scoring is off (``val_file`` is only its
    disjoint held-out set)."""
    if val_file is None:
        raise ExperimentError(f"{experiment.key}: an rl run needs its validation problems file")
    t = experiment.training
    rows = t.max_steps * t.prompts_per_step
    return [
        sys.executable, "-m", "fura_cli", "train", "grpo",
        "--model", experiment.model,
        "--method", experiment.method,
        *method_arg_flags(experiment.method_args),
        "--dataset", str(train_file),
        "--train-size", str(rows),
        "--held-out-dataset", str(val_file),
        "--held-out-size", str(experiment.data.val_rows_per_file),
        "--no-held-out-eval",
        "--prompt-style", t.prompt_style,
        "--answer-source", t.answer_source,
        "--prompts-per-step", str(t.prompts_per_step),
        "--num-generations", str(t.num_generations),
        "--per-device-train-batch-size", str(t.batch_size),
        "--max-completion-length", str(t.max_completion_length),
        "--max-steps", str(t.max_steps),
        "--seed", str(seed),
        "--learning-rate", repr(float(learning_rate)),
        "--warmup-steps", repr(float(t.warmup_ratio)),
        *precision_flags(t.mixed_precision),
        "--logging-steps", str(t.logging_steps),
        "--save-steps", str(t.max_steps + 1),
        "--dtype", "float32",
        "--output-dir", str(run_dir),
        "--overwrite",
    ]  # fmt: skip


def child_environment(threads: int) -> dict[str, str]:
    """The child's environment: thread counts, offline, no tokenizer parallelism."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
    )
    return env


def _last_metrics(path: Path, since: float = 0.0) -> dict[str, Any] | None:
    """The last loss record of ``path``; None while the file was last written before ``since`` (``time.time()``):
    the metrics of an earlier attempt that was cut off, which the new child truncates once it logs its first step."""
    try:
        if path.stat().st_mtime < since:
            return None
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            return record
    return None


class Launcher:
    """The launcher process (:mod:`benchmarks.method_comparison.launcher`) that starts and reaps training children.

    Start it before the harness grows (it is a fresh interpreter either way, so its own footprint stays ~15 MB); use it
    as a context manager or call :meth:`close`.
    """

    def __init__(self) -> None:
        script = Path(__file__).with_name("launcher.py")
        self.process = subprocess.Popen(
            [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self._buffer = b""

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the launcher (it exits when its input closes)."""
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=30)

    def start(self, command: Sequence[str], env: dict[str, str], log: Path, cpus: Sequence[int] | None) -> int:
        """Start ``command``; returns its pid."""
        request = {"command": list(command), "env": env, "log": str(log), "cpus": list(cpus) if cpus else None}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return int(self._read_line(timeout=None)["pid"])

    def result(self, timeout: float) -> dict[str, int] | None:
        """``{"status", "maxrss_kib"}`` of the running child once it has ended, else None after ``timeout`` seconds."""
        return self._read_line(timeout)

    def _read_line(self, timeout: float | None) -> dict | None:
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise ExperimentError("the launcher process ended unexpectedly")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)


def run_child(
    command: Sequence[str],
    run_dir: Path,
    threads: int,
    cpus: Sequence[int] | None,
    steps: int,
    label: str,
    launcher: Launcher | None = None,
) -> ChildResult:
    """Run ``command`` via ``launcher`` (a new one if None), follow its metrics; returns status, time and peak RSS."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.parent / f"{run_dir.name}.child.log"
    log_path.write_text(" ".join(command) + "\n\n", encoding="utf-8")
    own = launcher is None
    launcher = launcher or Launcher()
    try:
        start = time.monotonic()
        pid = launcher.start(command, child_environment(threads), log_path, cpus)
        done = _follow(launcher, pid, run_dir / "metrics.jsonl", steps, label)
        wall = time.monotonic() - start
    finally:
        if own:
            launcher.close()
    returncode = os.waitstatus_to_exitcode(done["status"])
    return ChildResult(returncode, wall, done["maxrss_kib"] * 1024, log_path)


def _follow(launcher: Launcher, pid: int, metrics: Path, steps: int, label: str) -> dict[str, int]:
    bar = tqdm(total=steps, desc=label, unit="step", leave=False)
    started = time.time()
    try:
        while (done := launcher.result(timeout=1.0)) is None:
            record = _last_metrics(metrics, since=started)
            if record is not None:
                bar.update(int(record["step"]) - bar.n)
                bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
        return done
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        raise
    finally:
        bar.close()


def check_child(result: ChildResult, run_dir: Path) -> None:
    """Raise with the end of the child's log when it failed or left no ``results.json``."""
    if result.returncode == 0 and (run_dir / "results.json").is_file():
        return
    tail = result.log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
    raise ExperimentError(f"training failed (exit status {result.returncode}); log {result.log_path}:\n{tail}")
