"""Wire messages of the membership protocol and their codec.

Every message is a frozen, slotted dataclass.  ``encode_message`` turns one into a plain list of
msgpack-able values; ``decode_message`` checks the type and size of every field of such a list
and raises :class:`meshd.errors.ProtocolError` (reason ``malformed``) on anything else;
``to_bytes``/``from_bytes`` add msgpack.  An incarnation above :data:`MAX_INCARNATION` anywhere
in a message refuses the whole message with reason ``incarnation`` instead.  The layouts (first item is the type code)::

    update  alive   [0, node, incarnation, meta, reachable]
            suspect [1, node, incarnation, source]
            dead    [2, node, incarnation, source]
            left    [3, node, incarnation]
    message ping      [1, seq, target, flags, [update...]]
            ping-req  [2, seq, target, [update...]]
            ack       [3, seq, [update...]]
            nack      [4, seq, [update...]]
            gossip    [5, [update...]]
            push-pull [6, join, [state...], [blob...]]      request
                      [7, [state...], [blob...]]            response
    state   [node, incarnation, status, meta, reachable]    status: 0 alive 1 suspect 2 dead 3 left
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from meshd.errors import ProtocolError

MAX_ID_LEN = 64
"""Longest node id accepted on the wire, in bytes."""
MAX_META_LEN = 1024
"""Longest opaque member metadata accepted, in bytes."""
MAX_UPDATES = 512
"""Most piggybacked updates in one message."""
MAX_STATES = 100_000
"""Most member states in one push-pull message."""
MAX_BLOBS = 10_000
"""Most opaque blobs in one push-pull message."""
MAX_BLOB_LEN = 64 * 1024
"""Longest opaque blob accepted, in bytes."""
MAX_INT = 2**63 - 1
"""Largest sequence number; any integer field above it is malformed."""
MAX_INCARNATION = 2**53 - 1
"""Largest incarnation accepted in any update or push-pull row; a message with a larger one is
refused whole (``ProtocolError`` reason ``incarnation``).  Far above any honest count (one
restart or refutation a second for 285 million years), exact in a JSON number (``meshd peers
--json``), and, since a claim about someone else moves that member at most
``SwimConfig.max_incarnation_step`` per message (see :mod:`.core`), some 2**49 messages away
for a liar.  The core never raises an incarnation beyond it."""
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest encoded message ``from_bytes`` accepts."""

FLAG_WATCH = 1
"""Ping flag from an outbound-only member: "I keep a connection to you; watch me"."""
FLAG_UNWATCH = 2
"""Ping flag from an outbound-only member: "stop watching me"."""

STATUS_ALIVE, STATUS_SUSPECT, STATUS_DEAD, STATUS_LEFT = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class Alive:
    """``node`` is alive at ``incarnation``; ``reachable=False`` means it cannot be dialed."""

    node: bytes
    incarnation: int
    meta: bytes = b""
    reachable: bool = True


@dataclass(frozen=True, slots=True)
class Suspect:
    """``source`` suspects ``node`` at ``incarnation``."""

    node: bytes
    incarnation: int
    source: bytes


@dataclass(frozen=True, slots=True)
class Dead:
    """``source`` declared ``node`` dead at ``incarnation``."""

    node: bytes
    incarnation: int
    source: bytes


@dataclass(frozen=True, slots=True)
class Left:
    """``node`` left the mesh gracefully at ``incarnation``."""

    node: bytes
    incarnation: int


Update = Alive | Suspect | Dead | Left


@dataclass(frozen=True, slots=True)
class MemberState:
    """One row of a push-pull exchange: what the sender believes about ``node``."""

    node: bytes
    incarnation: int
    status: int
    meta: bytes = b""
    reachable: bool = True


@dataclass(frozen=True, slots=True)
class Ping:
    """Direct probe of ``target``; answered by an :class:`Ack` with the same ``seq``."""

    seq: int
    target: bytes
    updates: tuple[Update, ...] = ()
    flags: int = 0


