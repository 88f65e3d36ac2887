"""Run folders: one directory per training run, with the same layout for every pipeline (SFT, GRPO, VLM).

Details: ``docs/recipes/skeleton.md``."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fura.integrations import distributed
from fura.io.files import atomic_write_text, sweep_stale_staging
from fura.io.ownership import (
    LOCK_NAME,
    MARKER_NAME,
    check_output_is_not_an_input,
    exclusive_lock,
    is_owned,
    mark_owned,
)
from fura.recipes.plots import plot_loss_curve

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
_MODEL_FILES = (
    "adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "model.safetensors.index.json",
    "pytorch_model.bin", "pytorch_model.bin.index.json",
)  # fmt: skip


#: Every name a run writes at the top of its folder (GRPO adds its reward plot and held-out rows, PiSSA its initial
#: adapter); nothing else in a run folder is ever deleted.
RUN_ENTRIES = frozenset(
    {
        "config.yaml", "method.json", "metrics.jsonl", "loss.png", "rewards.png", "train.log", "checkpoints",
        "adapter", "adapter_init", "model", "eval", "data", "results.json", MARKER_NAME, LOCK_NAME,
    }
)  # fmt: skip
_STAGING_ENTRY = re.compile(r"^\..+\.(?:staging|old)-\d+")


#: Settings a resume cannot change: transformers restores the optimizer and the learning-rate schedule from the
#: checkpoint, so a new value would be written to config.yaml without being what runs.
SCHEDULE_SETTINGS = frozenset(
    {"learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio", "max_steps",
     "num_train_epochs", "optim", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay"}
)  # fmt: skip


class RunFolderError(RuntimeError):
    """The output folder cannot be used as asked (it holds another run, or nothing to resume)."""


@dataclass
class MetricsLog:
    """``metrics.jsonl`` at ``path``: one JSON object per line, each with a ``step``; appended as training goes."""

    path: Path

    def records(self) -> list[dict[str, Any]]:
        """Every record, in file order (a torn last line from a killed run is ignored)."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                if line.strip():
                    records.append(json.loads(line))
        return records

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record (flushed at once, so a kill loses at most the line being written)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(finite(dict(record)), ensure_ascii=False) + "\n")
            handle.flush()

    def truncate_after(self, step: int) -> int:
        """Keep the records with ``step <= step`` (rewritten atomically); returns how many were dropped."""
        records = self.records()
        kept = [r for r in records if int(r.get("step", 0)) <= step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
        return len(records) - len(kept)

    def clear(self) -> None:
        """Start an empty log."""
        self.path.unlink(missing_ok=True)

    def last_value(self, key: str, default: float = 0.0) -> float:
        """The ``key`` of the last record that has it (e.g. ``elapsed`` to continue the clock after a resume)."""
        for record in reversed(self.records()):
            if record.get(key) is not None:
                return float(record[key])
        return default


def finite(value: Any) -> Any:
    """NaN / ±inf floats become None, recursively, so that the JSON written is standard JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


@dataclass
class RunFolder:
    """Paths and helpers of the run folder ``root`` (the layout: ``docs/recipes/skeleton.md``)."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    config_path = property(lambda self: self.root / "config.yaml")
    method_path = property(lambda self: self.root / "method.json")
    metrics_path = property(lambda self: self.root / "metrics.jsonl")
    loss_plot_path = property(lambda self: self.root / "loss.png")
    log_path = property(lambda self: self.root / "train.log")
    checkpoints_dir = property(lambda self: self.root / "checkpoints")
    adapter_dir = property(lambda self: self.root / "adapter")
    model_dir = property(lambda self: self.root / "model")
    eval_dir = property(lambda self: self.root / "eval")
    results_path = property(lambda self: self.root / "results.json")

    @property
    def metrics(self) -> MetricsLog:
        """The run's :class:`MetricsLog`."""
        return MetricsLog(self.metrics_path)

    def trained_dir(self, save_format: str) -> Path:
        """Where the trained model is saved: ``adapter/`` (``save_format`` ``"adapter"``) or ``model/`` (dense)."""
        return self.adapter_dir if save_format == "adapter" else self.model_dir

    def is_run(self) -> bool:
        """Whether the folder already holds a run (a config or checkpoints)."""
        return self.config_path.exists() or self.checkpoints_dir.exists()

    def is_finished(self) -> bool:
        """Whether the run finished: ``results.json`` is written last, after the trained model is saved."""
        return self.results_path.is_file()

    def never_trained(self) -> bool:
        """A run that stopped before its first logged step (bad data, a bad flag, a crash while loading the model):
        nothing worth keeping."""
        return (
            self.is_run()
            and not self.checkpoints()
            and not self.metrics.records()
            and not self.is_finished()
            and not self.adapter_dir.exists()
            and not self.model_dir.exists()
        )

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (``trainer_state.json`` is written last, so it marks completeness)."""
        found = [c for c in self.checkpoints_dir.glob("checkpoint-*") if CHECKPOINT_PATTERN.match(c.name)]
        return sorted((c for c in found if c.is_dir() and is_complete_checkpoint(c)), key=checkpoint_step)

    def last_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        found = self.checkpoints()
        return found[-1] if found else None

    def foreign_entries(self) -> list[str]:
        """Names at the top of the folder that no run writes (a user's files): never deleted."""
        if not self.root.is_dir():
            return []
        names = (entry.name for entry in self.root.iterdir())
        return sorted(n for n in names if n not in RUN_ENTRIES and not _STAGING_ENTRY.match(n))

    def has_content(self) -> bool:
        """Whether the folder holds anything besides fura's marker and lock."""
        return self.root.is_dir() and any(e.name not in (MARKER_NAME, LOCK_NAME) for e in self.root.iterdir())

    def is_owned(self) -> bool:
        """Whether fura created the folder for a run: its ownership marker (:mod:`fura.io.ownership`), or — for a
        folder written before markers existed — a ``config.yaml`` beside a file only a run writes."""
        if is_owned(self.root):
            return True
        traces = (self.method_path, self.log_path, self.metrics_path, self.checkpoints_dir)
        return self.config_path.is_file() and any(path.exists() for path in traces)

    def prepare(self, resume: bool = False, overwrite: bool = False) -> Path | None:
        """Make the folder ready; returns the checkpoint to resume from (None = start from scratch).

        * a new or empty folder: start (the folder gets fura's ownership marker);
        * ``resume``: continue from the last complete checkpoint (metric lines after it are dropped); with no
          checkpoint the run starts from scratch. A non-empty folder that holds no run is refused;
        * ``overwrite``: delete the previous run in this folder and start again;
        * a run that fura started here and that stopped before its first step (:meth:`never_trained`) is deleted
          and started again without ``--overwrite``;
        * otherwise a folder with content is an error (nothing is ever silently overwritten).

        Only what a run writes (:data:`RUN_ENTRIES`) is ever deleted: a folder that also holds other files is
        refused even with ``overwrite``. Call it under the folder's lock (:func:`claim_run_folder`).
        """
        if resume and overwrite:
            raise RunFolderError("choose either --resume or --overwrite, not both")
        if self.root.exists() and not self.root.is_dir():
            raise RunFolderError(f"{self.root} exists and is not a folder. Fix: choose another --output-dir.")
        self.sweep_staging()
        if resume:
            return self._prepare_resume()
        if self.has_content():
            if not (overwrite or (self.is_owned() and self.never_trained())):
                raise RunFolderError(
                    f"{self.root} is not empty. Fix: pass --resume to continue the run in it, --overwrite to delete "
                    "it and start again, or choose another --output-dir."
                )
            foreign = self.foreign_entries()
            if foreign:
                shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                raise RunFolderError(
                    f"{self.root} holds files that no fura run writes ({shown}); not going to delete it. Fix: choose "
                    "another --output-dir (or move those files away)."
                )
            if not self.is_owned():
                raise RunFolderError(f"{self.root} does not look like a run folder (no config.yaml); not deleting it")
            why = "--overwrite" if overwrite else "it stopped before its first step"
            logger.warning("deleting the previous run in %s (%s)", self.root, why)
            self._delete_run_files()
        self.root.mkdir(parents=True, exist_ok=True)
        mark_owned(self.root, "fura train")
        self.metrics.clear()
        return None

    def _delete_run_files(self) -> None:
        """Delete what runs write here, keeping the folder itself, its marker and its lock."""
        for entry in self.root.iterdir():
            if entry.name in (MARKER_NAME, LOCK_NAME):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def _prepare_resume(self) -> Path | None:
        if self.has_content() and not self.is_owned():
            raise RunFolderError(
                f"--resume: {self.root} holds no run (no config.yaml or checkpoints/). Fix: give the run folder to "
                "resume, or another --output-dir to start a new run."
            )
        self.root.mkdir(parents=True, exist_ok=True)
        mark_owned(self.root, "fura train")
        checkpoint = self.last_checkpoint()
        if checkpoint is None:
            logger.warning("--resume: no complete checkpoint in %s; starting from scratch", self.checkpoints_dir)
            self.metrics.clear()
            return None
        step = checkpoint_step(checkpoint)
        dropped = self.metrics.truncate_after(step)
        logger.info("resuming from %s (step %d); dropped %d metric line(s) logged after it", checkpoint, step, dropped)
        return checkpoint

    def sweep_staging(self) -> None:
        """Remove what a killed process left while writing into this folder (a half-saved adapter or model)."""
        for path in (self.adapter_dir, self.model_dir, self.config_path, self.results_path, self.method_path):
            for removed in sweep_stale_staging(path):
                logger.info("removed %s, left by a killed save", removed)

    def write_json(self, path: Path, payload: Mapping[str, Any]) -> Path:
        """Write ``payload`` as indented JSON (atomically)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(finite(payload), indent=2, ensure_ascii=False, default=str) + "\n")
        return path

    def write_config(self, text: str) -> Path:
        """Write ``config.yaml`` (atomically)."""
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, text)
        return self.config_path

    def plot(self, title: str = "") -> Path | None:
        """Redraw ``loss.png`` from ``metrics.jsonl``."""
        return plot_loss_curve(self.metrics.records(), self.loss_plot_path, title)


def flatten_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"training": {"seed": 1}}`` → ``{"training.seed": 1}`` (``method_args`` stays one value)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value and key != "method_args":
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume_compatible(
    run: RunFolder, resolved: Mapping[str, Any], invariants: Sequence[str], consequence: str
) -> None:
    """Refuse to resume ``run`` when a setting in ``invariants`` differs from its saved ``config.yaml``.

    ``resolved`` is the new run's configuration as a nested mapping; a dotted invariant (``"training.seed"``)
    names one leaf, a plain one (``"data"``) a whole subtree. A changed learning rate, schedule, step budget or
    optimizer setting (:data:`SCHEDULE_SETTINGS`) is refused too. Other changes are allowed and logged.
    ``consequence`` completes the error message: "so the resumed run would not continue ...".
    """
    import yaml

    if not run.config_path.exists():
        return
    saved = yaml.safe_load(run.config_path.read_text(encoding="utf-8")) or {}
    before, now = flatten_config(saved), flatten_config(resolved)
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    schedule = [k for k in changed if k.rsplit(".", 1)[-1] in SCHEDULE_SETTINGS]
    if schedule:
        raise RunFolderError(
            f"cannot resume {run.root} with {', '.join(schedule)} changed: the checkpoint's optimizer and scheduler "
            "state would go on with the old schedule, so the change would be recorded but not applied. Fix: resume "
            "with the original settings, or start a new run with the new ones (--overwrite or another --output-dir)."
        )
    fixed = [k for k in changed if any(k == inv or k.startswith(inv + ".") for inv in invariants)]
    if fixed:
        raise RunFolderError(
            f"cannot resume {run.root}: {', '.join(fixed)} differ from the run's config.yaml, so the resumed run "
            f"would not continue {consequence}. Fix: resume with the original settings, or start a new run "
            "(--overwrite or another --output-dir)."
        )
    for key in changed:
        logger.warning("resuming with %s changed: %r -> %r", key, before.get(key), now.get(key))


def checkpoint_step(path: Path) -> int:
    """The step number of a ``checkpoint-<step>`` folder."""
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint-<step> folder")
    return int(match.group(1))


def train_or_restore(trainer: Any, checkpoint: Path | None) -> tuple[int, float | None, dict[str, Any]]:
    """Train (resuming from ``checkpoint``), or — when the checkpoint already ends the training (its
    ``trainer_state.json`` has ``global_step >= max_steps``) — only load its weights. Returns ``(global_step,
    train_loss, metrics)``."""
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8")) if checkpoint else {}
    if not 0 < (state.get("max_steps") or 0) <= state.get("global_step", 0):
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        return output.global_step, output.training_loss, dict(output.metrics)
    logger.info("%s ends the training (step %d): restoring it, nothing left to train", checkpoint, state["global_step"])
    trainer._load_from_checkpoint(str(checkpoint))  # the Trainer's own loader: adapters, full and sharded models
    losses = [entry["loss"] for entry in state.get("log_history", []) if "loss" in entry]  # train() reports their mean
    return int(state["global_step"]), sum(losses) / len(losses) if losses else None, {}


def is_complete_checkpoint(path: Path) -> bool:
    """A checkpoint with model/adapter weights and a readable ``trainer_state.json`` (written last by the Trainer)."""
    try:
        json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))  # a missing file is an OSError
    except (OSError, json.JSONDecodeError):
        return False
    return any((path / name).exists() for name in _MODEL_FILES)


@contextlib.contextmanager
def main_process_log(path: str | Path, level: int = logging.INFO) -> Iterator[logging.Handler | None]:
    """Also write the ``fura`` and ``transformers`` logs to ``path`` (appended) while the block runs, on the main
    process (elsewhere: nothing)."""
    if not distributed.is_main_process():
        yield None
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    fura_logger = logging.getLogger("fura")
    previous_level = fura_logger.level
    if fura_logger.getEffectiveLevel() > level:
        fura_logger.setLevel(level)
    loggers = [fura_logger, logging.getLogger("transformers")]
    for item in loggers:
        item.addHandler(handler)
    try:
        yield handler
    finally:
        for item in loggers:
            item.removeHandler(handler)
        fura_logger.setLevel(previous_level)
        handler.close()


def prepare_run_folder(run: RunFolder, resume: bool = False, overwrite: bool = False) -> Path | None:
    """:meth:`RunFolder.prepare` on the main process; elsewhere only the checkpoint to resume from (read-only)."""
    if distributed.is_main_process():
        return run.prepare(resume=resume, overwrite=overwrite)
    return run.last_checkpoint() if resume else None


@contextlib.contextmanager
def claim_run_folder(run: RunFolder, switches: Any, *inputs: Any) -> Iterator[Path | None]:
    """Own ``run`` for the block: refuse it if it is or overlaps an input, lock it, prepare it; yields the checkpoint
    to resume from (see :meth:`RunFolder.prepare`). Other processes only read it (:func:`prepare_run_folder`).

    ``switches`` is the recipe's ``RunArguments`` (``model``, ``resume``, ``overwrite``); ``inputs`` are the other
    paths the run reads (data files, evaluation data). A folder this call created and that is still empty when the
    block fails is removed again.
    """
    if not distributed.is_main_process():
        yield prepare_run_folder(run, resume=switches.resume, overwrite=switches.overwrite)
        return
    paths = [path for value in inputs for path in (value if isinstance(value, (list, tuple)) else [value])]
    check_output_is_not_an_input(run.root, [switches.model, *paths], "--output-dir")
    if run.root.exists() and not run.root.is_dir():
        raise RunFolderError(f"{run.root} exists and is not a folder. Fix: choose another --output-dir.")
    created = not run.root.exists()
    run.root.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive_lock(run.root / LOCK_NAME, run.root):
            yield run.prepare(resume=switches.resume, overwrite=switches.overwrite)
    finally:
        if created and run.root.is_dir() and not any(run.root.iterdir()):
            run.root.rmdir()
