"""The frames on a channel's ipc socket between an application and its daemon (the data path).

App -> daemon, one message per batch of application messages (:mod:`meshd.channel.batch`)::

    [batch]                        the packed batch inline
    [RING_MARK, descriptor]        the batch is a record of the sender's ring (:mod:`.ring`)

Daemon -> app, one message per delivered batch, and one when a channel ends::

    [meta, batch]
    [meta, RING_MARK, descriptor]  the batch is a record of the receiver's ring
    [end]                          a channel to this receiver ended (after its last delivery)

``meta`` is the msgpack list ``[cid, sender, first_seq, sender_name]``: the channel id (bytes),
the sending site's public key (bytes), the sequence number of the batch's first message and the
sending site's name.  ``end`` is the msgpack list ``["end", cid, sender, sender_name, reason,
message, still_open]``: ``reason`` ``closed`` (the sender closed it; everything it sent was
delivered before) or ``revoked``; ``still_open``: how many other channels feed the receiver.
Both sides use this module: the application packs batches
(:func:`batch_frames`) and reads deliveries (:func:`read_delivery`); the daemon reads batches
(:func:`read_batch`) and packs deliveries (:func:`pack_meta`, :func:`delivery_frames`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgpack

from meshd.channel import batch
from meshd.errors import ProtocolError

from .ring import DESCRIPTOR, RING_MARK, Ring, ring_worthy

__all__ = ["ChannelEnd", "Delivery", "DeliveryMeta", "batch_frames", "delivery_frames",
           "pack_end", "pack_meta", "read_batch", "read_delivery", "unpack_end", "unpack_meta"]


class DeliveryMeta(NamedTuple):
    """The first frame of a delivery."""

    cid: bytes
    sender: bytes
    """The sending site's public key."""
    first_seq: int
    sender_name: str


class Delivery(NamedTuple):
    """One delivery read from the receiver's socket."""

    meta: bytes
    """The ``meta`` frame, still packed (:func:`unpack_meta`)."""
    payload: memoryview
    """The packed batch: a view of the received frame, or of the receiver's ring."""
    ring_start: int | None
    """Where the record starts in the ring (to release it once read), or None if inline."""
    frame: Any
    """The received frame the payload views (None for a ring record)."""


class ChannelEnd(NamedTuple):
    """The one frame that says a channel to the receiver ended."""

    cid: bytes
    sender: bytes
    sender_name: str
    reason: str
    message: str
    still_open: int


def pack_end(end: ChannelEnd) -> bytes:
    """The ``end`` frame (what the receiving daemon sends after a channel's last delivery)."""
    data: bytes = msgpack.packb(["end", *end], use_bin_type=True)
    return data


def unpack_end(data: bytes) -> ChannelEnd:
    """The ``end`` frame; ProtocolError (``malformed``) if it is not one."""
    try:
        tag, cid, sender, name, reason, message, still_open = msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise ProtocolError("bad channel end notice", reason="malformed") from None
    if (tag != "end" or not isinstance(cid, bytes) or not isinstance(sender, bytes)
            or not all(isinstance(x, str) for x in (name, reason, message))
            or not isinstance(still_open, int) or still_open < 0):
        raise ProtocolError("bad channel end notice", reason="malformed")
    return ChannelEnd(cid, sender, name, reason, message, still_open)


def pack_meta(cid: bytes, sender: bytes, first_seq: int, sender_name: str) -> bytes:
    """The ``meta`` frame of a delivery (what the receiving daemon sends)."""
    data: bytes = msgpack.packb([cid, sender, first_seq, sender_name], use_bin_type=True)
    return data


def unpack_meta(data: bytes) -> DeliveryMeta:
    """The ``meta`` frame of a delivery; ProtocolError (``malformed``) if it is not one."""
    try:
        cid, sender, first, name = msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise ProtocolError("bad delivery header", reason="malformed") from None
    return DeliveryMeta(cid, sender, first, name)


def read_delivery(parts: list[Any], ring: Ring | None) -> Delivery:
    """The delivery in the frames ``parts`` (zmq Frames); ``ring``: the receiver's ring, if it
    has one.  ProtocolError if the frames are not a delivery or a ring descriptor is bad (the
``meta`` frame is decoded apart: a ring record is to be released even if it is bad)."""
    if len(parts) == 3 and ring is not None and parts[1].bytes == RING_MARK:
        start, view = ring.record(parts[2].bytes)
        return Delivery(parts[0].bytes, view, start, None)
    if len(parts) == 2:
        view = memoryview(parts[1].buffer).cast("B")
        return Delivery(parts[0].bytes, view, None, parts[1])
    raise ProtocolError(f"delivery of {len(parts)} frames", reason="frames")


def batch_frames(messages: list[tuple[Any, Any]], nbytes: int, ring: Ring | None) -> list[Any]:
    """The frames that hand a batch of ``messages`` (header and body pairs) to the daemon: a
    descriptor of the batch written into the sender's ``ring`` when its messages are big
    (``nbytes``: about the batch's size) and the ring has room, else the packed batch inline
    (for many small messages ``bytes.join`` beats writing each one into the ring from Python).
    Raises the errors a bad batch deserves (:func:`meshd.channel.batch.pack`)."""
    if ring is not None and ring_worthy(nbytes, len(messages)):
        sizes = [(memoryview(h).nbytes, memoryview(b).nbytes) for h, b in messages]
        size = batch.payload_size(sizes)
        if max(b for _, b in sizes) <= batch.MAX_MESSAGE_BYTES:
            start = ring.reserve(size)
            if start is not None:
                batch.pack_into(ring.region(start, size), messages)
                return [RING_MARK, DESCRIPTOR.pack(start, size)]
    return [batch.pack(messages)]


# -- the daemon's side ----------------------------------------------------------------------------


def read_batch(parts: list[Any], ring: Ring | None) -> tuple[memoryview, int | None]:
    """The batch a sending application's message carries, inline or in the sender's ``ring``
    (then also the ring offset to release once it is sealed); ProtocolError if it is malformed."""
    if len(parts) == 1:
        return parts[0].buffer, None
    if len(parts) == 2 and parts[0].bytes == RING_MARK and ring is not None:
        start, view = ring.record(parts[1].bytes)
        return view, start + view.nbytes
    raise ProtocolError(f"an application message of {len(parts)} parts", reason="frames")


def delivery_frames(ring: Ring | None, meta: bytes, payload: Any, count: int) -> list[Any]:
    """The frames that hand ``payload`` (a batch of ``count`` messages) to a receiving
    application: a descriptor of a record of the receiver's ``ring`` when the batch is worth it
    and the ring has room, else the payload itself."""
    n = len(payload)
    if ring is not None and ring_worthy(n, count):
        start = ring.reserve(n)
        if start is not None:
            ring.region(start, n)[:] = payload
            return [meta, RING_MARK, DESCRIPTOR.pack(start, n)]
    return [meta, payload]
