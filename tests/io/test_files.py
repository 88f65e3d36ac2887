"""Atomic folders and files: never half-written, swept after a kill, written with the user's normal permissions."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fura.io.files import atomic_directory, atomic_write_text, sweep_stale_staging


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_directory_replaces_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first"
    with pytest.raises(FileExistsError, match="--force"), atomic_directory(target):
        pass
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(target, force=True) as staging:
        (staging / "a.txt").write_text("half-written")
        raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "first"
    with atomic_directory(target, force=True) as staging:
        (staging / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or old folders left behind


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_with_the_umask_permissions_not_owner_only(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        with atomic_directory(tmp_path / "adapter") as staging:
            (staging / "sub").mkdir()
            (staging / "sub" / "weights.bin").write_bytes(b"x")
            (staging / "config.json").write_text("{}")
        written = atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
    finally:
        os.umask(previous)
    assert mode(tmp_path / "adapter") == 0o777 & ~umask
    assert mode(tmp_path / "adapter" / "sub") == 0o777 & ~umask
    assert mode(tmp_path / "adapter" / "sub" / "weights.bin") == 0o666 & ~umask
    assert mode(tmp_path / "adapter" / "config.json") == 0o666 & ~umask
    assert mode(written) == 0o666 & ~umask


KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from fura.io.files import atomic_directory, atomic_write_text
    target = sys.argv[1]
    if sys.argv[2] == "dir":
        with atomic_directory(target) as staging:
            (staging / "weights.bin").write_bytes(b"0" * 4096)
            os.kill(os.getpid(), signal.SIGKILL)
    else:
        import tempfile
        from fura.io import files
        real = files.os.replace
        files.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        atomic_write_text(target, "half")
    """
)


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_staging_left_by_a_killed_writer_is_swept_by_the_next_write(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "merged"
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target), kind], check=False)
    assert done.returncode == -signal.SIGKILL
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.staging-")]
    assert len(leftovers) == 1 and not target.exists()
    if kind == "dir":
        with atomic_directory(target) as staging:
            (staging / "weights.bin").write_bytes(b"1")
    else:
        atomic_write_text(target, "complete")
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_a_live_writers_staging_is_not_swept(tmp_path: Path) -> None:
    live = tmp_path / f".out.staging-{os.getppid()}-abc"
    live.mkdir()
    dead = tmp_path / ".out.staging-999999999-abc"
    dead.mkdir()
    other = tmp_path / ".other.staging-999999999-abc"
    other.mkdir()
    assert sweep_stale_staging(tmp_path / "out") == [dead]
    assert live.exists() and other.exists()
