"""Run-folder conventions: metrics log, resume bookkeeping, checkpoint discovery, loss plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fura.recipes.runs import (
    MetricsLog,
    RunFolder,
    RunFolderError,
    check_resume_compatible,
    checkpoint_step,
    finite,
    flatten_config,
    is_complete_checkpoint,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    """A checkpoint folder with (or without) the files that mark a complete save."""
    folder = root / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"")
    if complete:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_metrics_log_appends_truncates_and_skips_torn_lines(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 6):
        log.append({"step": step, "loss": 1.0 / step, "elapsed": float(step)})
    with log.path.open("a") as handle:
        handle.write('{"step": 6, "loss"')  # a kill in the middle of a line
    assert [r["step"] for r in log.records()] == [1, 2, 3, 4, 5]
    assert log.truncate_after(3) == 2
    assert [r["step"] for r in log.records()] == [1, 2, 3]
    assert log.last_value("elapsed") == 3.0
    assert log.path.read_text().endswith("\n")


def test_metrics_are_standard_json(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append({"step": 1, "eval_loss": float("nan"), "grad_norm": float("inf")})
    assert json.loads(log.path.read_text()) == {"step": 1, "eval_loss": None, "grad_norm": None}
    assert finite({"a": [1.0, float("-inf")], "b": "x"}) == {"a": [1.0, None], "b": "x"}


def test_checkpoint_discovery_ignores_incomplete_saves(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    fake_checkpoint(tmp_path, 3)
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 12, complete=False)  # killed while saving
    assert [checkpoint_step(p) for p in run.checkpoints()] == [3, 10]
    assert run.last_checkpoint().name == "checkpoint-10"
    assert not is_complete_checkpoint(tmp_path / "checkpoints" / "checkpoint-12")


def test_prepare_new_refuse_overwrite_and_resume(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "run")
    assert run.prepare() is None and run.root.is_dir()
    run.write_config("method: fura\n")
    run.metrics.append({"step": 1, "loss": 2.0})
    run.metrics.append({"step": 2, "loss": 1.5})
    with pytest.raises(RunFolderError, match="--resume"):
        run.prepare()
    fake_checkpoint(run.root, 1)
    assert run.prepare(resume=True).name == "checkpoint-1"
    assert [r["step"] for r in run.metrics.records()] == [1]
    assert run.prepare(overwrite=True) is None
    assert not run.config_path.exists() and not run.metrics_path.exists()
    with pytest.raises(RunFolderError, match="not both"):
        run.prepare(resume=True, overwrite=True)


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(RunFolderError, match="does not look like a run"):
        RunFolder(tmp_path).prepare(overwrite=True)
    assert (tmp_path / "precious.txt").exists()


def test_resume_without_checkpoint_starts_over(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    run.metrics.append({"step": 1, "loss": 2.0})
    assert run.prepare(resume=True) is None
    assert run.metrics.records() == []


def test_resume_check_refuses_changed_invariants_and_allows_the_rest(tmp_path: Path, caplog) -> None:
    run = RunFolder(tmp_path)
    check_resume_compatible(run, {"model": "a"}, ["model"], "the same model")  # no config.yaml yet: nothing to check
    saved = {"model": "a", "method_args": {"r": 8}, "training": {"seed": 1, "logging_steps": 10}, "data": {"x": 1}}
    run.write_config(json.dumps(saved))  # JSON is YAML
    assert flatten_config(saved)["training.seed"] == 1 and flatten_config(saved)["method_args"] == {"r": 8}

    changed_logging = {**saved, "training": {"seed": 1, "logging_steps": 5}}
    with caplog.at_level("WARNING"):
        check_resume_compatible(run, changed_logging, ["model", "training.seed", "data"], "the same model")
    assert "training.logging_steps" in caplog.text
    for changed, key in (
        ({**saved, "training": {"seed": 2, "logging_steps": 10}}, "training.seed"),
        ({**saved, "data": {"x": 2}}, "data.x"),  # a plain invariant covers its subtree
        ({**saved, "method_args": {"r": 16}}, "method_args"),
    ):
        with pytest.raises(RunFolderError, match=rf"{key} differ.*would not continue the same model"):
            check_resume_compatible(run, changed, ["model", "method_args", "training.seed", "data"], "the same model")


class _StubTrainer:
    """Records whether it trained or only loaded a checkpoint."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def train(self, resume_from_checkpoint=None):
        from types import SimpleNamespace

        self.calls.append(f"train:{Path(resume_from_checkpoint).name if resume_from_checkpoint else None}")
        return SimpleNamespace(global_step=6, training_loss=0.5, metrics={"train_runtime": 1.0})

    def _load_from_checkpoint(self, path: str) -> None:
        self.calls.append(f"load:{Path(path).name}")


def _checkpoint_with_state(tmp_path: Path, step: int, max_steps: int) -> Path:
    folder = fake_checkpoint(tmp_path, step)
    history = [{"step": s, "loss": float(s)} for s in range(1, step + 1)]
    (folder / "trainer_state.json").write_text(
        json.dumps({"global_step": step, "max_steps": max_steps, "log_history": history})
    )
    return folder


def test_a_resume_from_the_final_checkpoint_restores_it_instead_of_training(tmp_path: Path) -> None:
    from fura.recipes.runs import train_or_restore

    trainer = _StubTrainer()
    final = _checkpoint_with_state(tmp_path, 6, 6)
    assert train_or_restore(trainer, final) == (6, 3.5, {})  # mean of the logged losses 1..6
    assert trainer.calls == ["load:checkpoint-6"]
    earlier = _checkpoint_with_state(tmp_path, 3, 6)
    assert train_or_restore(trainer, earlier)[0] == 6
    assert train_or_restore(trainer, None)[0] == 6
    assert trainer.calls[1:] == ["train:checkpoint-3", "train:None"]
