"""Settings copied by field name: keyword arguments from an object's same-named attributes, and a dataclass built
from another settings object (an argparse namespace, another dataclass) whose fields share its names."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def same_named(source: Any, names: Iterable[str]) -> dict[str, Any]:
    """``{name: source.<name>}`` for each of ``names``: keyword arguments taken from same-named attributes."""
    return {name: getattr(source, name) for name in names}


def dataclass_from(cls: type[T], source: Any, **overrides: Any) -> T:
    """An instance of the dataclass ``cls``: each init field takes ``source``'s attribute of the same name.

    ``overrides`` set fields by value (those named differently in ``source``, e.g. ``memory=not args.no_memory``);
    a field ``source`` has no attribute for keeps its default.
    """
    names = [
        spec.name
        for spec in dataclasses.fields(cls)  # type: ignore[arg-type]
        if spec.init and spec.name not in overrides and hasattr(source, spec.name)
    ]
    return cls(**same_named(source, names), **overrides)
