"""The applications' side of channels: ipc endpoints, noticing an application that left, and
the shared-memory rings (asyncio glue).

A sender writes batches (:mod:`meshd.channel.batch`) to a PULL socket the daemon binds per
channel; a receiver reads ``[meta, batch]`` from a PUSH socket the daemon binds per name.  Both
over ipc in the site's home directory (mode 0700).  Big batches may travel in a shared-memory
ring instead (:mod:`meshd.local.ring`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path as FsPath

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from meshd.errors import LocalError
from meshd.local.ring import Ring

log = logging.getLogger("meshd.daemon.channels.ipc")


class IpcEndpoints:
    """Where the daemon binds its ipc sockets: the site's home directory, or a private temporary
    directory when the home path is too long for a unix socket address."""

    def __init__(self, root: FsPath) -> None:
        self.root = root
        self._fallback: FsPath | None = None

    def endpoint(self, name: str) -> str:
        path = self.root / name
        if len(str(path)) > 100:  # sun_path is 108 bytes
            if self._fallback is None:
                self._fallback = FsPath(tempfile.mkdtemp(prefix="meshd-"))
            path = self._fallback / name
        return f"ipc://{path}"

    @staticmethod
    def remove(endpoint: str) -> None:
        try:
            os.unlink(endpoint.removeprefix("ipc://"))
        except OSError:
            pass


async def until_app_leaves(sock: zmq.asyncio.Socket,
                           counted: Callable[[int], None] | None = None) -> None:
    """Return once no application is connected to ``sock`` (an ipc socket the daemon bound)
    after one was, or after the only one that connected before this started watching left:
    how a daemon notices an application that died without closing its channel.  ``counted``
    is told the number of applications connected after each connect or disconnect.  Close
    ``sock`` with :func:`close_watched`."""
    # A unique address: pyzmq's default names it by the socket's descriptor, which a socket
    # opened right after this one closed may reuse ("Address already in use").
    monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED,
                                      addr=f"inproc://meshd-monitor-{secrets.token_hex(8)}")
    try:
        connected = 0
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())["event"]
            if event == zmq.EVENT_ACCEPTED:
                connected += 1
            elif event == zmq.EVENT_DISCONNECTED:
                connected -= 1
            if counted is not None:
                counted(connected)
            if event == zmq.EVENT_DISCONNECTED and connected <= 0:
                return
    finally:
        if not sock.closed:
            sock.disable_monitor()
        # Closed already: its owner stopped the monitor first (close_watched), else this close
        # could hang ZeroMQ's I/O thread (see there).
        monitor.close(0)


def close_watched(sock: zmq.asyncio.Socket) -> None:
    """Close ``sock``, which :func:`until_app_leaves` may be watching: its monitor is stopped
    first.  Closed with the monitor on, the socket reports its last events (disconnected,
    closed) from ZeroMQ's I/O thread while the watcher, cancelled, closes the monitor's reading
    end: the I/O thread then blocks in that send for ever, and every ZeroMQ connection of the
    daemon (its gossip first) goes silent with it.  Stopping the monitor here is synchronous:
    no event follows it."""
    if not sock.closed:
        try:
            sock.disable_monitor()
        except zmq.ZMQError:
            pass
        sock.close(0)


# -- rings ------------------------------------------------------------------------------------


def attach_ring(path: str) -> Ring | None:
    """Map the shared-memory ring a sending application made; None if it cannot be used (the
    application then sends inline)."""
    try:
        return Ring.attach(path)
    except LocalError as exc:
        log.warning("not using an application's ring: %s", exc)
        return None


async def make_ring(ring_bytes: int) -> Ring | None:
    """A receiver's ring of ``ring_bytes`` (0: none), its memory allocated in a thread; None if
    ``/dev/shm`` has no room (the receiver is then fed inline).  LocalError if the size is out
    of range."""
    if not ring_bytes:
        return None
    try:
        return await asyncio.to_thread(Ring.create, ring_bytes, background=False)
    except OSError as exc:
        log.warning("no shared-memory ring for a receiver: %s", exc)
        return None
