"""Ordered, exactly-once delivery with credit flow control, one direction of a channel (pure).

Theory of operation
-------------------
The :class:`Sender` numbers messages 0, 1, 2, …, seals each once (``seal(seq, payload)``; the
frame layer binds ``seq`` into the nonce) and keeps the sealed frame in a resend buffer until a
cumulative ack covers it.  The buffer is bounded (``SenderConfig.max_buffer_bytes``, counted in
frame bytes); ``send`` raises :class:`WouldBlock` rather than exceed it or the credit.

The :class:`Receiver` grants credit as absolute limits, like QUIC's MAX_DATA: "seqs below
``max_seq``" and "cumulative payload bytes up to ``max_bytes``", where both are "what the
application has taken (``pop``) + the window".  Limits only grow, so feedback can be lost,
duplicated or reordered.  A stalled application stops popping, the limits stop growing, and the
sender blocks: the receiver never holds more than ``window_bytes`` of payload nor
``window_messages`` messages (frames beyond the advertised credit are a protocol violation).

Delivery: a frame at the expected seq is delivered and drains any buffered successors; a later
one is buffered (bounded by the credit) and the feedback says ``gap`` so the sender resends the
missing frame once at once (fast retransmit); an earlier or already-buffered one is a duplicate
and dropped (but re-acked, in case our last ack was lost).

Loss recovery: one retransmit timer on the sender, armed while frames are unacked or the sender
is blocked on credit.  When it fires, every unacked frame is resent (or, if none, a
:class:`~.events.Probe` asks for fresh feedback) and the timeout doubles up to ``max_rto``; any
progress resets it.  ``on_reconnect`` resends every unacked frame from the first unacked seq and
a probe on the new connection; the receiver's state survives the reconnect, so duplicates are
dropped there and nothing is delivered twice.

Transitions (sender)::

    send          credit and buffer allow  -> Transmit(seq) queued, seq += 1, arm timer
                  otherwise                -> WouldBlock (reason no-credit/buffer-full), arm timer
    on_feedback   ack advances             -> free frames; AllAcked if none left; reset RTO
                  credit grows / frees     -> Writable if a send had blocked
                  gap at first unacked     -> resend it once
    handle_timer  unacked                  -> resend all unacked, RTO *= 2
                  blocked, nothing unacked -> Probe, RTO *= 2
    on_reconnect                           -> resend all unacked + Probe, reset RTO

Control messages (:class:`~.events.Feedback`, :class:`~.events.Probe`) travel in control frames;
:func:`encode_control` / :func:`decode_control` are their codec.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from meshd.errors import LocalError, ProtocolError

from .events import AllAcked, Feedback, Message, Probe, Transmit, Writable
from .frames import MAX_PAYLOAD, MAX_SEQ, Buffer, byte_view

__all__ = [
    "Receiver",
    "ReceiverConfig",
    "Sender",
    "SenderConfig",
    "WouldBlock",
    "decode_control",
    "encode_control",
]


class WouldBlock(LocalError):
    """``send`` cannot proceed now: ``no-credit`` (the receiver has not granted room) or
    ``buffer-full`` (unacknowledged frames fill the resend buffer).  Retry after a
    :class:`~.events.Writable` event."""


@dataclass(frozen=True, slots=True)
class SenderConfig:
    max_buffer_bytes: int = 64 << 20
    """Most frame bytes kept for resend (unacked); at least one largest frame."""
    max_message_bytes: int = MAX_PAYLOAD
    """Largest payload ``send`` accepts; the receiver's ``window_bytes`` must be at least this."""
    rto: float = 1.0
    """Initial retransmit timeout, seconds (reset to this on any progress)."""
    max_rto: float = 30.0
    """The timeout doubles per expiry without progress, up to this."""
    first_message_free: bool = False
    """Send seq 0 (up to ``max_message_bytes``) before the first Feedback: every receiver can
    take it, since its window holds at least one message of the largest size.  Saves the round
    trip of waiting for the first credit when a channel opens."""

    def __post_init__(self) -> None:
        if not (0 < self.max_message_bytes <= MAX_PAYLOAD):
            raise LocalError("max_message_bytes out of range", reason="bad-config")
        if self.max_buffer_bytes < self.max_message_bytes:
            raise LocalError("max_buffer_bytes must hold one largest message",
                             reason="bad-config")
        if not (0 < self.rto <= self.max_rto):
            raise LocalError("need 0 < rto <= max_rto", reason="bad-config")


