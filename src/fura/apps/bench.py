r"""``fura bench``: training-step time, peak memory, conversion time and merged-inference latency.

What is measured, and how:

* **Step time** — one full training step (forward, causal-LM loss, backward, ``optimizer.step()``,
  ``zero_grad``) per method, on the same random batch. All methods' models live in one process and
  are stepped *interleaved*: each round steps every method once, the order rotated by one each round,
  so slow drifts of a shared machine hit every method alike. The first ``warmup`` rounds are
  discarded; the report gives the median of the remaining steps, every raw time, and — the most
  robust comparison on a noisy machine — the median over rounds of the per-round ratio to
  ``lora-matched``. CPU: ``time.perf_counter`` around the step. CUDA: CUDA events around the step
  (synchronised). **Tokens/s** is ``batch × seq`` trained tokens divided by the median step time.
* **Peak memory** — per method, in a *fresh process*: on CPU forked from a pristine server process
  that has imported torch / transformers / peft / fura but never computed (a fork after OpenMP has
  run can deadlock; one process per method keeps one method's allocations from hiding in another's
  heap), on CUDA started afresh (a forked process cannot use CUDA once its parent touched it). CUDA:
  ``torch.cuda.max_memory_allocated`` over the steps (reset after the build) minus what was
  allocated before the build. CPU: the *tensor peak*, the analogue of that — bytes of all live
  tensors after the warm steps (weights, adapters, optimizer state, batch) plus the largest rise of
  live tensor bytes during one more step, from the PyTorch profiler's allocation events — and, as
  a cross-check, the *RSS peak*: peak resident set during the steps (``VmHWM``, reset through
  ``/proc/self/clear_refs`` after the build) minus the resident set before the build, with glibc's
  mmap threshold pinned so that freed tensors really leave the resident set (by default glibc
  keeps them in its heap and the resident set overstates live memory by the fragmentation).
* **Conversion** — wall time of ``get_peft_model(base, FuraConfig())`` and the block-SVD part of it
  (the tuner's ``decomposition_seconds``), median over ``conversion_repeats`` fresh base models.
* **Merged inference** — forward only (no grad, eval mode) of ``merge_and_unload()`` of the trained
  FuRA model against the untouched base model (same architecture, so 1.00x is expected), interleaved;
  the un-merged FuRA model is timed alongside for reference.
* **Large-model conversion** — a Llama-3-8B-shaped model built one decoder layer at a time (random
  weights of the right shapes, only one layer's seven projections in memory), ``get_peft_model`` timed
  per layer; with fewer layers than the shape has, the total is extrapolated and labelled so.

Outputs: ``bench.json`` (everything, raw timings included), ``bench.md`` (tables + goals) and
``bench.png`` (step time and peak memory per method, ratios to ``lora-matched`` annotated; drawn where
matplotlib is installed).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as _dt
import gc
import importlib.util
import json
import logging
import math
import os
import platform
import select
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fura.apps.bench_models import (
    LLAMA3_8B,
    METHODS,
    POOL_SLACK,
    FuraBudget,
    LlamaShape,
    ShapedDecoderLayer,
    build_meta_model,
    build_method,
    check_method,
    fura_budget,
    load_base_model,
    load_model_config,
    make_batch,
    make_optimizer,
    model_label,
    random_pool,
    shaped_model,
    train_step,
)
from fura.io.memory import (
    current_rss,
    peak_rss,
    pin_malloc_mmap_threshold,
    release_free_memory,
    reset_peak_rss,
)
from fura.recipes.methods import DTYPE_NAMES, count_parameters, resolve_dtype

logger = logging.getLogger("fura.apps.bench")

REFERENCE = "lora-matched"
MiB = 1024**2
#: glibc mmap threshold pinned in the memory children (allocations at least this large are mmapped).
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
TIMING_METHOD = (
    "one process, all methods' models resident; each round steps every method once (order rotated by one "
    "per round); the first `warmup` rounds are discarded. A step is forward + causal-LM loss + backward + "
    "AdamW step + zero_grad(set_to_none=True) on the same random batch; gc.collect() runs before each round "
    "and Python's cyclic GC is paused during the round. {clock}"
)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """Everything ``fura bench`` measures and how (each field is a CLI flag of the same name).

    Attributes:
        model: ``"smollm2"`` (SmolLM2-135M-Instruct, the offline asset), ``"tiny"`` (a 2-layer random
            Llama, hidden 64, for checking the harness in seconds), a shaped model with random weights built
            from a config (``"llama3-8b"``, ``"llama3.2-3b"``; ``"llama3-8b:4"`` keeps 4 decoder layers) or a
            local Hugging Face folder / hub id.
        batch: sequences per training step.
        seq: tokens per sequence.
        steps: timed training steps per method (after warm-up); the medians are over these.
        warmup: untimed warm-up rounds (each steps every method once) before the timed ones.
        methods: methods to compare, from ``fura, fura-explicit, lora-matched, lora-r32, dora, full,
            svd`` (``lora-rN`` for any fixed rank N). Ratios are taken against ``lora-matched``.
        dtype: a name of :func:`fura.recipes.methods.resolve_dtype`'s table (``"float32"``, ``"bf16"``, …);
            ``None`` picks float32 on CPU and bfloat16 on CUDA.
        device: ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``); ``None`` picks CUDA when available.
        out: output folder for ``bench.json``, ``bench.md`` and ``bench.png`` (created).
        lr: AdamW learning rate of the training steps (its value does not change the cost).
        seed: seed of the random batch, the tiny model and the large-model weights.
        threads: ``torch.set_num_threads`` for the run (and every child process); ``None`` keeps
            PyTorch's default.
        memory: measure peak memory (one child process per method); off skips that phase.
        memory_steps: training steps run in each memory child. Step 1 allocates gradients and the
            optimizer state; from step 2 on every step starts with them resident, which is the
            steady-state peak, so 2 suffices.
        conversion_repeats: fresh base models converted with ``get_peft_model(FuraConfig())`` for the
            conversion-time median.
        inference: measure merged-inference latency (needs ``fura`` among the methods).
        inference_warmup: untimed rounds of the inference comparison.
        inference_repeats: timed rounds (each times every compared model once, interleaved).
        skip_8b: skip the large-model-shaped conversion benchmark.
        big_shape: geometry of the large model (default Llama-3-8B).
        big_layers: layers to build and convert one at a time; ``None`` = all of ``big_shape.layers``.
            Fewer layers give a total extrapolated to the full depth, labelled as such.
        show_progress: tqdm progress bars.
    """

    model: str = "smollm2"
    batch: int = 8
    seq: int = 128
    steps: int = 5
    warmup: int = 2
    methods: tuple[str, ...] = METHODS
    dtype: str | None = None
    device: str | None = None
    out: str = "bench-out"
    lr: float = 1e-5
    seed: int = 0
    threads: int | None = None
    memory: bool = True
    memory_steps: int = 2
    conversion_repeats: int = 3
    inference: bool = True
    inference_warmup: int = 1
    inference_repeats: int = 10
    skip_8b: bool = False
    big_shape: LlamaShape = field(default_factory=lambda: LLAMA3_8B)
    big_layers: int | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.methods, str):
            self.methods = tuple(m.strip() for m in self.methods.split(",") if m.strip())
        self.methods = tuple(dict.fromkeys(check_method(m) for m in self.methods))
        if not self.methods:
            raise ValueError("BenchConfig: no methods to benchmark")
        for name in ("batch", "seq", "steps", "memory_steps", "conversion_repeats", "inference_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"BenchConfig: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "inference_warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"BenchConfig: {name} must be >= 0, got {getattr(self, name)}")
        if self.dtype is not None:
            resolve_dtype(self.dtype)  # an unknown name raises, listing the valid ones
        shaped_model(self.model)  # a shaped model with a bad layer count raises
        if isinstance(self.big_shape, dict):
            self.big_shape = LlamaShape(**self.big_shape)
        if self.big_layers is not None and self.big_layers < 1:
            raise ValueError(f"BenchConfig: big_layers must be >= 1, got {self.big_layers}")

    def resolved_device(self) -> torch.device:
        """``device`` as a ``torch.device`` (CUDA when available if unset); errors if CUDA is asked for but absent."""
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("BenchConfig: device 'cuda' requested but torch.cuda.is_available() is False")
        return device

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        """``dtype`` resolved by :func:`fura.recipes.methods.resolve_dtype`; unset: bfloat16 on CUDA, else float32."""
        if self.dtype is not None:
            return resolve_dtype(self.dtype)
        return torch.bfloat16 if device.type == "cuda" else torch.float32


# --------------------------------------------------------------------------------------------
# Clocks and memory probes
# --------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """``(seconds, fn())``: CUDA events on CUDA (synchronised), ``time.perf_counter`` otherwise."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        stream = torch.cuda.current_stream(device)  # the events must live on the device that does the work
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        result = fn()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1000.0, result
    start_time = time.perf_counter()
    result = fn()
    return time.perf_counter() - start_time, result


