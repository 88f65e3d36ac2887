"""``bench.md`` and ``bench.png``: the tables and the chart of a ``fura bench`` report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fura.apps.bench_config import REFERENCE, MiB
from fura.apps.bench_timing import ratio


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
            f"{_fmt_ratio(ratio(step['median'], ref_step))} | "
            f"{_fmt_ratio(result.get('paired_ratio_to_reference', {}).get('median'))} | {_fmt_mib(peak)} | "
            f"{_fmt_ratio(ratio(peak, ref_peak))} | {_fmt_mib(memory.get('model_bytes'))} | "
            f"{_fmt_mib(memory.get('rss_peak_bytes'))} | {_fmt_ratio(ratio(memory.get('rss_peak_bytes'), ref_rss))} |"
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
