"""Data connections between daemons: TCP carrying :mod:`meshd.channel.link` records (asyncio glue).

:class:`DataConnection` is an :class:`asyncio.BufferedProtocol`: small records are parsed out of a
reused scratch buffer; a large record (a frame of a big message) is received straight into its
own buffer, so the kernel's copy is the only one before decryption.  Records go to ``handler``
(by default an inbox queue that handshakes await with :meth:`DataConnection.expect`).  A relay
switches a connection to :meth:`DataConnection.splice`: raw bytes to the partner, with flow
control both ways (:mod:`meshd.peer.splice`), nothing parsed.  A handler that keeps nothing
of a record past its call (a tunnel carrier) sets ``reuse_bodies``: every big record is then
received into one reused buffer, and after a big record the next header is read alone, so
that the next body lands in that buffer without passing through the scratch.

What a connection may cost before it is authenticated.  A connection this daemon *accepted*
starts untrusted: its records may be at most :data:`~meshd.channel.link.MAX_SMALL` bytes and it
parses them in a small scratch buffer, so a stranger costs a few KiB however big a record it
announces (a bigger one closes the connection).  The service calls :meth:`DataConnection.trust`
once the far end has proved itself (a valid Hello, a frame under a channel's keys, a relay
preamble signed by a member); only then may a record be a whole frame.  A connection this daemon
*dialed* goes to an address from a signed site record and is trusted from the start.

Stalls.  A record received in pieces must keep coming: if no byte of it arrives for
:data:`STALL_TIMEOUT` seconds, or it takes longer than that plus its size at
:data:`MIN_RECORD_RATE`, the connection is closed and its buffer freed.  At most
:data:`MAX_INBOX` records wait in the inbox of a connection nobody reads yet.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from meshd.channel import link
from meshd.channel.frames import Block, new_block
from meshd.channel.link import MIN_RECORD_RATE, STALL_TIMEOUT
from meshd.errors import ProtocolError
from meshd.peer.splice import SpliceEnd, pair

log = logging.getLogger("meshd.daemon.channels.connection")

_SCRATCH = 256 << 10
_SMALL_SCRATCH = 8 << 10
"""Scratch of an untrusted connection: a header and the largest small record fit."""
MAX_INBOX = 64
_WRITE_HIGH = 8 << 20
_WRITE_LOW = 2 << 20
_COALESCE = 64 << 10

Handler = Callable[["DataConnection", int, Block], None]


def set_options(transport: asyncio.BaseTransport | None,
                *options: tuple[int, int, int | bytes]) -> None:
    """Set ``(level, option, value)`` socket options on a transport's socket, best effort (an
    option the platform refuses is left as it is)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return
    for level, opt, value in options:
        try:
            sock.setsockopt(level, opt, value)
        except OSError:
            pass


class _StallWatch:
    """Times the record a connection receives in pieces (see the module docstring)."""

    __slots__ = ("conn", "started", "last", "timer")

    def __init__(self, conn: DataConnection) -> None:
        self.conn = conn
        self.started = self.last = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.started = self.last = loop.time()
        if self.timer is None:
            self.timer = loop.call_later(self.conn.stall_timeout, self._check)

    def progress(self) -> None:
        self.last = asyncio.get_running_loop().time()

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _check(self) -> None:
        self.timer = None
        conn, body = self.conn, self.conn._body
        if body is None:
            return
        now = asyncio.get_running_loop().time()
        idle_until = self.last + conn.stall_timeout
        finish_by = self.started + conn.stall_timeout + len(body) / MIN_RECORD_RATE
        if now >= min(idle_until, finish_by):
            conn.abort(f"stalled in the middle of a {len(body)}-byte record"
                       f" ({conn._body_got} bytes in {now - self.started:.0f} s)")
            return
        self.timer = asyncio.get_running_loop().call_later(min(idle_until, finish_by) - now,
                                                           self._check)


