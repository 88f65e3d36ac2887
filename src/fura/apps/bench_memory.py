"""Peak training memory of one method per process (``fura bench``'s memory phase).

CPU: children forked from a pristine server process (:func:`_zygote_main`) that imported the libraries but never
computed; CUDA: a fresh process per method. See :func:`measure_memory_here` for what is measured."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import select
import subprocess
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fura.apps.bench_config import BenchConfig, MiB
from fura.apps.bench_models import (
    FuraBudget,
    build_meta_model,
    build_method,
    make_batch,
    make_optimizer,
    train_step,
)
from fura.io.memory import (
    current_rss,
    peak_rss,
    pin_malloc_mmap_threshold,
    release_free_memory,
    reset_peak_rss,
)
from fura.recipes.base_models import resolve_dtype

logger = logging.getLogger("fura.apps.bench")

MALLOC_MMAP_THRESHOLD = 256 * 1024

MEMORY_METHOD_CPU = (
    "per method, a fresh process forked from a pristine server process (libraries imported, nothing computed), "
    "so no method inherits another's allocations. 'peak memory' is the tensor peak, the CPU analogue of "
    "torch.cuda.max_memory_allocated: bytes of every live tensor after memory_steps warm training steps "
    "(weights, adapter tensors, optimizer state, batch) plus the largest rise of live tensor bytes during one "
    "more step (gradients, activations, temporaries), from the PyTorch profiler's allocation events. 'RSS peak' "
    "is the process view of the same run: peak resident set (VmHWM, reset via /proc/self/clear_refs after the "
    "model is built) during the memory_steps steps minus the resident set before the build, with glibc's mmap "
    "threshold pinned at 256 KiB so freed tensors leave the resident set; it adds allocator slack and library "
    "buffers (oneDNN/MKL scratch, thread stacks)."
)

MEMORY_METHOD_CUDA = (
    "per method, a fresh Python process (started, not forked: a process forked after CUDA or its driver was "
    "touched cannot use the GPU): torch.cuda.max_memory_allocated during "
    "memory_steps training steps (peak stats reset after building the model) minus the memory allocated "
    "before the model was built: weights, adapter state, gradients, optimizer state and activations."
)


def _live_tensor_bytes(*groups: Any) -> int:
    """Bytes of the distinct storages behind the tensors in ``groups`` (iterables of tensors)."""
    storages: dict[int, int] = {}
    for group in groups:
        for tensor in group:
            if torch.is_tensor(tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def peak_increase(profiler: Any) -> int:
    """Largest rise of live CPU tensor bytes during a ``profile_memory`` profiler session."""
    events = [
        event
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    ]
    return _running_peak(events)


def _running_peak(events: Sequence[Any]) -> int:
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def measure_memory_here(job: dict[str, Any]) -> dict[str, Any]:
    """Build one method in *this* process, run training steps, return its peak memory.

    Meant to run in a fresh child process (:func:`measure_memory`); ``job`` holds plain values only.

    CUDA: ``max_memory_allocated`` over ``memory_steps`` steps (stats reset after the build) minus
    what was allocated before the build. CPU, two views of the same steps:

    * ``peak_bytes`` — *tensor* peak, the CPU analogue of ``max_memory_allocated``: the bytes of all
      live tensors after ``memory_steps`` warm steps (weights, adapters, optimizer state, batch) plus
      the largest rise of live tensor bytes during one more step, read from the PyTorch profiler's
      allocation events (gradients, activations, temporaries). Excludes allocator slack and
      library-internal buffers.
    * ``rss_peak_bytes`` — *process* peak: peak resident set during the ``memory_steps`` steps (VmHWM,
      reset after the build) minus the resident set before the build, with glibc's mmap threshold
      pinned (:func:`fura.io.memory.pin_malloc_mmap_threshold`) so freed tensors leave the resident set.
    """
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    device, dtype = torch.device(job["device"]), resolve_dtype(job["dtype"])
    budget = FuraBudget(**job["budget"])
    cuda = device.type == "cuda"
    pinned = False if cuda else pin_malloc_mmap_threshold(MALLOC_MMAP_THRESHOLD)
    build_meta_model(job["model"])  # import the modelling code now, so it is not counted as the model's memory
    release_free_memory()
    if cuda:
        if device.index is not None:
            torch.cuda.set_device(device)
        torch.cuda.init()
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = current_rss()
    reset_ok = cuda or reset_peak_rss()
    built = build_method(job["method"], job["model"], dtype=dtype, device=device, budget=budget, seed=job["seed"])
    model = built.model
    optimizer = make_optimizer(model, job["lr"])
    batch = make_batch(job["vocab_size"], job["batch"], job["seq"], device, job["seed"])
    release_free_memory()
    result: dict[str, Any] = {"trainable": built.trainable, "steps": job["memory_steps"]}
    if cuda:
        torch.cuda.synchronize(device)
        result["model_bytes"] = torch.cuda.memory_allocated(device) - before
        result["build_peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
        torch.cuda.reset_peak_memory_stats(device)
    else:
        result["rss_model_bytes"] = current_rss() - before
        result["rss_build_peak_bytes"] = peak_rss() - before if reset_ok else None
        reset_ok = reset_peak_rss()
    result["model_tensor_bytes"] = _live_tensor_bytes(model.parameters(), model.buffers())
    losses = [float(train_step(model, optimizer, batch)) for _ in range(job["memory_steps"])]
    if cuda:
        torch.cuda.synchronize(device)
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
        result["source"] = "torch.cuda.max_memory_allocated"
    else:
        result["rss_peak_bytes"] = peak_rss() - before
        result["rss_peak_reset"] = reset_ok
        result["rss_source"] = ("VmHWM since the build" if reset_ok else "peak over the process's life") + (
            ", mmap threshold pinned" if pinned else ", glibc default mmap threshold"
        )
        state = [value for entry in optimizer.state.values() for value in entry.values()]
        steady = _live_tensor_bytes(model.parameters(), model.buffers(), state, [batch])
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            losses.append(float(train_step(model, optimizer, batch)))
        result["steady_state_tensor_bytes"] = steady
        result["peak_bytes"] = steady + peak_increase(prof)
        result["model_bytes"] = result["model_tensor_bytes"]
        result["source"] = "live tensors + torch.profiler allocation events"
    result["training_overhead_bytes"] = result["peak_bytes"] - result["model_bytes"]
    result["baseline_bytes"] = before
    result["losses"] = losses
    return result


def _zygote_main(model: str | None = None, fork: bool = True) -> None:
    """Entry point of the memory server process (``python -c "from fura.apps.bench_memory import _zygote_main; ..."``).

    It imports torch / transformers / peft / fura (and, given ``model``, that model's modelling code)
    once and never computes anything, so forking it is safe (a fork after OpenMP has run can
    deadlock); ``gc.freeze()`` then keeps the children's ``gc.collect()`` cheap. Protocol: one JSON
    job per line on stdin; for each, a forked child runs :func:`measure_memory_here` and the server
    answers one JSON line ``["ok", result]`` or ``["error", message]`` on its original stdout (fd 1
    is pointed at stderr so that stray prints cannot corrupt the protocol; children send their own
    output to ``/dev/null`` unless the job says ``quiet: False``). With ``fork=False`` (CUDA jobs: a
    process forked after the CUDA driver was touched — ``bitsandbytes`` does at import — cannot use the
    GPU; and platforms without ``os.fork``) it serves one job in-process and exits, and the parent starts
    a fresh server per job.
    """
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    import peft.tuners.lora  # noqa: F401  (LoRA / DoRA layers)

    if model is not None:
        build_meta_model(model)
    gc.collect()
    gc.freeze()
    protocol.write("READY\n")
    for line in sys.stdin:
        job = json.loads(line)
        if not fork:
            protocol.write(json.dumps(_run_job(job)) + "\n")
            return
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, report through the pipe, exit without cleanup
            os.close(read_fd)
            if job.get("quiet", True):  # progress bars and profiler chatter; errors come back through the pipe
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
            with os.fdopen(write_fd, "w") as pipe:
                pipe.write(json.dumps(_run_job(job)))
            os._exit(0)
        os.close(write_fd)
        with os.fdopen(read_fd) as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
        if data:
            protocol.write(data + "\n")
        else:
            reason = (
                f"killed by signal {-os.waitstatus_to_exitcode(status)}"
                if os.WIFSIGNALED(status)
                else (f"exit status {os.waitstatus_to_exitcode(status)}")
            )
            message = f"the child process died without a result ({reason}; out of memory?)"
            protocol.write(json.dumps(["error", message]) + "\n")


def _run_job(job: dict[str, Any]) -> list[Any]:
    try:
        return ["ok", measure_memory_here(job)]
    except BaseException:  # report everything, the parent decides
        return ["error", traceback.format_exc()]


class MemoryServer:
    """The parent's handle on a :func:`_zygote_main` process.

    ``fork=True``: one server forks a child per job. ``fork=False`` (forced where ``os.fork`` is missing):
    the server runs a single job itself and exits (:attr:`single_job`); the caller starts one per job.
    """

    def __init__(self, model: str | None = None, fork: bool = True) -> None:
        import fura

        self.single_job = not (fork and hasattr(os, "fork"))
        package_root = str(Path(fura.__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
        entry = f"from fura.apps.bench_memory import _zygote_main; _zygote_main({model!r}, fork={not self.single_job})"
        self.process = subprocess.Popen(
            [sys.executable, "-c", entry],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.ready = False
        self.used = False

    def wait_ready(self, timeout: float = 900.0) -> None:
        """Block until the server has finished importing (it must not compete with timed work)."""
        if not self.ready:
            line = self._read_line(timeout)
            if line != "READY":
                self.close()
                raise RuntimeError(f"the memory-measurement process did not start (got {line!r})")
            self.ready = True

    def _read_line(self, timeout: float) -> str | None:
        readable, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not readable:
            return None
        line = self.process.stdout.readline()
        return line.strip() if line else None

    def run(self, job: dict[str, Any], timeout: float) -> list[Any]:
        """Send one job, wait for its ``["ok", result]`` / ``["error", message]`` answer."""
        self.wait_ready()
        self.used = True
        try:
            self.process.stdin.write(json.dumps(job) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            return ["error", "the memory-measurement process is gone"]
        line = self._read_line(timeout)
        if line is None:
            return ["error", f"no result within {timeout:.0f} s (or the server died)"]
        return json.loads(line)

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def memory_jobs(
    cfg: BenchConfig, device: torch.device, dtype: torch.dtype, budget: FuraBudget, vocab_size: int
) -> list[dict[str, Any]]:
    """One :func:`measure_memory_here` job per method of ``cfg``: plain JSON values, for a child process."""
    return [
        {
            "method": name,
            "model": cfg.model,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "batch": cfg.batch,
            "seq": cfg.seq,
            "lr": cfg.lr,
            "seed": cfg.seed,
            "threads": torch.get_num_threads(),
            "memory_steps": cfg.memory_steps,
            "vocab_size": vocab_size,
            "budget": dataclasses.asdict(budget),
        }
        for name in cfg.methods
    ]


def forks(device: str) -> bool:
    """Whether memory jobs on ``device`` may run in forked children (not on CUDA, see :func:`_zygote_main`)."""
    return torch.device(device).type != "cuda"


def measure_memory(
    jobs: list[dict[str, Any]],
    show_progress: bool = True,
    timeout: float = 3600.0,
    server: MemoryServer | None = None,
) -> dict[str, Any]:
    """Run :func:`measure_memory_here` for each job in a process of its own, one after another.

    CPU jobs run in children forked from one server; CUDA jobs each in a freshly started process (see
    :func:`_zygote_main`). ``server`` (already started, e.g. early so its imports overlap untimed work) is
    used and closed.
    """
    results: dict[str, Any] = {}
    try:
        for job in tqdm(jobs, desc="peak memory", unit="method", disable=not show_progress):
            if server is not None and ((server.used and server.single_job) or not server.alive()):
                server.close()
                server = None
            if server is None:
                server = MemoryServer(job["model"], fork=forks(job["device"]))
            status, payload = server.run(job, timeout)
            if status == "ok":
                results[job["method"]] = payload
                logger.info("peak memory %-14s %8.1f MiB", job["method"], payload["peak_bytes"] / MiB)
            else:
                results[job["method"]] = {"error": payload}
                logger.warning("peak memory of %s failed: %s", job["method"], payload.strip().splitlines()[-1:])
    finally:
        if server is not None:
            server.close()
    return results