# --------------------------------------------------------------------------------------------
# Peak memory: one forked child per method
# --------------------------------------------------------------------------------------------


def _live_tensor_bytes(*groups: Any) -> int:
    """Bytes of the distinct storages behind the tensors in ``groups`` (iterables of tensors)."""
    storages: dict[int, int] = {}
    for group in groups:
        for tensor in group:
            if torch.is_tensor(tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _peak_increase(profiler: Any) -> int:
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
        result["peak_bytes"] = steady + _peak_increase(prof)
        result["model_bytes"] = result["model_tensor_bytes"]
        result["source"] = "live tensors + torch.profiler allocation events"
    result["training_overhead_bytes"] = result["peak_bytes"] - result["model_bytes"]
    result["baseline_bytes"] = before
    result["losses"] = losses
    return result


def _zygote_main(model: str | None = None, fork: bool = True) -> None:
    """Entry point of the memory server process (``python -c "from fura.apps.bench import _zygote_main; ..."``).

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


class _MemoryServer:
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
        entry = f"from fura.apps.bench import _zygote_main; _zygote_main({model!r}, fork={not self.single_job})"
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


def _forks(device: str) -> bool:
    """Whether memory jobs on ``device`` may run in forked children (not on CUDA, see :func:`_zygote_main`)."""
    return torch.device(device).type != "cuda"


def measure_memory(
    jobs: list[dict[str, Any]],
    show_progress: bool = True,
    timeout: float = 3600.0,
    server: _MemoryServer | None = None,
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
                server = _MemoryServer(job["model"], fork=_forks(job["device"]))
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


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, mean, min, max and quartiles of ``values`` (seconds)."""
    values = sorted(values)
    quartiles = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "min": values[0],
        "max": values[-1],
        "q1": quartiles[0],
        "q3": quartiles[2],
    }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