@dataclass(frozen=True, slots=True)
class PingReq:
    """Ask the receiver to ping ``target`` and relay the ack, or a :class:`Nack` on timeout."""

    seq: int
    target: bytes
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True)
class Ack:
    """Answer to a ping (or relayed answer to a ping-req) with sequence number ``seq``."""

    seq: int
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True)
class Nack:
    """A helper could not reach the target of ping-req ``seq`` in time (but is itself alive)."""

    seq: int
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True)
class Gossip:
    """Updates alone, sent every gossip interval to a few random members."""

    updates: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True)
class PushPullRequest:
    """Full state and blobs of the sender; answered by a :class:`PushPullResponse`."""

    states: tuple[MemberState, ...]
    blobs: tuple[bytes, ...] = ()
    join: bool = False


@dataclass(frozen=True, slots=True)
class PushPullResponse:
    """Full state and blobs of the responder."""

    states: tuple[MemberState, ...]
    blobs: tuple[bytes, ...] = ()


Message = Ping | PingReq | Ack | Nack | Gossip | PushPullRequest | PushPullResponse


# ---------------------------------------------------------------- encode


def encode_update(u: Update) -> list[Any]:
    """Plain-list form of one update."""
    t = type(u)
    if t is Alive:
        return [0, u.node, u.incarnation, u.meta, u.reachable]  # type: ignore[union-attr]
    if t is Suspect:
        return [1, u.node, u.incarnation, u.source]  # type: ignore[union-attr]
    if t is Dead:
        return [2, u.node, u.incarnation, u.source]  # type: ignore[union-attr]
    return [3, u.node, u.incarnation]


def _enc_state(s: MemberState) -> list[Any]:
    return [s.node, s.incarnation, s.status, s.meta, s.reachable]


def encode_message(m: Message) -> list[Any]:
    """Plain-list form of one message (msgpack-able)."""
    t = type(m)
    if t is Ping:
        return [1, m.seq, m.target, m.flags, [encode_update(u) for u in m.updates]]  # type: ignore[union-attr]
    if t is PingReq:
        return [2, m.seq, m.target, [encode_update(u) for u in m.updates]]  # type: ignore[union-attr]
    if t is Ack:
        return [3, m.seq, [encode_update(u) for u in m.updates]]  # type: ignore[union-attr]
    if t is Nack:
        return [4, m.seq, [encode_update(u) for u in m.updates]]  # type: ignore[union-attr]
    if t is Gossip:
        return [5, [encode_update(u) for u in m.updates]]  # type: ignore[union-attr]
    if t is PushPullRequest:
        return [6, m.join, [_enc_state(s) for s in m.states], list(m.blobs)]  # type: ignore[union-attr]
    if t is PushPullResponse:
        return [7, [_enc_state(s) for s in m.states], list(m.blobs)]  # type: ignore[union-attr]
    raise TypeError(f"not a membership message: {m!r}")


def to_bytes(m: Message) -> bytes:
    """msgpack encoding of ``encode_message(m)``."""
    return msgpack.packb(encode_message(m), use_bin_type=True)  # type: ignore[no-any-return]


# ---------------------------------------------------------------- decode


def _bad(what: str) -> ProtocolError:
    return ProtocolError(f"membership message: {what}", reason="malformed")


def _list(x: Any, what: str, n: int | None = None, max_len: int | None = None) -> list[Any]:
    if type(x) is not list and type(x) is not tuple:
        raise _bad(f"{what} is not a list")
    if n is not None and len(x) != n:
        raise _bad(f"{what} has {len(x)} items, expected {n}")
    if max_len is not None and len(x) > max_len:
        raise _bad(f"{what} has too many items ({len(x)} > {max_len})")
    return list(x)


def _id(x: Any, what: str) -> bytes:
    if type(x) is not bytes or not 1 <= len(x) <= MAX_ID_LEN:
        raise _bad(f"{what} is not a node id of 1..{MAX_ID_LEN} bytes")
    return x


def _int(x: Any, what: str, hi: int = MAX_INT) -> int:
    if type(x) is not int or not 0 <= x <= hi:
        raise _bad(f"{what} is not an integer in 0..{hi}")
    return x


def _inc(x: Any, what: str) -> int:
    n = _int(x, what)
    if n > MAX_INCARNATION:
        raise ProtocolError(f"membership message: {what} {n} is above {MAX_INCARNATION}",
                            reason="incarnation")
    return n


