"""A handed-over channel in the application: the data connection, run in the caller's thread
(blocking sockets; see :mod:`meshd.channel.stream` for the protocol and
:mod:`meshd.local.handover` for the messages with the daemon).

:class:`DirectLink` holds the hand-over socket to the daemon (for the channel's life: closing
it tells the daemon the application is gone) and, once granted, the data socket.  ``send``
seals into reused buffers and writes with ``sendmsg`` (record header and frame in one call);
it reads the receiver's feedback opportunistically, and blocks on it when out of credit.  A
broken connection (an error, end of file, an inauthentic record) goes back to the daemon, which
races a path again and grants the resumed connection; the unacked frames are then resent.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from typing import Any

from meshd.app.handover import REJOIN_EVERY, HandoverEnd
from meshd.channel.frames import Buffer
from meshd.channel.reliable import WouldBlock
from meshd.channel.stream import StreamSender
from meshd.errors import LocalError
from meshd.local.handover import decode_grant

__all__ = ["DirectLink"]

IO_TIMEOUT = 15.0
"""Seconds a write may block before the connection counts as broken."""
_TIMEVAL = struct.Struct("@ll")  # struct timeval, for SO_SNDTIMEO
EARLY_BATCHES = 8
"""Batches that may wait for the channel's first connection before ``send`` blocks."""
IOV = 512
"""Buffers per ``sendmsg`` at most."""


class DirectLink(HandoverEnd):
    """The data side of one handed-over sending channel (not thread-safe: the caller locks)."""

    def __init__(self, path: str, channel_id: str, name: str, *,
                 window_bytes: int = 64 << 20) -> None:
        super().__init__(path, channel_id, name, window_bytes)
        self._early: list[tuple[list[Buffer], int, int]] = []  # batches before the first grant
        self._take()

    # -- what a sender calls -------------------------------------------------------------------

    def send(self, parts: list[Buffer], nbytes: int, count: int) -> None:
        """Seal and write one batch; blocks while there is no credit.  Before the first
        connection (there are no keys to seal with yet) up to :data:`EARLY_BATCHES` batches
        wait here, as they would in the daemon; then ``send`` blocks until it is granted."""
        if self.core is None:
            if len(self._early) < EARLY_BATCHES:
                self._early.append((parts, nbytes, count))
                self._poll(0.0)
                return
            self._connected()
        self._send(parts, nbytes, count)

    def _send(self, parts: list[Buffer], nbytes: int, count: int) -> None:
        while True:
            core = self._connected()
            try:
                core.send_batch(parts, nbytes, count, time.monotonic())
                break
            except WouldBlock:
                self._wait(core.get_timer())
        self._write()
        self._poll(0.0)
        self._report(False)
        if self._gone_since is not None:
            self._rejoin()

    def flush(self, timeout: float | None) -> None:
        """Wait until the receiving daemon has acknowledged every batch sent; LocalError
        (``timeout``) after ``timeout`` seconds, ChannelClosed if the channel ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            core = self._connected(deadline)
            if core.all_acked and not self._early:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise LocalError(f"flush timed out: {core.acked_messages} of {core.messages}"
                                 " messages acknowledged", reason="timeout")
            timer = core.get_timer()
            if deadline is not None:
                timer = deadline if timer is None else min(timer, deadline)
            self._wait(timer)
        self._report(True)

    def close(self) -> None:
        """Write the channel's last record (if connected) and let go of both sockets."""
        if self.sock is not None and self.core is not None and self.ended is None:
            try:
                sendmsg_all(self.sock, self.core.close_frame())
            except (OSError, LocalError):
                pass
        self._report(True)
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self._lease is not None:
            self._lease.close()
            self._lease = None

    @property
    def busy(self) -> bool:
        """Whether :meth:`pump` has something to move on: batches waiting for the first
        connection, frames the receiver has not acknowledged yet, or an acknowledgement the
        daemon has not been told of (for ``meshd channels``)."""
        if self.ended is not None:
            return False
        core = self.core
        return bool(self._early) or (core is not None and (
            not core.all_acked or (self._lease is not None and core.acked_messages
                                   != self._counts.get("acked_messages", 0))))

    def pump(self) -> None:
        """Move the channel on without waiting (the sender's thread calls it while the
        application makes no call): take a grant and write what waited for it, read the
        receiver's feedback, run the retransmit timer, give a broken connection back to the
        daemon, report the counters.  ChannelClosed if the channel ended."""
        if self.ended is not None:
            raise self.ended
        self._poll(0.0)
        core = self.core
        if core is not None and self.sock is not None:
            timer = core.get_timer()
            if timer is not None and timer <= time.monotonic():
                core.handle_timer(time.monotonic())
            self._write()
        if self._gone_since is not None:
            self._rejoin()
        self._report(False)
        if self.ended is not None:
            raise self.ended

    @property
    def acked_messages(self) -> int:
        return 0 if self.core is None else self.core.acked_messages

    # -- internals -----------------------------------------------------------------------------

    def _connected(self, deadline: float | None = None) -> StreamSender:
        """The core, once a connection is granted (waits for one; ChannelClosed if the channel
        ended, LocalError ``timeout`` past ``deadline``)."""
        if self._lease is not None and self.ended is None and select.select(
                [self._lease], [], [], 0)[0]:
            self._read_lease()  # a channel that ended says so at the next call
        while self.sock is None or self.core is None:
            if self.ended is not None:
                raise self.ended
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                raise LocalError("no path to the receiver yet", reason="timeout")
            if self._lease is None:  # the daemon is away: wait for it to come back
                self._rejoin()
                if self._lease is None:
                    time.sleep(REJOIN_EVERY if wait is None else min(wait, REJOIN_EVERY))
                continue
            ready, _, _ = select.select([self._lease], [], [], wait)
            if ready:
                self._read_lease()
        if self.ended is not None:
            raise self.ended
        return self.core

    def _read_lease(self) -> None:
        """Take every message the daemon has sent (a read stops at a message that carries a
        descriptor, so an ``ended`` right behind a grant needs another read)."""
        self._read_lease_once()
        for _ in range(64):
            if self._lease is None or not select.select([self._lease], [], [], 0)[0]:
                return
            self._read_lease_once()

    def _granted(self, msg: dict[str, Any], fd: int) -> None:
        sock = socket.socket(fileno=fd)
        send_timeout(sock, IO_TIMEOUT)
        grant = decode_grant(msg)
        if self.sock is not None:
            self.sock.close()
        self.sock = sock
        now = time.monotonic()
        if self.core is None:
            self.core = StreamSender(grant, now, window_bytes=self._window)
            self._write()
            early, self._early = self._early, []
            for batch in early:
                self._send(*batch)
        else:
            self.core.resume(grant, now)
        self._write()

    def _write(self) -> None:
        if self.core is None or self.sock is None:
            return
        bufs = self.core.take_writes()
        if bufs:
            try:
                sendmsg_all(self.sock, bufs)
            except OSError as exc:
                self._broken(f"write: {exc}")

    def _wait(self, until: float | None) -> None:
        """Wait for feedback (or the lease) until the core's timer, then run the timer."""
        timeout = None if until is None else max(0.0, until - time.monotonic())
        self._poll(timeout)
        core = self.core
        if core is not None and self.sock is not None:
            core.handle_timer(time.monotonic())
            self._write()

    def _poll(self, timeout: float | None) -> None:
        """Read what the receiver and the daemon sent, waiting at most ``timeout``."""
        watch = (([self._lease] if self._lease is not None else [])
                 + ([self.sock] if self.sock is not None else []))
        if not watch:
            time.sleep(min(timeout if timeout is not None else REJOIN_EVERY, REJOIN_EVERY))
            return
        ready, _, _ = select.select(watch, [], [], timeout)
        if self._lease is not None and self._lease in ready:
            self._read_lease()
        sock, core = self.sock, self.core
        if sock is None or core is None or sock not in ready:
            return
        if self._read_data(sock, core):
            self._write()

