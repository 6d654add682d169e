"""Several application messages in one channel payload (pure).

Small messages are batched: the sending daemon packs whatever the application has queued (up
to ``MAX_BATCH_BYTES`` or ``MAX_BATCH_MESSAGES``) into one payload, sealed as one frame, so the
per-frame cost (a few microseconds of Python) is paid once per batch, not per 64-byte message.
A large message travels alone.  Layout::

    count u32 | count x (header_len u32 | body_len u64) | header0 body0 header1 body1 ...

``header`` and ``body`` are the two frames of :mod:`.arrays` (msgpack header, raw buffer).  The
receiving daemon hands the whole payload to its application as one ZeroMQ frame; the client
splits it with :func:`split` into memoryviews, so arrays are views of the received frame.
Message sequence numbers are not carried: delivery is in order and exactly once, so the
receiver numbers messages by counting.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from meshd.errors import LocalError, ProtocolError

from .frames import MAX_PAYLOAD

__all__ = ["MAX_BATCH_BYTES", "MAX_BATCH_MESSAGES", "MAX_MESSAGE_BYTES", "check", "offsets",
           "pack", "pack_into", "pack_parts", "payload_size", "split", "uniform"]

MAX_MESSAGE_BYTES = 1 << 24
"""Largest array or byte string one message may carry (16 MiB); split larger data."""

MAX_BATCH_BYTES = 256 << 10
"""A batch stops growing past this many bytes (a larger single message travels alone)."""
MAX_BATCH_MESSAGES = 8192
_COUNT = struct.Struct(">I")
_ENTRY = struct.Struct(">IQ")


def pack(messages: Sequence[tuple[Any, Any]]) -> bytes:
    """One payload for ``messages`` (pairs of header and body buffers); copies each once."""
    n = len(messages)
    if not 0 < n <= MAX_BATCH_MESSAGES:
        raise ValueError(f"a batch holds 1..{MAX_BATCH_MESSAGES} messages, not {n}")
    entries = [_COUNT.pack(n)]
    data: list[Any] = []
    size = _COUNT.size + n * _ENTRY.size
    for h, b in messages:  # the client's small messages are bytes: skip the memoryviews
        if type(h) is not bytes:
            h = memoryview(h).cast("B")
        if type(b) is not bytes:
            b = memoryview(b).cast("B")
        hn, bn = len(h), len(b)
        if bn > MAX_MESSAGE_BYTES:
            raise LocalError(f"a message carries at most {MAX_MESSAGE_BYTES} bytes (16 MiB);"
                             " split larger arrays", reason="too-large")
        entries.append(_ENTRY.pack(hn, bn))
        data += (h, b)
        size += hn + bn
    if size > MAX_PAYLOAD:
        raise LocalError(f"batch of {size} bytes exceeds {MAX_PAYLOAD}", reason="too-large")
    return b"".join(entries + data)


def pack_into(target: memoryview, messages: Sequence[tuple[Any, Any]]) -> None:
    """Write the payload :func:`pack` would return into ``target`` (a writable byte view of
    exactly :func:`payload_size` bytes): one copy of each body, straight into shared memory."""
    n = len(messages)
    if not 0 < n <= MAX_BATCH_MESSAGES:
        raise ValueError(f"a batch holds 1..{MAX_BATCH_MESSAGES} messages, not {n}")
    views = [(memoryview(h).cast("B"), memoryview(b).cast("B")) for h, b in messages]
    if target.nbytes != payload_size([(h.nbytes, b.nbytes) for h, b in views]):
        raise ValueError("target is not the size of the payload")
    _COUNT.pack_into(target, 0, n)
    pos = _COUNT.size + n * _ENTRY.size
    for i, (h, b) in enumerate(views):
        if b.nbytes > MAX_MESSAGE_BYTES:
            raise LocalError(f"a message carries at most {MAX_MESSAGE_BYTES} bytes (16 MiB);"
                             " split larger arrays", reason="too-large")
        _ENTRY.pack_into(target, _COUNT.size + i * _ENTRY.size, h.nbytes, b.nbytes)
        target[pos:pos + h.nbytes] = h
        pos += h.nbytes
        target[pos:pos + b.nbytes] = b
        pos += b.nbytes


def pack_parts(messages: Sequence[tuple[Any, Any]], big: int = 64 << 10) -> tuple[list[Any], int]:
    """The payload :func:`pack` would return, as buffers to be read one after the other (the
    bodies of ``big`` bytes or more are not copied), and its size."""
    if all(type(b) is bytes or memoryview(b).nbytes < big for _, b in messages):
        data = pack(messages)  # small bodies (the client's are bytes): one join is cheapest
        return [data], len(data)
    views = [(memoryview(h).cast("B"), memoryview(b).cast("B")) for h, b in messages]
    n = len(views)
    if n > MAX_BATCH_MESSAGES:
        raise ValueError(f"a batch holds 1..{MAX_BATCH_MESSAGES} messages, not {n}")
    head = [_COUNT.pack(n)]
    parts: list[Any] = []
    small: list[Any] = []
    size = _COUNT.size + n * _ENTRY.size
    for h, b in views:
        if b.nbytes > MAX_MESSAGE_BYTES:
            raise LocalError(f"a message carries at most {MAX_MESSAGE_BYTES} bytes (16 MiB);"
                             " split larger arrays", reason="too-large")
        head.append(_ENTRY.pack(h.nbytes, b.nbytes))
        small.append(h)
        if b.nbytes >= big:
            parts += [b"".join(small), b]
            small = []
        else:
            small.append(b)
        size += h.nbytes + b.nbytes
    if small:
        parts.append(b"".join(small))
    if size > MAX_PAYLOAD:
        raise LocalError(f"batch of {size} bytes exceeds {MAX_PAYLOAD}", reason="too-large")
    parts[0] = b"".join(head) + parts[0]
    return parts, size


def payload_size(messages: Sequence[tuple[int, int]]) -> int:
    """The size :func:`pack` gives for messages of these (header, body) sizes."""
    return _COUNT.size + len(messages) * _ENTRY.size + sum(h + b for h, b in messages)


def split(payload: Any) -> list[tuple[memoryview, memoryview]]:
    """The (header, body) views of a payload; ProtocolError (``batch``) if it is malformed."""
    view = memoryview(payload).cast("B")
    return [(view[ho:ho + hn], view[bo:bo + bn]) for ho, hn, bo, bn in offsets(view)]


_ENTRIES = np.dtype([("header", ">u4"), ("body", ">u8")])


def _counted(payload: Any) -> tuple[memoryview, int, int]:
    """A payload's byte view, size and message count, once the count fits the size."""
    view = memoryview(payload).cast("B")
    size = view.nbytes
    if size < _COUNT.size:
        raise ProtocolError("batch shorter than its count", reason="batch")
    (n,) = _COUNT.unpack_from(view, 0)
    if not 0 < n <= MAX_BATCH_MESSAGES or _COUNT.size + n * _ENTRY.size > size:
        raise ProtocolError(f"batch count {n} does not fit its {size} bytes", reason="batch")
    return view, size, n


