"""Watching a daemon's ipc socket for its application leaving (``until_app_leaves``), with
real ZeroMQ sockets: closing the watched socket must never hang ZeroMQ's I/O thread, which
carries every gossip connection of the daemon."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from meshd.daemon.channels.ipc import close_watched, until_app_leaves

pytestmark = pytest.mark.glue

T = 10.0


async def _io_works(zctx: Any) -> bool:
    """Whether the context's I/O thread still carries a message over TCP."""
    a, b = zctx.socket(zmq.PAIR), zctx.socket(zmq.PAIR)
    try:
        b.connect(f"tcp://127.0.0.1:{a.bind_to_random_port('tcp://127.0.0.1')}")
        await b.send(b"ping")
        return bool(await asyncio.wait_for(a.recv(), T) == b"ping")
    except asyncio.TimeoutError:
        return False
    finally:
        a.close(0)
        b.close(0)


class Watched:
    """A daemon's PUSH socket at ``endpoint`` under :func:`until_app_leaves`, and how many
    applications the watch saw connected."""

    def __init__(self, daemon: Any, endpoint: str) -> None:
        self.sock = daemon.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.apps = 0
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(until_app_leaves(self.sock, self._counted))

    async def started(self) -> None:
        """Once the watch's monitor is on: the task takes its first step in the loop's next
        round, before this call goes on."""
        await asyncio.sleep(0)

    def _counted(self, n: int) -> None:
        self.apps = n
        self.changed.set()

    async def until(self, apps: int) -> None:
        while self.apps != apps:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), T)


async def _close_while_watched(home: str, rounds: int) -> bool:
    """``rounds`` times, a receiver port closed while its application is connected (the watch
    cancelled, the socket closed); then whether the I/O thread still works."""
    daemon = zmq.asyncio.Context()
    app = zmq.Context()
    for i in range(rounds):
        w = Watched(daemon, f"ipc://{home}/rx-{i}")
        await w.started()
        pull = app.socket(zmq.PULL)
        pull.connect(f"ipc://{home}/rx-{i}")
        await w.until(1)
        await w.sock.send(b"hello")  # the connection is up at both ends
        assert pull.poll(int(T * 1000)) and pull.recv() == b"hello"
        w.task.cancel()
        close_watched(w.sock)
        pull.close(0)
        await asyncio.gather(w.task, return_exceptions=True)
    return await _io_works(daemon)


def test_closing_a_watched_socket_keeps_zeromq_running(tmp_path: Path) -> None:
    """Closed with its monitor still on, the socket reported its teardown from the I/O thread
    to the monitor that the cancelled watch had closed: the I/O thread blocked for ever, here
    within a few rounds, and a daemon's gossip went silent with it.  In a child process: a hung
    I/O thread also hangs the end of its context."""
    run = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert run.stdout.strip() == "works", (run.stdout, run.stderr[-2000:])


async def test_the_watch_ends_when_the_last_application_leaves(tmp_path: Path) -> None:
    daemon = zmq.asyncio.Context()
    app = zmq.Context()
    try:
        w = Watched(daemon, f"ipc://{tmp_path}/rx")
        await w.started()
        first, second = app.socket(zmq.PULL), app.socket(zmq.PULL)
        first.connect(f"ipc://{tmp_path}/rx")
        second.connect(f"ipc://{tmp_path}/rx")
        await w.until(2)
        first.close(0)
        await w.until(1)
        assert not w.task.done()
        second.close(0)
        await asyncio.wait_for(w.task, T)
        close_watched(w.sock)
        assert await _io_works(daemon)
    finally:
        app.destroy(linger=0)
        daemon.destroy(linger=0)


if __name__ == "__main__":
    try:
        works = asyncio.run(_close_while_watched(sys.argv[1], 100))
    except (asyncio.TimeoutError, AssertionError):  # no connect event came: the thread hangs
        works = False
    print("works" if works else "hangs", flush=True)
    os._exit(0)  # never wait for a context whose I/O thread may hang