class DataConnection(asyncio.BufferedProtocol):
    """One data connection (either side)."""

    def __init__(self, on_lost: Callable[[DataConnection], None] | None = None, *,
                 trusted: bool = True) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: str = "?"
        self.handler: Handler | None = None
        self.on_lost = on_lost
        self.inbox: asyncio.Queue[tuple[int, Block] | None] = asyncio.Queue()
        self.closed = asyncio.get_running_loop().create_future()
        self.writable = asyncio.Event()
        self.writable.set()
        self.owner: Any = None
        """Whatever this connection serves now (an attempt, a channel end, a relay leg)."""
        self.bytes_in = 0
        self._bytes_sent = 0
        self.trusted = trusted
        self.max_record = link.MAX_RECORD if trusted else link.MAX_SMALL
        self.release_slot: Callable[[], None] | None = None
        """Called once, when an untrusted connection is trusted or lost, whichever comes first
        (it gives back the slot the accepting service took for it)."""
        self.stall_timeout = STALL_TIMEOUT
        self.reuse_bodies = False
        """Set by a handler that keeps nothing of a record past its call (see the module doc)."""
        self._spare: Block | None = None
        self._after_big = False
        self._scratch = bytearray(_SCRATCH if trusted else _SMALL_SCRATCH)
        self._fill = 0
        self._body: Block | None = None
        self._body_kind = 0
        self._body_got = 0
        self._stall = _StallWatch(self)
        self._end = SpliceEnd()
        self._partner: DataConnection | None = None
        self._held = False
        self._parsing = False
        self._queue: collections.deque[Any] = collections.deque()
        self._queued = 0
        self._transport_full = False
        self._close_when_sent = False
        self.error: str | None = None
        self.refused_for: str | None = None
        """The reason code of the protocol error that closed the connection, if one did."""

    # -- asyncio callbacks -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = self._end.transport = transport
        # The transport is handed a record only while its own buffer is empty (it tells us by
        # pause/resume_writing at 0): a record it can send at once is never copied into that
        # buffer; the rest wait, uncopied, in ``_queue`` (see ``send``).
        transport.set_write_buffer_limits(high=0, low=0)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = f"{peer[0]}:{peer[1]}"
        set_options(transport, (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1))

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._body is not None:
            return memoryview(self._body)[self._body_got:]
        if self._after_big and not self._fill and self._partner is None:
            return memoryview(self._scratch)[:link.RECORD_HEADER.size]
        if self._fill == len(self._scratch):  # held bytes fill it (relay leg waiting)
            self._scratch.extend(bytes(_SCRATCH))
        elif self.trusted and len(self._scratch) < _SCRATCH:
            self._scratch.extend(bytes(_SCRATCH - len(self._scratch)))
        return memoryview(self._scratch)[self._fill:]

    def buffer_updated(self, nbytes: int) -> None:
        self.bytes_in += nbytes
        if self._partner is not None:
            with memoryview(self._scratch)[:nbytes] as view:
                self._end.received(view, reused=True)
            return
        if self._body is not None:
            self._body_got += nbytes
            self._stall.progress()
            if self._body_got == len(self._body):
                body, self._body = self._body, None
                self._after_big = self.reuse_bodies
                self._deliver(self._body_kind, body)
            return
        self._fill += nbytes
        if not self._held:
            self._parse()

    def pause_writing(self) -> None:
        self._transport_full = True
        if self._partner is not None:
            self.writable.clear()
            self._end.pause_writing()

    def resume_writing(self) -> None:
        self._transport_full = False
        if self._partner is not None:
            self.writable.set()
            self._end.resume_writing()
            return
        self._write_queued()

    def eof_received(self) -> bool:
        return False  # close

    def connection_lost(self, exc: Exception | None) -> None:
        self._queue.clear()
        self._queued = 0
        self._body = None
        self._stall.cancel()
        self._release_slot()
        self.writable.set()
        self.inbox.put_nowait(None)
        if not self.closed.done():
            self.closed.set_result(None)
        partner, self._partner = self._partner, None
        if partner is not None:
            partner.close()
        if self.on_lost is not None:
            self.on_lost(self)

    # -- records ---------------------------------------------------------------------------------

    def _parse(self) -> None:
        self._parsing = True
        try:
            self._parse_records()
        finally:
            self._parsing = False

    def _parse_records(self) -> None:
        view = memoryview(self._scratch)
        pos = 0
        hs = link.RECORD_HEADER.size
        try:
            while self._fill - pos >= hs and not self._held and self._partner is None:
                kind, length = link.RECORD_HEADER.unpack_from(view, pos)
                link.check_record(kind, length)
                if length > self.max_record:
                    raise ProtocolError(
                        f"record of {length} bytes before the connection is authenticated"
                        f" (at most {self.max_record})", reason="oversized")
                have = self._fill - pos - hs
                if have >= length:
                    self._after_big = False
                    small: Block = bytearray(view[pos + hs:pos + hs + length])
                    pos += hs + length
                    self._deliver(kind, small)
                    continue
                if hs + length > len(self._scratch):  # receive the rest straight into the body
                    body = _new_body(self, length)
                    body[:have] = view[pos + hs:self._fill]
                    self._body, self._body_kind, self._body_got = body, kind, have
                    self._stall.start()
                    pos = self._fill
                break
        except ProtocolError as exc:
            view.release()
            self.refused_for = exc.reason
            self.abort(str(exc))
            return
        rest = self._fill - pos
        if pos:
            view[:rest] = view[pos:self._fill]
        view.release()
        self._fill = rest
        if self._partner is not None and rest:  # spliced while parsing: pass the rest on
            self._end.received(bytes(self._scratch[:rest]))
            self._fill = 0

    def trust(self) -> None:
        """The far end has proved itself: records may be whole frames from now on."""
        if self.trusted:
            return
        self.trusted = True
        self.max_record = link.MAX_RECORD  # the scratch grows in get_buffer (no view held there)
        self._release_slot()

    def _release_slot(self) -> None:
        release, self.release_slot = self.release_slot, None
        if release is not None:
            release()

    def _deliver(self, kind: int, body: Block) -> None:
        if self.handler is not None:
            try:
                self.handler(self, kind, body)
            except ProtocolError as exc:
                self.refused_for = exc.reason
                self.abort(f"{exc.reason}: {exc}")
            except Exception as exc:  # a bug in a handler must not kill the loop
                log.exception("data connection handler failed")
                self.abort(f"internal error: {type(exc).__name__}")
        elif self.inbox.qsize() >= MAX_INBOX:
            self.abort(f"more than {MAX_INBOX} records nobody has read yet")
        else:
            self.inbox.put_nowait((kind, body))

    async def expect(self, *kinds: int, timeout: float) -> Block:
        """The next record from the inbox; ProtocolError if it is another type or closed."""
        try:
            item = await asyncio.wait_for(self.inbox.get(), timeout)
        except asyncio.TimeoutError:
            raise ProtocolError("no answer on the data connection", reason="timeout") from None
        if item is None:
            raise ProtocolError(f"connection closed{': ' + self.error if self.error else ''}",
                                reason="closed")
        kind, body = item
        if kind == link.REFUSE:
            raise ProtocolError(f"refused: {bytes(body[:200]).decode('utf-8', 'replace')}",
                                reason="refused")
        if kind not in kinds:
            raise ProtocolError(f"record type {kind} where {kinds} was expected",
                                reason="unexpected")
        return body

    def send(self, kind: int, body: Any, *, built: bool = False) -> bool:
        """Queue one record; False if the connection is closed.  ``built``: ``body`` is the
        whole record, its first ``link.RECORD_HEADER.size`` bytes left for the header, which
        is written there (one buffer, one write, no copy)."""
        t = self.transport
        if t is None or t.is_closing():
            return False
        n = memoryview(body).nbytes
        head = b"" if built else link.record_header(kind, n)
        if built:
            link.RECORD_HEADER.pack_into(body, 0, kind, n - link.RECORD_HEADER.size)
            self._queue.append(body)
        elif n < _COALESCE:
            self._queue.append(head + body)
        else:
            self._queue.append(head)
            self._queue.append(body)
        self._queued += n + len(head)
        self._bytes_sent += n + len(head)
        self._write_queued()
        return True

    def _write_queued(self) -> None:
        """Hand queued records to the transport while it can send them without buffering."""
        t = self.transport
        queue = self._queue
        while queue and not self._transport_full and t is not None and not t.is_closing():
            item = queue.popleft()
            self._queued -= len(item) if isinstance(item, bytes) else memoryview(item).nbytes
            t.write(item)  # may call pause_writing at once
        if not queue and self._close_when_sent:
            self.close()
        elif self._queued > _WRITE_HIGH:
            self.writable.clear()
        elif self._queued <= _WRITE_LOW:
            self.writable.set()

    def hold(self) -> None:
        """Stop parsing and reading (a relay leg waiting for its partner)."""
        self._held = True
        if self.transport is not None:
            self.transport.pause_reading()

    def splice(self, partner: DataConnection) -> None:
        """From now on pass every byte to ``partner`` (and what is held already)."""
        self._partner = partner
        pair(self._end, partner._end)
        self._held = False
        if self.transport is not None:  # raw bytes go through the transport's buffer
            self.transport.set_write_buffer_limits(high=_WRITE_HIGH)
        if not self._parsing and self._fill:  # (else the parser passes the rest on)
            self._end.received(bytes(self._scratch[:self._fill]))
            self._fill = 0
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    @property
    def bytes_out(self) -> int:
        """Bytes written: records, and raw bytes a splice passed through."""
        return self._bytes_sent + self._end.bytes_out

    def refuse(self, reason: str) -> None:
        """Tell the other side why (a hint) and close."""
        log.debug("refusing data connection from %s: %s", self.peer, reason)
        self.error = reason
        self.send(link.REFUSE, reason.encode()[:200])
        self.close()

    def abort(self, reason: str) -> None:
        # A stranger's garbage is not worth a log line each (the service counts it).
        log.log(logging.INFO if self.trusted else logging.DEBUG,
                "closing data connection %s: %s", self.peer, reason)
        self.error = reason
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Close once every queued record is handed to the transport (which sends its buffer
        before it closes)."""
        self._close_when_sent = True
        if self._queue:
            return
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


def drop_spare(conn: DataConnection) -> None:
    """Forget the reused body buffer unless a record is being received into it."""
    if conn._body is None:
        conn._spare = None


def _new_body(conn: DataConnection, n: int) -> Block:
    """The buffer a big record of ``n`` bytes is received into (one reused buffer if the
    connection's handler keeps nothing: ``reuse_bodies``)."""
    if not conn.reuse_bodies:
        return new_block(n)
    if conn._spare is None or len(conn._spare) < n:
        conn._spare = new_block(n)
    return memoryview(conn._spare)[:n]


async def detach(conn: DataConnection,
                 timeout: float = 5.0) -> tuple[socket.socket, bytes] | None:
    """Give this connection's socket away (to an application, see
    :mod:`meshd.local.handover`): stop reading, wait until every queued record is sent,
    and return a duplicate of the socket (blocking) with the bytes read but not yet taken
    as a record; the daemon then forgets the connection without closing it (no FIN: the
    duplicate keeps it open).  None if the connection closed meanwhile."""
    t = conn.transport
    if t is None or t.is_closing():
        return None
    conn._held = True
    t.pause_reading()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while conn._queue or t.get_write_buffer_size():
        if t.is_closing() or loop.time() > deadline:
            return None
        await asyncio.sleep(0.001)
    raw = t.get_extra_info("socket")
    if raw is None:
        return None
    left = bytes(conn._scratch[:conn._fill])
    if conn._body is not None:  # a record received in part
        left += link.record_header(conn._body_kind, len(conn._body)) + bytes(
            memoryview(conn._body)[:conn._body_got])
    sock = socket.socket(fileno=os.dup(raw.fileno()))
    sock.setblocking(True)
    conn.on_lost = None
    conn.handler = None
    conn._body = None
    conn._stall.cancel()
    t.abort()  # closes this side's descriptor only
    return sock, left


def unhold(conn: DataConnection, first: tuple[int, Block] | None = None) -> None:
    """Read ``conn`` again after :meth:`DataConnection.hold`; ``first``: a record that was
    taken before the hold, handled before the bytes held behind it."""
    conn._held = False
    t = conn.transport
    if t is None or t.is_closing():
        return
    if first is not None:
        conn._deliver(*first)
    if conn._held or t.is_closing():
        return
    t.resume_reading()
    if not conn._parsing and conn._fill:
        conn._parse()
