"""Many TCP streams over one data connection: stream states and per-stream credit (pure).

Theory of operation.  The *consumer* (the site where TCP clients connect) opens streams; the
*owner* (the site that exposes the service) accepts or resets them.  Both sides run a
:class:`Mux`; what one puts out (:meth:`Mux.take_payloads`) is what the other takes in
(:meth:`Mux.receive`), sealed in between by :mod:`.sealed`.  The data connection is a TCP
byte stream, so nothing is lost or reordered while it lives; when it is lost every stream is
reset (:meth:`Mux.lost`): a TCP stream cannot resume from an unknown point, and a reset is
never a corruption.

Flow control.  Each direction of each stream has a window, initially :data:`WINDOW` bytes: a
side may send only as many DATA bytes as the other granted (initially the window; then each
CREDIT message adds bytes that the receiver's local TCP connection has taken, see
:meth:`Mux.consumed`).  A slow reader therefore stops only its own stream's writer, and the
memory a stream costs is bounded by its window at the receiver plus what the sender holds
(:meth:`Mux.send` tells the glue to stop reading as soon as anything waits for credit).
Credit is returned once a quarter window has been consumed, so a writer always has at least
three quarters of a window when its reader keeps up.

Window growth (receiver side; the sender needs no rule, it spends what it is given).  A window
of 256 KiB caps one stream at about window / round trip, and the round trip through two daemons
is a fraction of a millisecond even on loopback.  So when a quarter window is consumed and
the local socket took everything at once (``drained``: the reader keeps up), the receiver
doubles the stream's window, up to :data:`MAX_STREAM_WINDOW`, by adding the growth to the
credit, as long as the growth of all windows on the connection stays within
:data:`GROWTH_BUDGET`.  A slow reader never grows its window; memory per stream stays at most
MAX_STREAM_WINDOW, and per connection at most ``streams * WINDOW + GROWTH_BUDGET``.

A stream's life (each direction half-closes on its own)::

    open --FIN sent--> half-closed(local) --FIN received--> finished (forgotten)
    open --FIN received--> half-closed(remote) --FIN sent--> finished
    any  --RESET sent or received, or lost()--> forgotten (StreamReset for a received one)

Protocol errors (:class:`~meshd.errors.ProtocolError`; the glue closes the data connection and
every stream on it is reset): the codec's, plus ``unexpected`` (an OPEN sent to a consumer),
``duplicate-stream`` (an OPEN for a stream number already used), ``unknown-stream`` (a message
for a stream never opened), ``credit-exceeded`` (more DATA than granted), ``after-fin`` (DATA
after FIN), ``credit-overflow`` (credit beyond :data:`~.codec.MAX_WINDOW`).  Messages for a
stream that was opened and is gone are dropped: they were in flight when it went.
"""

from __future__ import annotations

from collections import deque

from meshd.errors import LocalError, ProtocolError

from .codec import (
    MAX_DATA,
    MAX_FRAME_PAYLOAD,
    MAX_STREAM,
    MAX_WINDOW,
    Credit,
    Data,
    Fin,
    Message,
    Open,
    Reset,
    check_service,
    data_header,
    decode,
    encode,
)
from .events import Ended, Event, Finished, Received, StreamOpened, StreamReset, Writable

WINDOW = 256 << 10
"""Bytes each direction of a stream may have in flight and unconsumed (the protocol's initial
credit; both sides use it)."""
MAX_STREAMS = 4096
"""Streams open at once on one data connection; beyond, the owner resets new ones ``busy``."""
MAX_STREAM_WINDOW = 16 << 20
"""The most a stream's window grows to (see the module docstring): four of the largest
frames (:data:`~.codec.MAX_FRAME_PAYLOAD`) in flight.  At 4 MiB a bulk stream had one frame
in flight, its whole window, sealed, sent and opened whole before credit came back: 542
against 715 MB/s through the tunnel in the same sitting."""
GROWTH_BUDGET = 64 << 20
"""The most all windows of one connection may have grown in total, in bytes."""

CONSUMER, OWNER = "consumer", "owner"


class _Stream:
    __slots__ = ("blocked", "bytes_in", "bytes_out", "fin_queued", "fin_received", "fin_sent",
                 "id", "pending", "pending_bytes", "recv_left", "send_credit", "service",
                 "ungranted", "window")

    def __init__(self, sid: int, service: str, window: int) -> None:
        self.id = sid
        self.service = service
        self.window = window
        """How much this side lets the other have unconsumed (grows, see the module docstring)."""
        self.send_credit = window
        self.recv_left = window
        self.ungranted = 0
        self.pending: deque[memoryview] = deque()
        self.pending_bytes = 0
        self.blocked = False
        self.fin_queued = self.fin_sent = self.fin_received = False
        self.bytes_in = self.bytes_out = 0


