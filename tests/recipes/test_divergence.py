"""A diverged run stops at the step where it diverges, with the rate and the fix, and nothing non-finite is saved."""

from __future__ import annotations

import json

import pytest
import torch

import fura_cli.commands as cli
from fura.recipes.divergence import TrainingDivergedError
from fura.recipes.runs import RunFolder

from .test_sft import make_argv

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("rate", ["inf", "1e6"])
def test_a_diverging_run_stops_at_its_step_and_saves_nothing(tiny_model_dir, commonsense_dir, tmp_path, capsys, rate):
    out = tmp_path / "run"
    argv = make_argv(tiny_model_dir, commonsense_dir, out, learning_rate=rate, max_steps=4, save_steps=1,
                     warmup_steps=0)  # fmt: skip
    status = cli.main(["-q", "train", "sft", *argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert status == cli.EXIT_USAGE and len(lines) == 1 and "Traceback" not in err, err
    assert "training diverged at step" in lines[0] and "learning rate" in lines[0] and "Fix:" in lines[0]
    run = RunFolder(out)
    assert not run.adapter_dir.exists() and not run.is_finished()
    for checkpoint in run.checkpoints():  # checkpoints before the divergence only, every value finite
        from safetensors.torch import load_file

        tensors = load_file(checkpoint / "adapter_model.safetensors")
        assert all(torch.isfinite(t).all() for t in tensors.values()), checkpoint
    lines = run.metrics_path.read_text().splitlines() if run.metrics_path.exists() else []
    assert all(json.loads(line).get("loss") != 0.0 for line in lines)  # no diverged step logged as loss 0


def test_a_model_with_a_non_finite_tensor_is_never_saved(tiny_model_dir, tmp_path) -> None:
    from fura.recipes.artifacts import save_trained_model
    from fura.recipes.loading import load_model_for_method

    model, info = load_model_for_method("fura", tiny_model_dir, dtype="float32")
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("nan")
    with pytest.raises(TrainingDivergedError, match=r"not saving .* NaN or Inf"):
        save_trained_model(model, info, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
