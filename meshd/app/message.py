"""Messages as an application sees them: :class:`Message`, the encoding of what it sends and the
decoding of what its daemon delivers (shared by the sync and the asyncio flavour)."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from meshd.channel import batch
from meshd.channel.arrays import decode_message, encode_message
from meshd.errors import ProtocolError
from meshd.local import ipc
from meshd.local.ring import ReleaseTracker
from meshd.trust.identity import site_id_of

__all__ = ["Message", "batch_messages", "checked_messages", "encode", "messages"]

log = logging.getLogger("meshd.app.streams")
"""The application API's logger (its name from before the API was split into modules)."""


@dataclass(slots=True)
class Message:
    """One received message.  ``array`` is a numpy view of the received buffer (no copy);
    for a bytes message it is the uint8 view and ``data`` the same bytes as a memoryview."""

    array: np.ndarray[Any, Any]
    data: memoryview
    meta: dict[str, Any]
    seq: int
    sender: str
    """The sending site's name."""
    sender_id: str
    channel: str
    kind: str = "array"
    _frame: Any = field(default=None, repr=False)
    _cid: bytes = field(default=b"", repr=False)
    """The channel's id (to drop what is not handed out yet of a channel that was cut)."""

    def bytes(self) -> bytes:
        return bytes(self.data)


# -- encoding with a small cache of headers ----------------------------------------------------

_HEADERS: dict[tuple[Any, ...], bytes] = {}
_U8 = np.dtype(np.uint8)
_DECODED: dict[bytes, tuple[str, np.dtype[Any], tuple[int, ...], int]] = {}
"""Header bytes (without meta) -> kind, dtype, shape and body size: the receive path of small
messages spends most of its time decoding headers, and a stream repeats one header."""


def encode(obj: Any, meta: Mapping[str, Any] | None) -> tuple[Any, Any]:
    """The header and body of one message (:func:`meshd.channel.arrays.encode_message`), the
    header from a cache when a stream repeats it."""
    if not meta:
        if isinstance(obj, (bytes, bytearray)):
            key: tuple[Any, ...] = ("b", len(obj))
            head = _HEADERS.get(key)
            if head is not None:
                return head, obj
        elif isinstance(obj, np.ndarray) and obj.flags.c_contiguous and obj.dtype.fields is None \
                and obj.dtype.kind != "O":
            key = ("a", obj.dtype.str, obj.shape)
            head = _HEADERS.get(key)
            if head is not None:
                return head, obj.reshape(-1).view(np.uint8).data
        else:
            key = ()
        head_v, body = encode_message(obj, meta)
        if key and len(_HEADERS) < 1024:
            _HEADERS[key] = bytes(head_v)
        return head_v, body
    head_v, body = encode_message(obj, meta)
    return head_v, body


def _decode(head: memoryview, body: memoryview, raw: np.ndarray[Any, Any]
            ) -> tuple[str, np.ndarray[Any, Any], dict[str, Any]]:
    """``raw``: the body as uint8 numpy (a slice of the whole delivery: cheaper than a new
    ``np.frombuffer`` per message)."""
    if head.nbytes <= 256:
        key = bytes(head)
        hit = _DECODED.get(key)
        if hit is not None:
            kind, dt, shape, nbytes = hit
            if nbytes == body.nbytes:
                array = raw if dt == _U8 else raw.view(dt)
                return kind, array if len(shape) == 1 else array.reshape(shape), {}
        msg = decode_message([head, body])
        if not msg.meta and len(_DECODED) < 1024:
            _DECODED[key] = (msg.kind, msg.array.dtype, msg.array.shape, msg.array.nbytes)
        return msg.kind, msg.array, msg.meta
    msg = decode_message([head, body])
    return msg.kind, msg.array, msg.meta


def messages(parts: list[Any], channel: str, ring: ReleaseTracker | None) -> list[Message]:
    """The messages of one delivery from the daemon (:mod:`meshd.local.ipc`).  A batch in the
    receiver's ring is viewed there: its arrays view the ring, and the record is released once
    the last of them is garbage collected."""
    got = ipc.read_delivery(parts, None if ring is None else ring.ring)
    view = got.payload
    whole = np.frombuffer(view, dtype=np.uint8)
    keep: Any = got.frame
    if got.ring_start is not None and ring is not None:
        ring.track(got.ring_start, got.ring_start + view.nbytes)
        weakref.finalize(whole, ring.freed, got.ring_start)
        keep = whole
    cid, sender, first, name = ipc.unpack_meta(got.meta)
    return batch_messages(view, whole, keep, first, name, site_id_of(sender), channel, cid)


def batch_messages(view: memoryview, whole: np.ndarray[Any, Any], keep: Any, first: int,
                   sender_name: str, sender_id: str, channel: str, cid: bytes
                   ) -> list[Message]:
    """The messages of one packed batch ``view`` (``whole``: the same bytes as uint8 numpy;
    ``keep``: what each message holds on to), the first of them number ``first``; ProtocolError
    (``batch``) if it is malformed."""
    out = []
    for i, (ho, hn, bo, bn) in enumerate(batch.offsets(view)):
        raw = whole[bo:bo + bn]
        # a ring's views must hold ``whole`` (its finalizer frees the record); a frame's need not
        body = memoryview(raw) if keep is whole else view[bo:bo + bn]  # type: ignore[arg-type]
        kind, array, meta = _decode(view[ho:ho + hn], body, raw)
        out.append(Message(array, body, meta, first + i, sender_name, sender_id, channel, kind,
                           keep, cid))
    return out


def checked_messages(parts: list[Any], channel: str, ring: ReleaseTracker | None
                     ) -> list[Message]:
    """:func:`messages`, or none (logged) for a malformed delivery: one bad batch from a far
    sender must not end the application's receive loop."""
    try:
        return messages(parts, channel, ring)
    except ProtocolError as exc:
        log.warning("channel %r: skipped a malformed delivery: %s", channel, exc)
        return []