class Mux:
    """One side of the tunnel multiplexer (see the module docstring)."""

    def __init__(self, role: str, *, window: int = WINDOW, max_streams: int = MAX_STREAMS) -> None:
        if role not in (CONSUMER, OWNER):
            raise LocalError(f"role {role!r}", reason="usage")
        self.role = role
        self.window = window
        self.max_streams = max_streams
        self.streams: dict[int, _Stream] = {}
        self._highest = 0
        """Consumer: the last stream number it opened; owner: the last one it was sent."""
        self._out: list[bytes | memoryview] = []
        self._out_bytes = 0
        self._events: list[Event] = []
        self.bytes_in = 0
        self.bytes_out = 0
        self.closed = False
        self.grown = 0
        """Bytes all windows of this connection have grown by (at most GROWTH_BUDGET)."""
        self.refused = 0
        """Owner: streams it reset ``busy`` as they were opened (the glue counts its own)."""

    # -- inputs from the local side ------------------------------------------------------------

    def open_stream(self, service: str) -> int:
        """Consumer: a new stream to ``service``; its number.  LocalError ``busy`` when
        MAX_STREAMS are open, ``closed`` after :meth:`lost`."""
        if self.role != CONSUMER:
            raise LocalError("only the consumer opens streams", reason="usage")
        self._check_open()
        if len(self.streams) >= self.max_streams or self._highest >= MAX_STREAM:
            raise LocalError(f"{self.max_streams} streams are open on this tunnel",
                             reason="busy")
        try:
            check_service(service)
        except ValueError as exc:
            raise LocalError(str(exc), reason="bad-name") from None
        self._highest += 1
        sid = self._highest
        self.streams[sid] = _Stream(sid, service, self.window)
        self._emit(Open(sid, service))
        return sid

    def send(self, sid: int, data: bytes | bytearray | memoryview, *,
             borrowed: bool = False) -> bool:
        """Bytes the local TCP connection sent for ``sid``.  True if the glue may read more at
        once; False if some wait for credit or no credit is left (pause reading until
        :class:`~.events.Writable`).  Bytes for a stream that is gone are dropped (True).
        ``borrowed``: ``data`` stays valid only until the next :meth:`take_parts` (a reused
        read buffer); what must wait for credit is copied."""
        st = self.streams.get(sid)
        if st is None or st.fin_queued:
            return True
        view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
        if view.nbytes:
            st.pending.append(view)
            st.pending_bytes += view.nbytes
            self._push(st)
            if borrowed and st.pending:
                st.pending = deque(memoryview(bytes(v)) for v in st.pending)
        if st.pending_bytes or st.send_credit <= 0:
            st.blocked = True
            return False
        return True

    def sendable(self, sid: int) -> int:
        """How many bytes :meth:`send` would put out for ``sid`` at once (its credit, 0 if
        anything waits or the stream is gone): what the glue should read at most."""
        st = self.streams.get(sid)
        if st is None or st.pending_bytes or st.fin_queued:
            return 0
        return max(st.send_credit, 0)

    def finish(self, sid: int) -> None:
        """The local connection half-closed: FIN once everything queued has gone."""
        st = self.streams.get(sid)
        if st is None or st.fin_queued:
            return
        st.fin_queued = True
        self._push(st)

    def consumed(self, sid: int, n: int, *, drained: bool = False) -> None:
        """``n`` received bytes of ``sid`` have left this process (credit goes back);
        ``drained``: the local socket holds nothing unsent now (its reader keeps up)."""
        st = self.streams.get(sid)
        if st is None or n <= 0:
            return
        st.ungranted += n
        if st.ungranted >= st.window // 4 and not st.fin_received:
            grant = st.ungranted
            if drained and st.window < MAX_STREAM_WINDOW \
                    and self.grown + st.window <= GROWTH_BUDGET:
                self.grown += st.window
                grant += st.window
                st.window *= 2
            st.recv_left += grant
            self._emit(Credit(sid, grant))
            st.ungranted = 0

    def reset(self, sid: int, reason: str) -> None:
        """The local side ends ``sid`` abruptly (``reason`` from :data:`.codec.REASONS`)."""
        st = self.streams.pop(sid, None)
        if st is not None:
            self._forget(st)
            self._emit(Reset(sid, reason))

    def lost(self) -> None:
        """The data connection is gone: every stream is reset (``lost``)."""
        self.closed = True
        for sid in list(self.streams):
            self._events.append(StreamReset(sid, "lost"))
        self.streams.clear()
        self._out.clear()
        self._out_bytes = 0

    # -- input from the far side ---------------------------------------------------------------

    def receive(self, payload: bytes | bytearray | memoryview) -> None:
        """One frame's plaintext from the far side; ProtocolError if it breaks the protocol."""
        self._check_open()
        for msg in decode(payload):
            if isinstance(msg, Open):
                self._on_open(msg)
                continue
            self._check_known(msg.stream)
            st = self.streams.get(msg.stream)
            if st is None:
                continue  # in flight when the stream went
            if isinstance(msg, Data):
                self._on_data(st, msg.data)
            elif isinstance(msg, Credit):
                self._on_credit(st, msg.increment)
            elif isinstance(msg, Fin):
                self._on_fin(st)
            elif isinstance(msg, Reset):
                del self.streams[st.id]
                self._forget(st)
                self._events.append(StreamReset(st.id, msg.reason))

    # -- outputs -------------------------------------------------------------------------------

    def take_parts(self) -> list[list[bytes | memoryview]]:
        """The queued messages packed into frame plaintexts of at most MAX_FRAME_PAYLOAD bytes
        (unless one DATA message with the control messages before it is more), each as its
        pieces in order (headers, and DATA bodies uncopied); forgets them."""
        out: list[list[bytes | memoryview]] = []
        batch: list[bytes | memoryview] = []
        size = 0
        for part in self._out:
            n = len(part) if isinstance(part, bytes) else part.nbytes
            if size and size + n > MAX_FRAME_PAYLOAD and _is_header(part):
                out.append(batch)
                batch, size = [], 0
            batch.append(part)
            size += n
        if batch:
            out.append(batch)
        self._out = []
        self._out_bytes = 0
        return out

    def take_payloads(self) -> list[bytes]:
        """:meth:`take_parts`, each frame's plaintext joined."""
        return [b"".join(parts) for parts in self.take_parts()]

    def events(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    @property
    def queued_bytes(self) -> int:
        return self._out_bytes

    # -- internals -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise LocalError("the tunnel's data connection is gone", reason="closed")

    def _check_known(self, sid: int) -> None:
        if sid > self._highest:
            raise ProtocolError(f"a message for stream {sid}, never opened",
                                reason="unknown-stream")

    def _on_open(self, msg: Open) -> None:
        if self.role != OWNER:
            raise ProtocolError("an OPEN sent to the consumer", reason="unexpected")
        if msg.stream <= self._highest:
            raise ProtocolError(f"stream {msg.stream} opened twice", reason="duplicate-stream")
        self._highest = msg.stream
        if len(self.streams) >= self.max_streams:
            self.refused += 1
            self._emit(Reset(msg.stream, "busy"))
            return
        self.streams[msg.stream] = _Stream(msg.stream, msg.service, self.window)
        self._events.append(StreamOpened(msg.stream, msg.service))

    def _on_data(self, st: _Stream, data: bytes | memoryview) -> None:
        n = len(data)
        if st.fin_received:
            raise ProtocolError(f"DATA after FIN on stream {st.id}", reason="after-fin")
        if n > st.recv_left:
            raise ProtocolError(f"{n} bytes on stream {st.id} with credit for {st.recv_left}",
                                reason="credit-exceeded")
        st.recv_left -= n
        st.bytes_in += n
        self.bytes_in += n
        self._events.append(Received(st.id, data))

    def _on_credit(self, st: _Stream, inc: int) -> None:
        if st.send_credit + inc > MAX_WINDOW:
            raise ProtocolError(f"credit of {st.send_credit + inc} bytes on stream {st.id}",
                                reason="credit-overflow")
        st.send_credit += inc
        self._push(st)

    def _on_fin(self, st: _Stream) -> None:
        if st.fin_received:
            raise ProtocolError(f"a second FIN on stream {st.id}", reason="after-fin")
        st.fin_received = True
        self._events.append(Ended(st.id))
        self._maybe_finished(st)

    def _push(self, st: _Stream) -> None:
        """Send what credit allows, then a queued FIN; Writable when nothing waits any more."""
        while st.pending and st.send_credit > 0:
            head = st.pending[0]
            n = min(head.nbytes, st.send_credit, MAX_DATA)
            if n == head.nbytes:
                st.pending.popleft()
                chunk = head
            else:
                chunk, st.pending[0] = head[:n], head[n:]
            st.pending_bytes -= n
            st.send_credit -= n
            st.bytes_out += n
            self.bytes_out += n
            self._out.append(data_header(st.id, n))
            self._out.append(chunk)
            self._out_bytes += n
        if st.pending:
            return
        if st.blocked:
            st.blocked = False
            self._events.append(Writable(st.id))
        if st.fin_queued and not st.fin_sent:
            st.fin_sent = True
            self._emit(Fin(st.id))
            self._maybe_finished(st)

    def _maybe_finished(self, st: _Stream) -> None:
        if st.fin_sent and st.fin_received and self.streams.get(st.id) is st:
            del self.streams[st.id]
            self._forget(st)
            self._events.append(Finished(st.id))

    def _forget(self, st: _Stream) -> None:
        """A stream is gone: what its window grew by is free for others."""
        self.grown -= st.window - self.window

    def _emit(self, msg: Message) -> None:
        data = encode(msg)
        self._out.append(data)
        self._out_bytes += len(data)


def _is_header(part: bytes | memoryview) -> bool:
    """True for the start of a message (anything but a DATA body, which follows its header)."""
    return isinstance(part, bytes)
