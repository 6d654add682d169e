"""Messages as an application sees them: :class:`Message`, the encoding of what it sends and the
decoding of what its daemon delivers (shared by the sync and the asyncio flavour)."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from operator import attrgetter
from typing import Any

import numpy as np

from meshd.channel import batch
from meshd.channel.arrays import decode_message, encode_message
from meshd.errors import ProtocolError
from meshd.local import ipc
from meshd.local.ring import ReleaseTracker
from meshd.trust.identity import site_id_of

__all__ = ["Message", "Origin", "batch_messages", "checked_messages", "encode", "messages"]

log = logging.getLogger("meshd.app.streams")
"""The application API's logger (its name from before the API was split into modules)."""


class Origin:
    """What the messages of one delivery share: who sent them, on which channel, as what kind,
    and the buffer they view (one object per batch instead of six fields per message)."""

    __slots__ = ("channel", "cid", "frame", "kind", "sender", "sender_id")

    def __init__(self, sender: str, sender_id: str, channel: str, kind: str, frame: Any,
                 cid: bytes) -> None:
        self.sender, self.sender_id, self.channel = sender, sender_id, channel
        self.kind, self.frame, self.cid = kind, frame, cid


class Message:
    """One received message.  ``array`` is a numpy view of the received buffer (no copy);
    for a bytes message it is the uint8 view and ``data`` the same bytes as a memoryview.
    ``sender`` is the sending site's name, ``sender_id`` its id, ``seq`` the message's number
    on its channel (from 0)."""

    __slots__ = ("_data", "_origin", "array", "meta", "seq")

    def __init__(self, array: np.ndarray[Any, Any], data: memoryview | None,
                 meta: dict[str, Any], seq: int, origin: Origin) -> None:
        self.array = array
        self._data = data
        """The bytes as a memoryview, made from ``array`` when first asked for if None."""
        self.meta = meta
        self.seq = seq
        self._origin = origin

    @property
    def data(self) -> memoryview:
        if self._data is None:
            self._data = memoryview(self.array).cast("B")  # type: ignore[arg-type]
        return self._data

    sender = property(attrgetter("_origin.sender"))
    sender_id = property(attrgetter("_origin.sender_id"))
    channel = property(attrgetter("_origin.channel"))
    kind = property(attrgetter("_origin.kind"))
    _frame = property(attrgetter("_origin.frame"))
    """What the message's buffer belongs to (a delivery's frame, or a ring's view)."""
    _cid = property(attrgetter("_origin.cid"))
    """The channel's id (to drop what is not handed out yet of a channel that was cut)."""

    def bytes(self) -> bytes:
        return bytes(self.data)

    def __repr__(self) -> str:
        return (f"Message(seq={self.seq}, kind={self.kind!r}, array={self.array!r},"
                f" meta={self.meta!r}, sender={self.sender!r}, channel={self.channel!r})")


# -- encoding with a small cache of headers ----------------------------------------------------

_HEADERS: dict[Any, bytes] = {}
"""Per :func:`_header_key`, the header :func:`encode` made for it."""
_U8 = np.dtype(np.uint8)
COPIED_BELOW = 64 << 10
"""A body smaller than this is copied at once (:class:`~meshd.app.batching.Batcher` would copy
it anyway: the caller may reuse its array after ``send``); a bigger one is viewed."""
_DECODED: dict[bytes, tuple[str, np.dtype[Any], tuple[int, ...], int]] = {}
"""Header bytes (without meta) -> kind, dtype, shape and body size: the receive path of small
messages spends most of its time decoding headers, and a stream repeats one header."""


