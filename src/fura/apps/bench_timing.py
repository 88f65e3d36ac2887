"""Timed phases of ``fura bench``: interleaved training steps, conversion, merged inference, large-model conversion."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from fura.apps.bench_config import REFERENCE, BenchConfig
from fura.apps.bench_models import (
    POOL_SLACK,
    FuraBudget,
    ShapedDecoderLayer,
    build_method,
    load_base_model,
    make_batch,
    make_optimizer,
    random_pool,
    train_step,
)
from fura.io.memory import (
    release_free_memory,
)
from fura.recipes.base_models import count_parameters

logger = logging.getLogger("fura.apps.bench")

TIMING_METHOD = (
    "one process, all methods' models resident; each round steps every method once (order rotated by one "
    "per round); the first `warmup` rounds are discarded. A step is forward + causal-LM loss + backward + "
    "AdamW step + zero_grad(set_to_none=True) on the same random batch; gc.collect() runs before each round "
    "and Python's cyclic GC is paused during the round. {clock}"
)


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


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


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
        results[name]["ratio_to_base"] = ratio(results[name]["median"], results["base"]["median"])
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
