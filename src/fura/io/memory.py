"""Process memory: resident set now and at its peak, resetting the peak, handing freed memory back to the OS.

One helper for everything in fura that measures host memory (the layer-streaming conversion's
:class:`fura.io.streaming.report.StreamReport`, ``fura bench``'s peak-memory children). All of it reads the
kernel's own counters, so it costs microseconds and needs no third-party package:

* :func:`current_rss` — resident set size now (``/proc/self/statm``);
* :func:`peak_rss` — the kernel's high-water mark of the resident set (``VmHWM``; ``ru_maxrss`` where
  ``/proc`` is missing);
* :func:`reset_peak_rss` — reset that high-water mark to the current RSS (``/proc/self/clear_refs``), so a
  later :func:`peak_rss` measures one phase of a process, not its whole life;
* :func:`release_free_memory` — collect garbage and let glibc return freed heap pages (``malloc_trim``),
  so that memory freed earlier cannot hide (or inflate) what the next phase needs;
* :func:`pin_malloc_mmap_threshold` — make glibc serve large allocations by ``mmap`` so that freed tensors
  leave the resident set at once (glibc otherwise raises its threshold and keeps them in its heap).

Off Linux (or off glibc) each function degrades to a documented no-op or fallback instead of failing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import resource
import sys
from pathlib import Path
from typing import Any

#: Slack allowed between ``VmHWM`` and ``VmRSS`` right after a reset (page-table noise, the reset's own pages).
RESET_SLACK_BYTES = 4 * 1024**2
#: glibc ``mallopt`` parameter number of ``M_MMAP_THRESHOLD``.
_M_MMAP_THRESHOLD = -3


def current_rss() -> int:
    """Resident set size of this process now, in bytes (``/proc/self/statm``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _proc_status() -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of this process in bytes, from ``/proc/self/status`` (empty off Linux)."""
    values: dict[str, int] = {}
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return values
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def _ru_maxrss() -> int:
    """Peak resident set of this process over its whole life (``getrusage().ru_maxrss``), in bytes."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024


def peak_rss() -> int:
    """Peak resident set of this process since it started or since the last :func:`reset_peak_rss`, in bytes.

    Reads the kernel's high-water mark ``VmHWM``; where ``/proc`` is unavailable, the lifetime peak
    (``getrusage().ru_maxrss``).
    """
    return _proc_status().get("VmHWM") or _ru_maxrss()


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0); ``False`` if that did not happen.

    Writes ``5`` to ``/proc/self/clear_refs`` (only the counter changes; no memory is touched), then checks
    that ``VmHWM`` really fell to ``VmRSS`` (within :data:`RESET_SLACK_BYTES`): some sandboxes accept the
    write and ignore it. On ``False``, :func:`peak_rss` still reports the peak over the process's life.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    status = _proc_status()
    return bool(status) and status["VmHWM"] <= status["VmRSS"] + RESET_SLACK_BYTES


@functools.cache
def _libc() -> Any:
    """glibc, or ``None`` where there is none (macOS, musl without the symbols, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_free_memory(collect_garbage: bool = True) -> None:
    """Hand freed memory back to the OS: ``gc.collect()`` (optional), then glibc's ``malloc_trim(0)``.

    Without the trim the allocator keeps freed mid-sized blocks (they live on its heap, not in their own
    mappings), so RSS would creep up phase after phase although nothing is kept alive. ``collect_garbage=False``
    skips the collection for hot loops that free nothing cyclic (a full collection costs tens of milliseconds
    in a process that has imported transformers). A no-op off glibc.
    """
    if collect_garbage:
        gc.collect()
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim(0)


def pin_malloc_mmap_threshold(nbytes: int = 256 * 1024) -> bool:
    """Make glibc serve each allocation ``>= nbytes`` by ``mmap`` (freed at once); ``False`` if impossible.

    By default glibc raises its mmap threshold after each freed large block (up to 32 MiB), so freed
    tensors stay in its heap and the resident set overstates live memory; pinning the threshold turns
    that off for the rest of the process. ``False`` where ``mallopt`` is unavailable (not glibc).
    """
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    return bool(mallopt(_M_MMAP_THRESHOLD, nbytes)) if mallopt is not None else False
