"""``fura bench`` end to end on the tiny random Llama: every method, every phase, every output file."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from fura.apps.bench import BenchConfig, bench_cli, run_benchmark
from fura.apps.bench_models import METHODS, TINY_LLAMA, LlamaShape, check_method
from fura.tuner.factorize import closest_factor_pair

#: A drastically reduced Llama-shaped stack: 4 layers of which 2 are converted (exercises extrapolation).
SMALL_SHAPE = LlamaShape(name="small-Llama", hidden=64, intermediate=224, heads=4, kv_heads=2, head_dim=16, layers=4)


def _fura_trainable_expected() -> int:
    """Σ in·(b+1) over the adapted modules: closest divisor pair, o_proj split by head."""
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "head_dim")
    hidden, inter, heads, head_dim = (TINY_LLAMA[k] for k in keys)
    b_hidden, b_inter = closest_factor_pair(hidden)[1], closest_factor_pair(inter)[1]
    per_layer = 5 * hidden * (b_hidden + 1) + heads * head_dim * (head_dim + 1) + inter * (b_inter + 1)
    return per_layer * TINY_LLAMA["num_hidden_layers"]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cfg = BenchConfig(
        model="tiny",
        batch=2,
        seq=16,
        steps=2,
        warmup=1,
        device="cpu",
        out=str(out),
        threads=1,
        memory_steps=2,
        conversion_repeats=1,
        inference_warmup=0,
        inference_repeats=2,
        big_shape=SMALL_SHAPE,
        big_layers=2,
        show_progress=False,
    )
    return out, run_benchmark(cfg)


def test_files_exist_and_json_has_every_method(bench_run):
    out, _ = bench_run
    for name in ("bench.json", "bench.md", "bench.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    data = json.loads((out / "bench.json").read_text())
    assert list(data["methods"]) == list(METHODS)
    env = data["environment"]
    for key in ("torch", "device", "threads", "dtype", "batch", "seq"):
        assert key in env
    assert (env["device"], env["dtype"], env["batch"], env["seq"], env["threads"]) == ("cpu", "float32", 2, 16, 1)
    assert torch.get_num_threads() >= 1  # restored after the run


def test_timings_and_memory_are_positive(bench_run):
    _, report = bench_run
    for name, result in report["methods"].items():
        assert len(result["step_times_s"]) == 2 and len(result["warmup_times_s"]) == 1, name
        assert result["step"]["median"] > 0, name
        assert all(t > 0 for t in result["step_times_s"]), name
        memory = result["memory"]
        assert "error" not in memory, memory.get("error")
        assert memory["peak_bytes"] > memory["steady_state_tensor_bytes"] > memory["model_bytes"] > 0, name
        assert memory["rss_peak_bytes"] > 0 and memory["rss_source"].startswith(("VmHWM", "ru_maxrss")), name
        assert memory["trainable"] == result["trainable_params"], name
        assert all(torch.isfinite(torch.tensor(result["losses"]))), name
    assert report["round_orders"][0] != report["round_orders"][1]  # the order rotates between rounds
    peak = {name: result["memory"]["peak_bytes"] for name, result in report["methods"].items()}
    # tensor peaks are deterministic: full fine-tuning adds a gradient and two Adam moments per weight
    params = report["methods"]["full"]["trainable_params"] * 4
    assert peak["full"] - peak["lora-matched"] > 2 * params
    assert peak["full"] - peak["fura"] > params


def test_trainable_counts(bench_run):
    _, report = bench_run
    methods = report["methods"]
    expected = _fura_trainable_expected()
    assert methods["fura"]["trainable_params"] == expected
    assert methods["fura-explicit"]["trainable_params"] == expected
    assert report["fura_budget"]["trainable"] == expected
    from transformers import LlamaConfig, LlamaForCausalLM

    total = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).parameters())
    assert methods["full"]["trainable_params"] == total
    matched = methods["lora-matched"]
    unit = report["fura_budget"]["lora_unit"]
    assert matched["rank"] == report["fura_budget"]["matched_rank"]
    assert abs(matched["trainable_params"] - expected) <= unit / 2  # the best integer rank
    assert abs(matched["trainable_params"] - expected) / expected < 0.05
    assert methods["lora-r32"]["rank"] == 32 and methods["lora-r32"]["trainable_params"] == 32 * unit
    assert methods["dora"]["rank"] == matched["rank"]
    assert methods["dora"]["trainable_params"] > matched["trainable_params"]  # + magnitude vectors


def test_conversion_inference_and_large_shape(bench_run):
    _, report = bench_run
    conversion = report["conversion"]
    assert conversion["get_peft_model_median_s"] >= conversion["block_svd_median_s"] > 0
    inference = report["inference"]
    assert set(inference["models"]) == {"base", "fura-merged", "fura-unmerged"}
    assert inference["merged_same_architecture_as_base"]
    assert inference["merged_vs_unmerged_max_abs_logit_diff"] < 1e-3
    assert all(m["median"] > 0 for m in inference["models"].values())
    big = report["large_conversion"]
    assert big["layers_converted"] == 2 and big["extrapolated"]
    assert big["total_s"] == pytest.approx(big["mean_layer_s"] * SMALL_SHAPE.layers)
    hidden, inter = SMALL_SHAPE.hidden, SMALL_SHAPE.intermediate
    b_hidden, b_inter = closest_factor_pair(hidden)[1], closest_factor_pair(inter)[1]
    q = SMALL_SHAPE.heads * SMALL_SHAPE.head_dim
    per_layer = 5 * hidden * (b_hidden + 1) + q * (SMALL_SHAPE.head_dim + 1) + inter * (b_inter + 1)
    assert big["trainable_per_layer"] == per_layer
    goals = {g["goal"]: g for g in report["goals"]}
    assert goals["step time fura / lora-matched"]["value"] > 0
    assert goals["conversion time get_peft_model(FuraConfig()) (SmolLM2)"]["met"] is None  # not SmolLM2
    assert all(g["met"] is None for g in report["goals"] if "small-Llama" in g["goal"])  # only the real 8B shape counts


def test_markdown_has_a_row_per_method(bench_run):
    out, _ = bench_run
    text = (out / "bench.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    for name in METHODS:
        assert any(row.split("|")[1].strip().split(" ")[0] == name for row in rows), name
    assert "## Goals" in text and "How this was measured" in text


def test_png_is_valid(bench_run):
    out, _ = bench_run
    data = (out / "bench.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100


def test_config_validation_and_cli_parsing(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark method"):
        BenchConfig(methods=("fura", "lora-huge"))
    with pytest.raises(ValueError, match="steps"):
        BenchConfig(steps=0)
    assert BenchConfig(methods="fura, lora-r8").methods == ("fura", "lora-r8")
    assert check_method("lora-r4") == "lora-r4"
    # the CLI path: two methods, no memory / inference / 8B phase
    code = bench_cli(
        [
            "--model", "tiny", "--batch", "1", "--seq", "8", "--steps", "1", "--warmup", "0",
            "--methods", "fura,lora-matched", "--no-memory", "--no-inference", "--skip-8b",
            "--conversion-repeats", "1", "--threads", "1", "--out", str(tmp_path), "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert list(data["methods"]) == ["fura", "lora-matched"]
    assert "memory" not in data["methods"]["fura"] and "large_conversion" not in data
