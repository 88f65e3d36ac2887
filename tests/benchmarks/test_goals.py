"""benchmarks/goals.py judges fura bench reports: each goal met, missed, or not measured (a figure missing, or the
model it is defined for not run)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.goals import bench_goals, main


def report(model: str = "smollm2", fura_step: float = 1.0, big_shape: str = "llama3-8b") -> dict:
    from dataclasses import asdict

    from fura.apps.bench_models import LLAMA3_8B

    shape = asdict(LLAMA3_8B) if big_shape == "llama3-8b" else {**asdict(LLAMA3_8B), "name": big_shape, "layers": 2}
    return {
        "environment": {"model": model},
        "methods": {
            "fura": {"step": {"median": fura_step}, "memory": {"peak_bytes": 100}, "paired_ratio_to_reference": {}},
            "lora-matched": {"step": {"median": 1.0}, "memory": {"peak_bytes": 100}},
            "full": {"step": {"median": 1.5}, "memory": {"peak_bytes": 200}},
        },
        "conversion": {"get_peft_model_median_s": 1.3},
        "inference": {"models": {"fura-merged": {"paired_ratio_to_base": 1.01}}},
        "large_conversion": {"shape": shape, "extrapolated": True, "total_s": 90.0},
    }


def test_goals_are_met_missed_or_not_measured() -> None:
    goals = {g["goal"].strip(): g for g in bench_goals(report())}
    assert goals["step time fura / lora-matched"]["met"] is True
    assert goals["peak memory saving of fura vs full"]["value"] == 0.5
    assert goals["step time fura-explicit / fura (speed-up)"]["met"] is None  # not run
    assert goals["conversion time get_peft_model(FuraConfig()) (SmolLM2)"]["met"] is True
    assert goals["Llama-3-8B-shaped conversion (extrapolated)"]["met"] is True
    slow = {g["goal"]: g for g in bench_goals(report(fura_step=1.2))}
    assert slow["step time fura / lora-matched"]["met"] is False


def test_goals_defined_for_other_models_are_not_judged() -> None:
    goals = bench_goals(report(model="tiny", big_shape="small-llama"))
    by_text = {g["goal"]: g for g in goals}
    assert by_text["conversion time get_peft_model(FuraConfig()) (SmolLM2)"]["met"] is None
    assert all(g["met"] is None for g in goals if "small-llama" in g["goal"])  # only the real 8B shape counts


def test_command_line_writes_the_goals_table(tmp_path: Path, capsys) -> None:
    (tmp_path / "bench.json").write_text(json.dumps(report()))
    assert main([str(tmp_path)]) == 0
    table = (tmp_path / "goals.md").read_text()
    assert "| step time fura / lora-matched | <= 1.05 | 1.00x | ✅ yes |" in table
    assert table.splitlines()[-1] in capsys.readouterr().out
    assert main([str(tmp_path / "missing")]) == 2
