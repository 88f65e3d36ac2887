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
import dataclasses
import datetime as _dt
import importlib.util
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fura.apps.bench_config import BenchConfig
from fura.apps.bench_memory import (
    MEMORY_METHOD_CPU,
    MEMORY_METHOD_CUDA,
    MemoryServer,
    forks,
    measure_memory,
    memory_jobs,
)
from fura.apps.bench_models import (
    fura_budget,
    load_model_config,
    model_label,
)
from fura.apps.bench_report import render_chart, render_markdown
from fura.apps.bench_timing import (
    TIMING_METHOD,
    time_conversion,
    time_large_conversion,
    time_merged_inference,
    time_training_steps,
)
from fura.io.fields import dataclass_from
from fura.io.memory import (
    release_free_memory,
)
from fura.recipes.base_models import DTYPE_NAMES
from fura.tuner.factorize import torch_threads

logger = logging.getLogger("fura.apps.bench")


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


def run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    """Run every phase and write ``bench.json``, ``bench.md`` and ``bench.png`` to ``cfg.out``.

    Returns the report (the content of ``bench.json``).
    """
    with torch_threads(cfg.threads):
        return _run_benchmark(cfg)


def _run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    device = cfg.resolved_device()
    dtype = cfg.resolved_dtype(device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load_model_config(cfg.model)  # resolves (and for smollm2 converts once) the model folder before the server starts
    # the memory server imports its libraries while this process does the untimed set-up below
    server = MemoryServer(cfg.model, fork=forks(str(device))) if cfg.memory else None
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
    server: MemoryServer | None,
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
    return dataclass_from(
        BenchConfig,
        args,
        memory=not args.no_memory,
        inference=not args.no_inference,
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
    return 0


if __name__ == "__main__":
    sys.exit(bench_cli())
