"""Evaluation outputs: prediction records as JSONL, summaries as indented JSON (standard JSON: NaN written as
``null``), and :class:`Accuracy`."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fura.recipes.runs import finite


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write one JSON object per line to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(finite(record), ensure_ascii=False, allow_nan=False) + "\n")
    return path


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite(payload), indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    return path


class Accuracy:
    """Base of a result dataclass that counts ``correct`` answers out of ``total``: adds its :attr:`accuracy`."""

    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        """``correct / total`` in [0, 1] (0 when nothing was evaluated)."""
        return self.correct / self.total if self.total else 0.0