# --------------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _paused_gc():
    """Collect once, then keep Python's cyclic GC from running inside the timed region."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _rotated(items: Sequence[str], shift: int) -> list[str]:
    shift %= len(items)
    return list(items[shift:]) + list(items[:shift])


def time_training_steps(
    cfg: BenchConfig, device: torch.device, dtype: torch.dtype, budget: FuraBudget, vocab_size: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build every method, then step them interleaved. Returns ``(results, built models)``."""
    built: dict[str, Any] = {}
    optimizers: dict[str, torch.optim.Optimizer] = {}
    for name in tqdm(cfg.methods, desc="building models", unit="method", disable=not cfg.show_progress):
        built[name] = build_method(name, cfg.model, dtype=dtype, device=device, budget=budget, seed=cfg.seed)
        optimizers[name] = make_optimizer(built[name].model, cfg.lr)
        logger.info(
            "built %-14s trainable %12s in %.2f s", name, f"{built[name].trainable:,}", built[name].build_seconds
        )
    batch = make_batch(vocab_size, cfg.batch, cfg.seq, device, cfg.seed)
    rounds = cfg.warmup + cfg.steps
    times: dict[str, list[float]] = {name: [] for name in cfg.methods}
    losses: dict[str, list[float]] = {name: [] for name in cfg.methods}
    orders: list[list[str]] = []
    progress = tqdm(total=rounds * len(cfg.methods), desc="training steps", unit="step", disable=not cfg.show_progress)
    for round_index in range(rounds):
        order = _rotated(cfg.methods, round_index)
        orders.append(order)
        with _paused_gc():
            for name in order:
                progress.set_postfix_str(f"{name} ({'warm-up' if round_index < cfg.warmup else 'timed'})")
                seconds, loss = timed(lambda n=name: train_step(built[n].model, optimizers[n], batch), device)
                times[name].append(seconds)
                losses[name].append(float(loss))
                progress.update()
        logger.info(
            "round %d/%d (%s): %s",
            round_index + 1,
            rounds,
            "warm-up" if round_index < cfg.warmup else "timed",
            ", ".join(f"{name} {times[name][-1]:.2f} s" for name in order),
        )
    progress.close()
    results = {}
    for name in cfg.methods:
        measured = times[name][cfg.warmup :]
        step = summarize(measured)
        results[name] = {
            "warmup_times_s": times[name][: cfg.warmup],
            "step_times_s": measured,
            "step": step,
            "tokens_per_second": cfg.batch * cfg.seq / step["median"],
            "losses": losses[name],
            "trainable_params": built[name].trainable,
            "total_params": built[name].total,
            "build_seconds": built[name].build_seconds,
            **built[name].details,
        }
    if REFERENCE in results:
        ref = results[REFERENCE]["step_times_s"]
        for result in results.values():
            paired = [a / b for a, b in zip(result["step_times_s"], ref, strict=True)]
            result["paired_ratio_to_reference"] = {"median": statistics.median(paired), "per_round": paired}
    return {"methods": results, "round_orders": orders}, built


