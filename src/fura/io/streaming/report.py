"""What a layer-streaming conversion did and cost: :class:`StreamReport` and the meter that fills it."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fura.io.memory import current_rss, peak_rss, release_free_memory, reset_peak_rss


@dataclass
class StreamReport:
    """What a streaming conversion did and what it cost.

    Attributes:
        kind: ``"fura_adapter"`` (:func:`prepare_adapter`) or ``"qfura"`` (:func:`convert_qfura`).
        model_dir: the checkpoint read.
        output_dir: where the result was written.
        modules: number of target weights converted.
        layers: number of layer groups (decoder layers; a target outside any numbered layer is its own group).
        wall_seconds: total time of the call.
        skeleton_seconds: time to read the config and build the meta skeleton (and the meta PEFT model).
        layer_seconds: time per layer group, in checkpoint order.
        other_seconds: time spent outside the layer groups (e.g. copying embeddings).
        baseline_rss_bytes: RSS when the call started (imports and whatever the process held before).
        skeleton_rss_bytes: RSS once the meta skeleton was built.
        layer_rss_bytes: RSS after each layer group (flat when streaming works).
        peak_rss_bytes: peak RSS during the call (``VmHWM``; over the whole process if ``peak_reset`` is False).
        peak_reset: whether the kernel's peak counter could be reset at the start of the call.
        bytes_read: checkpoint bytes of the target weights (the streamed input).
        bytes_written: bytes of all files written.
        largest_layer_bytes: checkpoint bytes of the largest layer group's target weights.
        largest_weight_bytes: checkpoint bytes of the largest single target weight.
        extra: kind-specific numbers (trainable parameters, NF4 bytes saved, …).
    """

    kind: str
    model_dir: str
    output_dir: str
    modules: int = 0
    layers: int = 0
    wall_seconds: float = 0.0
    skeleton_seconds: float = 0.0
    layer_seconds: list[float] = field(default_factory=list)
    other_seconds: float = 0.0
    baseline_rss_bytes: int = 0
    skeleton_rss_bytes: int = 0
    layer_rss_bytes: list[int] = field(default_factory=list)
    peak_rss_bytes: int = 0
    peak_reset: bool = False
    bytes_read: int = 0
    bytes_written: int = 0
    largest_layer_bytes: int = 0
    largest_weight_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def peak_above_baseline_bytes(self) -> int:
        """Peak RSS minus the RSS at the start: what the conversion itself needed."""
        return max(0, self.peak_rss_bytes - self.baseline_rss_bytes)

    def extrapolate(self, layers: int) -> dict[str, float]:
        """Time and memory for the same model with ``layers`` layer groups, from this run.

        Time is linear in the number of layers (the mean measured layer time per extra layer, plus
        the fixed skeleton / copy time); the peak RSS does not grow with depth, because exactly one
        layer is processed at a time and nothing from earlier layers is kept (the meta skeleton grows
        by a few kB per layer).
        """
        per_layer = sum(self.layer_seconds) / max(1, len(self.layer_seconds))
        fixed = self.wall_seconds - sum(self.layer_seconds)
        written_per_layer = self.extra.get("layer_bytes_written", 0)
        return {
            "layers": layers,
            "wall_seconds": fixed + per_layer * layers,
            "peak_rss_bytes": self.peak_rss_bytes,
            "bytes_written": self.bytes_written + written_per_layer * (layers - self.layers),
        }

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["peak_above_baseline_bytes"] = self.peak_above_baseline_bytes
        return data

    def save_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def summary(self) -> str:
        """A few readable lines."""
        mean = sum(self.layer_seconds) / max(1, len(self.layer_seconds))
        size = format_bytes
        return (
            f"{self.kind}: {self.modules} modules in {self.layers} layers, {self.wall_seconds:.1f} s "
            f"(skeleton {self.skeleton_seconds:.2f} s, {mean:.2f} s/layer, other {self.other_seconds:.1f} s)\n"
            f"  RSS: start {size(self.baseline_rss_bytes)}, skeleton {size(self.skeleton_rss_bytes)}, "
            f"peak {size(self.peak_rss_bytes)} (+{size(self.peak_above_baseline_bytes)}); "
            f"largest layer {size(self.largest_layer_bytes)}, largest weight {size(self.largest_weight_bytes)}\n"
            f"  read {size(self.bytes_read)} of target weights, wrote {size(self.bytes_written)} to {self.output_dir}"
        )


def format_bytes(count: float) -> str:
    """``1536 → '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} B" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    return f"{count:.2f} GiB"


class StreamMeter:
    """Fills a :class:`StreamReport` while a conversion runs: times, RSS, byte counts."""

    def __init__(self, report: StreamReport) -> None:
        self.report = report
        release_free_memory()  # so that memory freed earlier in the process cannot hide what this call needs
        report.peak_reset = reset_peak_rss()
        report.baseline_rss_bytes = current_rss()
        self._start = self._lap = time.perf_counter()

    def skeleton_done(self) -> None:
        self.report.skeleton_seconds = time.perf_counter() - self._start
        self.report.skeleton_rss_bytes = current_rss()
        self._lap = time.perf_counter()

    def layer_done(self, read_bytes: int) -> None:
        now = time.perf_counter()
        self.report.layer_seconds.append(now - self._lap)
        self.report.layer_rss_bytes.append(current_rss())
        self.report.largest_layer_bytes = max(self.report.largest_layer_bytes, read_bytes)
        self.report.layers += 1
        self._lap = now

    def weight_read(self, nbytes: int) -> None:
        self.report.bytes_read += nbytes
        self.report.modules += 1
        self.report.largest_weight_bytes = max(self.report.largest_weight_bytes, nbytes)

    def finish(self) -> StreamReport:
        report = self.report
        report.wall_seconds = time.perf_counter() - self._start
        report.other_seconds = report.wall_seconds - report.skeleton_seconds - sum(report.layer_seconds)
        report.peak_rss_bytes = peak_rss()
        return report
