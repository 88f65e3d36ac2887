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


@pytest.mark.parametrize("lookalike", ["config.yaml", "checkpoints"])
@pytest.mark.parametrize("switch", ["none", "overwrite", "resume"])
def test_a_users_folder_is_never_emptied_or_written(tmp_path: Path, lookalike: str, switch: str) -> None:
    """A project folder that happens to hold a run's file names is not a run: refused, whatever the switch."""
    (tmp_path / "thesis.tex").write_text("keep me")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "main.py").write_text("print(1)")
    (tmp_path / lookalike).mkdir() if lookalike == "checkpoints" else (tmp_path / lookalike).write_text("lr: 1\n")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(RunFolderError, match=r"not empty|no fura run writes|holds no run"):
        RunFolder(tmp_path).prepare(overwrite=switch == "overwrite", resume=switch == "resume")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_only_a_run_that_fura_started_and_never_trained_is_reused(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "run")
    run.prepare()
    run.write_config("method: fura\n")
    run.log_path.write_text("crashed while loading the model\n")
    assert run.prepare() is None and not run.config_path.exists() and run.is_owned()  # reused without --overwrite
    run.write_config("method: fura\n")
    (run.root / "notes.txt").write_text("mine")  # a file the user added: never deleted
    for overwrite in (False, True):
        with pytest.raises(RunFolderError, match=r"no fura run writes \(notes.txt\)"):
            run.prepare(overwrite=overwrite)
    assert (run.root / "notes.txt").read_text() == "mine" and run.config_path.exists()


def test_overwrite_through_a_symlinked_run_folder_keeps_the_link(tmp_path: Path) -> None:
    real = RunFolder(tmp_path / "real")
    real.prepare()
    real.write_config("method: fura\n")
    fake_checkpoint(real.root, 1)
    link = tmp_path / "link"
    link.symlink_to(real.root)
    assert RunFolder(link).prepare(overwrite=True) is None
    assert link.is_symlink() and not real.config_path.exists() and not real.checkpoints_dir.exists()


def test_claiming_a_run_folder_locks_it_and_never_takes_an_input(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from fura.io.ownership import FolderInUseError, OutputIsInputError
    from fura.recipes.runs import claim_run_folder

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    switches = SimpleNamespace(model=str(model), resume=False, overwrite=True)
    for output in (model, model / "run", tmp_path):
        with pytest.raises(OutputIsInputError), claim_run_folder(RunFolder(output), switches):
            pytest.fail("claimed an input")
    assert [p.name for p in model.iterdir()] == ["config.json"]
    run = RunFolder(tmp_path / "run")
    with claim_run_folder(run, switches) as checkpoint:
        assert checkpoint is None and run.is_owned()
        run.write_config("method: fura\n")
        with pytest.raises(FolderInUseError, match="in use by another fura command"):  # noqa: SIM117
            with claim_run_folder(run, switches):
                pytest.fail("two commands in one folder")
        assert run.config_path.exists()  # the second command deleted nothing
    failed = RunFolder(tmp_path / "failed")
    with pytest.raises(RuntimeError, match="boom"), claim_run_folder(failed, switches):
        raise RuntimeError("boom")
    assert failed.root.exists() and failed.is_owned()  # a run started there: reusable by the corrected command


def test_resume_without_checkpoint_starts_over(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    run.prepare()
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


@pytest.mark.parametrize(("key", "value"), [("learning_rate", 0.05), ("max_steps", 2), ("warmup_steps", 0.5)])
def test_resume_refuses_a_changed_schedule_that_the_checkpoint_would_ignore(tmp_path: Path, key, value) -> None:
    run = RunFolder(tmp_path)
    saved = {"model": "a", "learning_rate": 0.01, "max_steps": 6, "warmup_steps": 0.03, "logging_steps": 1}
    run.write_config(json.dumps(saved))
    with pytest.raises(RunFolderError, match=rf"{key} changed: .* recorded but not applied"):
        check_resume_compatible(run, {**saved, key: value}, ["model"], "the same model")
    assert json.loads(run.config_path.read_text()) == saved


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
