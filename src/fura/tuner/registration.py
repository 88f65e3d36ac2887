"""Make FuRA a first-class PEFT method: a ``PeftType.FURA`` member and PEFT's registries.

PEFT's ``register_peft_method`` only accepts names that already exist in its ``PeftType`` enum,
so the member is added at runtime. Everything here is idempotent (importing ``fura`` twice, or
reloading it, registers once) and guarded: if PEFT's internals move, the user gets one clear
message naming the supported versions instead of an AttributeError from inside PEFT.
"""

from __future__ import annotations

import enum

import peft
from packaging.version import Version
from peft.utils.peft_types import PeftType

PEFT_NAME = "fura"
PEFT_MEMBER = "FURA"
PREFIX = "fura_"
#: Oldest PEFT the test suite runs against (its tuner API: ``register_peft_method``, ``BaseTuner`` hooks).
MIN_PEFT = Version("0.21.2")


class PeftInternalsChangedError(RuntimeError):
    """The installed PEFT no longer exposes what FuRA's registration needs."""


def _check_peft_version() -> None:
    installed = Version(peft.__version__)
    if installed < MIN_PEFT:
        raise PeftInternalsChangedError(
            f"fura needs peft>={MIN_PEFT}, found {installed}. Fix: pip install -U 'peft>={MIN_PEFT}'."
        )


def _add_enum_member(enum_cls: type[enum.Enum], name: str, value: str) -> enum.Enum:
    """Add ``name = value`` to a ``(str, Enum)`` class, the way the enum machinery would have."""
    if name in enum_cls.__members__:
        return enum_cls[name]
    try:
        member = str.__new__(enum_cls, value)
        member._name_ = name
        member._value_ = value
        member.__objclass__ = enum_cls
        member.__init__(value)
        enum_cls._member_map_[name] = member
        enum_cls._value2member_map_[value] = member
        enum_cls._member_names_.append(name)
        type.__setattr__(enum_cls, name, member)
    except (AttributeError, TypeError) as exc:  # pragma: no cover - depends on Python / PEFT internals
        raise PeftInternalsChangedError(
            f"could not add {name} to peft's {enum_cls.__name__} enum ({exc}); this fura release supports "
            f"peft>={MIN_PEFT} on Python >= 3.10. Please report the PEFT version you use."
        ) from exc
    return member


def FURA_PEFT_TYPE() -> PeftType:  # noqa: N802 - reads like the enum member it returns
    """``PeftType.FURA``, created on first use."""
    _check_peft_version()
    return _add_enum_member(PeftType, PEFT_MEMBER, PEFT_MEMBER)


def register() -> None:
    """Register ``FuraConfig`` / ``FuraModel`` with PEFT (idempotent)."""
    from peft import mapping
    from peft.utils import register_peft_method

    from fura.tuner.config import FuraConfig
    from fura.tuner.model import FuraModel

    peft_type = FURA_PEFT_TYPE()
    registries = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING")
    missing = [name for name in registries if not hasattr(mapping, name)]
    if missing:
        raise PeftInternalsChangedError(
            f"peft {peft.__version__} has no {missing} in peft.mapping; fura supports peft>={MIN_PEFT} with these "
            "registries. Pin a supported PEFT version."
        )
    from fura.tuner import counting

    counting.install()
    current = mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if current is FuraModel:
        return
    if current is not None:
        # a reloaded fura module: replace the stale classes
        for name in registries:
            getattr(mapping, name).pop(peft_type, None)
    register_peft_method(name=PEFT_NAME, config_cls=FuraConfig, model_cls=FuraModel, prefix=PREFIX)


def is_registered() -> bool:
    """Whether PEFT currently maps ``PeftType.FURA`` to FuRA's classes."""
    from peft import mapping

    from fura.tuner.model import FuraModel

    return PEFT_MEMBER in PeftType.__members__ and mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(PeftType.FURA) is FuraModel
