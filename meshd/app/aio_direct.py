"""A handed-over channel in an asyncio application: the data connection driven by the event
loop (the sync flavour is :mod:`meshd.app.direct`; the protocol is
:mod:`meshd.channel.stream`, the messages with the daemon :mod:`meshd.local.handover`).

:class:`AsyncDirectLink` holds the hand-over socket to the daemon (for the channel's life) and,
once granted, the data socket; both are non-blocking, each with a loop reader.  ``send`` puts a
batch in a short queue (:data:`~meshd.app.direct.EARLY_BATCHES` deep) and waits only while the
queue is full; the loop seals queued batches as the receiver's credit allows and writes them
with non-blocking ``sendmsg`` (what the kernel does not take waits on a loop writer).  So the
batches sent before the first grant go out when it comes, and unacknowledged frames, feedback,
retransmits, counter reports and the tries to reach a daemon that went away move on while the
application awaits something else: loop callbacks and one timer re-armed after each event, as
aioquic's glue does, and no thread.

A batch is sealed only once every earlier write has left: a sealed frame's buffer is reused
once acknowledged, and a frame still queued for writing (a resend) may be acknowledged meanwhile
from an earlier connection.  This is the sync flavour's order too (its ``sendmsg`` blocks).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from typing import Any

from meshd.app.direct import EARLY_BATCHES, IO_TIMEOUT, IOV, byte_views, consumed
from meshd.app.handover import REPORT_EVERY, HandoverEnd
from meshd.channel.frames import Buffer
from meshd.channel.reliable import WouldBlock
from meshd.channel.stream import StreamSender
from meshd.errors import LocalError, ProtocolError
from meshd.local.handover import decode_grant

__all__ = ["AsyncDirectLink"]


class AsyncDirectLink(HandoverEnd):
    """The data side of one handed-over sending channel, on the running event loop (see the
    module docstring).  One sending task at a time (the caller keeps batches in order)."""

    def __init__(self, path: str, channel_id: str, name: str, *,
                 window_bytes: int = 64 << 20) -> None:
        super().__init__(path, channel_id, name, window_bytes)
        self._loop = asyncio.get_running_loop()
        self._queue: deque[tuple[list[Buffer], int, int]] = deque()  # batches not sealed yet
        self._out: list[memoryview] = []  # what is sealed and not yet written, from _out_at
        self._out_at = 0
        self._wrote = 0.0  # when a write last made progress
        self._writing = False  # a loop writer waits for room on the data socket
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._changed = asyncio.Event()
        self._closed = False
        self._take()

    # -- what a sender calls -------------------------------------------------------------------

    async def send(self, parts: list[Buffer], nbytes: int, count: int) -> None:
        """Queue one batch to be sealed and written in order; waits while
        :data:`~meshd.app.direct.EARLY_BATCHES` wait already (before the first connection, or
        without credit).  ChannelClosed if the channel ended."""
        while True:
            if self.ended is not None:
                raise self.ended
            if self._closed:
                raise LocalError("the sender is closed", reason="closed")
            if len(self._queue) < EARLY_BATCHES:
                break
            await self._wait(None)
        self._queue.append((parts, nbytes, count))
        self._progress()

    async def flush(self, timeout: float | None) -> None:
        """Wait until the receiving daemon has acknowledged every batch sent; LocalError
        (``timeout``) after ``timeout`` seconds, ChannelClosed if the channel ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.ended is not None:
                raise self.ended
            core = self.core
            if core is not None and core.all_acked and not self._queue:
                break
            if deadline is not None and time.monotonic() >= deadline:
                if core is None or self.sock is None:
                    raise LocalError("no path to the receiver yet", reason="timeout")
                raise LocalError(f"flush timed out: {core.acked_messages} of {core.messages}"
                                 " messages acknowledged", reason="timeout")
            await self._wait(deadline)
        self._report(True)

    async def close(self) -> None:
        """Write the channel's last record after what is being written (if connected; at most
        :data:`~meshd.app.direct.IO_TIMEOUT` seconds) and let go of both sockets.  Batches not
        sealed yet are dropped (a sender flushes first)."""
        if self._closed:
            return
        self._queue.clear()
        core = self.core
        if self.sock is not None and core is not None and self.ended is None:
            try:
                self._queue_writes(core.close_frame())
                deadline = time.monotonic() + IO_TIMEOUT
                while self._out and self.sock is not None and time.monotonic() < deadline:
                    await self._wait(deadline)
            except LocalError:
                pass
        self._report(True)
        self._shut()

    @property
    def acked_messages(self) -> int:
        return 0 if self.core is None else self.core.acked_messages

    # -- loop callbacks ------------------------------------------------------------------------

    def _on_lease(self) -> None:
        """The daemon sent something (a read stops at a message that carries a descriptor;
        the reader is called again for the rest)."""
        if self._lease is not None:
            self._read_lease_once()
            self._progress()

    def _on_data(self) -> None:
        """The receiver sent something (feedback)."""
        sock, core = self.sock, self.core
        if sock is None or core is None:
            return
        if self._read_data(sock, core):
            self._queue_writes(core.take_writes())
        self._progress()

    def _on_writable(self) -> None:
        self._write_out()
        self._progress()

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        now = time.monotonic()
        core = self.core
        if core is not None and self.sock is not None:
            timer = core.get_timer()
            if self._out and now - self._wrote >= IO_TIMEOUT:
                self._broken(f"a write blocked for {IO_TIMEOUT:.0f} s")
            elif timer is not None and timer <= now:
                core.handle_timer(now)
                self._queue_writes(core.take_writes())
        if self._gone_since is not None:
            self._rejoin()
        self._progress()

    # -- internals -----------------------------------------------------------------------------

    def _progress(self) -> None:
        """After each event: seal what is queued as far as credit allows (once earlier writes
        have left), report the counters when due, re-arm the timer, wake waiting calls."""
        if self._closed:
            return
        core = self.core
        if core is not None and self.sock is not None and self.ended is None:
            now = time.monotonic()
            while self._queue and not self._out and self.sock is not None:
                try:
                    core.send_batch(*self._queue[0], now)
                except WouldBlock:
                    break
                except LocalError as exc:
                    self._end("failed", str(exc))
                    break
                self._queue.popleft()
                self._queue_writes(core.take_writes())
        self._report(False)
        self._rearm()
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait(self, deadline: float | None) -> None:
        """Wait for the next event, at most until ``deadline``."""
        changed = self._changed
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            await asyncio.wait_for(changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _rearm(self) -> None:
        """Keep the one timer on the earliest of: the core's retransmit timer, a blocked
        write's deadline, the next try to reach a daemon that went away, the next report."""
        core, times = self.core, []
        if core is not None and self.ended is None:
            if self.sock is not None:
                timer = core.get_timer()
                if timer is not None:
                    times.append(timer)
                if self._out:
                    times.append(self._wrote + IO_TIMEOUT)
            if self._gone_since is not None:
                times.append(self._next_rejoin)
            elif core.counters() != self._counts:
                times.append(self._reported + REPORT_EVERY)
        at = min(times) if times else None
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, at
        if at is not None:
            self._timer = self._loop.call_later(max(0.0, at - time.monotonic()), self._on_timer)

    def _set_lease(self, lease: socket.socket) -> None:
        lease.setblocking(False)
        super()._set_lease(lease)
        self._loop.add_reader(lease.fileno(), self._on_lease)

    def _drop_lease(self) -> None:
        if self._lease is not None:
            self._loop.remove_reader(self._lease.fileno())
        super()._drop_lease()

    def _drop_sock(self) -> None:
        """Let go of the data socket (its reader and writer first) and what waited to be
        written on it."""
        if self.sock is not None:
            self._loop.remove_reader(self.sock.fileno())
            if self._writing:
                self._loop.remove_writer(self.sock.fileno())
        super()._drop_sock()
        self._writing = False
        self._out, self._out_at = [], 0

    def _granted(self, msg: dict[str, Any], fd: int) -> None:
        grant = None
        try:
            grant = decode_grant(msg)
        except ProtocolError as exc:
            self._end("failed", str(exc))
        if grant is None or self.ended is not None:
            socket.socket(fileno=fd).close()
            return
        self._drop_sock()
        sock = self.sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._on_data)
        now = time.monotonic()
        if self.core is None:
            self.core = StreamSender(grant, now, window_bytes=self._window)
        else:
            self.core.resume(grant, now)
        self._queue_writes(self.core.take_writes())

    def _queue_writes(self, bufs: list[Buffer]) -> None:
        if bufs and self.sock is not None:
            if not self._out:
                self._wrote = time.monotonic()
            self._out += byte_views(bufs)
            self._write_out()

    def _write_out(self) -> None:
        """Write what the kernel takes now; a loop writer waits for room for the rest."""
        sock = self.sock
        if sock is None:
            return
        out = self._out
        while self._out_at < len(out):
            try:
                sent = sock.sendmsg(out[self._out_at:self._out_at + IOV])
            except BlockingIOError:
                break
            except OSError as exc:
                self._broken(f"write: {exc}")
                return
            self._out_at = consumed(out, self._out_at, sent)
            self._wrote = time.monotonic()
        if self._out_at == len(out):
            self._out, self._out_at = [], 0
        if bool(self._out) != self._writing:
            self._writing = bool(self._out)
            if self._writing:
                self._loop.add_writer(sock.fileno(), self._on_writable)
            else:
                self._loop.remove_writer(sock.fileno())

    def _shut(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_at = None
        self._drop_sock()
        self._drop_lease()
        self._changed.set()