@dataclass(frozen=True, slots=True)
class ReceiverConfig:
    window_messages: int = 1024
    """Most messages held (buffered out of order or not yet popped)."""
    window_bytes: int = 64 << 20
    """Most payload bytes held; at least the sender's ``max_message_bytes``."""
    update_fraction: int = 4
    """Send a credit update once popping has grown the credit by window/this."""

    def __post_init__(self) -> None:
        if self.window_messages < 1 or self.window_bytes < 1 or self.update_fraction < 1:
            raise LocalError("window and update_fraction must be positive", reason="bad-config")


class Sender:
    """The sending half of one direction.  ``seal(seq, payload) -> frame`` turns a payload into
    the bytes to transmit (the frame layer's ``Sealer.seal``); by default the payload is copied
    as is.  ``overhead``: how many bytes ``seal`` adds (``frames.FRAME_OVERHEAD``)."""

    __slots__ = (
        "_blocked",
        "_buffered",
        "_deadline",
        "_events",
        "_fast_resent",
        "_max_bytes",
        "_max_seq",
        "_next_seq",
        "_outgoing",
        "_overhead",
        "_rto",
        "_seal",
        "_sent_bytes",
        "_unacked",
        "config",
    )

    def __init__(self, config: SenderConfig = SenderConfig(), *,
                 seal: Callable[[int, Buffer], bytes | bytearray | memoryview] | None = None,
                 overhead: int = 0) -> None:
        if overhead < 0 or config.max_buffer_bytes < config.max_message_bytes + overhead:
            raise LocalError("max_buffer_bytes must hold one largest frame", reason="bad-config")
        self.config = config
        self._seal = seal
        self._overhead = overhead
        self._next_seq = 0
        self._unacked: deque[tuple[int, bytes | bytearray | memoryview]] = deque()
        self._buffered = 0
        self._sent_bytes = 0
        self._max_seq = 1 if config.first_message_free else 0
        self._max_bytes = config.max_message_bytes if config.first_message_free else 0
        self._outgoing: list[Transmit | Probe] = []
        self._events: list[AllAcked | Writable] = []
        self._deadline: float | None = None
        self._rto = config.rto
        self._blocked = False
        self._fast_resent: int | None = None

    # -- state --------------------------------------------------------------------------------
    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def first_unacked(self) -> int:
        return self._unacked[0][0] if self._unacked else self._next_seq

    @property
    def buffered_bytes(self) -> int:
        """Frame bytes held for resend; never above ``config.max_buffer_bytes``."""
        return self._buffered

    @property
    def all_acked(self) -> bool:
        """True when every message sent so far is acknowledged (what ``flush`` waits for)."""
        return not self._unacked

    def can_send(self, nbytes: int) -> bool:
        """Would ``send`` of a payload of ``nbytes`` succeed now?"""
        return self._why_blocked(nbytes) is None

    def _why_blocked(self, nbytes: int) -> str | None:
        if self._next_seq >= self._max_seq or self._sent_bytes + nbytes > self._max_bytes:
            return "no-credit"
        if self._buffered + nbytes + self._overhead > self.config.max_buffer_bytes:
            return "buffer-full"
        return None

    # -- inputs -------------------------------------------------------------------------------
    @property
    def credit(self) -> tuple[int, int]:
        """The receiver's absolute credit as last heard: (``max_seq``, ``max_bytes``)."""
        return self._max_seq, self._max_bytes

    def send(self, payload: Buffer, *, now: float) -> int:
        """Queue ``payload`` as the next message and return its seq; :class:`WouldBlock` if the
        credit or the resend buffer has no room (nothing is queued then)."""
        view = byte_view(payload)
        seal = self._seal
        if seal is None:
            return self.send_sealed(view.nbytes, lambda seq: bytes(view), now=now)
        return self.send_sealed(view.nbytes, lambda seq: seal(seq, payload), now=now)

    def send_sealed(self, nbytes: int,
                    seal: Callable[[int], bytes | bytearray | memoryview], *,
                    now: float) -> int:
        """:meth:`send` for a payload of ``nbytes`` that ``seal(seq)`` turns into its frame
        (the caller seals from several buffers, or into a buffer it reuses once acked)."""
        if nbytes > self.config.max_message_bytes:
            raise LocalError(f"message of {nbytes} bytes > {self.config.max_message_bytes}",
                             reason="too-large")
        if self._next_seq >= MAX_SEQ - 1:
            raise LocalError("sequence numbers exhausted", reason="seq-exhausted")
        why = self._why_blocked(nbytes)
        if why is not None:
            self._blocked = True
            if self._deadline is None:
                self._deadline = now + self._rto
            raise WouldBlock(f"cannot send {nbytes} bytes now: {why}", reason=why)
        seq = self._next_seq
        frame = seal(seq)
        if len(frame) > nbytes + self._overhead:
            raise LocalError("seal added more than the declared overhead", reason="bad-config")
        self._next_seq += 1
        self._sent_bytes += nbytes
        self._unacked.append((seq, frame))
        self._buffered += len(frame)
        self._outgoing.append(Transmit(seq, frame, False))
        if self._deadline is None:
            self._deadline = now + self._rto
        return seq

    def on_feedback(self, fb: Feedback, *, now: float) -> None:
        """Take the receiver's ack and credit (stale values are ignored)."""
        if fb.ack > self._next_seq:
            raise ProtocolError(f"ack of seq {fb.ack - 1} that was never sent",
                                reason="ack-unsent")
        progress = False
        had_unacked = bool(self._unacked)
        while self._unacked and self._unacked[0][0] < fb.ack:
            _, frame = self._unacked.popleft()
            self._buffered -= len(frame)
            progress = True
        if fb.max_seq > self._max_seq:
            self._max_seq = fb.max_seq
            progress = True
        if fb.max_bytes > self._max_bytes:
            self._max_bytes = fb.max_bytes
            progress = True
        if fb.gap and self._unacked and self._unacked[0][0] == fb.ack \
                and self._fast_resent != fb.ack:
            seq, frame = self._unacked[0]
            self._outgoing.append(Transmit(seq, frame, True))
            self._fast_resent = seq
        if had_unacked and not self._unacked:
            self._events.append(AllAcked(self._next_seq))
        if progress:
            self._rto = self.config.rto
            self._rearm(now)
            if self._blocked:
                self._blocked = False
                self._events.append(Writable())

    def on_reconnect(self, *, now: float) -> None:
        """A new connection carries the channel: resend every unacked frame from the first
        unacked seq, then a probe; whatever was queued for the old connection is dropped."""
        self._outgoing = [Transmit(seq, frame, True) for seq, frame in self._unacked]
        self._outgoing.append(Probe())
        self._fast_resent = None
        self._rto = self.config.rto
        self._rearm(now)

    def handle_timer(self, now: float) -> None:
        """Call when ``now`` reaches :meth:`get_timer`; early calls do nothing."""
        if self._deadline is None or now < self._deadline:
            return
        if self._unacked:
            self._outgoing.extend(Transmit(seq, frame, True) for seq, frame in self._unacked)
        else:
            self._outgoing.append(Probe())
        self._rto = min(self._rto * 2, self.config.max_rto)
        self._rearm(now)

    # -- outputs ------------------------------------------------------------------------------
    def get_timer(self) -> float | None:
        """When to call :meth:`handle_timer` next (None: no timer needed)."""
        return self._deadline

    def take_outgoing(self) -> list[Transmit | Probe]:
        """Messages to send to the receiver, in order; the owner seals Probes as control frames."""
        out, self._outgoing = self._outgoing, []
        return out

    def events(self) -> list[AllAcked | Writable]:
        out, self._events = self._events, []
        return out

    def _rearm(self, now: float) -> None:
        self._deadline = now + self._rto if (self._unacked or self._blocked) else None


