"""One tunnel data connection, either end: a thin pump between a
:class:`~meshd.daemon.channels.connection.DataConnection` and a :class:`~meshd.tunnel.TunnelEnd`
whose streams are :class:`.local.LocalStream` sockets (asyncio glue).

Records in -> ``TunnelEnd.frame_received`` -> events to the local streams; local bytes ->
the multiplexer -> one flush per loop turn seals what is queued into as few frames as fit.
When the data connection's send queue is over its mark every local stream stops reading
until it drains.  A lost connection (or a protocol error, which closes it) resets every stream.

Copies.  Local sockets are read into one reused buffer per data connection (:data:`ARENA`
bytes; each read at most the stream's credit), the multiplexer queues views of it, and the
flush seals them from there, unjoined, into a frame built with room for its record header: one
buffer and one write per frame, the AEAD pass the only copy in user space.  The buffer is
sealed out early when a read would find less than :data:`MIN_READ` left in it.  A connection
with no stream left drops its reused buffers (they come back with the next stream's bytes).  The other way,
records arrive in one reused buffer and decrypt into one reused buffer (``TunnelEnd``), whose
views go to the local sockets; asyncio copies only what a socket does not take at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable

from meshd.channel import link
from meshd.channel.frames import Block
from meshd.daemon.channels.connection import DataConnection, drop_spare, set_options
from meshd.daemon.tunnels.local import WRITE_COPIES, LocalStream
from meshd.errors import ProtocolError
from meshd.tunnel import (
    Ended,
    Finished,
    Received,
    StreamOpened,
    StreamReset,
    TunnelEnd,
    Writable,
)
from meshd.tunnel.codec import MAX_FRAME_PAYLOAD

log = logging.getLogger("meshd.daemon.tunnels")

KEEPALIVE = (60, 20, 5)
"""TCP keepalive of a tunnel's data connection: first probe after 60 s idle, then every 20 s,
dead after 5 unanswered: an idle tunnel stays up for hours through firewalls and NATs that
forget silent connections, and a vanished peer is noticed in about three minutes."""
MAX_HELD = 64 << 20
"""Bytes one data connection's streams may hold for targets still being connected (each up to
its window); DATA beyond resets its stream ``busy``, so 4096 streams to a target that does not
answer cannot hold 4096 windows (1 GiB)."""
ARENA = MAX_FRAME_PAYLOAD
"""Bytes of the reused buffer local sockets are read into (one frame's worth)."""
MIN_READ = 64 << 10
"""A read that would find less room than this in the buffer seals it out first."""
_HS = link.RECORD_HEADER.size
MAX_UNREAD_REFUSALS = 65536
"""Streams the owner may refuse (each answered with a RESET) while the consumer is not reading
what it is sent (the send queue over its mark); beyond, the data connection is closed.  An
OPEN costs 10 bytes and its RESET 10: without this a consumer that never reads makes the owner
queue as much as it sends, without end.  Honest consumers read, and open at most 4096 streams."""


_SPILL = memoryview(bytearray(16 << 10))


def _keep_alive(conn: DataConnection) -> None:
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in zip(("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT"), KEEPALIVE):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    set_options(conn.transport, *options)


class Carrier:
    """The streams of one tunnel data connection (see the module docstring).

    ``on_open(carrier, sid, service)``: owner side, a stream was opened (the owner checks the
    allow-list and connects, or resets it).  ``on_lost(carrier)``: the connection is gone."""

    def __init__(self, conn: DataConnection, end: TunnelEnd, *, path: str,
                 relay: bytes | None, on_lost: Callable[[Carrier], None],
                 on_open: Callable[[Carrier, int, str], None] | None = None) -> None:
        self.conn = conn
        self.end = end
        self.mux = end.mux
        self.peer = end.peer
        self.service = end.service
        self.path = path
        self.relay = relay
        self.streams: dict[int, LocalStream] = {}
        self.opened = 0
        self.created = time.time()
        self.error: str | None = None
        self._on_lost = on_lost
        self._on_open = on_open
        self._flush_due = False
        self._paused = False
        self.held_bytes = 0
        """Bytes held for targets still being connected (at most MAX_HELD)."""
        self.refused = 0
        """Owner: streams refused as they were opened (not allowed, target refused, busy)."""
        self._refused_mark = 0
        self.closed = False
        self._arena: memoryview | None = None
        self._fill = 0
        self._lent = _SPILL
        self._lent_arena = False
        conn.reuse_bodies = True
        conn.owner = self
        conn.handler = self._on_record
        conn.on_lost = self._lost
        _keep_alive(conn)

    @property
    def bytes_total(self) -> int:
        return self.mux.bytes_in + self.mux.bytes_out

    # -- the local side ------------------------------------------------------------------------

    def open_stream(self, local: LocalStream) -> None:
        """Consumer: carry a new local connection (LocalError ``busy``/``closed`` if not)."""
        sid = self.mux.open_stream(self.service)
        self.streams[sid] = local
        self.opened += 1
        local.attach(self, sid)
        self._flush_soon()

    def add_target(self, sid: int, local: LocalStream) -> None:
        """Owner: the local connection that carries stream ``sid`` (being connected)."""
        self.streams[sid] = local
        self.opened += 1

    def read_buffer(self, sid: int) -> memoryview:
        """Where the next read of stream ``sid`` goes: room in the shared buffer, as much as
        the stream may send at once (a small spill buffer if nothing: what is read there is
        copied to wait for credit)."""
        if self._arena is None:
            self._arena = memoryview(bytearray(ARENA))
        if ARENA - self._fill < MIN_READ and not self.closed:
            self._seal_out()
        n = min(ARENA - self._fill, self.mux.sendable(sid))
        self._lent_arena = n > 0
        self._lent = self._arena[self._fill:self._fill + n] if n > 0 else _SPILL
        return self._lent

    def read_done(self, sid: int, n: int) -> bool:
        """``n`` bytes were read into the last :meth:`read_buffer`; False: pause reading."""
        view = self._lent[:n]
        if self._lent_arena:
            self._fill += n
        more = self.mux.send(sid, view, borrowed=True)
        self._flush_soon()
        return more

    def finish(self, sid: int) -> None:
        self.mux.finish(sid)
        self._flush_soon()

    def consumed(self, sid: int, n: int, *, drained: bool = False) -> None:
        self.mux.consumed(sid, n, drained=drained)
        self._flush_soon()

    def held(self, n: int) -> None:
        self.held_bytes += n

    def local_gone(self, sid: int) -> None:
        """The local connection closed or was reset before the stream finished."""
        if self.streams.pop(sid, None) is not None:
            self.mux.reset(sid, "reset")
            self._flush_soon()

    def reset(self, sid: int, reason: str) -> None:
        """End stream ``sid`` here and there (``reason`` as in ``tunnel.codec.REASONS``)."""
        if reason != "reset":
            self.refused += 1
        local = self.streams.pop(sid, None)
        self.mux.reset(sid, reason)
        if local is not None:
            local.reset()
        self._flush_soon()

    def close(self, why: str) -> None:
        """Cut the data connection: every stream is reset."""
        self.error = why
        self.conn.abort(why)

    # -- the data connection -------------------------------------------------------------------

    def _on_record(self, conn: DataConnection, kind: int, body: Block) -> None:
        if kind == link.REFUSE:
            self.error = bytes(body[:200]).decode("utf-8", "replace")
            conn.close()
            return
        if kind != link.FRAME:
            raise ProtocolError(f"record type {kind} on a tunnel", reason="unexpected")
        # ProtocolError: the connection is closed, streams reset.  The plaintext buffer is
        # reused: every Received is written (or copied, if held) in _dispatch below.
        self.end.frame_received(body, reuse=WRITE_COPIES)
        self._dispatch()
        self._flush_soon()

    def _dispatch(self) -> None:
        for ev in self.mux.events():
            if isinstance(ev, Received):
                local = self.streams.get(ev.stream)
                if local is None:
                    continue
                if local.transport is None and self.held_bytes + len(ev.data) > MAX_HELD:
                    self.reset(ev.stream, "busy")  # (its target connect is cancelled with it)
                else:
                    local.write(ev.data)
            elif isinstance(ev, StreamOpened):
                if self._on_open is not None:
                    self._on_open(self, ev.stream, ev.service)
                else:
                    self.mux.reset(ev.stream, "unknown-service")
            elif isinstance(ev, Writable):
                local = self.streams.get(ev.stream)
                if local is not None:
                    local.resume()
            elif isinstance(ev, Ended):
                local = self.streams.get(ev.stream)
                if local is not None:
                    local.write_eof()
            elif isinstance(ev, Finished):
                local = self.streams.pop(ev.stream, None)
                if local is not None:
                    local.close()
            elif isinstance(ev, StreamReset):
                local = self.streams.pop(ev.stream, None)
                if local is not None:
                    local.reset()

    def _flush_soon(self) -> None:
        if not self._flush_due and not self.closed:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        if self.closed:
            return
        self._dispatch()  # what local inputs made the multiplexer say (Writable, Finished)
        refused = self.refused + self.mux.refused
        if self.conn.writable.is_set():
            self._refused_mark = refused
        elif refused - self._refused_mark > MAX_UNREAD_REFUSALS:
            self.close("the far end opens streams and does not read the answers")
            return
        self._seal_out()
        if not self.streams and self._arena is not None and not self._fill:
            self._release_buffers()

    def _release_buffers(self) -> None:
        """No stream left: an idle data connection holds no buffers (up to 3 * ARENA)."""
        self._arena = None
        drop_spare(self.conn)
        self.end.drop_buffer()

    def _seal_out(self) -> None:
        """Seal what the multiplexer queued (the read buffer is free again) and send it."""
        for frame in self.end.frames(room=_HS):
            self.conn.send(link.FRAME, frame, built=True)
        self._fill = 0
        if not self.conn.writable.is_set() and not self._paused:
            self._pause_all(True)
            asyncio.get_running_loop().create_task(self._wait_writable())

    async def _wait_writable(self) -> None:
        await self.conn.writable.wait()
        self._pause_all(False)

    def _pause_all(self, paused: bool) -> None:
        self._paused = paused
        for local in self.streams.values():
            local.carrier_paused(paused)
            if not paused and self.mux.streams.get(local.sid) is not None \
                    and not self.mux.streams[local.sid].blocked:
                local.resume()

    def _lost(self, conn: DataConnection) -> None:
        if self.closed:
            return
        self.closed = True
        self.error = self.error or conn.error
        self.mux.lost()
        self._fill = 0
        self._dispatch_lost()
        self._on_lost(self)

    def _dispatch_lost(self) -> None:
        for ev in self.mux.events():
            if isinstance(ev, StreamReset):
                local = self.streams.pop(ev.stream, None)
                if local is not None:
                    local.reset()
        for local in self.streams.values():
            local.reset()
        self.streams.clear()
