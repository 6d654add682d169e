"""The blocks a receiving application's big records are read into, used again once nothing
views them any more.

A handed-over receiver reads each record of 64 KiB or more into a block of its own and opens
the frame in place, so the messages' arrays view that block (:mod:`.in_link`).  A new block is
fresh memory: the kernel zeroes every page of it on first touch, which cost a receiver 3-12 % of
its time at 16 MiB messages (``perf``: ``clear_page_erms``).  :func:`take` hands out a
memoryview of a view of a pooled *backing* array; a finalizer on that view gives the backing
back once the last memoryview, and so every array made from one, is gone (numpy arrays made
from a memoryview keep the memoryview, which keeps the view).  So a block is never handed out
again while anything still reads it.  The pool keeps at most :data:`MAX_IDLE_BYTES` of idle
blocks per process (beyond, a block given back is freed).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np

__all__ = ["GRAIN", "MAX_IDLE_BYTES", "idle_bytes", "take"]

MAX_IDLE_BYTES = 64 << 20
"""Most bytes of idle blocks kept for reuse, per process."""
GRAIN = 64 << 10
"""Blocks are sized in steps of this, so records of nearly one size share them."""

_lock = threading.RLock()  # re-entrant: a garbage collection inside take may give one back
_idle: dict[int, list[Any]] = {}
_idle_bytes = 0


def take(n: int) -> memoryview:
    """A writable byte view of ``n`` bytes (contents undefined), from an idle block if one of
    its size is kept, else from a new one."""
    size = -(-n // GRAIN) * GRAIN
    global _idle_bytes
    with _lock:
        spare = _idle.get(size)
        backing = spare.pop() if spare else None
        if backing is not None:
            _idle_bytes -= size
    if backing is None:
        backing = np.empty(size, dtype=np.uint8)
    view = backing[:n]
    done = weakref.finalize(view, _give_back, backing)
    done.atexit = False
    return memoryview(view)  # type: ignore[arg-type]


def _give_back(backing: Any) -> None:
    global _idle_bytes
    size = backing.nbytes
    with _lock:
        if _idle_bytes + size <= MAX_IDLE_BYTES:
            _idle.setdefault(size, []).append(backing)
            _idle_bytes += size


def idle_bytes() -> int:
    """Bytes of idle blocks kept now."""
    with _lock:
        return _idle_bytes
