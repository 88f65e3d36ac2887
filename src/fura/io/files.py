"""Files and folders that a reader never sees half-written, with the user's normal permissions.

Everything fura writes that another program reads (adapters, merged models, run configs, reports) goes through
here:

* :func:`atomic_directory` — build a folder in a *staging* folder beside the destination, then rename it into place.
  A reader sees the old folder or the complete new one, never a part. A process killed mid-write (even by SIGKILL)
  leaves only its staging folder, named ``.<name>.staging-<pid>-<random>``; the next write to the same destination
  sweeps every staging folder whose process is gone (:func:`sweep_stale_staging`).
* :func:`atomic_write_text` — the same for one text file.

Staging uses ``tempfile.mkdtemp`` / ``mkstemp`` for unique names, which create owner-only entries (``0700`` /
``0600``); the result is given the mode a plain ``mkdir`` / ``open`` would have had under the process's umask
(usually ``0755`` / ``0644``), so a shared serving or evaluation user can read what was written.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: Infix of staging entries (``.<name>.staging-<pid>-<random>``) and of folders being replaced (``.old-``).
_STAGING = ".staging-"
_OLD = ".old-"


def current_umask() -> int:
    """The process's umask (read without changing it for longer than one call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_permissions(path: str | Path) -> None:
    """Give ``path`` (and, for a folder, everything in it) the mode ``mkdir`` / ``open`` would give under the umask."""
    mask = current_umask()
    path = Path(path)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                full = os.path.join(root, name)
                if not os.path.islink(full):
                    os.chmod(full, 0o666 & ~mask)
    elif path.exists():
        os.chmod(path, 0o666 & ~mask)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_stale_staging(path: str | Path) -> list[Path]:
    """Remove staging / replaced copies of ``path`` left by processes that no longer run; returns what was removed.

    A killed ``fura merge`` used to leave a hidden full-size model copy per attempt; this runs before every
    :func:`atomic_directory` / :func:`atomic_write_text` to the same destination.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(path.name)}(?:{re.escape(_STAGING)}|{re.escape(_OLD)})(\d+)(?:-.*)?$")
    removed = []
    for entry in path.parent.iterdir():
        match = pattern.match(entry.name)
        if match and not _process_alive(int(match.group(1))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def check_output_folder(path: str | Path, force: bool = False) -> None:
    """Refuse a non-empty existing folder (or a file) unless ``force``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder. Fix: choose another output folder.")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise FileExistsError(f"{path} is not empty. Fix: choose another output folder, or pass --force to replace it.")


@contextlib.contextmanager
def atomic_directory(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a staging folder beside ``path``; on success it replaces ``path`` by renames, on error it is removed.

    A reader never sees a half-written ``path``: either the old folder or the complete new one exists. A non-empty
    ``path`` is refused unless ``force``. The result has the umask's normal permissions.
    """
    path = Path(path)
    check_output_folder(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_staging(path)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}{_STAGING}{os.getpid()}-", dir=path.parent))
    try:
        yield staging
        normal_permissions(staging)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}{_OLD}{os.getpid()}")
            path.rename(old)
        staging.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a staging file and a rename; normal permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_staging(path)
    fd, staging = tempfile.mkstemp(prefix=f".{path.name}{_STAGING}{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(staging, 0o666 & ~current_umask())
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return path
