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

from meshd.errors import LocalError, ProtocolError

from .frames import MAX_PAYLOAD

__all__ = ["MAX_BATCH_BYTES", "MAX_BATCH_MESSAGES", "MAX_MESSAGE_BYTES", "pack", "split"]

MAX_MESSAGE_BYTES = 1 << 24
"""Largest array or byte string one message may carry (16 MiB); split larger data."""

MAX_BATCH_BYTES = 256 << 10
"""A batch stops growing past this many bytes (a larger single message travels alone)."""
MAX_BATCH_MESSAGES = 8192
_COUNT = struct.Struct(">I")
_ENTRY = struct.Struct(">IQ")


def pack(messages: Sequence[tuple[Any, Any]]) -> bytearray:
    """One payload for ``messages`` (pairs of header and body buffers); copies each once."""
    n = len(messages)
    if not 0 < n <= MAX_BATCH_MESSAGES:
        raise ValueError(f"a batch holds 1..{MAX_BATCH_MESSAGES} messages, not {n}")
    views = [(memoryview(h).cast("B"), memoryview(b).cast("B")) for h, b in messages]
    size = _COUNT.size + n * _ENTRY.size + sum(h.nbytes + b.nbytes for h, b in views)
    if any(b.nbytes > MAX_MESSAGE_BYTES for _, b in views):
        raise LocalError(f"a message carries at most {MAX_MESSAGE_BYTES} bytes (16 MiB);"
                         " split larger arrays", reason="too-large")
    if size > MAX_PAYLOAD:
        raise LocalError(f"batch of {size} bytes exceeds {MAX_PAYLOAD}", reason="too-large")
    out = bytearray(size)
    _COUNT.pack_into(out, 0, n)
    pos = _COUNT.size
    for h, b in views:
        _ENTRY.pack_into(out, pos, h.nbytes, b.nbytes)
        pos += _ENTRY.size
    for h, b in views:
        out[pos:pos + h.nbytes] = h
        pos += h.nbytes
        out[pos:pos + b.nbytes] = b
        pos += b.nbytes
    return out


def payload_size(messages: Sequence[tuple[int, int]]) -> int:
    """The size :func:`pack` gives for messages of these (header, body) sizes."""
    return _COUNT.size + len(messages) * _ENTRY.size + sum(h + b for h, b in messages)


def split(payload: Any) -> list[tuple[memoryview, memoryview]]:
    """The (header, body) views of a payload; ProtocolError (``batch``) if it is malformed."""
    view = memoryview(payload).cast("B")
    size = view.nbytes
    if size < _COUNT.size:
        raise ProtocolError("batch shorter than its count", reason="batch")
    (n,) = _COUNT.unpack_from(view, 0)
    if not 0 < n <= MAX_BATCH_MESSAGES or _COUNT.size + n * _ENTRY.size > size:
        raise ProtocolError(f"batch count {n} does not fit its {size} bytes", reason="batch")
    pos = _COUNT.size + n * _ENTRY.size
    out = []
    for i in range(n):
        hl, bl = _ENTRY.unpack_from(view, _COUNT.size + i * _ENTRY.size)
        end = pos + hl + bl
        if end > size:
            raise ProtocolError("batch entry runs past the payload", reason="batch")
        out.append((view[pos:pos + hl], view[pos + hl:end]))
        pos = end
    if pos != size:
        raise ProtocolError(f"{size - pos} stray bytes after the batch", reason="batch")
    return out
