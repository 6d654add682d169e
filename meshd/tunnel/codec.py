"""The messages of the tunnel multiplexer and their checked codec (pure).

Many TCP streams travel over one end-to-end encrypted data connection.  The plaintext of each
sealed data frame (:mod:`.sealed`) is one or more messages, back to back::

    message = type u8 | stream u32 | length u32 | body (length bytes)      (big-endian)

=========  ====  ==========================================  ===================================
type       code  body                                        meaning
=========  ====  ==========================================  ===================================
OPEN       1     service name, UTF-8 (1..128 B, printable)   consumer -> owner: a new TCP stream
DATA       2     1..MAX_DATA bytes of the stream             within the receiver's credit
FIN        3     empty                                       no more bytes this way (half-close)
RESET      4     reason u8                                   the stream is gone (both ways)
CREDIT     5     increment u32 (1..MAX_WINDOW)               the sender may send this many more
=========  ====  ==========================================  ===================================

:func:`decode` checks every size and type before it trusts it and raises
:class:`~meshd.errors.ProtocolError` with reason ``truncated`` (a header or body cut short),
``type`` (unknown type), ``oversized`` (a body over its bound), ``malformed`` (a bad name, a
FIN with a body, a CREDIT or RESET of the wrong size, a zero increment, stream 0).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from meshd.errors import ProtocolError

OPEN, DATA, FIN, RESET, CREDIT = 1, 2, 3, 4, 5
TYPES = {OPEN: "open", DATA: "data", FIN: "fin", RESET: "reset", CREDIT: "credit"}

HEADER = struct.Struct(">BII")
HEADER_SIZE = HEADER.size  # 9
MAX_NAME = 128
"""Longest service name, in UTF-8 bytes (as a channel name)."""
MAX_DATA = 256 << 10
"""Largest DATA body; a sender splits bigger writes."""
MAX_WINDOW = 16 << 20
"""Largest credit a stream may hold (a CREDIT beyond it is ``malformed``)."""
MAX_STREAM = (1 << 32) - 1
MAX_FRAME_PAYLOAD = 4 << 20
"""Most plaintext bytes of messages a sender packs into one sealed frame (its choice: a
receiver takes any frame up to the channel's limit).  4 MiB, a quarter of one stream's largest
window (:data:`~.mux.MAX_STREAM_WINDOW`): a bulk stream then costs one read, one seal and one
write per 4 MiB (1 MiB frames spent 0.3 CPU-s/GB more in the sending daemon, see
docs/performance.md) and keeps four frames in flight."""

# RESET reasons: code -> name (what the far end's client sees is a TCP reset either way)
REASONS = {
    1: "refused",          # the owner's target refused the connection (or did not answer)
    2: "not-allowed",      # the consuming site is not on the service's allow-list
    3: "unknown-service",  # no service of that name is exposed
    4: "reset",            # one end's TCP connection was reset or aborted
    5: "busy",             # too many streams on this tunnel
    6: "cut",              # the service was unexposed, the site revoked or cut off
    7: "lost",             # the data connection was lost (never sent: each side notes it)
}
REASON_CODES = {name: code for code, name in REASONS.items()}

_U32 = struct.Struct(">I")


def check_service(name: object) -> str:
    """``name`` if it is a valid service name, else ValueError."""
    if not isinstance(name, str) or not 0 < len(name.encode()) <= MAX_NAME \
            or not name.isprintable() or "/" in name:
        raise ValueError(f"a service name is 1-{MAX_NAME} bytes of printable text without '/'")
    return name


@dataclass(frozen=True, slots=True)
class Open:
    stream: int
    service: str


@dataclass(frozen=True, slots=True)
class Data:
    stream: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class Fin:
    stream: int


@dataclass(frozen=True, slots=True)
class Reset:
    stream: int
    reason: str


@dataclass(frozen=True, slots=True)
class Credit:
    stream: int
    increment: int


Message = Open | Data | Fin | Reset | Credit


def encode(msg: Message) -> bytes:
    """The bytes of one message (the caller keeps to the bounds above)."""
    if isinstance(msg, Data):
        return HEADER.pack(DATA, msg.stream, len(msg.data)) + bytes(msg.data)
    if isinstance(msg, Open):
        body = msg.service.encode()
        return HEADER.pack(OPEN, msg.stream, len(body)) + body
    if isinstance(msg, Fin):
        return HEADER.pack(FIN, msg.stream, 0)
    if isinstance(msg, Reset):
        return HEADER.pack(RESET, msg.stream, 1) + bytes([REASON_CODES[msg.reason]])
    return HEADER.pack(CREDIT, msg.stream, 4) + _U32.pack(msg.increment)


def data_header(stream: int, length: int) -> bytes:
    """The header of a DATA message of ``length`` bytes (its body follows, uncopied)."""
    return HEADER.pack(DATA, stream, length)


def decode(payload: bytes | bytearray | memoryview) -> list[Message]:
    """Every message in one frame's plaintext; ProtocolError (nothing returned) if any is bad.
    DATA bodies are views of ``payload`` (no copy)."""
    view = memoryview(payload)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    size = view.nbytes
    if size == 0:
        raise ProtocolError("an empty tunnel frame", reason="truncated")
    out: list[Message] = []
    pos = 0
    while pos < size:
        if size - pos < HEADER_SIZE:
            raise ProtocolError(f"{size - pos} bytes where a message header of {HEADER_SIZE}"
                                " was expected", reason="truncated")
        kind, stream, length = HEADER.unpack_from(view, pos)
        pos += HEADER_SIZE
        if kind not in TYPES:
            raise ProtocolError(f"unknown tunnel message type {kind}", reason="type")
        if stream == 0:
            raise ProtocolError("stream 0 is not used", reason="malformed")
        limit = MAX_DATA if kind == DATA else MAX_NAME if kind == OPEN else 4
        if length > limit:
            raise ProtocolError(f"{TYPES[kind]} body of {length} bytes (at most {limit})",
                                reason="oversized")
        if size - pos < length:
            raise ProtocolError(f"{TYPES[kind]} body of {length} bytes, {size - pos} left",
                                reason="truncated")
        body = view[pos:pos + length]
        pos += length
        out.append(_message(kind, stream, body))
    return out


def _message(kind: int, stream: int, body: memoryview) -> Message:
    n = body.nbytes
    if kind == DATA:
        if n == 0:
            raise ProtocolError("an empty DATA message", reason="malformed")
        return Data(stream, body)
    if kind == OPEN:
        try:
            return Open(stream, check_service(bytes(body).decode()))
        except (UnicodeDecodeError, ValueError):
            raise ProtocolError("OPEN with a bad service name", reason="malformed") from None
    if kind == FIN:
        if n:
            raise ProtocolError("FIN with a body", reason="malformed")
        return Fin(stream)
    if kind == RESET:
        if n != 1 or body[0] not in REASONS or REASONS[body[0]] == "lost":
            raise ProtocolError("RESET with a bad reason", reason="malformed")
        return Reset(stream, REASONS[body[0]])
    if n != 4:
        raise ProtocolError("CREDIT of the wrong size", reason="malformed")
    inc = _U32.unpack(body)[0]
    if not 0 < inc <= MAX_WINDOW:
        raise ProtocolError(f"CREDIT of {inc} bytes", reason="malformed")
    return Credit(stream, inc)
