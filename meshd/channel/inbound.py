"""The receiving end of one channel (pure).

A receiving site answers the sender's Hello (:class:`~.handshake.Responder`) and then waits for
the channel's first frame: :func:`open_first_frame` checks it is the sealed
:data:`~.control.CTRL_OPEN` with a valid name, and only then does a :class:`ReceivingEnd` exist.
:class:`ReceivingEnd` opens every later frame (on whatever connection the sender resumes over),
feeds the :class:`~.reliable.Receiver`, notes the sender's close, hands messages out in order
(:meth:`ReceivingEnd.pop`) and decides when feedback is due: after every frame and every delivery,
coalesced into one flush that the glue runs soon after (:meth:`ReceivingEnd.take_flush`,
:meth:`ReceivingEnd.take_feedback`).

States (for ``describe``)::

    waiting  --connection_adopted-->  open  --connection_lost-->  waiting
    any      --CTRL_CLOSE frame-->    closed (done once every held message is delivered)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any


from meshd.errors import LocalError, ProtocolError

from .control import CTRL_CLOSE, CTRL_OPEN, CTRL_TUNNEL, check_name
from .events import Probe
from .frames import KIND_CONTROL, KIND_DATA, Block, Opener, Sealer
from .handshake import ChannelKeys
from .reliable import Receiver, ReceiverConfig, decode_control, encode_control
from .stream import LEASE

_COUNT = struct.Struct(">I")
COUNTER_LIMIT = 1 << 63
"""Bound of every counter in a state taken back (seqs, messages, bytes): far beyond what a
channel carries, and the window added to any of them still fits the 64-bit Feedback fields."""


def open_first_frame(keys: ChannelKeys, body: Block) -> tuple[Opener, str]:
    """The opener of a new channel and its name, from the channel's first frame; ProtocolError
    if the frame does not open (wrong keys, tampered) or is not CTRL_OPEN with a valid name."""
    opener, kind, name = open_first(keys, body)
    if kind != CTRL_OPEN:
        raise ProtocolError("a channel must start with its name", reason="unexpected")
    return opener, name


def open_first(keys: ChannelKeys, body: Block) -> tuple[Opener, int, str]:
    """The opener, the kind (CTRL_OPEN: a channel; CTRL_TUNNEL: a tunnel) and the name, from
    the first frame of a data connection's new keys; ProtocolError if the frame does not open
    or is neither with a valid name."""
    opener = Opener.for_channel(keys)
    frame = opener.open(body)
    kind = frame.payload[0] if frame.payload else -1
    if frame.kind != KIND_CONTROL or kind not in (CTRL_OPEN, CTRL_TUNNEL):
        raise ProtocolError("a channel must start with its name", reason="unexpected")
    try:
        name = check_name(bytes(frame.payload[1:]).decode())
    except (UnicodeDecodeError, LocalError):
        raise ProtocolError("bad channel name", reason="malformed") from None
    return opener, kind, name


@dataclass(frozen=True, slots=True)
class InGrant:
    """A receiving end as one holder gives it to another: the receiving daemon to its
    application with the connected data socket (:meth:`ReceivingEnd.hand_over`,
    :meth:`ReceivingEnd.for_application`), the application back to its daemon when that
    connection broke (:meth:`ReceivingEnd.give_back`, :meth:`ReceivingEnd.taken_back`)."""

    cid: bytes
    cipher: int
    send_key: bytes = field(repr=False)
    """The key this end seals its Feedback with."""
    recv_key: bytes = field(repr=False)
    send_direction: int
    recv_direction: int
    ctl_seal: int
    """The next control seq to seal (an application may seal :data:`~.stream.LEASE` of
    them from here)."""
    ctl_open: int
    """The lowest control seq the opener takes."""
    rx: tuple[int, int, int, int, int]
    """:meth:`~.reliable.Receiver.snapshot`."""
    messages: int
    """Messages delivered so far (the number of the next one)."""
    nbytes: int
    """Payload bytes delivered so far."""
    closed: bool
    """The sender's CTRL_CLOSE arrived."""
    name: str
    sender: bytes
    """The sending site's key."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One batch for the application: ``payload`` holds ``count`` messages, the first of them
    the channel's message number ``first``."""

    payload: bytes | bytearray | memoryview
    count: int
    first: int


