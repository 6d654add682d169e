"""Channel names, the control payloads of a channel's first and last frames, and the codec of
the ``chan`` messages daemons exchange about channels (pure).

The glue of both ends uses these to open and close a channel, never its own byte layout.

``chan`` messages travel one way over the membership links as ``{"t": "chan", "id": 0, "op":
OP, "b": BODY}``, BODY a msgpack map:

============  ==========================================  ===========================================
op            body                                        meaning
============  ==========================================  ===========================================
``dial``      ``{"cid": 16 B, "hello"?: bytes}``          sender S asks receiver R to dial S back (a
                                                          reversed path), maybe with its Hello
``relay``     ``{"cid": 16 B, "from": 32 B}``             relay X tells R that sender ``from`` waits
``reach?``    ``{}``                                      dial me back, please
``reach``     ``{"results": [[addr, ok, rtt_s], ...]}``    how that went
============  ==========================================  ===========================================

:func:`decode` raises :class:`~meshd.errors.ProtocolError` (the peer's fault) on an undecodable
body, a body that is not a map, a field of the wrong type or size, or an unknown op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from meshd.errors import LocalError, ProtocolError

from .reach import Outcome

MAX_NAME = 128
"""Longest channel name, in UTF-8 bytes."""

CTRL_OPEN = 0x10
"""Sender -> receiver control payload: ``0x10`` + the channel name (UTF-8); the first frame."""
CTRL_CLOSE = 0x11
"""Sender -> receiver: the application closed the channel; nothing more will come."""
CTRL_TUNNEL = 0x12
"""A tunnel's first frame each way: ``0x12`` + the service name (UTF-8); see
:mod:`meshd.tunnel.sealed`."""

PEER_TYPE = "chan"
"""The ``t`` of a peer message carrying a channel control message."""
MAX_FIELD = 4096
"""Longest bytes or string field of a control body."""


def check_name(name: object) -> str:
    """``name`` if it is a valid channel name, else LocalError (reason ``bad-name``)."""
    if not isinstance(name, str) or not 0 < len(name.encode()) <= MAX_NAME \
            or not name.isprintable():
        raise LocalError(f"a channel name is 1-{MAX_NAME} bytes of printable text",
                         reason="bad-name")
    return name


def open_payload(name: str) -> bytes:
    """The control payload of a channel's first frame."""
    return bytes([CTRL_OPEN]) + name.encode()


def tunnel_payload(service: str) -> bytes:
    """The control payload of a tunnel data connection's first frame (each way)."""
    return bytes([CTRL_TUNNEL]) + service.encode()


CLOSE_PAYLOAD = bytes([CTRL_CLOSE])
"""The control payload of a channel's last frame."""


# -- the chan messages (frozen, slotted) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DialRequest:
    """``dial``: please dial me back for channel ``cid`` (with my Hello, if given)."""

    cid: bytes
    hello: bytes | None = None


@dataclass(frozen=True, slots=True)
class RelayNotice:
    """``relay``: ``sender`` waits at this relay for channel ``cid``."""

    cid: bytes
    sender: bytes


@dataclass(frozen=True, slots=True)
class ReachRequest:
    """``reach?``: dial me back at each of my addresses, please."""


@dataclass(frozen=True, slots=True)
class ReachReport:
    """``reach``: one ``(address, ok, rtt seconds)`` per address dialed.  An entry the peer
    sent malformed is kept as a failure."""

    results: tuple[tuple[str, bool, float], ...]

    @property
    def outcome(self) -> Outcome:
        if any(ok for _, ok, _ in self.results):
            return Outcome.OK
        return Outcome.FAILED if self.results else Outcome.UNKNOWN

    @property
    def rtt(self) -> float | None:
        """The round trip of the first address that answered, if any did."""
        return next((rtt for _, ok, rtt in self.results if ok), None)


ControlMessage = DialRequest | RelayNotice | ReachRequest | ReachReport

OPS = ("dial", "relay", "reach?", "reach")


def encode(msg: ControlMessage) -> tuple[str, bytes]:
    """The op and msgpack body of ``msg``."""
    body: dict[str, Any]
    if isinstance(msg, DialRequest):
        op, body = "dial", {"cid": msg.cid}
        if msg.hello is not None:
            body["hello"] = msg.hello
    elif isinstance(msg, RelayNotice):
        op, body = "relay", {"cid": msg.cid, "from": msg.sender}
    elif isinstance(msg, ReachRequest):
        op, body = "reach?", {}
    else:
        op, body = "reach", {"results": [list(r) for r in msg.results]}
    return op, _pack(body)


def peer_message(msg: ControlMessage) -> dict[str, Any]:
    """The peer message (over the membership links) that carries ``msg``."""
    op, body = encode(msg)
    return {"t": PEER_TYPE, "id": 0, "op": op, "b": body}


def decode(op: str, body: bytes) -> ControlMessage:
    """The message a ``chan`` peer message carries; ProtocolError if it is malformed."""
    msg = _unpack(body, op)
    if not isinstance(msg, dict):
        raise ProtocolError(f"{op}: body is not a map", reason="malformed")
    if op == "dial":
        hello = msg.get("hello")
        if hello is not None and not isinstance(hello, bytes):
            raise ProtocolError("dial: hello is not bytes", reason="malformed")
        return DialRequest(_bin(msg, "cid", 16), hello)
    if op == "relay":
        return RelayNotice(_bin(msg, "cid", 16), _bin(msg, "from", 32))
    if op == "reach?":
        return ReachRequest()
    if op == "reach":
        results = msg.get("results")
        if not isinstance(results, list):
            raise ProtocolError("reach: results missing", reason="malformed")
        return ReachReport(tuple(_result(r) for r in results))
    raise ProtocolError(f"unknown channel operation {op!r}", reason="type")


def _result(r: Any) -> tuple[str, bool, float]:
    if (isinstance(r, list) and len(r) == 3 and r[1] is True and isinstance(r[2], (int, float))):
        return (r[0] if isinstance(r[0], str) else "?", True, float(r[2]))
    return (r[0] if isinstance(r, list) and r and isinstance(r[0], str) else "?", False, 0.0)


def _pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def _unpack(data: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, max_bin_len=MAX_FIELD, max_str_len=MAX_FIELD,
                               max_array_len=64, max_map_len=16)
    except Exception:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"{what}: undecodable body", reason="malformed") from None


def _bin(msg: dict[str, Any], name: str, size: int) -> bytes:
    v = msg.get(name)
    if not isinstance(v, bytes) or len(v) != size:
        raise ProtocolError(f"field {name} must be {size} bytes", reason="malformed")
    return v
