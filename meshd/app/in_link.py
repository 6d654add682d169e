"""One handed-over receiving channel in the application: its records read from a non-blocking
socket into a reused buffer, its frames opened by the daemon's own pure core
(:class:`~meshd.channel.inbound.ReceivingEnd`), its messages decoded, its Feedback written.
:class:`~meshd.app.direct_in.InLinks` runs these for a receiver (threads, lock, daemon)."""

from __future__ import annotations

import logging
import socket
from typing import Any, NamedTuple

import numpy as np

from meshd.app import blocks
from meshd.app.message import Message, batch_messages
from meshd.channel import link
from meshd.channel.frames import new_block
from meshd.channel.inbound import Delivery, ReceivingEnd
from meshd.channel.reliable import ReceiverConfig
from meshd.errors import LocalError, ProtocolError
from meshd.local.handover import InGrantInfo
from meshd.trust.identity import site_id_of

log = logging.getLogger("meshd.app.streams")

__all__ = ["AHEAD_BYTES", "Broken", "Cut", "InLink"]

AHEAD_BYTES = 64 << 20
"""Most payload bytes per channel the reader thread takes from the core ahead of the receiving
call (on top of the channel's window, which the core holds): as much as the daemon's receiver
ring and ipc queue held when the daemon carried the data, so a sender's ``flush`` returns while
the application is busy, as before."""
_HEAD = link.RECORD_HEADER


class Cut(NamedTuple):
    """A channel that ended here: the receiver drops what it holds of it; ``tell``: and tells
    the application (the daemon, away, will not)."""

    cid: bytes
    sender_name: str
    reason: str
    message: str
    tell: bool


class Broken(Exception):
    """A handed-over connection cannot go on (closed, reset, an inauthentic record)."""


OWN_BLOCK_FROM = 64 << 10
"""A record this big is received into a block of its own, which goes with it: its frame is
opened in place and the messages view it (one pass over the bytes fewer than decrypting out
of a reused buffer, and none at all without a cipher); a smaller one into a buffer reused by
the next record."""


class _Records:
    """One connection's records, read from a non-blocking socket: the header, then the body
    straight into a block of its own or a reused buffer (:data:`OWN_BLOCK_FROM`; after the
    bytes the daemon had read).  A record must keep coming as at the daemon
    (:meth:`stalled`)."""

    def __init__(self, sock: socket.socket, leftover: bytes) -> None:
        self.sock = sock
        self._started = self._last = 0.0
        """When the record being received began, and when a byte of it last came."""
        self._pre = memoryview(leftover)
        self._head = bytearray(_HEAD.size)
        self._hgot = 0
        self._kind = 0
        self._len = -1
        self._got = 0
        self._reused: Any = new_block(OWN_BLOCK_FROM)
        self._buf: Any = self._reused

    @property
    def buffered(self) -> bool:
        """Whether bytes the daemon read are still to be taken (the socket may stay quiet)."""
        return self._pre.nbytes > 0

    def _recv_into(self, view: memoryview) -> int:
        if self._pre.nbytes:
            n = min(view.nbytes, self._pre.nbytes)
            view[:n] = self._pre[:n]
            self._pre = self._pre[n:]
            return n
        n = self.sock.recv_into(view)  # BlockingIOError: nothing more now
        if n == 0:
            raise Broken("the connection was closed")
        return n

    def stalled(self, now: float) -> str | None:
        """Why the connection cannot go on if the record being received is overdue: no byte of
        it for :data:`~meshd.channel.link.STALL_TIMEOUT` seconds, or not whole after that
        plus its size at :data:`~meshd.channel.link.MIN_RECORD_RATE` (as the daemon's
        connections); None while it is not (or no record is under way)."""
        if self._len < 0 and self._hgot == 0:
            return None
        size = max(self._len, 0)
        if now < min(self._last + link.STALL_TIMEOUT,
                     self._started + link.STALL_TIMEOUT + size / link.MIN_RECORD_RATE):
            return None
        return (f"stalled in the middle of a {size}-byte record ({self._got} bytes in"
                f" {now - self._started:.0f} s)")

    def next(self, now: float) -> tuple[int, memoryview, bool] | None:
        """The next whole record: its type, its body and whether the body is the caller's to
        keep (else it is valid until the next call); or None until the socket has more; Broken
        at its end or if the record is malformed.  ``now``: the monotonic clock (for
        :meth:`stalled`)."""
        try:
            while self._len < 0:
                got = self._recv_into(memoryview(self._head)[self._hgot:])
                if self._hgot == 0:
                    self._started = now
                self._hgot += got
                self._last = now
                if self._hgot < _HEAD.size:
                    continue
                self._hgot = 0
                kind, length = _HEAD.unpack(self._head)
                link.check_record(kind, length)
                if length > link.MAX_RECORD:
                    raise ProtocolError(f"record of {length} bytes", reason="oversized")
                self._buf = blocks.take(length) if length >= OWN_BLOCK_FROM else self._reused
                self._kind, self._len, self._got = kind, length, 0
            body = memoryview(self._buf)
            while self._got < self._len:
                self._got += self._recv_into(body[self._got:self._len])
                self._last = now
        except (BlockingIOError, InterruptedError):
            return None
        except (OSError, ProtocolError) as exc:
            raise Broken(str(exc)) from None
        n, self._len = self._len, -1
        return self._kind, memoryview(self._buf)[:n], self._buf is not self._reused


