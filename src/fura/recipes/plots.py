"""The plots of a run folder, redrawn from ``metrics.jsonl``: ``loss.png`` (every recipe) and ``rewards.png`` (GRPO).

Each is written to a temporary file and renamed (:func:`save_figure`), so a PNG on disk is always complete.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any


def save_figure(draw: Callable[[Any], None], path: str | Path, title: str) -> Path:
    """Draw on one 7x4 in axis with ``draw(ax)``, title it, and write it to ``path`` atomically (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        draw(ax)
        ax.set_title(title, fontsize=10)
        fig.subplots_adjust(left=0.12, right=0.87, bottom=0.13, top=0.9)  # fixed margins: tight_layout is slow
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.png")
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
    return path


def plot_loss_curve(records: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Training loss (and held-out loss, and the learning rate on a second axis) against the step; None when there
    is nothing to draw."""
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    held_out = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    rates = [(r["step"], r["lr"]) for r in records if r.get("lr") is not None and r.get("loss") is not None]
    if not train and not held_out:
        return None

    def draw(ax: Any) -> None:
        if train:
            ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue", lw=1.2)
        if held_out:
            ax.plot(*zip(*held_out, strict=True), "o-", label="held-out loss", color="tab:orange", lw=1.2)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if rates:
            lr_axis = ax.twinx()
            lr_axis.plot(*zip(*rates, strict=True), color="tab:gray", lw=0.8, ls="--", label="learning rate")
            lr_axis.set_ylabel("learning rate", color="tab:gray")
            lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        ax.legend(loc="upper right")

    return save_figure(draw, path, title or "training loss")


def plot_reward_curve(records: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """GRPO's mean reward (± its std across completions), held-out accuracy and the mean completion length against
    the step; None when there is nothing to draw."""
    train = [r for r in records if r.get("reward") is not None and r.get("loss") is not None]
    held_out = [(r["step"], r["held_out_accuracy"]) for r in records if r.get("held_out_accuracy") is not None]
    if not train and not held_out:
        return None
    return save_figure(lambda ax: _draw_rewards(ax, train, held_out), path, title or "GRPO rewards")


def _draw_rewards(ax: Any, train: Sequence[Mapping[str, Any]], held_out: Sequence[tuple[int, float]]) -> None:
    if train:
        steps = [r["step"] for r in train]
        mean = [r["reward"] for r in train]
        std = [r.get("reward_std") or 0.0 for r in train]
        ax.plot(steps, mean, label="train reward (mean)", color="tab:blue", lw=1.2)
        low = [m - s for m, s in zip(mean, std, strict=True)]
        high = [m + s for m, s in zip(mean, std, strict=True)]
        ax.fill_between(steps, low, high, color="tab:blue", alpha=0.15, lw=0)
    if held_out:
        ax.plot(*zip(*held_out, strict=True), "o-", label="held-out accuracy", color="tab:orange", lw=1.2)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("reward / accuracy")
    ax.grid(alpha=0.3)
    lengths = [(r["step"], r["completions/mean_length"]) for r in train if r.get("completions/mean_length")]
    if lengths:
        length_axis = ax.twinx()
        length_axis.plot(*zip(*lengths, strict=True), color="tab:gray", lw=0.8, ls="--")
        length_axis.set_ylabel("mean completion length (tokens)", color="tab:gray")
    ax.legend(loc="upper left")