class ReceivingEnd:
    """The receiving end's state for one channel (see the module docstring)."""

    def __init__(self, keys: ChannelKeys, opener: Opener, name: str,
                 config: ReceiverConfig = ReceiverConfig()) -> None:
        self.cid = keys.channel_id
        self.sender = keys.peer
        self.name = name
        self._opener = opener
        self._keys = keys
        self._cipher = keys.cipher
        self._sealer = Sealer.for_channel(keys)
        self.ctl_end: int | None = None
        """The end of an application's lease of control seqs (None in the daemon)."""
        self.rx = Receiver(config)
        self.connected = False
        self.closed_by_sender = False
        self.messages = 0
        self.bytes = 0
        self._due = False
        self._flush = False
        self._request_feedback()  # the first frame asks for credit

    @classmethod
    def for_application(cls, g: InGrant, config: ReceiverConfig) -> ReceivingEnd:
        """The end an application runs once its daemon handed it over (:meth:`hand_over`):
        it seals Feedback within its lease of control seqs."""
        keys = ChannelKeys(g.cid, False, g.sender, g.cipher, g.send_direction, g.recv_direction,
                           b"", g.send_key, g.recv_key)
        opener = Opener.for_channel(keys)
        end = cls(keys, opener, g.name, config)
        end._sealer.next_control_seq = g.ctl_seal
        end.ctl_end = g.ctl_seal + LEASE
        end._restore(g)
        return end

    @classmethod
    def adopted(cls, g: InGrant, ctl_end: int, config: ReceiverConfig) -> ReceivingEnd:
        """The end a daemon runs for a channel that the application holding it offers after
        the daemon restarted (its state ``g``; ``ctl_end``: the end of the application's lease
        of control seqs).  The daemon seals from a whole lease beyond ``ctl_end``: the daemon
        before it may have sealed up to there.  LocalError if ``g`` cannot be a channel's
        state (a counter of :data:`COUNTER_LIMIT` or more, a lease end before its next seq)."""
        if max(g.messages, g.nbytes, g.ctl_open, g.ctl_seal, ctl_end, *g.rx) >= COUNTER_LIMIT:
            raise LocalError("a state with a counter beyond 2**63", reason="usage")
        if not g.ctl_seal <= ctl_end <= g.ctl_seal + LEASE:
            raise LocalError("a control seq lease that does not hold the next seq",
                             reason="usage")
        keys = ChannelKeys(g.cid, False, g.sender, g.cipher, g.send_direction, g.recv_direction,
                           b"", g.send_key, g.recv_key)
        end = cls(keys, Opener.for_channel(keys), g.name, config)
        end._sealer.next_control_seq = ctl_end + LEASE
        end._restore(g)
        end.connected = False
        return end

    def hand_over(self) -> InGrant:
        """This end goes to the application (the glue hands it the data socket with what this
        returns): the application may seal the next :data:`~.stream.LEASE` control seqs, this
        end goes on after them.  LocalError (``busy``) while messages are held here: deliver
        them first."""
        if self.rx.held_messages:
            raise LocalError("messages are held: deliver them first", reason="busy")
        g = self.give_back()
        self._sealer.next_control_seq += LEASE
        self.connected = False
        return g

    def give_back(self) -> InGrant:
        """This end's state, for the other holder (see :class:`InGrant`)."""
        k = self._sealer
        return InGrant(self.cid, self._cipher, self._keys.send_key, self._keys.recv_key,
                       k.direction, self._opener.direction, k.next_control_seq,
                       self._opener.next_control_seq, self.rx.snapshot(), self.messages,
                       self.bytes, self.closed_by_sender, self.name, self.sender)

    def taken_back(self, g: InGrant) -> None:
        """The application gave this end back (its connection broke): go on from ``g``.
        LocalError if ``g`` is another channel's or not a state this end can take: one that
        goes back from this end's (what was received and acknowledged would be asked again,
        which the sender no longer holds: the channel would stall), or with a counter of
        :data:`COUNTER_LIMIT` or more (its Feedback would not encode)."""
        if g.cid != self.cid or g.sender != self.sender:
            raise LocalError("the state of another channel", reason="wrong-channel")
        nxt, popped, popped_bytes, _, _ = self.rx.snapshot()
        if (g.messages < self.messages or g.nbytes < self.bytes or g.rx[0] < nxt
                or g.rx[1] < popped or g.rx[2] < popped_bytes):
            raise LocalError("a state older than this end's", reason="usage")
        if max(g.messages, g.nbytes, g.ctl_open, *g.rx) >= COUNTER_LIMIT:
            raise LocalError("a state with a counter beyond 2**63", reason="usage")
        self._restore(g)
        self.connection_lost()

    def _restore(self, g: InGrant) -> None:
        self.rx.restore(g.rx)
        self.messages, self.bytes = g.messages, g.nbytes
        self.closed_by_sender = self.closed_by_sender or g.closed
        self._opener.next_control_seq = max(self._opener.next_control_seq, g.ctl_open)

    # -- inputs --------------------------------------------------------------------------------

    def connection_adopted(self) -> None:
        self.connected = True

    def connection_lost(self) -> None:
        self.connected = False
        self.rx.on_reconnect()  # the next connection starts with fresh feedback

    def frame_received(self, body: Block, *, in_place: bool = False) -> None:
        """A frame from the sender; ProtocolError if it does not open (the connection is
        dropped, not the channel).  ``in_place``: ``body`` is the caller's to give up, and its
        payload is opened over it (see :meth:`~meshd.channel.frames.Opener.open`)."""
        frame = self._opener.open(body, in_place=in_place)
        if frame.kind == KIND_DATA:
            self.rx.on_data(frame.seq, frame.payload)
        else:
            self._on_control(frame.payload)
        self._request_feedback()

    def pop(self) -> Delivery | None:
        """The next in-order batch for the application, if one is held."""
        msg = self.rx.pop()
        if msg is None:
            return None
        payload = msg.payload
        count = _COUNT.unpack_from(payload, 0)[0] if len(payload) >= 4 else 0
        out = Delivery(payload, count, self.messages)
        self.messages += count
        self.bytes += len(payload)
        self._request_feedback()
        return out

    # -- outputs -------------------------------------------------------------------------------

    def take_flush(self) -> bool:
        """True once when feedback became due: the glue then runs a flush soon (after the
        input at hand, so that several inputs share one Feedback)."""
        out, self._flush = self._flush, False
        return out

    def take_feedback(self) -> Block | None:
        """The sealed Feedback to send now, if any (the flush itself; nothing if not
        connected: the next connection starts with fresh feedback)."""
        self._due = False
        if not self.connected:
            return None
        fb = self.rx.take_feedback()
        if fb is None:
            return None
        if self.ctl_end is not None and self._sealer.next_control_seq >= self.ctl_end:
            raise LocalError("control sequence lease used up", reason="lease")
        return self._sealer.seal_control(encode_control(fb))

    @property
    def finished(self) -> bool:
        """Closed by the sender and everything delivered: the channel can be forgotten."""
        return self.closed_by_sender and self.rx.held_messages == 0

    @property
    def state(self) -> str:
        if self.closed_by_sender:
            return "closed"
        return "open" if self.connected else "waiting"

    def counters(self) -> dict[str, Any]:
        return {"duplicates": self.rx.duplicates, "held_bytes": self.rx.held_bytes,
                "held_messages": self.rx.held_messages}

    # -- internals -----------------------------------------------------------------------------

    def _on_control(self, payload: Block | memoryview) -> None:
        head = bytes(payload[:1])
        if head == bytes([CTRL_OPEN]):
            return
        if head == bytes([CTRL_CLOSE]):
            self.closed_by_sender = True
            return
        if isinstance(decode_control(payload), Probe):
            self.rx.on_probe()

    def _request_feedback(self) -> None:
        if not self._due:
            self._due = True
            self._flush = True