def time_conversion(cfg: BenchConfig, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """``get_peft_model(fresh base, FuraConfig())`` wall time and its block-SVD part, repeated."""
    from peft import get_peft_model

    from fura.tuner.config import FuraConfig

    walls, svds = [], []
    for _ in tqdm(range(cfg.conversion_repeats), desc="conversion", unit="run", disable=not cfg.show_progress):
        base = load_base_model(cfg.model, dtype, device, cfg.seed)
        release_free_memory()
        seconds, model = timed(lambda b=base: get_peft_model(b, FuraConfig()), device)
        walls.append(seconds)
        svds.append(model.base_model.decomposition_seconds)
        del model, base
        release_free_memory()
    logger.info(
        "conversion: get_peft_model %.2f s (block SVD %.2f s), median",
        statistics.median(walls),
        statistics.median(svds),
    )
    return {
        "get_peft_model_s": walls,
        "block_svd_s": svds,
        "get_peft_model_median_s": statistics.median(walls),
        "block_svd_median_s": statistics.median(svds),
    }


def time_merged_inference(
    cfg: BenchConfig, device: torch.device, dtype: torch.dtype, fura_model: Any, vocab_size: int
) -> dict[str, Any]:
    """Forward latency (no grad, eval) of merged FuRA, the untouched base, and un-merged FuRA, interleaved."""
    base = load_base_model(cfg.model, dtype, device, cfg.seed).eval()
    fura_model.eval()
    merged = copy.deepcopy(fura_model).merge_and_unload().eval()
    batch = make_batch(vocab_size, cfg.batch, cfg.seq, device, cfg.seed + 1)
    models = {"base": base, "fura-merged": merged, "fura-unmerged": fura_model}
    with torch.no_grad():
        reference = fura_model(input_ids=batch, use_cache=False).logits.float()
        merged_logits = merged(input_ids=batch, use_cache=False).logits.float()
        merge_error = (merged_logits - reference).abs().max().item()
        del reference, merged_logits
    same_architecture = type(merged) is type(base) and sum(p.numel() for p in merged.parameters()) == sum(
        p.numel() for p in base.parameters()
    )
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    rounds = cfg.inference_warmup + cfg.inference_repeats
    progress = tqdm(total=rounds * len(names), desc="inference", unit="fwd", disable=not cfg.show_progress)
    with torch.no_grad():
        for round_index in range(rounds):
            with _paused_gc():
                for name in _rotated(names, round_index):
                    seconds, _ = timed(lambda m=models[name]: m(input_ids=batch, use_cache=False).logits, device)
                    times[name].append(seconds)
                    progress.update()
    progress.close()
    results: dict[str, Any] = {}
    for name in names:
        measured = times[name][cfg.inference_warmup :]
        results[name] = {
            "warmup_times_s": times[name][: cfg.inference_warmup],
            "times_s": measured,
            **summarize(measured),
        }
    base_times = results["base"]["times_s"]
    for name in names:
        paired = [a / b for a, b in zip(results[name]["times_s"], base_times, strict=True)]
        results[name]["ratio_to_base"] = _ratio(results[name]["median"], results["base"]["median"])
        results[name]["paired_ratio_to_base"] = statistics.median(paired)
    del models, merged, base
    release_free_memory()
    return {
        "models": results,
        "merged_vs_unmerged_max_abs_logit_diff": merge_error,
        "merged_same_architecture_as_base": same_architecture,
    }


def time_large_conversion(cfg: BenchConfig, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Convert a large-model-shaped stack one decoder layer at a time; time ``get_peft_model`` per layer."""
    from peft import get_peft_model

    from fura.tuner.config import FuraConfig

    shape = cfg.big_shape
    layers = min(cfg.big_layers or shape.layers, shape.layers)
    walls, svds = [], []
    trainable = 0
    start = time.perf_counter()
    largest = max(o * i for o, i in shape.projection_shapes().values())
    pool = random_pool(largest + POOL_SLACK, device, dtype, cfg.seed)
    pool_seconds = time.perf_counter() - start
    for index in tqdm(
        range(layers), desc=f"{shape.name}-shaped conversion", unit="layer", disable=not cfg.show_progress
    ):
        layer = ShapedDecoderLayer(shape, dtype, device, index=index, pool=pool)
        seconds, model = timed(lambda m=layer: get_peft_model(m, FuraConfig()), device)
        walls.append(seconds)
        svds.append(model.base_model.decomposition_seconds)
        trainable = count_parameters(model)[0]
        del model, layer
        release_free_memory()
    per_layer = statistics.fmean(walls)
    measured_all = layers == shape.layers
    total = sum(walls) if measured_all else per_layer * shape.layers
    label = (
        f"measured: all {layers} layers converted one at a time"
        if measured_all
        else f"extrapolated: mean of {layers} of {shape.layers} layers x {shape.layers}"
    )
    logger.info("%s-shaped conversion: %.1f s total (%s)", shape.name, total, label)
    return {
        "shape": dataclasses.asdict(shape),
        "layers_converted": layers,
        "per_layer_get_peft_model_s": walls,
        "per_layer_block_svd_s": svds,
        "weights": f"read-only windows into one pool of {pool.numel():,} N(0,1) numbers (drawn in "
        f"{pool_seconds:.1f} s, untimed), a different window per layer and projection",
        "mean_layer_s": per_layer,
        "total_s": total,
        "total_block_svd_s": sum(svds) if measured_all else statistics.fmean(svds) * shape.layers,
        "extrapolated": not measured_all,
        "label": label,
        "trainable_per_layer": trainable,
        "trainable_total": trainable * shape.layers,
        "params_per_layer": shape.layer_params(),
        "weights_dtype": str(dtype).removeprefix("torch."),
    }


# --------------------------------------------------------------------------------------------
# Environment, goals, reports
# --------------------------------------------------------------------------------------------


def environment(cfg: BenchConfig, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    import peft
    import transformers

    import fura

    cpu_model = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "fura": fura.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "device_memory_bytes": torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "batch": cfg.batch,
        "seq": cfg.seq,
        "model": cfg.model,
        "model_name": model_label(cfg.model),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    with contextlib.suppress(OSError):
        env["load_average_start"] = list(os.getloadavg())
    return env


def evaluate_goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, checked against the measurements (``met`` is None when not measured)."""
    methods = report["methods"]

    def step(name: str) -> float | None:
        return methods.get(name, {}).get("step", {}).get("median")

    def paired(name: str) -> float | None:
        return methods.get(name, {}).get("paired_ratio_to_reference", {}).get("median")

    def peak(name: str) -> float | None:
        return methods.get(name, {}).get("memory", {}).get("peak_bytes")

    def goal(name: str, target: str, value: float | None, ok: Callable[[float], bool], fmt: str = "{:.2f}x") -> dict:
        return {
            "goal": name,
            "target": target,
            "value": value,
            "measured": "n/a" if value is None else fmt.format(value),
            "met": None if value is None else bool(ok(value)),
        }

    goals = [
        goal("step time fura / lora-matched", "<= 1.05", _ratio(step("fura"), step(REFERENCE)), lambda v: v <= 1.05),
        goal("  (median of per-round ratios)", "<= 1.05", paired("fura"), lambda v: v <= 1.05),
        goal("peak memory fura / lora-matched", "<= 1.02", _ratio(peak("fura"), peak(REFERENCE)), lambda v: v <= 1.02),
        goal("step time full / fura (speed-up)", ">= 1.3", _ratio(step("full"), step("fura")), lambda v: v >= 1.3),
        goal(
            "peak memory saving of fura vs full",
            ">= 40%",
            None if _ratio(peak("fura"), peak("full")) is None else 1 - _ratio(peak("fura"), peak("full")),
            lambda v: v >= 0.40,
            "{:.0%}",
        ),
        goal(
            "step time fura-explicit / fura (speed-up)",
            ">= 1.2",
            _ratio(step("fura-explicit"), step("fura")),
            lambda v: v >= 1.2,
        ),
    ]
    inference = report.get("inference") or {}
    merged = inference.get("models", {}).get("fura-merged", {})
    goals.append(
        goal(
            "merged inference / dense base",
            "1.00x (within ±5%)",
            merged.get("paired_ratio_to_base"),
            lambda v: abs(v - 1) <= 0.05,
        )
    )
    conversion = report.get("conversion") or {}
    smollm2 = report["environment"]["model"] == "smollm2"
    goals.append(
        goal(
            "conversion time get_peft_model(FuraConfig()) (SmolLM2)",
            "<= 3 s",
            conversion.get("get_peft_model_median_s") if smollm2 else None,
            lambda v: v <= 3.0,
            "{:.2f} s",
        )
    )
    big = report.get("large_conversion") or {}
    if big:
        full_shape = big["shape"] == dataclasses.asdict(LLAMA3_8B)
        goals.append(
            goal(
                f"{big['shape']['name']}-shaped conversion ({'extrapolated' if big['extrapolated'] else 'measured'})",
                "<= 120 s",
                big["total_s"] if full_shape else None,
                lambda v: v <= 120.0,
                "{:.1f} s",
            )
        )
    return goals


def _fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _fmt_ms(seconds: float) -> str:
    """Milliseconds with three significant figures at least (GPU steps take a few ms, CPU steps seconds)."""
    ms = seconds * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _fmt_mib(value: float | None) -> str:
    return "—" if value is None else f"{value / MiB:,.0f}"


def _load_line(env: dict[str, Any]) -> str:
    """Machine load during the run (1/5/15-minute load averages): timings on a shared machine need it."""
    start, end = env.get("load_average_start"), env.get("load_average_end")
    if not start:
        return "Load average: not available."
    text = f"Load average at start {start[0]:.1f} / {start[1]:.1f} / {start[2]:.1f}"
    if end:
        text += f", at end {end[0]:.1f} / {end[1]:.1f} / {end[2]:.1f}"
    return text + f" (1/5/15 min; {env['cpu_count']} CPUs)."


def render_markdown(report: dict[str, Any]) -> str:
    env, cfg = report["environment"], report["config"]
    methods = report["methods"]
    ref = methods.get(REFERENCE, {})
    ref_step, ref_peak = ref.get("step", {}).get("median"), ref.get("memory", {}).get("peak_bytes")
    ref_rss = ref.get("memory", {}).get("rss_peak_bytes")
    lines = [
        f"# fura bench — {env['model_name']}",
        "",
        f"{env['device_name']} ({env['device']}), {env['threads']} thread(s) · {env['dtype']} · batch {env['batch']} × "
        f"{env['seq']} tokens · torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']} · "
        f"{cfg['steps']} timed steps per method after {cfg['warmup']} warm-up, interleaved · {env['timestamp']}",
        "",
        _load_line(env),
        "",
        "## Training step (forward + backward + AdamW step)",
        "",
        "| method | trainable params | step median (ms) | IQR (ms) | tokens/s | × lora-matched | per-round × "
        "lora-matched | peak memory (MiB) | × lora-matched | model (MiB) | RSS peak (MiB) | RSS × lora-matched |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, result in methods.items():
        step = result["step"]
        memory = result.get("memory", {})
        peak = memory.get("peak_bytes")
        label = name + (f" (r={result['rank']})" if "rank" in result else "")
        lines.append(
            f"| {label} | {result['trainable_params']:,} | {_fmt_ms(step['median'])} | "
            f"{_fmt_ms(step['q1'])}–{_fmt_ms(step['q3'])} | {result['tokens_per_second']:,.0f} | "
            f"{_fmt_ratio(_ratio(step['median'], ref_step))} | "
            f"{_fmt_ratio(result.get('paired_ratio_to_reference', {}).get('median'))} | {_fmt_mib(peak)} | "
            f"{_fmt_ratio(_ratio(peak, ref_peak))} | {_fmt_mib(memory.get('model_bytes'))} | "
            f"{_fmt_mib(memory.get('rss_peak_bytes'))} | {_fmt_ratio(_ratio(memory.get('rss_peak_bytes'), ref_rss))} |"
        )
    budget = report.get("fura_budget", {})
    if budget:
        lines += [
            "",
            f"lora-matched rank: {budget['matched_rank']} (FuRA trains {budget['trainable']:,} parameters; "
            f"r·Σ(in+out) = {budget['matched_rank'] * budget['lora_unit']:,} over the same "
            f"{budget['modules']} modules).",
        ]
    conversion = report.get("conversion")
    if conversion:
        fura_build = methods.get("fura", {})
        lines += [
            "",
            "## Conversion (block SVD of every target)",
            "",
            "| what | median (s) | runs (s) |",
            "|---|---:|---|",
            f"| get_peft_model(base, FuraConfig()) | {conversion['get_peft_model_median_s']:.2f} | "
            + ", ".join(f"{v:.2f}" for v in conversion["get_peft_model_s"])
            + " |",
            f"| … of which block SVD (decomposition_seconds) | {conversion['block_svd_median_s']:.2f} | "
            + ", ".join(f"{v:.2f}" for v in conversion["block_svd_s"])
            + " |",
        ]
        for name in ("fura-explicit", "svd"):
            if name in methods:
                lines.append(f"| {name} conversion (for comparison) | {methods[name]['build_seconds']:.2f} | 1 run |")
        if fura_build:
            lines.append(f"| fura build in the timing phase | {fura_build['build_seconds']:.2f} | 1 run |")
    inference = report.get("inference")
    if inference:
        lines += [
            "",
            "## Inference (forward only, no grad, batch × seq as above)",
            "",
            "| model | median (ms) | × base | per-round × base |",
            "|---|---:|---:|---:|",
        ]
        for name, result in inference["models"].items():
            lines.append(
                f"| {name} | {result['median'] * 1e3:,.0f} | {_fmt_ratio(result['ratio_to_base'])} | "
                f"{_fmt_ratio(result['paired_ratio_to_base'])} |"
            )
        lines += [
            "",
            f"merge_and_unload keeps the architecture: {inference['merged_same_architecture_as_base']}; "
            f"max |logit(merged) − logit(unmerged)| = {inference['merged_vs_unmerged_max_abs_logit_diff']:.2e}.",
        ]
    big = report.get("large_conversion")
    if big:
        shape = big["shape"]
        lines += [
            "",
            f"## {shape['name']}-shaped conversion (random weights, one decoder layer in memory at a time)",
            "",
            f"hidden {shape['hidden']}, MLP {shape['intermediate']}, {shape['heads']} heads / {shape['kv_heads']} KV "
            f"heads × {shape['head_dim']}, {shape['layers']} layers, {big['weights_dtype']} weights, "
            f"{big['params_per_layer']:,} projection weights per layer, FuRA trains {big['trainable_total']:,}.",
            "",
            f"- get_peft_model per layer: mean {big['mean_layer_s']:.2f} s "
            f"(min {min(big['per_layer_get_peft_model_s']):.2f}, max {max(big['per_layer_get_peft_model_s']):.2f})",
            f"- **total: {big['total_s']:.1f} s** ({big['label']}); block SVD part {big['total_block_svd_s']:.1f} s",
        ]
    lines += ["", "## Goals", "", "| goal | target | measured | met |", "|---|---|---|---|"]
    for item in report["goals"]:
        met = {True: "✅ yes", False: "❌ no", None: "— not measured"}[item["met"]]
        lines.append(f"| {item['goal']} | {item['target']} | {item['measured']} | {met} |")
    if env["model"] != "smollm2":
        lines += ["", "The goals are defined for SmolLM2-135M-Instruct; on other models they are only indicative."]
    lines += [
        "",
        "## How this was measured",
        "",
        f"- **Step time**: {report['timing_method']}",
        f"- **Peak memory**: {report['memory_method']}",
        "- **Ratios**: '× lora-matched' divides medians; 'per-round' is the median over rounds of the ratio of the "
        "two steps taken in the same round (robust to drifts in machine load).",
        "",
    ]
    return "\n".join(lines)


def render_chart(report: dict[str, Any], path: Path) -> None:
    """Two bar charts (step time, peak memory) with each bar's ratio to lora-matched written on it."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    methods = report["methods"]
    names = list(methods)
    steps = [methods[n]["step"]["median"] * 1e3 for n in names]
    peaks = [(methods[n].get("memory", {}).get("peak_bytes") or 0) / MiB for n in names]
    models = [(methods[n].get("memory", {}).get("model_bytes") or 0) / MiB for n in names]
    ref_index = names.index(REFERENCE) if REFERENCE in names else None
    colors = ["#d62728" if n == "fura" else "#ff9896" if n.startswith("fura") else "#1f77b4" for n in names]
    env = report["environment"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    panels = (
        (axes[0], steps, "median training step (ms)"),
        (axes[1], peaks, "peak training memory (MiB; hatched: model after conversion)"),
    )
    for axis, values, title in panels:
        bars = axis.bar(names, values, color=colors)
        axis.set_title(title, fontsize=11)
        axis.tick_params(axis="x", rotation=30)
        reference = values[ref_index] if ref_index is not None else None
        for bar, value in zip(bars, values, strict=True):
            text = "n/a" if value == 0 else (f"{value / reference:.2f}×" if reference else f"{value:,.0f}")
            axis.annotate(
                text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=9
            )
        axis.margins(y=0.12)
    axes[1].bar(names, models, color="none", edgecolor="white", hatch="//", linewidth=0)
    fig.suptitle(
        f"{env['model_name']} · {env['device']} {env['dtype']}, {env['threads']} thread(s) · "
        f"batch {env['batch']}×{env['seq']} · "
        f"ratios to {REFERENCE}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    """Run every phase and write ``bench.json``, ``bench.md`` and ``bench.png`` to ``cfg.out``.

    Returns the report (the content of ``bench.json``).
    """
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_benchmark(cfg)
    finally:
        torch.set_num_threads(threads)


def _run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    device = cfg.resolved_device()
    dtype = cfg.resolved_dtype(device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load_model_config(cfg.model)  # resolves (and for smollm2 converts once) the model folder before the server starts
    # the memory server imports its libraries while this process does the untimed set-up below
    server = _MemoryServer(cfg.model, fork=_forks(str(device))) if cfg.memory else None
    try:
        return _run_phases(cfg, device, dtype, out, started, server)
    finally:
        if server is not None:
            server.close()


def _run_phases(
    cfg: BenchConfig,
    device: torch.device,
    dtype: torch.dtype,
    out: Path,
    started: float,
    server: _MemoryServer | None,
) -> dict[str, Any]:
    config_dict = dataclasses.asdict(cfg)
    config_dict["methods"] = list(cfg.methods)
    report: dict[str, Any] = {
        "environment": environment(cfg, device, dtype),
        "config": config_dict,
        "timing_method": TIMING_METHOD.format(
            clock="CUDA events around the step (synchronised)."
            if device.type == "cuda"
            else "time.perf_counter around the step."
        ),
        "memory_method": "not measured (memory=False)",
    }
    logger.info(
        "fura bench: %s on %s (%s), batch %d x %d",
        report["environment"]["model_name"],
        device,
        dtype,
        cfg.batch,
        cfg.seq,
    )

    budget = fura_budget(cfg.model)
    report["fura_budget"] = dataclasses.asdict(budget)
    vocab_size = load_model_config(cfg.model).vocab_size
    logger.info("FuRA trains %s parameters; lora-matched rank %d", f"{budget.trainable:,}", budget.matched_rank)

    memory: dict[str, Any] = {}
    if cfg.memory:
        jobs = memory_jobs(cfg, device, dtype, budget, vocab_size)
        memory = measure_memory(jobs, cfg.show_progress, server=server)
        report["memory_method"] = MEMORY_METHOD_CUDA if device.type == "cuda" else MEMORY_METHOD_CPU
        if any(m.get("rss_peak_reset") is False for m in memory.values()):
            report["memory_method"] += (
                " (The peak-RSS reset was unavailable here: RSS peak is the process's lifetime peak and includes the "
                "model build.)"
            )

    if "fura" in cfg.methods:
        report["conversion"] = time_conversion(cfg, device, dtype)

    timing, built = time_training_steps(cfg, device, dtype, budget, vocab_size)
    report["methods"] = timing["methods"]
    report["round_orders"] = timing["round_orders"]
    for name, result in report["methods"].items():
        if name in memory:
            result["memory"] = memory[name]

    fura_model = built["fura"].model if "fura" in built else None
    built = {name: b for name, b in built.items() if name == "fura"}  # free the other models
    release_free_memory()
    if cfg.inference and fura_model is not None:
        report["inference"] = time_merged_inference(cfg, device, dtype, fura_model, vocab_size)
    del fura_model, built
    release_free_memory()

    if not cfg.skip_8b:
        report["large_conversion"] = time_large_conversion(cfg, device, dtype)

    with contextlib.suppress(OSError):
        report["environment"]["load_average_end"] = list(os.getloadavg())
    report["goals"] = evaluate_goals(report)
    report["total_seconds"] = time.perf_counter() - started

    (out / "bench.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    (out / "bench.md").write_text(render_markdown(report))
    written = [out / "bench.json", out / "bench.md"]
    if importlib.util.find_spec("matplotlib") is None:  # a GPU image may lack it (it comes with fura's train extra)
        logger.warning("bench.png not drawn: matplotlib is not installed (pip install matplotlib)")
    else:
        render_chart(report, out / "bench.png")
        written.append(out / "bench.png")
    logger.info("wrote %s (%.0f s)", ", ".join(map(str, written)), report["total_seconds"])
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"cannot serialise {type(value).__name__}")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``fura bench``'s options to ``parser`` (for a sub-command parser)."""
    defaults = BenchConfig()
    parser.add_argument(
        "--model",
        default=defaults.model,
        help="smollm2 | tiny | llama3-8b[:N] | llama3.2-3b[:N] (random weights of that geometry, N decoder layers) "
        "| PATH (default: %(default)s)",
    )
    parser.add_argument("--batch", type=int, default=defaults.batch, help="sequences per step (default: %(default)s)")
    parser.add_argument("--seq", type=int, default=defaults.seq, help="tokens per sequence (default: %(default)s)")
    parser.add_argument(
        "--steps", type=int, default=defaults.steps, help="timed steps per method (default: %(default)s)"
    )
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="warm-up rounds (default: %(default)s)")
    parser.add_argument(
        "--methods",
        default=",".join(defaults.methods),
        help="comma-separated methods (default: %(default)s; lora-rN for any rank N)",
    )
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    parser.add_argument("--out", default=defaults.out, help="output folder (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default: %(default)s)")
    parser.add_argument("--memory-steps", type=int, default=defaults.memory_steps, help="steps per memory child")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory phase")
    parser.add_argument("--conversion-repeats", type=int, default=defaults.conversion_repeats)
    parser.add_argument("--no-inference", action="store_true", help="skip the merged-inference comparison")
    parser.add_argument("--inference-repeats", type=int, default=defaults.inference_repeats)
    parser.add_argument("--skip-8b", action="store_true", help="skip the Llama-3-8B-shaped conversion")
    parser.add_argument(
        "--big-layers",
        type=int,
        default=None,
        help="8B-shaped layers to convert (default: all 32; fewer = extrapolated)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """A :class:`BenchConfig` from parsed :func:`add_bench_arguments` options."""
    return BenchConfig(
        model=args.model,
        batch=args.batch,
        seq=args.seq,
        steps=args.steps,
        warmup=args.warmup,
        methods=args.methods,
        dtype=args.dtype,
        device=args.device,
        out=args.out,
        threads=args.threads,
        lr=args.lr,
        seed=args.seed,
        memory=not args.no_memory,
        memory_steps=args.memory_steps,
        conversion_repeats=args.conversion_repeats,
        inference=not args.no_inference,
        inference_repeats=args.inference_repeats,
        skip_8b=args.skip_8b,
        big_layers=args.big_layers,
        show_progress=not args.no_progress,
    )


def bench_cli(args: Sequence[str] | argparse.Namespace | None = None) -> int:
    """``fura bench [options]``: parse (a list of strings, or an already parsed namespace), run, print the table."""
    if not isinstance(args, argparse.Namespace):
        parser = add_bench_arguments(argparse.ArgumentParser(prog="fura bench", description=__doc__.split("\n")[0]))
        args = parser.parse_args(args)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run_benchmark(config_from_args(args))
    print(render_markdown(report))
    missed = [g["goal"] for g in report["goals"] if g["met"] is False]
    if missed:
        logger.warning("goals missed: %s", "; ".join(g.strip() for g in missed))
    return 0


if __name__ == "__main__":
    sys.exit(bench_cli())
