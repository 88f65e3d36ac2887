"""Reading LLM-Adapters style data: a JSON array or JSONL file of ``instruction / input / output / answer`` rows.

Details: ``docs/recipes/data.md``."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REQUIRED_FIELDS: tuple[str, ...] = ("instruction", "output", "answer")


class DataFormatError(ValueError):
    """A data file is unreadable or a row lacks a required field."""


@dataclass(frozen=True)
class Example:
    """One instruction-tuning / evaluation row.

    Attributes:
        instruction: the question or task text.
        output: the target response (``"the correct answer is X"`` or a worked solution).
        answer: the gold label (``"true"``, ``"answer3"``, ``"576.0"``, ...).
        input: optional extra context; empty in every LLM-Adapters commonsense/math file.
        source: where the row came from (file stem or Hub id), used for mixing statistics and logs.
    """

    instruction: str
    output: str
    answer: str
    input: str = ""
    source: str = ""


def load_rows(path: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """Every row of a local ``.json`` (array, or one object per line) / ``.jsonl`` file, or of the ``split`` of a Hub
    dataset when ``path`` does not exist locally."""
    local = Path(path)
    if local.exists():
        return _read_local(local)
    return _read_hub(str(path), split)


def _read_local(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataFormatError(
            f"{path}: not UTF-8 text (byte {err.start} cannot be decoded). Fix: save the file as UTF-8 JSON / JSONL."
        ) from None
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            rows = json.loads(stripped)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        if _one_object(stripped):  # pretty-printed over several lines, so no line of it is JSON
            raise DataFormatError(
                f"{path}: holds one JSON object, not rows. Fix: write the rows as a JSON array ([{{...}}, ...]) or "
                "one object per line (JSONL)."
            ) from None
        raise DataFormatError(f"{path}: not a JSON array or JSONL file ({err}). Fix: one of those formats.") from err
    if not all(isinstance(row, dict) for row in rows):
        raise DataFormatError(f"{path}: every row must be a JSON object")
    return rows


def _one_object(text: str) -> bool:
    """Whether ``text`` is a single (pretty-printed) JSON object rather than JSONL."""
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _read_hub(dataset_id: str, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is an install extra
        raise DataFormatError(f"{dataset_id}: no such local file, and `datasets` is not installed") from err
    logger.info("%s is not a local file; loading it from the Hugging Face Hub (split=%s)", dataset_id, split)
    try:
        return list(datasets.load_dataset(dataset_id, split=split))
    except Exception as err:  # surface any Hub/IO failure with the id in the message
        raise DataFormatError(f"{dataset_id}: not a local file, and loading it from the Hub failed: {err}") from err


def load_examples(
    path: str | Path,
    split: str = "train",
    required: Sequence[str] = REQUIRED_FIELDS,
    max_rows: int | None = None,
) -> list[Example]:
    """The rows of ``path`` / ``split`` (:func:`load_rows`) as :class:`Example` objects; a row without one of the
    ``required`` fields (missing or ``None``) is an error. ``max_rows``: only the first rows (only those checked)."""
    rows = load_rows(path, split)
    if max_rows is not None:
        rows = rows[:max_rows]
    source = Path(path).stem if Path(path).exists() else str(path)
    return [_to_example(row, index, path, required, source) for index, row in enumerate(rows)]


def _to_example(row: dict[str, Any], index: int, path: str | Path, required: Sequence[str], source: str) -> Example:
    for field in required:
        if row.get(field) is None:
            have = ", ".join(sorted(row)) or "nothing"
            raise DataFormatError(f"{path}: row {index} lacks required field {field!r} (it has: {have})")
    texts = {key: "" if row.get(key) is None else str(row[key]) for key in ("instruction", "output", "answer", "input")}
    return Example(**texts, source=source)
