"""``fura stream``: the layer-streaming conversion and the synthetic checkpoint from the command line."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import fura_cli.commands as cli

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fura_stream_command_writes_a_loadable_adapter_and_a_report(tmp_path):
    model_dir = tmp_path / "model"
    args = ["--hidden", "64", "--intermediate", "96", "--layers", "2", "--heads", "4", "--kv-heads", "2"]
    assert cli.main(["stream", "make-checkpoint", str(model_dir), *args, "--vocab", "96", "--dtype", "float32"]) == 0
    assert (
        cli.main(
            [
                "stream",
                "prepare",
                str(model_dir),
                str(tmp_path / "adapter"),
                "--report",
                str(tmp_path / "r.json"),
                "--no-progress",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["modules"] == 14 and len(report["layer_seconds"]) == 2

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
        reference = base(tokens).logits
        loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
        assert torch.equal(loaded(tokens).logits, reference)  # exact init, read back from the streamed file


def test_fura_stream_help_lists_the_steps(capsys):
    with pytest.raises(SystemExit):
        cli.main(["stream", "--help"])
    text = capsys.readouterr().out
    assert all(step in text for step in ("make-checkpoint", "prepare", "qfura"))


def test_fura_stream_never_writes_into_a_users_folder_or_its_input(tmp_path, capsys):
    model_dir = tmp_path / "model"
    sizes = ["--hidden", "64", "--intermediate", "96", "--layers", "1", "--heads", "4", "--kv-heads", "2"]
    assert cli.main(["stream", "make-checkpoint", str(model_dir), *sizes, "--vocab", "96", "--dtype", "float32"]) == 0
    model_files = sorted(p.name for p in model_dir.iterdir())
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for output, force in ((mine, []), (model_dir, ["--force"]), (tmp_path, ["--force"])):
        status = cli.main(["stream", "prepare", str(model_dir), str(output), "--no-progress", *force])
        err = capsys.readouterr().err
        assert status == cli.EXIT_USAGE and ("--force" in err or "which this command reads" in err), err
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(p.name for p in model_dir.iterdir()) == model_files
    assert cli.main(["stream", "prepare", str(model_dir), str(mine), "--no-progress", "--force"]) == 0
    assert (mine / "adapter_model.safetensors").exists() and not (mine / "notes.txt").exists()