class InLink:
    """One handed-over receiving channel (see the module docstring)."""

    def __init__(self, info: InGrantInfo, sock: socket.socket, channel: str,
                 config: ReceiverConfig) -> None:
        g = info.grant
        self.cid = g.cid
        self.channel = channel
        self.core = ReceivingEnd.for_application(g, config)
        self.core.connection_adopted()
        self.sender_name = info.sender_name
        self.sender_id = site_id_of(g.sender)
        self.path = info.path
        self.relay = info.relay
        self.wait_for = info.ipc_until
        """The receiving call hands this link's messages out once those before this number
        are out (what the daemon delivered over ipc, and this receiver's earlier links)."""
        self.sock = sock
        sock.setblocking(False)
        self.records = _Records(sock, info.leftover)
        self.broken: str | None = None
        """Why the connection cannot go on (the channel was given back to the daemon)."""
        self.pending: list[Delivery] = []
        """What the reader thread took from the core ahead of the receiving call (at most
        :data:`AHEAD_BYTES`), or what it held when the channel was given back."""
        self.pending_bytes = 0
        self.reported = -1
        """The message count last reported to the daemon."""
        self.cut_after: Cut | None = None
        """The end to tell once :attr:`pending` is handed out (given back with no daemon)."""
        self._out = bytearray()

    def frame(self, kind: int, body: memoryview, own: bool = False) -> None:
        """One record from the sender (the reader thread, under the lock); Broken if the
        connection cannot go on.  ``own``: ``body`` is ours to keep, and a frame in it is
        opened in place."""
        if kind == link.REFUSE:
            raise Broken(f"refused: {bytes(body[:200]).decode('utf-8', 'replace')}")
        if kind != link.FRAME:
            raise Broken(f"record type {kind} from the sender")
        try:
            self.core.frame_received(body, in_place=own)
        except ProtocolError as exc:
            raise Broken(f"{exc.reason}: {exc}") from None

    def pop(self) -> list[Message]:
        """The messages the core holds, in order (the receiving call, under the lock)."""
        out: list[Message] = []
        for held in self.pending:
            out += self._messages(held)
        self.pending_bytes = 0
        self.pending.clear()
        while (d := self.core.pop()) is not None:
            out += self._messages(d)
        return out

    def drain_core(self, room: int = 1 << 62) -> int:
        """Take what the core holds into :attr:`pending` (under the lock), up to ``room``
        payload bytes; how many it took.  The channel's state then counts it as delivered (and
        the sender gets the credit back)."""
        took = 0
        while took < room and (d := self.core.pop()) is not None:
            self.pending.append(d)
            took += len(d.payload)
        return took

    def _messages(self, d: Delivery) -> list[Message]:
        whole = np.frombuffer(d.payload, dtype=np.uint8)
        try:
            return batch_messages(whole.data, whole, d.payload, d.first, self.sender_name,
                                  self.sender_id, self.channel, self.cid)
        except ProtocolError as exc:  # an authentic sender's bad batch: skip it, go on
            log.warning("channel %r: skipped a malformed delivery: %s", self.channel, exc)
            return []

    def write_feedback(self) -> None:
        """Write the Feedback due (and what waited from before) as far as the socket takes it
        now (under the lock); a connection that cannot take it is marked broken."""
        if self.broken is not None:
            return
        core = self.core
        if core.take_flush():
            try:
                frame = core.take_feedback()
            except LocalError as exc:  # the lease of control seqs is used up
                self.broken = str(exc)
                return
            if frame is not None:
                self._out += link.record_header(link.FRAME, len(frame))
                self._out += frame
        if self._out:
            try:
                del self._out[:self.sock.send(self._out)]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                self.broken = str(exc)

    def close(self) -> None:
        self.sock.close()
