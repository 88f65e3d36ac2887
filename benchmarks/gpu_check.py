r"""``make gpu-check``: validate fura on a CUDA machine in one prepared run, and write one report.

Run from the repository root with the machine's own Python and torch (nothing here touches torch)::

    python3 benchmarks/gpu_check.py --out gpu-check-2026-01-31 [--wheels .whl]
    python3 benchmarks/gpu_check.py --dry-run          # the same code paths on the CPU, tiny shapes (CI)

What it does, each step with a time limit, the whole run in at most ``--budget-s`` (default 480 s):

1. **environment** — GPU, driver, CUDA, Python and the versions of torch, transformers, peft, accelerate,
   safetensors, trl, datasets, bitsandbytes and pytest.
2. **install** — ``pip install --no-deps --no-build-isolation -e .`` (fura itself, offline, torch untouched), and
   first every missing requirement of fura (and pytest, and bitsandbytes where a wheel is at hand) from the local
   wheel folder ``--wheels`` (``pip install --no-index --find-links DIR``, torch pinned to the installed version).
   Every later step also puts ``src/`` first on ``PYTHONPATH``, so it runs this checkout whatever is installed.
3. **tests** — the ``cuda``-marked tests, then the core tests (``tests/tuner tests/explicit``, not the ``slow``
   SmolLM2 ones), each under its own time limit, with this machine's torch and CUDA build.
4. **bench** — ``fura bench`` on CUDA in bfloat16 (CUDA events, ``torch.cuda.max_memory_allocated``) on random
   weights of real shapes built from configs: a Llama-3-8B-shaped stack of 4 decoder layers (fura, LoRA r=64 as in
   the paper, parameter-matched LoRA, full fine-tuning; peak memory per method) and Llama-3.2-3B (fura, LoRA r=32,
   DoRA, full; tokens/s).
5. **exactness** — on CUDA in bfloat16, on one Llama-3-8B-shaped layer: the adapted model's logits at init are
   bit-identical to the base model's; merge/unmerge cycles restore every base weight bit for bit (and the merged
   model computes what the adapter computes); QFuRA forward/backward with NF4 frozen cores (``qfura-nf4``) and on a
   bitsandbytes 4-bit base (``qfura``) where bitsandbytes is installed (else reported as skipped).

Output: ``--out`` (default ``gpu-check-<date>/``) holds ``gpu-check.json`` (everything, the bench reports
included) and ``gpu-check.md`` (environment, checks, goals, bench tables). The goals of issue 11 — step time
fura / LoRA r=64 <= 1.00, peak memory fura / LoRA r=64 <= 0.90, full / fura step time >= 3 (8B-shaped), fura
tokens/s >= LoRA r=32 tokens/s (3B-shaped) — are reported as met or not met; they are benchmark figures, not
checks. The exit status is 0 when every check passed (or was skipped for a stated reason, such as bitsandbytes
missing), 1 otherwise.

``--dry-run`` runs every step's code on the CPU with tiny shapes in about a minute: it prints the install
commands instead of running them and only collects the tests; CI runs it (tests/benchmarks/test_gpu_check.py),
so the script cannot rot between GPU runs. This file is outside the library's import graph: it imports only
the standard library until fura is installed, and fura (in child processes) after.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `benchmarks` is then importable
from benchmarks.goals import gpu_goals
from benchmarks.goals import render as render_goals

ROOT = Path(__file__).resolve().parents[1]
#: Distributions whose versions the report shows (``importlib.metadata`` names).
VERSIONED = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "safetensors",
    "trl",
    "datasets",
    "bitsandbytes",
    "pytest",
    "fura",
)
#: What the checks need beyond fura's own requirements; ``bitsandbytes`` is optional (the NF4 checks skip without it).
CHECK_REQUIREMENTS = ("pytest>=8",)
OPTIONAL_REQUIREMENTS = ("bitsandbytes>=0.45",)
#: The ``cuda``-marked test files and the modules each needs beyond fura's core requirements. A file whose modules
#: are missing is not run (and the report says why); a new ``cuda`` test file must be added here (a test checks it).
CUDA_TEST_NEEDS: dict[str, tuple[str, ...]] = {
    "tests/explicit/test_qbtt.py": ("bitsandbytes",),
    "tests/integrations/test_fsdp.py": ("trl", "datasets", "yaml"),  # launches the SFT recipe under accelerate
}
#: What :func:`run_child` reports for a step the budget left no time for.
NOT_STARTED = "not started: the time budget is spent"
#: Seconds kept back at the end of the budget for writing the report.
REPORT_RESERVE_S = 10
PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


# --------------------------------------------------------------------------------------------
# What runs: the plan (real shapes on CUDA, or tiny ones on the CPU for the dry run)
# --------------------------------------------------------------------------------------------


#: The 8B-shaped run: FuRA, LoRA r=64 (the paper's baseline), LoRA with FuRA's parameter count, full fine-tuning.
METHODS_8B = ("fura", "lora-r64", "lora-matched", "full")
#: The 3B-shaped run: PEFT's method-comparison set (FuRA in LoRA's place: fura, lora r=32, dora, full).
METHODS_3B = ("fura", "lora-r32", "dora", "full")


@dataclass(frozen=True)
class BenchRun:
    """One ``fura bench`` invocation.

    Attributes:
        key: short name, used in the report (``8b``, ``3b``).
        purpose: what the run is for (one line of the report).
        model: the ``--model`` value (a shaped model, e.g. ``llama3-8b:4``).
        methods: bench method labels.
        batch: sequences per step.
        seq: tokens per sequence.
        steps: timed steps per method.
        warmup: untimed warm-up rounds.
        memory: measure peak memory (one fresh process per method).
        timeout_s: time limit of the run.
    """

    key: str
    purpose: str
    model: str
    methods: tuple[str, ...]
    batch: int
    seq: int
    steps: int
    warmup: int
    memory: bool
    timeout_s: int


@dataclass(frozen=True)
class Plan:
    """Everything that differs between the real check and the dry run.

    Attributes:
        dry_run: CPU, tiny shapes, pip commands printed, tests only collected.
        device: ``cuda`` or ``cpu``.
        dtype: the dtype of the benchmarks and exactness checks.
        benches: the bench runs.
        exact_model: the shaped model of the init / merge exactness checks (``--model`` syntax of ``fura bench``).
        merge_cycles: merge/unmerge cycles after which every base weight must be bit-identical.
        quant_config: ``LlamaConfig`` fields of the small random model saved and loaded in 4 bits for ``qfura``.
        cuda_tests_timeout_s: time limit of the ``cuda``-marked tests.
        core_tests_timeout_s: time limit of the core tests.
        exactness_timeout_s: time limit of the exactness checks.
        install_timeout_s: time limit of each pip command.
    """

    dry_run: bool
    device: str
    dtype: str
    benches: tuple[BenchRun, ...]
    exact_model: str
    merge_cycles: int
    quant_config: dict[str, int]
    cuda_tests_timeout_s: int = 120
    core_tests_timeout_s: int = 150
    exactness_timeout_s: int = 90
    install_timeout_s: int = 120


def make_plan(dry_run: bool) -> Plan:
    """The real plan (CUDA, bf16, Llama-3 shapes, about 7 minutes on an H100) or the dry run's (CPU, tiny)."""
    if dry_run:
        tiny = {"batch": 1, "seq": 16, "steps": 1, "warmup": 0, "timeout_s": 240}
        return Plan(
            dry_run=True,
            device="cpu",
            dtype="bfloat16",
            benches=(
                BenchRun("8b", "dry run of the 8B-shaped run", "tiny", METHODS_8B, memory=True, **tiny),
                BenchRun("3b", "dry run of the 3B-shaped run", "tiny", METHODS_3B, memory=False, **tiny),
            ),
            exact_model="tiny",
            merge_cycles=3,
            quant_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "vocab_size": 128},
            cuda_tests_timeout_s=120,
            core_tests_timeout_s=120,
            exactness_timeout_s=120,
        )
    return Plan(
        dry_run=False,
        device="cuda",
        dtype="bfloat16",
        benches=(
            BenchRun(
                "8b",
                "Llama-3-8B-shaped stack (4 of 32 decoder layers): step time and peak memory",
                "llama3-8b:4",
                METHODS_8B,
                batch=2,
                seq=512,
                steps=6,
                warmup=2,
                memory=True,
                timeout_s=210,
            ),
            BenchRun(
                "3b",
                "Llama-3.2-3B-shaped model (all 28 layers): tokens/s",
                "llama3.2-3b",
                METHODS_3B,
                batch=4,
                seq=512,
                steps=6,
                warmup=2,
                memory=False,
                timeout_s=150,
            ),
        ),
        exact_model="llama3-8b:1",
        merge_cycles=20,
        quant_config={"hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 2, "vocab_size": 32000},
    )


# --------------------------------------------------------------------------------------------
# Checks, the clock and child processes
# --------------------------------------------------------------------------------------------


@dataclass
class Check:
    """One step's outcome.

    Attributes:
        name: what was checked.
        status: ``passed``, ``failed`` or ``skipped`` (a skip states its reason; only ``failed`` fails the run).
        seconds: wall time of the step.
        detail: one line: the result, or what went wrong and the fix.
        data: numbers and command lines for the JSON report.
    """

    name: str
    status: str
    seconds: float = 0.0
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)


