"""``fura bench`` end to end on the tiny random Llama: every method, every phase, every output file; the registry
aliases behind the bench labels; shaped random-weight models built from configs; the memory children's two modes."""

from __future__ import annotations

import argparse
import dataclasses
import json
import struct

import pytest
import torch

from fura.apps import bench_memory, bench_models
from fura.apps.bench import BenchConfig, add_bench_arguments, bench_cli, config_from_args, run_benchmark
from fura.apps.bench_models import (
    BENCH_METHODS,
    LLAMA3_8B,
    LLAMA32_3B,
    TINY_LLAMA,
    FuraBudget,
    LlamaShape,
    build_meta_model,
    check_method,
    fura_budget,
    load_base_model,
    load_model_config,
    model_label,
    registry_method,
    shaped_model,
)
from fura.recipes.base_models import count_parameters
from fura.recipes.registry import METHODS as REGISTRY
from fura.recipes.registry import get_method
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
    assert list(data["methods"]) == list(BENCH_METHODS)
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
        assert memory["rss_peak_bytes"] > 0 and isinstance(memory["rss_peak_reset"], bool), name
        assert memory["rss_source"].startswith("VmHWM" if memory["rss_peak_reset"] else "peak over"), name
        assert memory["trainable"] == result["trainable_params"], name
        assert result["tokens_per_second"] == pytest.approx(2 * 16 / result["step"]["median"]), name
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
    # every label was built by the registry, with the arguments of its alias
    assert {name: result["registry_method"] for name, result in methods.items()} == {
        "fura": "fura", "fura-explicit": "fura-explicit", "lora-matched": "lora", "lora-r32": "lora",
        "dora": "dora", "full": "full", "svd": "svd",
    }  # fmt: skip
    assert matched["method_args"]["lora_alpha"] == 2 * matched["rank"] and matched["method_args"]["lora_dropout"] == 0
    assert methods["dora"]["method_args"]["use_dora"] is True
    assert methods["fura-explicit"]["method_args"]["train_bias"] is False  # scale_large_core: the method's default
    assert sorted(matched["method_args"]["target_modules"]) == report["fura_budget"]["targets"]


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
    assert "goals" not in report  # the library measures; benchmarks/goals.py judges (tests/benchmarks/test_goals.py)


def test_markdown_has_a_row_per_method(bench_run):
    out, _ = bench_run
    text = (out / "bench.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    for name in BENCH_METHODS:
        assert any(row.split("|")[1].strip().split(" ")[0] == name for row in rows), name
    assert "tokens/s" in text
    assert "## Goals" not in text and "How this was measured" in text  # goals: benchmarks/goals.py


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


def test_every_bench_flag_reaches_the_config():
    parser = add_bench_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "--model", "tiny", "--batch", "3", "--seq", "7", "--steps", "2", "--warmup", "1", "--methods", "fura",
            "--dtype", "float16", "--device", "cpu", "--out", "o", "--threads", "2", "--lr", "0.5", "--seed", "9",
            "--memory-steps", "4", "--no-memory", "--conversion-repeats", "5", "--no-inference",
            "--inference-repeats", "6", "--skip-8b", "--big-layers", "2", "--no-progress",
        ]
    )  # fmt: skip
    config = config_from_args(args)
    assert dataclasses.asdict(config) == {
        **dataclasses.asdict(BenchConfig()),
        **dict(model="tiny", batch=3, seq=7, steps=2, warmup=1, methods=("fura",), dtype="float16", device="cpu"),
        **dict(out="o", threads=2, lr=0.5, seed=9, memory_steps=4, memory=False, conversion_repeats=5),
        **dict(inference=False, inference_repeats=6, skip_8b=True, big_layers=2, show_progress=False),
    }
    flags = {action.dest for action in parser._actions}
    negated = {"memory", "inference", "show_progress"}  # --no-memory, --no-inference, --no-progress
    without_flag = {field.name for field in dataclasses.fields(BenchConfig)} - flags - negated
    assert without_flag == {"inference_warmup", "big_shape"}  # set in code only


# --------------------------------------------------------------------------------------------
# One registry, one dtype table
# --------------------------------------------------------------------------------------------


def test_bench_labels_are_aliases_of_registry_methods():
    budget = fura_budget("tiny")
    targets = budget.targets
    for label in (*BENCH_METHODS, "lora-r12"):
        method, overrides = registry_method(label, budget)
        assert method in REGISTRY, label
        get_method(method).resolve_args("commonsense", overrides)  # every override is a valid argument
        assert label in ("fura", "full") or sorted(overrides["target_modules"]) == targets, label
    assert registry_method("lora-r12", budget) == (
        "lora", {"r": 12, "lora_alpha": 24, "lora_dropout": 0.0, "target_modules": targets, "bias": "none"}
    )  # fmt: skip
    assert registry_method("dora", budget)[1]["r"] == budget.matched_rank
    assert registry_method("fura-explicit", budget) == (
        "fura-explicit", {"target_modules": targets, "train_bias": False}
    )  # fmt: skip
    with pytest.raises(ValueError, match="unknown benchmark method"):
        registry_method("qlora", budget)


