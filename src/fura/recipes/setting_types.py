"""Whether a YAML value fits a settings dataclass field's type annotation (``int``, ``float``, ``str``, ``bool``,
``list[...]``, ``dict``, ``Literal``, enums, unions of them). Why: ``docs/recipes/skeleton.md``."""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union


def field_types(dataclass_types: Sequence[type]) -> dict[str, Any]:
    """``{field name: resolved annotation}`` over ``dataclass_types`` (the first declaration of a name wins)."""
    annotations: dict[str, Any] = {}
    for cls in dataclass_types:
        hints = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            annotations.setdefault(item.name, hints.get(item.name, Any))
    return annotations


def accepts(annotation: Any, value: Any) -> bool:
    """Whether ``value`` (as YAML read it) is a valid value of ``annotation``; unknown annotations accept anything."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(accepts(member, value) for member in typing.get_args(annotation))
    if origin is Literal:
        return value in typing.get_args(annotation)
    if origin in (list, tuple, Sequence, typing.List):  # noqa: UP006
        if isinstance(value, dict):  # recipes read a YAML mapping as named entries (method_arg, eval_protocol)
            return True
        args = typing.get_args(annotation)
        return isinstance(value, list) and all(accepts(args[0] if args else Any, item) for item in value)
    if origin in (dict, Mapping) or annotation is dict:
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return value in {member.value for member in annotation} or value in annotation.__members__
    return True


def describe(annotation: Any) -> str:
    """A short name of ``annotation`` for error messages (``int``, ``list[str]``, ``float | None``)."""
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")