class Budget:
    """The run's wall-clock budget: each step gets ``min(its own limit, what is left)``."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def limit(self, wanted: float) -> float:
        """Seconds the next step may take (0 when the budget is spent; the report's reserve is kept back)."""
        return max(0.0, min(wanted, self.deadline - time.monotonic() - REPORT_RESERVE_S))


@dataclass
class Completed:
    """A finished child process: exit status (``None`` if killed at its time limit), output tail, seconds."""

    returncode: int | None
    tail: list[str]
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def child_env() -> dict[str, str]:
    """The environment of every child: this checkout's ``src`` first on ``PYTHONPATH``, unbuffered, offline."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_child(command: Sequence[str], timeout: float, label: str, tail_lines: int = 40) -> Completed:
    """Run ``command`` from the repository root, echoing its output with a ``[label]`` prefix.

    The child gets a process group of its own, so at the time limit the whole group (a bench's memory children
    too) is killed. Returns the exit status (``None`` when killed) and the last ``tail_lines`` lines.
    """
    start = time.monotonic()
    tail: deque[str] = deque(maxlen=tail_lines)
    if timeout <= 0:
        return Completed(None, [NOT_STARTED], 0.0)
    process = subprocess.Popen(
        list(command),
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            tail.append(line.rstrip())
            print(f"[{label}] {line.rstrip()}", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        returncode: int | None = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        returncode = None
        tail.append(f"killed at its time limit of {timeout:.0f} s")
    reader.join(timeout=5)
    return Completed(returncode, list(tail), time.monotonic() - start)


def _failure_detail(done: Completed) -> str:
    last = next((line for line in reversed(done.tail) if line.strip()), "(no output)")
    if done.tail == [NOT_STARTED]:
        return "not run: the time budget (--budget-s) was spent before this step"
    if done.returncode is None:
        return f"killed at its time limit after {done.seconds:.0f} s; last line: {last}"
    return f"exit status {done.returncode}; last line: {last}"


# --------------------------------------------------------------------------------------------
# 1. Environment
# --------------------------------------------------------------------------------------------


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (``None`` if absent), without importing it."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(plan: Plan) -> dict[str, Any]:
    """Machine, GPU (name, driver, memory), CUDA and package versions."""
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "cpu_count": os.cpu_count(),
        "versions": {name: installed_version(name) for name in VERSIONED},
        "gpu": None,
        "driver": None,
        "cuda": None,
    }
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            rows = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
            if rows:
                name, driver, memory = (part.strip() for part in rows[0].split(",")[:3])
                env.update(gpu=name, driver=driver, gpu_memory=memory, gpu_count=len(rows))
    try:
        import torch

        env["cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available() and env["gpu"] is None:
            env["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        env["cuda_available"] = False
    return env


def check_environment(plan: Plan, env: dict[str, Any]) -> Check:
    """The machine can run the plan: torch importable, and CUDA available unless this is the dry run."""
    start = time.monotonic()
    missing = [name for name in ("torch", "transformers", "peft") if env["versions"][name] is None]
    if missing:
        detail = f"{', '.join(missing)} not installed: the check runs on the machine's own stack (never installs torch)"
        return Check("environment", FAILED, time.monotonic() - start, detail, env)
    if plan.device == "cuda" and not env.get("cuda_available"):
        detail = "torch.cuda.is_available() is False. Fix: run on a CUDA machine, or use --dry-run on a CPU"
        return Check("environment", FAILED, time.monotonic() - start, detail, env)
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    gpu = f"{env['gpu']} (driver {env['driver']}, CUDA {env['cuda']}); " if env.get("gpu") else ""
    return Check("environment", PASSED, time.monotonic() - start, f"{gpu}Python {env['python']}; {versions}", env)


# --------------------------------------------------------------------------------------------
# 2. Install (offline, torch untouched)
# --------------------------------------------------------------------------------------------


def project_requirements() -> list[str]:
    """``[project] dependencies`` of pyproject.toml, torch excluded (the machine's torch is what is checked)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    with open(ROOT / "pyproject.toml", "rb") as handle:
        dependencies = tomllib.load(handle)["project"]["dependencies"]
    return [req for req in dependencies if _requirement_name(req) != "torch"]


def _requirement_name(requirement: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(requirement).name.lower()


def unsatisfied(requirements: Sequence[str], versions: Callable[[str], str | None] = installed_version) -> list[str]:
    """The requirements (PEP 508 strings) that the installed distributions do not satisfy."""
    from packaging.requirements import Requirement

    missing = []
    for text in requirements:
        requirement = Requirement(text)
        version = versions(requirement.name)
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            missing.append(text)
    return missing


def install_commands(
    wheels: Path | None, missing: Sequence[str], optional: Sequence[str], torch_pin: Path | None
) -> list[list[str]]:
    """The pip commands of the install step: missing requirements from the wheel folder, then fura, editable.

    Nothing is fetched from an index (the GPU machine has none); ``torch_pin`` is a constraints file pinning torch
    to its installed version, so that no requirement can pull another build in. ``optional`` requirements are
    installed only if their wheel is in the folder.
    """
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    commands = []
    if wheels is not None and (missing or optional):
        present = [req for req in optional if _wheel_available(wheels, _requirement_name(req))]
        wanted = [*missing, *present]
        if wanted:
            constraint = [f"--constraint={torch_pin}"] if torch_pin else []
            commands.append([*pip, "--no-index", f"--find-links={wheels}", *constraint, *wanted])
    commands.append([*pip, "--no-deps", "--no-build-isolation", "-e", str(ROOT)])
    return commands


def _wheel_available(folder: Path, name: str) -> bool:
    stem = name.replace("-", "_").lower()
    return any(path.name.lower().startswith(stem + "-") for path in folder.glob("*.whl"))


def check_install(plan: Plan, wheels: Path | None, budget: Budget, scratch: Path) -> Check:
    """Install what is missing from ``wheels`` and fura itself, editable, with the machine's torch."""
    start = time.monotonic()
    # the editable install builds offline, without build isolation: setuptools >= 64 (PEP 660) must be there
    needed = [*project_requirements(), *CHECK_REQUIREMENTS, "setuptools>=64"]
    missing = unsatisfied(needed)
    torch_version = installed_version("torch")
    torch_pin = scratch / "torch-constraint.txt"
    torch_pin.write_text(f"torch=={torch_version}\n")
    commands = install_commands(wheels, missing, unsatisfied(OPTIONAL_REQUIREMENTS), torch_pin)
    data: dict[str, Any] = {"missing_before": missing, "commands": [" ".join(c) for c in commands]}
    if plan.dry_run:
        for command in commands:
            print(f"[install] dry run, would run: {' '.join(command)}", flush=True)
        detail = f"dry run: {len(commands)} pip command(s) printed, none run; missing here: {missing or 'nothing'}"
        return Check("install", SKIPPED, time.monotonic() - start, detail, data)
    if missing and wheels is None:
        fix = (
            f"missing {', '.join(missing)} and no --wheels folder. Fix: on a machine with internet, "
            f"`python3 -m pip download --only-binary=:all: --python-version {sys.version_info.major}."
            f"{sys.version_info.minor} --platform manylinux_2_28_x86_64 -d .whl {' '.join(repr(m) for m in missing)}`"
            " (plus their own missing requirements), carry .whl along and pass --wheels .whl"
        )
        return Check("install", FAILED, time.monotonic() - start, fix, data)
    for command in commands:
        done = run_child(command, budget.limit(plan.install_timeout_s), "install")
        if not done.ok:
            return Check("install", FAILED, time.monotonic() - start, _failure_detail(done), data)
    still = unsatisfied(needed)
    data["missing_after"] = still
    if still:
        return Check("install", FAILED, time.monotonic() - start, f"still missing: {', '.join(still)}", data)
    if installed_version("torch") != torch_version:
        detail = f"torch changed from {torch_version} to {installed_version('torch')}: the check must not touch it"
        return Check("install", FAILED, time.monotonic() - start, detail, data)
    detail = f"fura installed (editable, no deps); from the wheel folder: {', '.join(missing) or 'nothing needed'}"
    return Check("install", PASSED, time.monotonic() - start, detail, data)


# --------------------------------------------------------------------------------------------
# 3. Tests
# --------------------------------------------------------------------------------------------


def cuda_test_files() -> list[str]:
    """Test files that hold ``cuda``-marked tests (found by their marker, so new ones are picked up)."""
    return sorted(
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "tests").rglob("test_*.py")
        if "pytest.mark.cuda" in path.read_text(encoding="utf-8")
    )


def runnable_cuda_tests() -> tuple[list[str], dict[str, list[str]]]:
    """``(files to run, {file: missing modules})``: the cuda test files split by what this machine has."""
    runnable, missing = [], {}
    for path in cuda_test_files():
        absent = [module for module in CUDA_TEST_NEEDS.get(path, ()) if importlib.util.find_spec(module) is None]
        if absent:
            missing[path] = absent
        else:
            runnable.append(path)
    return runnable, missing


def pytest_command(paths: Sequence[str], marker: str, collect_only: bool) -> list[str]:
    """``python -m pytest`` on ``paths`` selecting ``marker``; ``--collect-only`` for the dry run."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker, *paths]
    return [*command, "--collect-only"] if collect_only else command


def check_tests(name: str, command: list[str], timeout: float, dry_run: bool, note: str = "") -> Check:
    """Run one pytest selection; passed when pytest exits 0 (every selected test passed or skipped)."""
    if installed_version("pytest") is None:
        detail = "pytest is not installed. Fix: carry its wheel (pip download pytest) and pass --wheels"
        return Check(name, FAILED, 0.0, detail, {"command": " ".join(command)})
    done = run_child(command, timeout, name)
    summary = next((line for line in reversed(done.tail) if line.strip()), "")
    data = {"command": " ".join(command), "summary": summary, "tail": done.tail[-15:]}
    if done.ok:
        detail = f"{'collected (dry run)' if dry_run else 'passed'}: {summary}{note}"
        return Check(name, PASSED, done.seconds, detail, data)
    return Check(name, FAILED, done.seconds, _failure_detail(done) + note, data)


def check_cuda_tests(plan: Plan, budget: Budget) -> Check:
    """The ``cuda``-marked tests whose extra modules are installed (:data:`CUDA_TEST_NEEDS`)."""
    files, missing = runnable_cuda_tests()
    note = "".join(f"; not run: {path} (needs {', '.join(mods)})" for path, mods in missing.items())
    if not files:
        return Check("cuda-marked tests", SKIPPED, 0.0, "no runnable cuda test file" + note, {"missing": missing})
    command = pytest_command(files, "cuda", plan.dry_run)
    return check_tests("cuda-marked tests", command, budget.limit(plan.cuda_tests_timeout_s), plan.dry_run, note)


# --------------------------------------------------------------------------------------------
# 4. Bench
# --------------------------------------------------------------------------------------------


def bench_command(run: BenchRun, plan: Plan, out: Path) -> list[str]:
    """The ``fura bench`` command line of ``run`` (``python -m fura.apps.bench``: no console script needed)."""
    command = [
        sys.executable, "-m", "fura.apps.bench",
        "--model", run.model, "--methods", ",".join(run.methods),
        "--device", plan.device, "--dtype", plan.dtype,
        "--batch", str(run.batch), "--seq", str(run.seq), "--steps", str(run.steps), "--warmup", str(run.warmup),
        "--conversion-repeats", "1", "--no-inference", "--skip-8b", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    return [*command, "--no-memory"] if not run.memory else command


def check_bench(run: BenchRun, plan: Plan, budget: Budget, scratch: Path) -> tuple[Check, dict[str, Any] | None]:
    """Run one bench; passed when it exits 0 with a report holding a finite step time for every method."""
    out = scratch / f"bench-{run.key}"
    command = bench_command(run, plan, out)
    done = run_child(command, budget.limit(run.timeout_s), f"bench {run.key}", tail_lines=60)
    name = f"bench {run.key} ({run.model})"
    data: dict[str, Any] = {"command": " ".join(command), "purpose": run.purpose}
    report_file = out / "bench.json"
    if not done.ok or not report_file.is_file():
        data["tail"] = done.tail[-20:]
        return Check(name, FAILED, done.seconds, _failure_detail(done), data), None
    report = json.loads(report_file.read_text())
    problems = [
        f"{label}: " + (result["memory"]["error"].strip().splitlines() or ["?"])[-1]
        for label, result in report["methods"].items()
        if "error" in result.get("memory", {})
    ]
    problems += [label for label in run.methods if label not in report["methods"]]
    if problems:
        return Check(name, FAILED, done.seconds, "; ".join(problems), data), report
    fura = report["methods"]["fura"]
    detail = (
        f"{len(report['methods'])} methods; fura {fura['step']['median'] * 1e3:.1f} ms/step, "
        f"{fura['tokens_per_second']:,.0f} tokens/s"
    )
    return Check(name, PASSED, done.seconds, detail, data), report


# --------------------------------------------------------------------------------------------
# 5. Exactness (run in a child process: --worker exactness)
# --------------------------------------------------------------------------------------------


def check_exactness(plan: Plan, budget: Budget, scratch: Path) -> list[Check]:
    """Run :func:`benchmarks.gpu_exactness.exactness_worker` in a child; one check per property it reports."""
    result_file = scratch / "exactness.json"
    command = [
        sys.executable, str(Path(__file__).resolve()), "--worker", "exactness", "--device", plan.device,
        "--dtype", plan.dtype, "--model", plan.exact_model, "--cycles", str(plan.merge_cycles),
        "--quant-config", json.dumps(plan.quant_config), "--result", str(result_file),
    ]  # fmt: skip
    done = run_child(command, budget.limit(plan.exactness_timeout_s), "exactness")
    if not result_file.is_file():
        return [Check("exactness", FAILED, done.seconds, _failure_detail(done), {"tail": done.tail[-20:]})]
    checks = [Check(**entry) for entry in json.loads(result_file.read_text())]
    if not done.ok and all(check.status != FAILED for check in checks):
        checks.append(Check("exactness", FAILED, done.seconds, _failure_detail(done), {"tail": done.tail[-20:]}))
    return checks


# --------------------------------------------------------------------------------------------
# Goals and the report
# --------------------------------------------------------------------------------------------


def _mib(value: int | None) -> str:
    return "—" if value is None else f"{value / 2**20:,.1f}"


def render_markdown(report: dict[str, Any]) -> str:
    """The markdown report: environment, checks, goals, bench tables."""
    env = report["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines = [
        f"# fura GPU check — {env['date'][:10]}" + (" (DRY RUN on the CPU, tiny shapes)" if report["dry_run"] else ""),
        "",
        f"- machine: {env.get('gpu') or 'no GPU'}"
        + (f" ({env.get('gpu_memory')}), driver {env.get('driver')}, CUDA {env.get('cuda')}" if env.get("gpu") else "")
        + f"; {env['cpu_count']} CPUs; {env['platform']}",
        f"- Python {env['python']}; {versions}",
        f"- command: `{report['command']}`",
        f"- result: **{'all checks passed' if report['ok'] else 'FAILED'}** in {report['seconds']:.0f} s",
        "",
        "## Checks",
        "",
        "| check | status | seconds | detail |",
        "|---|---|---:|---|",
    ]
    for check in report["checks"]:
        detail = check["detail"].replace("|", "\\|")
        lines.append(f"| {check['name']} | {check['status']} | {check['seconds']:.1f} | {detail} |")
    lines += ["", "## Goals (issue 11; benchmark figures, not checks)", ""]
    if report["dry_run"]:
        lines += ["Dry run: tiny CPU shapes, the figures below only show that the pipeline works.", ""]
    lines += render_goals(report["goals"]).splitlines()
    for key, bench in report["bench"].items():
        if not bench:
            continue
        env_b = bench["environment"]
        lines += [
            "",
            f"## Bench {key}: {env_b['model_name']}",
            "",
            f"{env_b['device_name']}, {env_b['dtype']}, batch {env_b['batch']} × {env_b['seq']} tokens, "
            f"{bench['config']['steps']} timed steps after {bench['config']['warmup']} warm-up, interleaved; "
            "step time from CUDA events, peak memory from torch.cuda.max_memory_allocated (fresh process per method)"
            if env_b["device"].startswith("cuda")
            else f"{env_b['device_name']}, {env_b['dtype']}, batch {env_b['batch']} × {env_b['seq']} tokens",
            "",
            "| method | trainable params | step median (ms) | tokens/s | peak memory (MiB) | model (MiB) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for label, result in bench["methods"].items():
            memory = result.get("memory", {})
            peak, model = memory.get("peak_bytes"), memory.get("model_bytes")
            rank = f" (r={result['rank']})" if "rank" in result else ""
            lines.append(
                f"| {label}{rank} | {result['trainable_params']:,} | {result['step']['median'] * 1e3:.2f} | "
                f"{result['tokens_per_second']:,.0f} | {_mib(peak)} | {_mib(model)} |"
            )
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def run_check(plan: Plan, out: Path, wheels: Path | None, budget_s: float, command: str) -> dict[str, Any]:
    """Every step in order; returns the report (also written to ``out``)."""
    started = time.monotonic()
    budget = Budget(budget_s)
    checks: list[Check] = []
    benches: dict[str, dict[str, Any] | None] = {}
    env = environment(plan)
    checks.append(check_environment(plan, env))
    print(f"[environment] {checks[-1].detail}", flush=True)
    if checks[0].status == PASSED:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
            checks.append(check_install(plan, wheels, budget, Path(scratch)))
            checks.append(check_cuda_tests(plan, budget))
            core = pytest_command(["tests/tuner", "tests/explicit"], "not slow", plan.dry_run)
            checks.append(check_tests("core tests", core, budget.limit(plan.core_tests_timeout_s), plan.dry_run))
            for run in plan.benches:
                check, benches[run.key] = check_bench(run, plan, budget, Path(scratch))
                checks.append(check)
            checks.extend(check_exactness(plan, budget, Path(scratch)))
    report = {
        "command": command,
        "dry_run": plan.dry_run,
        "plan": asdict(plan),
        "environment": env,
        "checks": [asdict(check) for check in checks],
        "goals": gpu_goals(benches),
        "bench": benches,
        "ok": all(check.status != FAILED for check in checks),
        "seconds": time.monotonic() - started,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "gpu-check.md").write_text(render_markdown(report))
    return report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gpu_check.py", description=__doc__.split("\n")[0], allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: gpu-check-<date>/)")
    parser.add_argument("--wheels", type=Path, default=None, help="local wheel folder for missing pure-Python deps")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, no pip: check the script itself")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget (default: %(default)s s)")
    worker = parser.add_argument_group("internal (the exactness child process)")
    worker.add_argument("--worker", choices=["exactness"], default=None, help=argparse.SUPPRESS)
    worker.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    worker.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    worker.add_argument("--model", default="llama3-8b:1", help=argparse.SUPPRESS)
    worker.add_argument("--cycles", type=int, default=20, help=argparse.SUPPRESS)
    worker.add_argument("--quant-config", default="{}", help=argparse.SUPPRESS)
    worker.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.wheels is not None and not args.wheels.is_dir():
        parser.error(f"--wheels {args.wheels}: no such folder. Fix: pip download the wheels into it first")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check (or, with ``--worker``, one child step); 0 when every check passed."""
    args = parse_args(argv)
    if args.worker == "exactness":
        from benchmarks.gpu_exactness import exactness_worker  # imports torch and fura: only in the child

        checks = exactness_worker(args.device, args.dtype, args.model, args.cycles, json.loads(args.quant_config))
        args.result.write_text(json.dumps([asdict(check) for check in checks], default=str))
        return 0 if all(check.status != FAILED for check in checks) else 1
    plan = make_plan(args.dry_run)
    out = args.out or ROOT / f"gpu-check-{_dt.date.today().isoformat()}"
    command = " ".join(["python", *sys.argv]) if argv is None else " ".join(["gpu_check.py", *argv])
    report = run_check(plan, out, args.wheels, args.budget_s, command)
    print(render_markdown(report), flush=True)
    print(f"report: {out / 'gpu-check.json'}, {out / 'gpu-check.md'}", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