def send_timeout(sock: socket.socket, seconds: float) -> None:
    """Make ``sock`` blocking, a send giving up after ``seconds`` without progress (OSError):
    the kernel's ``SO_SNDTIMEO``, so a frame goes in one ``sendmsg`` and no ``poll`` comes
    before each call, as it does under Python's own socket timeout."""
    sock.setblocking(True)
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                    _TIMEVAL.pack(whole, int((seconds - whole) * 1e6)))


def sendmsg_all(sock: socket.socket, bufs: list[Buffer]) -> None:
    """Write every buffer of ``bufs`` on the blocking ``sock`` with as few ``sendmsg`` calls as
    the kernel allows (at most ``IOV`` buffers each)."""
    views = byte_views(bufs)
    i = 0
    while i < len(views):
        i = consumed(views, i, sock.sendmsg(views[i:i + IOV]))


def byte_views(bufs: list[Buffer]) -> list[memoryview]:
    """``bufs`` as flat byte views (for ``sendmsg`` and :func:`consumed`)."""
    return [memoryview(b).cast("B") for b in bufs]  # type: ignore[arg-type]


def consumed(views: list[memoryview], i: int, sent: int) -> int:
    """The index of the first view of ``views[i:]`` not wholly written once a ``sendmsg`` of
    them wrote ``sent`` bytes; a view written in part is cut to what is left of it."""
    while sent and i < len(views):
        n = views[i].nbytes
        if sent >= n:
            sent -= n
            i += 1
        else:
            views[i] = views[i][sent:]
            sent = 0
    return i
