"""The version sets CI tests lie on pyproject.toml's bounds: ci/floors.txt pins exactly the lower bounds (`make
test-floors`), and ci/constraints.txt, the tested set that `make install` applies, lies within every bound."""

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


def pins(file: str) -> dict[str, Version]:
    """``name==version`` lines of ``ci/<file>`` (comments and blank lines skipped)."""
    found = {}
    for line in (ROOT / "ci" / file).read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if text:
            name, _, version = text.partition("==")
            assert version, f"ci/{file}: {line!r} is not an exact pin (name==version)"
            found[re.sub(r"[-_.]+", "-", name.strip()).lower()] = Version(version.strip())
    return found


def floors() -> dict[str, Version]:
    return pins("floors.txt")


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


def test_the_tested_set_lies_within_every_bound_and_leaves_torch_to_the_machine() -> None:
    requirements, tested = pyproject_requirements(), pins("constraints.txt")
    assert {"transformers", "peft", "accelerate", "safetensors", "trl", "datasets", "bitsandbytes"} <= set(tested)
    assert "torch" not in tested  # the Makefile's TORCH picks the wheel (CPU here, a CUDA build on a GPU image)
    for name, requirement in requirements.items():
        if name in tested:
            assert requirement.specifier.contains(tested[name]), (
                f"ci/constraints.txt: {name}=={tested[name]} is outside {requirement}"
            )
