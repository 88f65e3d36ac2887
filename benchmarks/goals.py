"""The goals the benchmarks are held to, evaluated from their reports: kept here, with the benchmarks, never in the
library (``fura bench`` and ``make gpu-check`` measure; this module judges).

Each goal is a dict ``{"goal", "target", "value", "measured", "met"}`` (``met`` is None where the figure was not
measured). Command line, after ``fura bench --out DIR``::

    python -m benchmarks.goals DIR      # prints the table and writes DIR/goals.md

This module imports only the standard library at import time (``benchmarks/gpu_check.py`` runs before fura is
installed).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

#: The method ``fura bench`` takes its ratios against.
REFERENCE = "lora-matched"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, None where either is missing or the denominator is 0."""
    return None if numerator is None or denominator in (None, 0) else numerator / denominator


def goal(text: str, target: str, value: float | None, ok: Callable[[float], bool], fmt: str = "{:.2f}x") -> dict:
    """One goal: its text, the target as written, the measured value and whether ``ok(value)`` holds."""
    return {
        "goal": text,
        "target": target,
        "value": value,
        "measured": "n/a" if value is None else fmt.format(value),
        "met": None if value is None else bool(ok(value)),
    }


def bench_goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 4's targets for ``fura bench`` on SmolLM2-135M (CPU), from its ``bench.json``."""
    from fura.apps.bench_models import LLAMA3_8B

    methods = report["methods"]

    def step(name: str) -> float | None:
        return methods.get(name, {}).get("step", {}).get("median")

    def paired(name: str) -> float | None:
        return methods.get(name, {}).get("paired_ratio_to_reference", {}).get("median")

    def peak(name: str) -> float | None:
        return methods.get(name, {}).get("memory", {}).get("peak_bytes")

    goals = [
        goal("step time fura / lora-matched", "<= 1.05", ratio(step("fura"), step(REFERENCE)), lambda v: v <= 1.05),
        goal("  (median of per-round ratios)", "<= 1.05", paired("fura"), lambda v: v <= 1.05),
        goal("peak memory fura / lora-matched", "<= 1.02", ratio(peak("fura"), peak(REFERENCE)), lambda v: v <= 1.02),
        goal("step time full / fura (speed-up)", ">= 1.3", ratio(step("full"), step("fura")), lambda v: v >= 1.3),
        goal(
            "peak memory saving of fura vs full",
            ">= 40%",
            None if ratio(peak("fura"), peak("full")) is None else 1 - ratio(peak("fura"), peak("full")),
            lambda v: v >= 0.40,
            "{:.0%}",
        ),
        goal(
            "step time fura-explicit / fura (speed-up)",
            ">= 1.2",
            ratio(step("fura-explicit"), step("fura")),
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
        full_shape = big["shape"] == asdict(LLAMA3_8B)
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


def gpu_goals(benches: dict[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    """Issue 11's goals for ``make gpu-check``, from its bench reports keyed ``"8b"`` and ``"3b"``."""

    def method(key: str, label: str) -> dict[str, Any]:
        return (benches.get(key) or {}).get("methods", {}).get(label, {})

    def step(key: str, label: str) -> float | None:
        return method(key, label).get("step", {}).get("median")

    peak = {label: method("8b", label).get("memory", {}).get("peak_bytes") for label in ("fura", "lora-r64")}
    tokens = {label: method("3b", label).get("tokens_per_second") for label in ("fura", "lora-r32")}
    return [
        goal("8B-shaped: step time fura / LoRA r=64", "<= 1.00", ratio(step("8b", "fura"), step("8b", "lora-r64")),
             lambda v: v <= 1.00),
        goal("8B-shaped: peak memory fura / LoRA r=64", "<= 0.90", ratio(peak["fura"], peak["lora-r64"]),
             lambda v: v <= 0.90),
        goal("8B-shaped: step time full / fura", ">= 3", ratio(step("8b", "full"), step("8b", "fura")),
             lambda v: v >= 3.0),
        goal("3B-shaped: tokens/s fura / LoRA r=32", ">= 1.00", ratio(tokens["fura"], tokens["lora-r32"]),
             lambda v: v >= 1.00),
    ]  # fmt: skip


def render(goals: Sequence[dict[str, Any]]) -> str:
    """The goals as a markdown table."""
    lines = ["| goal | target | measured | met |", "|---|---|---:|---|"]
    for item in goals:
        met = {True: "✅ yes", False: "❌ no", None: "— not measured"}[item["met"]]
        lines.append(f"| {item['goal']} | {item['target']} | {item['measured']} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.goals DIR``: judge ``DIR/bench.json``, print the table, write ``DIR/goals.md``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not (Path(args[0]) / "bench.json").is_file():
        print(
            "usage: python -m benchmarks.goals DIR  (DIR holds the bench.json of fura bench --out DIR)", file=sys.stderr
        )
        return 2
    report = json.loads((Path(args[0]) / "bench.json").read_text())
    table = render(bench_goals(report))
    if report["environment"]["model"] != "smollm2":
        table += "\nThe goals are defined for SmolLM2-135M-Instruct; on other models they are only indicative.\n"
    (Path(args[0]) / "goals.md").write_text("# fura bench — goals\n\n" + table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
