"""fura.io.memory: the one process-memory helper (RSS now and at its peak, the peak reset, handing memory back)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fura.io import memory

MiB = 1024**2
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")


@linux
def test_rss_peak_and_reset_follow_a_real_allocation() -> None:
    memory.release_free_memory()
    assert memory.reset_peak_rss(), "the kernel refused to reset VmHWM (/proc/self/clear_refs)"
    start = memory.current_rss()
    assert 0 < start <= memory.peak_rss() <= start + memory.RESET_SLACK_BYTES
    block = bytearray(96 * MiB)  # zero-filled: every page is touched
    assert memory.current_rss() >= start + 90 * MiB
    del block
    memory.release_free_memory()
    assert memory.current_rss() < start + 32 * MiB  # handed back (a block this large is mmapped)
    assert memory.peak_rss() >= start + 90 * MiB  # ... but the peak remembers it
    assert memory.reset_peak_rss()
    assert memory.peak_rss() < start + 32 * MiB + memory.RESET_SLACK_BYTES


@linux
def test_glibc_helpers_work_here() -> None:
    """This CI runs on glibc: the helpers must not silently degrade to their no-op fallbacks."""
    assert memory._libc() is not None and hasattr(memory._libc(), "malloc_trim")
    memory.release_free_memory(collect_garbage=False)
    # pinning changes the allocator for the rest of a process: try it in a child
    pin = "from fura.io.memory import pin_malloc_mmap_threshold as pin; raise SystemExit(0 if pin() is True else 1)"
    assert subprocess.run([sys.executable, "-c", pin], capture_output=True).returncode == 0