def _bool(x: Any, what: str) -> bool:
    if type(x) is not bool:
        raise _bad(f"{what} is not a boolean")
    return x


def _bytes(x: Any, what: str, max_len: int) -> bytes:
    if type(x) is not bytes or len(x) > max_len:
        raise _bad(f"{what} is not bytes of at most {max_len}")
    return x


def decode_update(x: Any) -> Update:
    """Inverse of :func:`encode_update`; raises ProtocolError on any malformed field."""
    items = _list(x, "update")
    if not items:
        raise _bad("empty update")
    kind = items[0]
    if kind == 0 and type(kind) is int:
        _list(items, "alive", 5)
        return Alive(
            _id(items[1], "alive.node"),
            _inc(items[2], "alive.incarnation"),
            _bytes(items[3], "alive.meta", MAX_META_LEN),
            _bool(items[4], "alive.reachable"),
        )
    if kind in (1, 2) and type(kind) is int:
        _list(items, "suspect/dead", 4)
        cls = Suspect if kind == 1 else Dead
        return cls(
            _id(items[1], "update.node"), _inc(items[2], "update.incarnation"), _id(items[3], "update.source")
        )
    if kind == 3 and type(kind) is int:
        _list(items, "left", 3)
        return Left(_id(items[1], "left.node"), _inc(items[2], "left.incarnation"))
    raise _bad(f"unknown update type {kind!r}")


def _updates(x: Any) -> tuple[Update, ...]:
    return tuple(decode_update(u) for u in _list(x, "updates", max_len=MAX_UPDATES))


def _state(x: Any) -> MemberState:
    items = _list(x, "state", 5)
    return MemberState(
        _id(items[0], "state.node"),
        _inc(items[1], "state.incarnation"),
        _int(items[2], "state.status", 3),
        _bytes(items[3], "state.meta", MAX_META_LEN),
        _bool(items[4], "state.reachable"),
    )


def _states(x: Any) -> tuple[MemberState, ...]:
    return tuple(_state(s) for s in _list(x, "states", max_len=MAX_STATES))


def _blobs(x: Any) -> tuple[bytes, ...]:
    return tuple(_bytes(b, "blob", MAX_BLOB_LEN) for b in _list(x, "blobs", max_len=MAX_BLOBS))


def decode_message(x: Any) -> Message:
    """Inverse of :func:`encode_message`; raises ProtocolError on anything malformed."""
    items = _list(x, "message")
    if not items or type(items[0]) is not int:
        raise _bad("missing message type")
    t = items[0]
    if t == 1:
        _list(items, "ping", 5)
        return Ping(_int(items[1], "seq"), _id(items[2], "ping.target"), _updates(items[4]), _int(items[3], "flags", 255))
    if t == 2:
        _list(items, "ping-req", 4)
        return PingReq(_int(items[1], "seq"), _id(items[2], "ping-req.target"), _updates(items[3]))
    if t == 3:
        _list(items, "ack", 3)
        return Ack(_int(items[1], "seq"), _updates(items[2]))
    if t == 4:
        _list(items, "nack", 3)
        return Nack(_int(items[1], "seq"), _updates(items[2]))
    if t == 5:
        _list(items, "gossip", 2)
        return Gossip(_updates(items[1]))
    if t == 6:
        _list(items, "push-pull request", 4)
        return PushPullRequest(_states(items[2]), _blobs(items[3]), _bool(items[1], "join"))
    if t == 7:
        _list(items, "push-pull response", 3)
        return PushPullResponse(_states(items[1]), _blobs(items[2]))
    raise _bad(f"unknown message type {t}")


def from_bytes(data: bytes) -> Message:
    """Decode msgpack bytes; raises only ProtocolError for any input."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _bad("not bytes")
    if len(data) > MAX_MESSAGE_BYTES:
        raise _bad("message too large")
    try:
        obj = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # noqa: BLE001  (msgpack raises many types on garbage; all mean the same)
        raise _bad(f"not msgpack ({type(exc).__name__})") from None
    return decode_message(obj)
