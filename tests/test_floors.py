"""ci/floors.txt pins exactly the lower bounds of pyproject.toml, so `make test-floors` tests the bounds users get."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def pyproject_requirements() -> dict[str, Requirement]:
    """Every requirement of pyproject.toml (dependencies and every extra) by normalised name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    texts = [*project["dependencies"], *(req for extra in project["optional-dependencies"].values() for req in extra)]
    return {re.sub(r"[-_.]+", "-", req.name).lower(): req for req in map(Requirement, texts)}


def floors() -> dict[str, Version]:
    """``name==version`` lines of ci/floors.txt (comments and blank lines skipped)."""
    pins = {}
    for line in (ROOT / "ci" / "floors.txt").read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if text:
            name, _, version = text.partition("==")
            assert version, f"ci/floors.txt: {line!r} is not an exact pin (name==version)"
            pins[re.sub(r"[-_.]+", "-", name.strip()).lower()] = Version(version.strip())
    return pins


def lower_bound(requirement: Requirement) -> Version | None:
    bounds = [Version(spec.version) for spec in requirement.specifier if spec.operator in (">=", "==", "~=")]
    return max(bounds) if bounds else None


def test_every_floor_is_the_lower_bound_of_pyproject() -> None:
    requirements, pins = pyproject_requirements(), floors()
    assert {"transformers", "peft", "accelerate", "safetensors", "trl", "datasets", "bitsandbytes"} <= set(pins)
    for name, version in pins.items():
        assert name in requirements, f"ci/floors.txt pins {name}, which pyproject.toml does not require"
        bound = lower_bound(requirements[name])
        assert bound == version, f"{name}: pyproject.toml's lower bound {bound} != ci/floors.txt's pin {version}"
        assert requirements[name].specifier.contains(version), f"{name}=={version} is outside {requirements[name]}"


def test_torch_is_bounded_but_not_pinned() -> None:
    """Only torch 2.13 installs on the CI machine: its floor is in pyproject.toml and checked by make gpu-check."""
    assert "torch" not in floors()
    assert lower_bound(pyproject_requirements()["torch"]) is not None
