"""PEFT's own test files, read at test time from the sdist of the installed PEFT version (never vendored).

The sdist ships ``tests/``; it is downloaded once with ``pip download peft==<installed> --no-binary :all:`` into
``$FURA_CACHE/peft-tests/peft-<version>/`` (default ``~/.cache/fura``), and only its ``tests/*.py`` are extracted.
The files are imported as the package :data:`PACKAGE`, so their relative imports (``.testing_common``) work.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

import peft

PACKAGE = "peft_upstream_tests"


def cache_root() -> Path:
    """``$FURA_CACHE`` or ``~/.cache/fura``."""
    return Path(os.environ.get("FURA_CACHE", Path.home() / ".cache" / "fura")).expanduser()


def tests_dir(version: str = peft.__version__) -> Path:
    """The folder holding PEFT ``version``'s test files, downloaded and extracted on first use."""
    target = cache_root() / "peft-tests" / f"peft-{version}"
    if (target / "test_custom_models.py").is_file():
        return target
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        done = subprocess.run([*command, "-d", download, f"peft=={version}"], capture_output=True, text=True)
        sdists = list(Path(download).glob("peft-*.tar.gz"))
        if done.returncode != 0 or not sdists:
            raise RuntimeError(
                f"could not download the sdist of peft=={version} to read PEFT's own tests (pip said: "
                f"{done.stderr.strip()[-400:]}). Fix: allow access to PyPI, or place its tests/ folder at {target}."
            )
        staging = Path(tempfile.mkdtemp(prefix=".peft-tests-", dir=_parent(target)))
        try:
            with tarfile.open(sdists[0]) as archive:
                for member in archive.getmembers():
                    parts = Path(member.name).parts
                    if len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py") and member.isfile():
                        source = archive.extractfile(member)
                        assert source is not None
                        (staging / parts[2]).write_bytes(source.read())
            os.chmod(staging, 0o755)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _parent(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.parent


def load(module: str) -> ModuleType:
    """Import PEFT's test module ``module`` (e.g. ``"test_custom_models"``) from the cached sdist."""
    if PACKAGE not in sys.modules:
        spec = importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True)
        package = importlib.util.module_from_spec(spec)
        package.__path__ = [str(tests_dir())]
        sys.modules[PACKAGE] = package
    return importlib.import_module(f"{PACKAGE}.{module}")


def module_fixtures(module: ModuleType) -> dict[str, object]:
    """The pytest fixtures defined at the top level of ``module`` (a test file's own fixtures, such as PEFT's
    ``fsdp_process_group``): a test class re-parametrised in another module sees them once they are bound there."""
    from _pytest.fixtures import getfixturemarker

    return {name: value for name, value in vars(module).items() if getfixturemarker(value) is not None}
