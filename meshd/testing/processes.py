"""Real daemons as separate processes, and waiting on a condition without sleeping blind.

Used by the demo, the tests and the benchmarks: each ``meshd run`` is its own process with its own
state directory; :func:`wait_until` polls a predicate (a client call, say) with a deadline.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from meshd.errors import DaemonNotRunning


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, *,
               ignore: tuple[type[BaseException], ...] = (DaemonNotRunning,)) -> Any:
    """Poll ``predicate`` until it returns something truthy or ``timeout`` passes (TimeoutError);
    ``ignore``: exceptions that mean "not yet"."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        try:
            value = predicate()
        except ignore:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


async def wait_until_async(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """:func:`wait_until` inside an event loop: polls ``predicate`` while the loop runs on."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.1)
    return value


def stop_daemons(procs: Iterable[subprocess.Popen[bytes]], timeout: float = 20.0) -> list[int]:
    """SIGTERM every daemon still running, then wait for each; one that has not exited within
    ``timeout`` is killed (exit code -9).  The exit codes, in order."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            codes.append(-9)
    return codes


def start_daemon(home: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``meshd run`` for ``home`` as a separate process, logging to ``log_path``."""
    log = open(log_path, "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "meshd", "run", "--home", str(home)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    finally:
        log.close()