def check(payload: Any) -> int:
    """The message count of a well-formed payload; ProtocolError (``batch``) if its entries do
    not add up to its size exactly or name a message too big.  Vectorized (about 40 us for
    8192 entries, where :func:`offsets` takes 5 ms): what a sending daemon runs on every batch
    an application hands it, so that a malformed one never reaches the far application."""
    return len(_checked_sizes(payload)[0])


def _checked_sizes(payload: Any) -> tuple[Any, Any]:
    """The header sizes and body sizes of a well-formed payload's messages, as numpy arrays
    (:func:`check`)."""
    view, size, n = _counted(payload)
    entries = np.frombuffer(view, dtype=_ENTRIES, count=n, offset=_COUNT.size)
    headers, bodies = entries["header"], entries["body"]
    if int(headers.max()) > MAX_PAYLOAD or int(bodies.max()) > MAX_MESSAGE_BYTES:
        raise ProtocolError("batch entry larger than a message may be", reason="batch")
    total = (_COUNT.size + n * _ENTRY.size + int(headers.sum(dtype=np.uint64))
             + int(bodies.sum(dtype=np.uint64)))  # no overflow: n and each size are bounded
    if total != size:
        raise ProtocolError(f"batch entries add up to {total} bytes, not {size}",
                            reason="batch")
    return headers, bodies


def offsets(payload: Any) -> list[tuple[int, int, int, int]]:
    """(header offset, header size, body offset, body size) of each message of a payload;
    ProtocolError (``batch``) if it is malformed."""
    view, size, n = _counted(payload)
    pos = _COUNT.size + n * _ENTRY.size
    out: list[tuple[int, int, int, int]] = []
    for i in range(n):
        hl, bl = _ENTRY.unpack_from(view, _COUNT.size + i * _ENTRY.size)
        end = pos + hl + bl
        if end > size:
            raise ProtocolError("batch entry runs past the payload", reason="batch")
        out.append((pos, hl, pos + hl, bl))
        pos = end
    if pos != size:
        raise ProtocolError(f"{size - pos} stray bytes after the batch", reason="batch")
    return out


def uniform(payload: Any) -> tuple[int, int, int] | None:
    """``(count, header size, body size)`` if every message of a well-formed payload has the
    same header size and body size (a stream of one dtype and shape); None if they differ
    (:func:`offsets` then places them); ProtocolError (``batch``) as :func:`check` if it is
    malformed.  Vectorized: a few microseconds for a batch, where :func:`offsets` spends about
    0.3 us per message."""
    headers, bodies = _checked_sizes(payload)
    hn, bn = int(headers[0]), int(bodies[0])
    if not ((headers == hn).all() and (bodies == bn).all()):
        return None
    return len(headers), hn, bn
