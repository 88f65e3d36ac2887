"""``RunFolderCallback``: the ``transformers`` callback that keeps a run folder's metrics and loss curve up to date.

Details: ``docs/recipes/skeleton.md``."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from fura.integrations.distributed import global_grad_norm
from fura.io.files import normal_permissions
from fura.recipes.divergence import DivergenceGuard
from fura.recipes.runs import RunFolder

#: Keys of the Trainer's end-of-training summary, which is not a logging step.
_SUMMARY_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss")


class RunFolderCallback(TrainerCallback):
    """Write ``metrics.jsonl`` of the run folder ``run`` during training, and redraw its ``loss.png`` (titled
    ``title``) at every save (:meth:`~fura.recipes.skeleton.Recipe.finish` draws the last one)."""

    def __init__(self, run: RunFolder, title: str = "") -> None:
        self.run = run
        self.title = title
        self._start = time.monotonic()
        self._offset = 0.0
        self._grad_norm: float | None = None
        self.guard = DivergenceGuard(lambda: self._grad_norm)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._start = time.monotonic()
        self._offset = self.run.metrics.last_value("elapsed", 0.0)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ):
        if args.max_grad_norm and args.max_grad_norm > 0:
            return  # the Trainer clips and reports the norm itself
        model = kwargs.get("model")
        if model is not None:
            self._grad_norm = global_grad_norm(model)  # a collective under sharding: every rank calls it
            self.guard.on_pre_optimizer_step(args, state, control, **kwargs)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self.guard.on_step_end(args, state, control, **kwargs)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        logs = logs or {}
        if not state.is_world_process_zero or any(key in logs for key in _SUMMARY_KEYS):
            return
        if "loss" in logs:
            self.run.metrics.append(self._train_record(state, logs))
        elif any(key.startswith("eval_") for key in logs):
            record = {"step": state.global_step, "epoch": _round(state.epoch), "elapsed": self._elapsed()}
            self.run.metrics.append({**_numbers(logs), **record})

    def _train_record(self, state: TrainerState, logs: dict[str, Any]) -> dict[str, Any]:
        grad_norm = logs.get("grad_norm", self._grad_norm)
        record = {
            "step": state.global_step,
            "epoch": _round(logs.get("epoch", state.epoch)),
            "loss": logs["loss"],
            "lr": logs.get("learning_rate"),
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "elapsed": self._elapsed(),
        }
        extra = {k: v for k, v in _numbers(logs).items() if k not in ("learning_rate", "epoch") and k not in record}
        return {**record, **extra}

    def _elapsed(self) -> float:
        return round(self._offset + time.monotonic() - self._start, 3)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():  # some savers write owner-only (0600) files; give the umask's modes like the rest
                normal_permissions(checkpoint)
            self.run.plot(self.title)


def _numbers(logs: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _round(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)
