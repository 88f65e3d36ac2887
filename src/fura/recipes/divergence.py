"""Stop a run whose training diverged, at the step where it happens, and never save a non-finite model.

Details: ``docs/recipes/skeleton.md``."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


class TrainingDivergedError(ValueError):
    """The loss, the gradients or the trainable tensors became NaN / Inf."""


def nonfinite_parameters(model: nn.Module, limit: int = 3) -> list[str]:
    """Names of (at most ``limit``) trainable parameters that hold a NaN or an Inf (the local shard when sharded)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad and p.dtype.is_floating_point]
    if not named:
        return []
    local = [getattr(p, "to_local", lambda p=p: p)().detach() for _, p in named]
    finite = torch.stack([torch.isfinite(t).all() for t in local]).cpu()  # one device sync
    return [name for (name, _), ok in zip(named, finite.tolist(), strict=True) if not ok][:limit]


def check_finite(model: nn.Module, what: str) -> None:
    """Raise :class:`TrainingDivergedError` if a trainable tensor of ``model`` is not finite (``what`` is saved)."""
    bad = nonfinite_parameters(model)
    if bad:
        raise TrainingDivergedError(
            f"not saving {what}: {', '.join(bad)} hold NaN or Inf values (the training diverged). Fix: train again "
            "with a lower --learning-rate (or clip gradients with --max-grad-norm 1.0)."
        )


class DivergenceGuard(TrainerCallback):
    """Raise :class:`TrainingDivergedError` at the first optimizer step whose gradients or updated weights are not
    finite. ``grad_norm`` is a zero-argument callable giving the step's gradient norm when one was computed."""

    def __init__(self, grad_norm: Any = None) -> None:
        self.grad_norm = grad_norm or (lambda: None)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ):
        norm = self.grad_norm()
        if norm is not None and not math.isfinite(norm):
            self._stop(args, state.global_step + 1, f"the gradient norm is {norm}", kwargs)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        model = kwargs.get("model")
        bad = nonfinite_parameters(model) if model is not None else []
        if bad:
            self._stop(args, state.global_step, f"{', '.join(bad)} became NaN / Inf after the update", kwargs)

    @staticmethod
    def _stop(args: TrainingArguments, step: int, what: str, kwargs: dict[str, Any]) -> None:
        scheduler = kwargs.get("lr_scheduler")
        rate = scheduler.get_last_lr()[0] if scheduler is not None else args.learning_rate
        raise TrainingDivergedError(
            f"training diverged at step {step}: {what} (learning rate {rate:.3g}, peak {args.learning_rate:g}). "
            "Nothing of this step was saved. Fix: start again (--overwrite) with a lower --learning-rate, or clip "
            "gradients with --max-grad-norm 1.0."
        )
