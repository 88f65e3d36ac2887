"""Output folders: one command at a time (a lock that dies with its process), and never an input as the output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fura.io import ownership
from fura.io.ownership import FolderInUseError, OutputIsInputError, check_output_is_not_an_input, exclusive_lock

HOLDER = textwrap.dedent(
    """
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("ownership", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with module.exclusive_lock(sys.argv[2], "the folder"):
        print("locked", flush=True)
        time.sleep(60)
    """
)


def test_a_second_holder_fails_at_once_and_the_lock_dies_with_its_process(tmp_path: Path) -> None:
    lock = tmp_path / ".fura.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, ownership.__file__, str(lock)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        message = rf"the folder is in use by another fura command \(process {holder.pid}\)"
        with pytest.raises(FolderInUseError, match=message), exclusive_lock(lock, "the folder"):
            pytest.fail("two holders of one lock")
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # no cleanup runs: the kernel releases the lock
        holder.wait()
    with exclusive_lock(lock, "the folder"):
        pass
    assert not lock.exists()  # released and removed


def test_a_lock_is_exclusive_within_one_process_too(tmp_path: Path) -> None:
    with exclusive_lock(tmp_path / "x.lock", "x"), pytest.raises(FolderInUseError):  # noqa: SIM117
        with exclusive_lock(tmp_path / "x.lock", "x"):
            pass


@pytest.mark.parametrize(
    ("output", "relation"),
    [("model", "is"), (".", "contains"), ("model/run", "lies inside"), ("link", "is")],
)
def test_an_output_that_overlaps_an_input_is_refused(tmp_path: Path, output: str, relation: str) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "model")
    with pytest.raises(OutputIsInputError, match=rf"--output \S+ {relation} .*model, which this command reads"):
        check_output_is_not_an_input(tmp_path / output, [tmp_path / "model", "org/hub-id", None], "--output")
    check_output_is_not_an_input(tmp_path / "elsewhere", [tmp_path / "model"], "--output")
