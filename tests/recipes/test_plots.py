"""The run folder's plots: complete PNG files, or nothing when there is nothing to draw."""

from __future__ import annotations

from pathlib import Path

from fura.recipes.plots import plot_loss_curve, plot_reward_curve

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_loss_plot_is_a_png(tmp_path: Path) -> None:
    records = [{"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-4} for s in range(1, 6)] + [{"step": 5, "eval_loss": 2.6}]
    path = plot_loss_curve(records, tmp_path / "loss.png", "test")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert plot_loss_curve([], tmp_path / "empty.png") is None


def test_reward_plot_is_a_png_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    records = [
        {"step": s, "loss": 0.1, "reward": 0.1 * s, "reward_std": 0.05, "completions/mean_length": 40 + s}
        for s in range(1, 6)
    ] + [{"step": 5, "held_out_accuracy": 0.4}]
    path = plot_reward_curve(records, tmp_path / "plots" / "rewards.png", "test")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in path.parent.iterdir()] == ["rewards.png"]
    assert plot_reward_curve([{"step": 1, "loss": 0.3}], tmp_path / "none.png") is None