class Receiver:
    """The receiving half of one direction: delivers each message once, in order."""

    __slots__ = (
        "_adv_bytes",
        "_adv_seq",
        "_due",
        "_held",
        "_next",
        "_ooo",
        "_popped_bytes",
        "_popped_count",
        "_ready",
        "config",
        "duplicates",
    )

    def __init__(self, config: ReceiverConfig = ReceiverConfig()) -> None:
        self.config = config
        self._next = 0
        self._ooo: dict[int, bytes | bytearray | memoryview] = {}
        self._ready: deque[Message] = deque()
        self._held = 0
        self._popped_count = 0
        self._popped_bytes = 0
        self._adv_seq = 1  # seq 0 is always welcome (``SenderConfig.first_message_free``)
        self._adv_bytes = 0
        self._due = True  # the first feedback grants the initial credit
        self.duplicates = 0
        """Frames dropped as already received (for metrics)."""

    @property
    def next_seq(self) -> int:
        """The next seq to deliver in order (everything below it has been received)."""
        return self._next

    @property
    def held_bytes(self) -> int:
        """Payload bytes held (out of order or not yet popped); never above ``window_bytes``."""
        return self._held

    @property
    def held_messages(self) -> int:
        return len(self._ready) + len(self._ooo)

    def on_data(self, seq: int, payload: bytes | bytearray | memoryview) -> None:
        """Take one authentic data frame's payload.  ProtocolError if the sender exceeded the
        credit we advertised."""
        if not (0 <= seq < MAX_SEQ):
            raise ProtocolError(f"seq {seq}", reason="malformed")
        if seq < self._next or seq in self._ooo:
            self.duplicates += 1
            self._due = True
            return
        n = len(payload)
        if seq >= self._adv_seq:
            raise ProtocolError(f"seq {seq} beyond the credit {self._adv_seq}",
                                reason="credit-exceeded")
        if self._held + n > self.config.window_bytes:
            raise ProtocolError(f"{self._held + n} bytes held > window",
                                reason="credit-exceeded")
        self._held += n
        self._due = True
        if seq != self._next:
            self._ooo[seq] = payload
            return
        self._ready.append(Message(seq, payload))
        self._next += 1
        while self._next in self._ooo:
            self._ready.append(Message(self._next, self._ooo.pop(self._next)))
            self._next += 1

    def on_probe(self) -> None:
        self._due = True

    def on_reconnect(self) -> None:
        """A new connection: tell the sender where we are."""
        self._due = True

    def pop(self) -> Message | None:
        """The next message for the application, if any; taking it frees credit."""
        if not self._ready:
            return None
        msg = self._ready.popleft()
        n = len(msg.payload)
        self._held -= n
        self._popped_count += 1
        self._popped_bytes += n
        c = self.config
        if (self._popped_count + c.window_messages - self._adv_seq
                >= max(1, c.window_messages // c.update_fraction)
                or self._popped_bytes + c.window_bytes - self._adv_bytes
                >= max(1, c.window_bytes // c.update_fraction)):
            self._due = True
        return msg

    def snapshot(self) -> tuple[int, int, int, int, int]:
        """What another holder of this end needs to go on from here (see :meth:`restore`):
        ``(next_seq, popped_count, popped_bytes, advertised_seq, advertised_bytes)``.  Messages
        held but not popped are not in it: the sender resends from ``next_seq`` only what was
        never delivered, so take a snapshot once everything received was popped."""
        return (self._next, self._popped_count, self._popped_bytes, self._adv_seq,
                self._adv_bytes)

    def restore(self, snap: tuple[int, int, int, int, int]) -> None:
        """Go on from :meth:`snapshot` ``snap`` (taken by another holder of this end): what is
        held here is dropped; feedback is due.  LocalError if ``snap`` is not a snapshot."""
        nxt, pc, pb, adv_seq, adv_bytes = snap
        if not (0 <= nxt <= MAX_SEQ and 0 <= pc <= nxt and pb >= 0 and adv_seq >= 0
                and adv_bytes >= 0):
            raise LocalError(f"not a receiver snapshot: {snap}", reason="usage")
        self._next, self._popped_count, self._popped_bytes = nxt, pc, pb
        self._adv_seq, self._adv_bytes = adv_seq, adv_bytes
        self._ooo.clear()
        self._ready.clear()
        self._held = 0
        self._due = True

    def take_feedback(self) -> Feedback | None:
        """The feedback to send now, if any is due (at most one, with the latest values)."""
        if not self._due:
            return None
        self._due = False
        self._adv_seq = min(self._popped_count + self.config.window_messages, MAX_SEQ)
        self._adv_bytes = self._popped_bytes + self.config.window_bytes
        return Feedback(self._next, self._adv_seq, self._adv_bytes, bool(self._ooo))


_FEEDBACK = struct.Struct(">BBQQQ")
_T_FEEDBACK = 1
_T_PROBE = 2


def encode_control(msg: Feedback | Probe) -> bytes:
    """The bytes of a control message (the payload of a control frame)."""
    if isinstance(msg, Probe):
        return bytes([_T_PROBE])
    return _FEEDBACK.pack(_T_FEEDBACK, int(msg.gap), msg.ack, msg.max_seq, msg.max_bytes)


def decode_control(data: bytes | bytearray | memoryview) -> Feedback | Probe:
    """Parse a control message; ProtocolError (``malformed``) if it is not exactly one."""
    if len(data) == 1 and data[0] == _T_PROBE:
        return Probe()
    if len(data) != _FEEDBACK.size or data[0] != _T_FEEDBACK:
        raise ProtocolError("not a control message", reason="malformed")
    _, flags, ack, max_seq, max_bytes = _FEEDBACK.unpack(data)
    if flags > 1 or ack > max_seq:
        raise ProtocolError("bad feedback fields", reason="malformed")
    return Feedback(ack, max_seq, max_bytes, bool(flags))