def encode(obj: Any, meta: Mapping[str, Any] | None) -> tuple[Any, Any]:
    """The header and body of one message (:func:`meshd.channel.arrays.encode_message`), the
    header from a cache when a stream repeats it (the hit path is what a stream of small
    messages spends its time in: a dict lookup and a byte view, no numpy call)."""
    if not meta:
        kind = type(obj)
        if kind is np.ndarray:
            head = _HEADERS.get((obj.dtype, obj.shape))
            if head is not None:
                if obj.nbytes < COPIED_BELOW:
                    return head, obj.tobytes()  # in C order, as the header says
                if obj.flags.c_contiguous:  # else encode_message copies it
                    # (a uint8 view: numpy exports no buffer of some dtypes, datetime64 say)
                    return head, obj.reshape(-1).view(np.uint8).data
        elif kind is bytes or kind is bytearray:
            head = _HEADERS.get(len(obj))
            if head is not None:
                return head, obj
        head_v, body = encode_message(obj, meta)
        key = _header_key(obj)
        if key is not None and len(_HEADERS) < 1024:
            _HEADERS[key] = bytes(head_v)
        return head_v, body
    head_v, body = encode_message(obj, meta)
    return head_v, body


def _header_key(obj: Any) -> Any:
    """What the header of ``obj`` (sent without meta) depends on, if it may be cached: the
    length of a byte string, the dtype and shape of a plain C-contiguous array; else None."""
    if type(obj) is bytes or type(obj) is bytearray:
        return len(obj)
    if type(obj) is np.ndarray and obj.flags.c_contiguous and obj.dtype.fields is None \
            and obj.dtype.kind != "O":
        return (obj.dtype, obj.shape)
    return None


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
    sizes = batch.uniform(view)
    if sizes is not None and sizes[0] >= UNIFORM_FROM:
        got = _uniform(sizes, view, whole)
        if got is not None:
            kind, arrays = got
            origin = Origin(sender_name, sender_id, channel, kind, keep, cid)
            return [Message(a, None, {}, seq, origin)
                    for seq, a in enumerate(arrays, first)]
    out = []
    origins: dict[str, Origin] = {}
    for i, (ho, hn, bo, bn) in enumerate(batch.offsets(view)):
        raw = whole[bo:bo + bn]
        # a ring's views must hold ``whole`` (its finalizer frees the record); a frame's need not
        body = memoryview(raw) if keep is whole else view[bo:bo + bn]  # type: ignore[arg-type]
        kind, array, meta = _decode(view[ho:ho + hn], body, raw)
        if kind not in origins:
            origins[kind] = Origin(sender_name, sender_id, channel, kind, keep, cid)
        out.append(Message(array, body, meta, first + i, origins[kind]))
    return out


UNIFORM_FROM = 8
"""A batch of this many messages or more, all of the same sizes, is tried as :func:`_uniform`."""


def _uniform(sizes: tuple[int, int, int], view: memoryview, whole: np.ndarray[Any, Any]
             ) -> tuple[str, list[Any]] | None:
    """The kind and arrays of a batch whose messages all carry the same header (a stream of
    one dtype and shape, no meta): decoded once, the arrays cut from one 2-D view of the batch
    instead of a numpy call each (their ``data`` is made when asked for); None if the batch is
    not like that.  ``sizes``: :func:`meshd.channel.batch.uniform` of it."""
    n, hn, bn = sizes
    if bn == 0:
        return None
    stride = hn + bn
    start = view.nbytes - n * stride  # the messages follow the entries, back to back
    rows = whole[start:].reshape(n, stride)
    heads = rows[:, :hn]
    if not (heads == heads[0]).all():
        return None
    kind, array, meta = _decode(view[start:start + hn], view[start + hn:start + stride],
                                whole[start + hn:start + stride])
    if meta or array.ndim == 0 or array.nbytes != bn:
        return None
    raw = rows[:, hn:]
    typed = raw if array.dtype == _U8 else raw.view(array.dtype)
    return kind, list(typed.reshape((n, *array.shape)))


def checked_messages(parts: list[Any], channel: str, ring: ReleaseTracker | None
                     ) -> list[Message]:
    """:func:`messages`, or none (logged) for a malformed delivery: one bad batch from a far
    sender must not end the application's receive loop."""
    try:
        return messages(parts, channel, ring)
    except ProtocolError as exc:
        log.warning("channel %r: skipped a malformed delivery: %s", channel, exc)
        return []
