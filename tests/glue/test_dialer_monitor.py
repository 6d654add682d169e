"""A dialer link's connection monitor (:class:`meshd.peer.dialer._Link`), with real ZeroMQ
sockets: if the task reading its events ends for any reason, the monitor stops with it. Events
nobody reads would fill the monitor and block ZeroMQ's I/O thread, and with it every connection
of the daemon (see ``ipc.close_watched`` for the same hang found in CI)."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest
import zmq
import zmq.asyncio

from meshd.peer import dialer
from tests.glue.test_ipc_watch import _io_works

pytestmark = pytest.mark.glue

RETRIES = 3000
"""Connect retries to let pile up: three times the monitor's queue (1000 events)."""


def _refusing_address() -> str:
    """A loopback address where nothing listens (connects are refused at once)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"


async def test_a_watcher_that_dies_stops_the_monitor(monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(monitor: Any) -> Any:
        raise RuntimeError("the watcher broke")

    monkeypatch.setattr(dialer, "recv_monitor_message", broken)
    ctx = zmq.asyncio.Context()
    ctx.setsockopt(zmq.RECONNECT_IVL, 1)  # a retry (one event) every millisecond
    try:
        link = dialer._Link(ctx, (b"a" * 40, b"b" * 40), b"c" * 40, _refusing_address())
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(link._watcher, 10)
        assert link._monitor.closed
        # Let the retries (each an event, were the monitor on) outnumber what it could queue.
        deadline = time.monotonic() + RETRIES / 1000
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await _io_works(ctx), "ZeroMQ's I/O thread is blocked"
        link.close()
        link.close()  # twice is harmless
    finally:
        ctx.destroy(0)
