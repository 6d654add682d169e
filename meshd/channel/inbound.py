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
from dataclasses import dataclass
from typing import Any


from meshd.errors import LocalError, ProtocolError

from .control import CTRL_CLOSE, CTRL_OPEN, CTRL_TUNNEL, check_name
from .events import Probe
from .frames import KIND_CONTROL, KIND_DATA, Block, Opener, Sealer
from .handshake import ChannelKeys
from .reliable import Receiver, ReceiverConfig, decode_control, encode_control

_COUNT = struct.Struct(">I")


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
        self._sealer = Sealer.for_channel(keys)
        self.rx = Receiver(config)
        self.connected = False
        self.closed_by_sender = False
        self.messages = 0
        self.bytes = 0
        self._due = False
        self._flush = False
        self._request_feedback()  # the first frame asks for credit

    # -- inputs --------------------------------------------------------------------------------

    def connection_adopted(self) -> None:
        self.connected = True

    def connection_lost(self) -> None:
        self.connected = False
        self.rx.on_reconnect()  # the next connection starts with fresh feedback

    def frame_received(self, body: Block) -> None:
        """A frame from the sender; ProtocolError if it does not open (the connection is
        dropped, not the channel)."""
        frame = self._opener.open(body)
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
        return None if fb is None else self._sealer.seal_control(encode_control(fb))

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
