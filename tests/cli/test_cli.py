"""The ``fura`` command line: help texts, plugin dispatch, convert (meta device), merge, eval, methods."""

from __future__ import annotations

import json
import sys
import types
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig

import fura_cli.commands as cli
from fura.recipes.loading import load_model_for_method
from fura.recipes.registry import METHODS

from ..recipes.data.conftest import build_tokenizer, require_data, tiny_causal_lm

HELP_COMMANDS = [
    [], ["train"], ["train", "sft"], ["train", "grpo"], ["train", "vlm"], ["eval"], ["eval", "commonsense"],
    ["eval", "math"], ["merge"], ["convert"], ["methods"], ["bench"], ["demo"],
]  # fmt: skip
INPUTS = torch.tensor([[1, 5, 9, 40, 77, 3, 120, 8, 2, 60]])


pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``cli.main(argv)`` → (exit status, stdout, stderr); ``--help`` / usage errors exit through SystemExit."""
    try:
        status = cli.main(argv)
    except SystemExit as exc:
        status = exc.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: " ".join(c) or "fura")
def test_help_exits_zero(command: list[str], capsys) -> None:
    status, out, _ = run_cli([*command, "--help"], capsys)
    assert status == 0
    assert out.startswith("usage: fura")


def test_train_sft_help_lists_methods_and_flags(capsys) -> None:
    _, out, _ = run_cli(["train", "sft", "--help"], capsys)
    for text in ("--method", "--data", "--resume", "--config", "--eval", "--method-arg", "--learning-rate",
                 "--per_device_train_batch_size", *METHODS):  # fmt: skip
        assert text in out


def test_console_script_points_at_main() -> None:
    """``fura`` is installed as ``fura_cli:main`` (running it costs a 10 s interpreter start; main() is tested here)."""
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    if "fura" not in scripts:
        pytest.skip("the fura console script is not installed (pip install -e .)")
    assert scripts["fura"] == "fura_cli:main"


def test_missing_pipeline_module_gives_a_clear_message(monkeypatch, capsys) -> None:
    missing = cli.Plugin("fura.recipes._not_written_yet", "main", "GRPO", "the GRPO pipeline")
    monkeypatch.setitem(cli.TRAIN_PLUGINS, "grpo", missing)
    for argv in (["train", "grpo", "--model", "smollm2"], ["train", "grpo", "--help"]):
        status, _, err = run_cli(argv, capsys)
        assert status == cli.EXIT_UNAVAILABLE
        assert "the GRPO pipeline is not available" in err and "fura.recipes._not_written_yet" in err


def test_recipes_get_their_arguments_and_plugins_declare_flags_or_receive_raw_ones(monkeypatch, capsys) -> None:
    calls: dict[str, object] = {}
    pipeline = types.ModuleType("fura_test_pipeline")
    pipeline.main = lambda argv: calls.setdefault("recipe", list(argv)) and 0
    bench = types.ModuleType("fura_test_bench")
    bench.bench_cli = lambda args: calls.setdefault("argv", args.argv) and 0
    monkeypatch.setitem(sys.modules, pipeline.__name__, pipeline)
    monkeypatch.setitem(sys.modules, bench.__name__, bench)
    monkeypatch.setitem(cli.TRAIN_PLUGINS, "vlm", cli.Plugin(pipeline.__name__, "main", "VLM", "the VLM pipeline"))
    monkeypatch.setitem(cli.TOP_PLUGINS, "bench", cli.Plugin(bench.__name__, "bench_cli", "bench", "bench"))
    assert run_cli(["-q", "train", "vlm", "--steps", "3", "--help"], capsys)[0] == 0
    assert run_cli(["bench", "--model", "smollm2", "--repeat", "2"], capsys)[0] == 0
    assert calls == {"recipe": ["--steps", "3", "--help"], "argv": ["--model", "smollm2", "--repeat", "2"]}


def test_methods_lists_the_registry(capsys) -> None:
    status, out, _ = run_cli(["methods", "--track", "rl"], capsys)
    assert status == 0 and all(name in out for name in METHODS) and "9e-05" in out


@pytest.fixture(scope="module")
def llama3_8b_config(tmp_path_factory) -> Path:
    """A Llama-3-8B-shaped config.json (no weights)."""
    folder = tmp_path_factory.mktemp("llama3-8b")
    LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
    ).save_pretrained(folder)  # fmt: skip
    return folder


def test_convert_reports_the_paper_count_on_the_meta_device(llama3_8b_config: Path, capsys) -> None:
    status, out, _ = run_cli(["convert", "--model", str(llama3_8b_config)], capsys)
    assert status == 0
    assert "FuRA trainable parameters: 118,685,696 in 224 modules" in out
    assert "LoRA r=32 on the same modules: 83,886,080" in out and "LoRA r=64 on the same modules: 167,772,160" in out
    assert "down_proj" in out and "112 x 128" in out and "32 x 128" in out  # down_proj blocks, o_proj by head
    status, out, _ = run_cli(["convert", "--model", str(llama3_8b_config / "config.json"), "--no-factorize-by-head",
                              "--json", "--lora-ranks", "16"], capsys)  # fmt: skip
    report = json.loads(out)
    assert status == 0 and report["trainable"] == 110_297_088 and report["lora"] == {"16": 41_943_040}
    assert report["base_params"] == 8_030_261_248


def test_convert_flags_change_the_plan(llama3_8b_config: Path, capsys) -> None:
    argv = ["convert", "--model", str(llama3_8b_config), "--json", "--rank", "16", "--target-modules", "q_proj"]
    report = json.loads(run_cli(argv, capsys)[1])
    assert report["modules"] == 32 and report["groups"][0]["rank"] == 16
    assert report["trainable"] == 32 * (64 * 16 * 64 + 64 * 16)  # n·r·b core + n·r singular values


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory) -> tuple[Path, Path, torch.Tensor]:
    """A FuRA adapter on the tiny Llama, moved away from its init; returns (base dir, adapter dir, its logits)."""
    root = tmp_path_factory.mktemp("merge")
    base_dir, adapter_dir = root / "base", root / "adapter"
    tokenizer = build_tokenizer()
    tiny_causal_lm(len(tokenizer)).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model, _ = load_model_for_method("fura", base_dir, dtype="float32")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    with torch.no_grad():
        logits = model.eval()(input_ids=INPUTS).logits
    return base_dir, adapter_dir, logits


def test_merge_writes_a_dense_folder_matching_the_adapter(trained_adapter, tmp_path: Path, capsys) -> None:
    base_dir, adapter_dir, expected = trained_adapter
    out = tmp_path / "merged"
    assert (
        run_cli(["-q", "merge", "--adapter", str(adapter_dir), "--output", str(out), "--dtype", "float32"], capsys)[0]
        == 0
    )
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not any("fura" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=INPUTS).logits, expected, atol=1e-5, rtol=0)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=INPUTS).logits, peft_model(input_ids=INPUTS).logits, atol=1e-5, rtol=0
        )
    assert (out / "tokenizer_config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no staging folder left


def test_merge_refuses_a_non_empty_output_unless_forced(trained_adapter, tmp_path: Path, capsys) -> None:
    _, adapter_dir, _ = trained_adapter
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    status, _, err = run_cli(["merge", "--adapter", str(adapter_dir), "--output", str(out)], capsys)
    assert status == cli.EXIT_USAGE and "--force" in err and (out / "keep.txt").exists()
    assert run_cli(["-q", "merge", "--adapter", str(adapter_dir), "--output", str(out), "--force"], capsys)[0] == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_eval_commands_on_an_adapter(trained_adapter, tmp_path: Path, capsys) -> None:
    _, adapter_dir, _ = trained_adapter
    commonsense = require_data("commonsense", "test")
    argv = ["-q", "eval", "commonsense", "--model", str(adapter_dir), "--data", str(commonsense), "--tasks",
            "boolq", "piqa", "--max-examples", "2", "--num-beams", "1", "--max-new-tokens", "4",
            "-o", str(tmp_path / "cs")]  # fmt: skip
    status, out, _ = run_cli(argv, capsys)
    assert status == 0 and json.loads(out)["average_over"] == ["boolq", "piqa"]
    assert json.loads((tmp_path / "cs" / "commonsense" / "summary.json").read_text())["tasks"]["piqa"]["total"] == 2
    status, out, _ = run_cli([*argv[:-1], str(tmp_path / "cs-loglik"), "--scoring", "loglik"], capsys)
    summary = json.loads((tmp_path / "cs-loglik" / "commonsense" / "summary.json").read_text())
    assert status == 0 and summary["protocol"] == "loglik" and summary["tasks"]["boolq"]["total"] == 2
    gsm8k = require_data("math", "test", "gsm8k.json")
    argv = ["-q", "eval", "math", "--model", str(adapter_dir), "--data", str(gsm8k), "--max-examples", "2",
            "--max-new-tokens", "4", "-o", str(tmp_path / "math")]  # fmt: skip
    status, out, _ = run_cli(argv, capsys)
    assert status == 0 and json.loads(out)["total"] == 2
    assert (tmp_path / "math" / "math" / "gsm8k.predictions.jsonl").exists()


# ------------------------------------------------------------------ user errors: one line, exit status 2


def one_line_error(status: int, err: str) -> str:
    """The single ``fura: error:`` line of a user error (log lines aside), with no traceback."""
    lines = [line for line in err.splitlines() if "error:" in line]
    assert status == cli.EXIT_USAGE, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _copy_adapter(adapter_dir: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(adapter_dir, target)
    return target


def test_a_truncated_adapter_is_one_line_before_anything_loads(trained_adapter, tmp_path, monkeypatch, capsys) -> None:
    _, adapter_dir, _ = trained_adapter
    broken = _copy_adapter(adapter_dir, tmp_path / "adapter")
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    for argv in (
        ["merge", "--adapter", str(broken), "-o", str(tmp_path / "merged")],
        ["eval", "math", "--model", str(broken), "--data", str(require_data("math", "test", "gsm8k.json"))],
    ):
        line = one_line_error(*run_cli(argv, capsys)[::2])
        assert "adapter_model.safetensors is truncated" in line and "Fix:" in line
    assert not (tmp_path / "merged").exists()


def test_an_adapter_of_another_base_is_one_line(trained_adapter, tmp_path, capsys) -> None:
    _, adapter_dir, _ = trained_adapter
    other = tmp_path / "other-base"
    model = tiny_causal_lm(len(build_tokenizer()))
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():  # another random base of the same architecture
        for param in model.parameters():
            param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(other)
    argv = ["merge", "--adapter", str(adapter_dir), "--model", str(other), "-o", str(tmp_path / "merged")]
    line = one_line_error(*run_cli(argv, capsys)[::2])
    assert "does not fit module" in line and "Fix:" in line


def test_bad_yaml_and_misspelt_flags_are_one_line(tmp_path, capsys) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("method: fura\nmax_steps: [3\n")
    line = one_line_error(*run_cli(["train", "sft", "--config", str(config)], capsys)[::2])
    assert "run.yaml: line" in line and "not valid YAML" in line
    line = one_line_error(*run_cli(["train", "sft", "--data", "x.json", "--learning-rat", "1"], capsys)[::2])
    assert "unknown flag --learning-rat (did you mean --learning-rate?)" in line
    line = one_line_error(*run_cli(["train", "sft", "--data", "x.json", "--max_steps", "x"], capsys)[::2])
    assert "--max_steps" in line and "invalid int value" in line


def test_empty_data_is_refused_before_the_model_is_loaded(tmp_path, monkeypatch, capsys) -> None:
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    import fura.recipes.sft as sft

    monkeypatch.setattr(sft, "load_model_for_method", lambda *a, **k: pytest.fail("loaded a model"))
    argv = ["train", "sft", "--data", str(empty), "--output-dir", str(tmp_path / "run")]
    line = one_line_error(*run_cli(argv, capsys)[::2])
    assert "holds no rows" in line and "Fix:" in line
    assert not (tmp_path / "run").exists()  # nothing left behind to block the corrected command
    tests_dir = tmp_path / "cs"
    tests_dir.mkdir()
    (tests_dir / "boolq.json").write_text("[]")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    line = one_line_error(
        *run_cli(["eval", "commonsense", "--model", "smollm2", "--data", str(tests_dir)], capsys)[::2]
    )
    assert "boolq.json: the boolq test file holds no rows" in line
