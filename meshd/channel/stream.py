"""The sending end of a channel whose data connection the application holds (pure).

Theory of operation.  The sending daemon races the paths and runs the handshake as always
(:mod:`.outbound`); then it *hands over* the connected data socket and a :class:`Grant` to its
application, which streams with a :class:`StreamSender`: the same :class:`~.frames.Sealer`,
:class:`~.frames.Opener` and :class:`~.reliable.Sender` the daemon would use, so the receiver
cannot tell the two apart.  The application's glue feeds what it reads from the socket
(:meth:`StreamSender.data_received`), the batches to send (:meth:`StreamSender.send_batch`) and
the time, and writes what :meth:`StreamSender.take_writes` gives, in order.

When the connection breaks, the application gives the channel back to its daemon with
:meth:`StreamSender.lost` (the control sequence numbers it used); the daemon races again,
resumes the channel (Probe -> Feedback under the same keys) and hands over the new connection
with a Grant that carries that Feedback; :meth:`StreamSender.resume` then resends every unacked
sealed frame, as the daemon's own sender does on a reconnect.  Nothing is lost or duplicated:
the receiver drops what it had and delivers the rest in order.

Control sequence numbers.  Sender and daemon seal control frames (Probe, CLOSE; the daemon's
resume Probe) under the same key, so they must never use one control seq twice.  Each grant
*leases* the application the range ``[ctl_seal, ctl_seal + LEASE)``; the daemon moves its own
counter past the range when it hands over, so even an application that dies holding the
connection cannot collide with the daemon (the receiver only asks control seqs to grow).

Sealed frames are kept in buffers that are reused once acknowledged (no allocation, no page
faults per frame); a batch of several buffers is sealed without joining them
(:meth:`~.frames.Sealer.seal_into`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from meshd.errors import LocalError, ProtocolError

from .control import CLOSE_PAYLOAD
from .events import Feedback, Probe, Transmit
from .frames import (FRAME_OVERHEAD, KIND_CONTROL, MAX_PAYLOAD, Block, Buffer, Opener, Sealer,
                     frame_size, new_block)
from .link import FRAME, MAX_SMALL, REFUSE, RecordReader, record_header
from .reliable import Sender, SenderConfig, decode_control, encode_control

__all__ = ["LEASE", "Grant", "StreamSender"]

LEASE = 1 << 32
"""Control sequence numbers leased to an application per hand-over."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What a sending daemon hands its application with a connected data socket."""

    cid: bytes
    cipher: int
    send_key: bytes = field(repr=False)
    recv_key: bytes = field(repr=False)
    send_direction: int
    recv_direction: int
    ctl_seal: int
    """The first control seq the application may seal (it may use ``LEASE`` of them)."""
    ctl_open: int
    """The lowest control seq the application's opener accepts from the receiver."""
    max_seq: int
    """The receiver's credit as the daemon last heard it (:attr:`~.reliable.Sender.credit`)."""
    max_bytes: int
    feedback: Feedback | None
    """The receiver's Feedback that resumed the channel on this connection (None the first
    time)."""
    path: str
    """``direct``, ``reversed`` or ``relay``."""
    peer: bytes = b""
    """The receiving site's key (to give the channel to a restarted daemon)."""
    leftover: bytes = b""
    """Bytes the daemon read from the socket after the last whole record it took."""
    relay: bytes | None = None
    """The relay's site key on a relayed path (a daemon that restarts is told it again, so
    that revoking the relay still cuts the channel's connection)."""