def test_dtypes_come_from_the_registry_table():
    assert BenchConfig(dtype="bf16").resolved_dtype(torch.device("cpu")) is torch.bfloat16
    assert BenchConfig().resolved_dtype(torch.device("cpu")) is torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        BenchConfig(dtype="int3")


# --------------------------------------------------------------------------------------------
# Shaped random-weight models from configs
# --------------------------------------------------------------------------------------------

#: A Llama geometry small enough to build for real on the CPU.
MINI = LlamaShape(name="Mini", hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, layers=3, vocab_size=96)


def test_shaped_model_specs_and_geometry():
    assert shaped_model("llama3-8b:4") == (LLAMA3_8B, 4)
    assert shaped_model("llama3.2-3b") == (LLAMA32_3B, 28)
    assert shaped_model("tiny") is None and shaped_model("/some/folder") is None
    for bad in ("llama3-8b:0", "llama3-8b:x", "llama3.2-3b:"):
        with pytest.raises(ValueError, match="positive integer"):
            shaped_model(bad)
    with pytest.raises(ValueError, match="positive integer"):
        BenchConfig(model="llama3-8b:-1")
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    eight_b = load_model_config("llama3-8b:4")
    assert [getattr(eight_b, k) for k in keys] == [4096, 14336, 32, 8, 128]
    assert (eight_b.num_hidden_layers, eight_b.vocab_size, eight_b.tie_word_embeddings) == (4, 128256, False)
    three_b = load_model_config("llama3.2-3b")
    assert [getattr(three_b, k) for k in keys] == [3072, 8192, 24, 8, 128]
    assert (three_b.num_hidden_layers, three_b.vocab_size, three_b.tie_word_embeddings) == (28, 128256, True)
    assert model_label("llama3-8b:4") == "Llama-3-8B-shaped random weights (4 of 32 layers)"
    assert model_label("llama3.2-3b") == "Llama-3.2-3B-shaped random weights (all 28 layers)"


def test_shaped_models_count_like_the_real_ones():
    """On the meta device: parameters of the real models, and FuRA's 118.7 M trainable on Llama-3-8B (the paper's
    count)."""
    meta = build_meta_model("llama3-8b:2")
    assert count_parameters(meta)[1] == 2 * 4096 * 128256 + 2 * (LLAMA3_8B.layer_params() + 2 * 4096) + 4096
    assert count_parameters(build_meta_model("llama3.2-3b"))[1] == 3_212_749_824  # Llama-3.2-3B, tied embeddings
    assert fura_budget("llama3-8b:1").trainable * 32 == 118_685_696


def test_shaped_model_is_seeded_and_built_in_the_dtype(monkeypatch, tmp_path):
    monkeypatch.setitem(bench_models.SHAPED_MODELS, "mini", MINI)
    state = torch.get_rng_state()
    first = load_base_model("mini:2", torch.bfloat16, torch.device("cpu"), seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is left alone
    again = load_base_model("mini:2", torch.bfloat16, torch.device("cpu"), seed=0)
    other = load_base_model("mini:2", torch.bfloat16, torch.device("cpu"), seed=1)
    assert len(first.model.layers) == 2 and {p.dtype for p in first.parameters()} == {torch.bfloat16}
    weights = [dict(m.named_parameters())["model.layers.1.mlp.down_proj.weight"] for m in (first, again, other)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
    report = run_benchmark(
        BenchConfig(
            model="mini:2", methods=("fura", "lora-r4", "full"), dtype="bfloat16", device="cpu", batch=1, seq=8,
            steps=1, warmup=0, memory=False, inference=False, skip_8b=True, conversion_repeats=1, threads=1,
            out=str(tmp_path), show_progress=False,
        )
    )  # fmt: skip
    assert report["environment"]["model_name"] == "Mini-shaped random weights (2 of 3 layers)"
    assert report["environment"]["dtype"] == "bfloat16"
    assert all(m["tokens_per_second"] == pytest.approx(8 / m["step"]["median"]) for m in report["methods"].values())


def test_memory_children_started_afresh_measure_what_forked_ones_do(bench_run, monkeypatch):
    """The CUDA mode (a fresh process per job, no fork) on the CPU: each job gets its own process, same figures."""
    _, report = bench_run
    monkeypatch.setattr(bench_memory, "forks", lambda device: False)
    cfg = BenchConfig(model="tiny", batch=2, seq=16, methods=("fura", "lora-matched"), memory_steps=2, threads=1)
    budget = FuraBudget(**report["fura_budget"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        jobs = bench_memory.memory_jobs(cfg, torch.device("cpu"), torch.float32, budget, TINY_LLAMA["vocab_size"])
        memory = bench_memory.measure_memory(jobs, show_progress=False)
    finally:
        torch.set_num_threads(threads)
    for name in cfg.methods:
        assert "error" not in memory[name], memory[name].get("error")
        assert memory[name]["peak_bytes"] == report["methods"][name]["memory"]["peak_bytes"], name
