"""Output folders that a fura command owns: an exclusive lock, an ownership marker, and the inputs it never deletes.

Three rules keep a user's files safe when a command writes a folder (a run folder, a merged model, a streamed
adapter):

* **One command per folder.** :func:`exclusive_lock` takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on a lock file for as
  long as the command runs. The kernel drops the lock when the process ends, however it ends (SIGKILL included), so
  a stale lock never blocks the next command; a second command on the same folder fails at once with
  :class:`FolderInUseError` instead of deleting or interleaving the first one's files.
* **Only fura's own folders are reused.** :func:`mark_owned` writes a marker file into a folder fura created;
  :func:`is_owned` tells a folder fura made from one that merely has the same file names (a user's project folder
  that happens to hold a ``config.yaml``).
* **Never the inputs.** :func:`check_output_is_not_an_input` refuses an output folder that is, contains or lies
  inside a folder or file the command reads (the base model, the adapter, the data) — even with ``--overwrite`` /
  ``--force``, which delete the output's previous content.

:func:`staged_output` applies all of them to a folder written in one go (``fura stream``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

#: The ownership marker in a folder fura created (JSON: which command made it).
MARKER_NAME = ".fura-owned"
#: The lock file inside a run folder (a folder replaced by rename is locked through ``.<name>.lock`` beside it).
LOCK_NAME = ".fura.lock"


class FolderInUseError(RuntimeError):
    """Another process holds the folder's lock (a second command on the same output folder)."""


class OutputIsInputError(ValueError):
    """The output folder is, contains or lies inside something the command reads."""


@contextlib.contextmanager
def exclusive_lock(lock_path: str | Path, folder: str | Path) -> Iterator[Path]:
    """Hold an exclusive, non-blocking ``flock`` on ``lock_path`` while the block runs; ``folder`` names the output
    in the error message.

    The lock file is removed on release. A process that opened the file just before the removal would lock an
    unlinked file, so after locking, the path must still name the locked file (same inode) or the lock counts as
    taken by another process.
    """
    lock_path = Path(lock_path)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not _same_file(fd, lock_path):
            raise BlockingIOError
    except BlockingIOError:
        holder = _read_pid(lock_path)
        os.close(fd)
        raise FolderInUseError(
            f"{folder} is in use by another fura command{f' (process {holder})' if holder else ''}. Fix: wait for it "
            "to finish (or stop it), or choose another output folder."
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield lock_path
    finally:
        if _same_file(fd, lock_path):
            lock_path.unlink(missing_ok=True)
        os.close(fd)  # releases the lock


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _read_pid(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(encoding="utf-8").strip()
    return ""


def sibling_lock_path(folder: str | Path) -> Path:
    """``.<name>.lock`` beside ``folder``: the lock of a folder that is written by replacing it with a rename."""
    folder = Path(folder)
    return folder.with_name(f".{folder.name}.lock")


@contextlib.contextmanager
def locked_output(folder: str | Path) -> Iterator[None]:
    """Lock an output folder that is written by renaming a staging folder into place (``fura merge``, ``stream``).

    The parent folder is created if needed (the lock file lives there).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(sibling_lock_path(folder), folder):
        yield


@contextlib.contextmanager
def staged_output(
    folder: str | Path, inputs: Iterable[str | Path | None], force: bool = False, flag: str = "output folder"
) -> Iterator[Path]:
    """Everything a command needs to write ``folder`` safely, in order: refuse an overlap with ``inputs`` (even with
    ``force``), refuse a non-empty folder unless ``force``, lock it, and yield a staging folder that replaces it only
    when the block succeeds (:func:`fura.io.files.atomic_directory`)."""
    from fura.io.files import atomic_directory, check_output_folder

    check_output_is_not_an_input(folder, inputs, flag)
    check_output_folder(folder, force)
    with locked_output(folder), atomic_directory(folder, force=force) as staging:
        yield staging


def mark_owned(folder: str | Path, kind: str) -> Path:
    """Write the ownership marker into ``folder`` (``kind``: what made it, e.g. ``"fura train sft"``)."""
    marker = Path(folder) / MARKER_NAME
    marker.write_text(json.dumps({"created_by": kind}) + "\n", encoding="utf-8")
    return marker


def is_owned(folder: str | Path) -> bool:
    """Whether ``folder`` carries fura's ownership marker."""
    return (Path(folder) / MARKER_NAME).is_file()


def check_output_is_not_an_input(output: str | Path, inputs: Iterable[str | Path | None], flag: str) -> None:
    """Refuse an ``output`` that is, contains or lies inside one of ``inputs`` (paths that do not exist, such as Hub
    ids, are skipped; symlinks are followed). ``flag`` names the output option in the message.
    """
    target = Path(output).expanduser().resolve()
    for item in inputs:
        if item is None or str(item) == "":
            continue
        source = Path(str(item)).expanduser()
        if not source.exists():
            continue
        source = source.resolve()
        if target == source:
            relation = "is"
        elif target in source.parents:
            relation = "contains"
        elif source in target.parents:
            relation = "lies inside"
        else:
            continue
        raise OutputIsInputError(
            f"{flag} {output} {relation} {source}, which this command reads; writing there could delete or corrupt "
            f"it. Fix: choose a {flag} folder outside the model, adapter and data folders."
        )