class StreamSender:
    """A handed-over channel's sending end (see the module docstring).  Not thread-safe."""

    def __init__(self, grant: Grant, now: float, *, window_bytes: int = 64 << 20) -> None:
        self.cid = grant.cid
        self.sealer = Sealer(grant.cipher, grant.send_key, grant.cid, grant.send_direction)
        self.opener = Opener(grant.cipher, grant.recv_key, grant.cid, grant.recv_direction)
        self.sender = Sender(SenderConfig(max_buffer_bytes=window_bytes,
                                          max_message_bytes=MAX_PAYLOAD,
                                          first_message_free=True), overhead=FRAME_OVERHEAD)
        self.sender.on_feedback(Feedback(0, grant.max_seq, grant.max_bytes, False), now=now)
        self.messages = 0
        self.bytes = 0
        self.acked_messages = 0
        self.retransmits = 0
        self.path = grant.path
        self.connected = False
        self._ctl_end = 0
        self._reader = RecordReader(MAX_SMALL)
        self._marks: deque[tuple[int, int]] = deque()  # (batch seq, messages up to it)
        self._inflight: deque[tuple[int, Block]] = deque()  # sealed frames not yet acked
        self._pool: dict[int, list[Block]] = {}
        self._pool_bytes = 0
        self._pool_max = window_bytes
        self._writes: list[Buffer] = []
        self._adopt(grant)

    # -- inputs --------------------------------------------------------------------------------

    def resume(self, grant: Grant, now: float) -> None:
        """A new connection (after :meth:`lost`): resend every unacked frame on it."""
        if grant.cid != self.cid:
            raise LocalError("a grant for another channel", reason="wrong-channel")
        self._adopt(grant)
        self.sender.on_reconnect(now=now)
        if grant.feedback is not None:
            self.sender.on_feedback(grant.feedback, now=now)
        self._pump()

    def send_batch(self, parts: list[Buffer], nbytes: int, count: int, now: float) -> int:
        """Seal one batch of ``count`` messages (the concatenation of ``parts``, ``nbytes``
        long) as the next data frame; its seq.  :class:`~.reliable.WouldBlock` without credit
        or room in the resend buffer (read feedback, or wait for the timer, and retry)."""
        size = frame_size(nbytes)
        sealed: list[Block] = []

        def seal(seq: int) -> Block:
            free = self._pool.get(size)
            if free:
                out = free.pop()
                self._pool_bytes -= size
            else:
                out = new_block(size)
            sealed.append(out)
            return self.sealer.seal_into(seq, parts, out)

        seq = self.sender.send_sealed(nbytes, seal, now=now)
        self._inflight.append((seq, sealed[0]))
        self.messages += count
        self.bytes += nbytes
        self._marks.append((seq, self.messages))
        self._pump()
        return seq

    def data_received(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Bytes from the receiver; ProtocolError if they are not authentic control frames of
        this channel (the connection is then to be dropped and the channel resumed)."""
        self._reader.feed(data)
        for kind, body in self._reader.records():
            if kind == REFUSE:
                raise ProtocolError(f"refused: {bytes(body[:200]).decode('utf-8', 'replace')}",
                                    reason="refused")
            if kind != FRAME:
                raise ProtocolError(f"record type {kind} from the receiver", reason="unexpected")
            frame = self.opener.open(body)
            if frame.kind != KIND_CONTROL:
                raise ProtocolError("a data frame from the receiver", reason="unexpected")
            msg = decode_control(frame.payload)
            if isinstance(msg, Feedback):
                self.sender.on_feedback(msg, now=now)
        self._pump()

    def handle_timer(self, now: float) -> None:
        self.sender.handle_timer(now)
        self._pump()

    def adoption(self) -> dict[str, object]:
        """What a restarted daemon needs to take this channel on (see
        :meth:`.outbound.SendingEnd.adopt`): the keys, the end of this end's control seq lease,
        its opener's next control seq and the path."""
        s, o = self.sealer, self.opener
        return {"cipher": self._grant.cipher, "sk": self._grant.send_key,
                "rk": self._grant.recv_key, "sd": s.direction, "rd": o.direction,
                "ce": self._ctl_end, "co": o.next_control_seq, "path": self.path,
                "peer": self._grant.peer, "relay": self._grant.relay}

    def lost(self) -> tuple[int, int]:
        """The connection broke: ``(ctl_seal, ctl_open)``, the next control seq this end would
        seal and the lowest one its opener takes, for the daemon that resumes the channel."""
        self.connected = False
        self._writes = []
        self.sender.take_outgoing()  # resent from the buffer on the next connection
        return self.sealer.next_control_seq, self.opener.next_control_seq

    # -- outputs -------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        return self.sender.get_timer()

    @property
    def all_acked(self) -> bool:
        return self.sender.all_acked

    def take_writes(self) -> list[Buffer]:
        """The buffers to write to the socket now, in order (record headers and frames)."""
        out, self._writes = self._writes, []
        return out

    def close_frame(self) -> list[Buffer]:
        """The channel's last record (CTRL_CLOSE): what to write before closing the socket."""
        return self._record(self._seal_control(CLOSE_PAYLOAD))

    def counters(self) -> dict[str, int]:
        """What the daemon lists in ``meshd channels`` for this channel."""
        return {"messages": self.messages, "bytes": self.bytes,
                "acked_messages": self.acked_messages, "retransmits": self.retransmits,
                "buffered_bytes": self.sender.buffered_bytes}

    # -- internals -----------------------------------------------------------------------------

    def _adopt(self, grant: Grant) -> None:
        self._grant = grant
        self.sealer.next_control_seq = grant.ctl_seal
        self._ctl_end = grant.ctl_seal + LEASE
        self.opener.next_control_seq = max(self.opener.next_control_seq, grant.ctl_open)
        self._reader = RecordReader(MAX_SMALL)
        self._writes = []
        self.path = grant.path
        self.connected = True
        if grant.leftover:
            self._reader.feed(grant.leftover)

    def _seal_control(self, payload: bytes) -> Block:
        if self.sealer.next_control_seq >= self._ctl_end:
            raise LocalError("control sequence lease used up", reason="lease")
        return self.sealer.seal_control(payload)

    @staticmethod
    def _record(frame: bytes | bytearray | memoryview) -> list[Buffer]:
        return [record_header(FRAME, memoryview(frame).nbytes), frame]

    def _pump(self) -> None:
        first = self.sender.first_unacked
        while self._marks and self._marks[0][0] < first:
            self.acked_messages = self._marks.popleft()[1]
        while self._inflight and self._inflight[0][0] < first:
            _, buf = self._inflight.popleft()
            n = len(buf)
            if self._pool_bytes + n <= self._pool_max:
                self._pool.setdefault(n, []).append(buf)
                self._pool_bytes += n
        for item in self.sender.take_outgoing():
            if not self.connected:
                continue
            if isinstance(item, Transmit):
                if item.seq < first:
                    continue  # acknowledged meanwhile (its buffer may be reused)
                self._writes += self._record(item.frame)
                self.retransmits += item.resend
            else:
                assert isinstance(item, Probe)
                self._writes += self._record(self._seal_control(encode_control(item)))
