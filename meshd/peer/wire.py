"""The peer protocol's messages and their checked codec (pure).

Every peer message is one ZeroMQ frame holding a msgpack map with string keys.  Requests carry
``t`` (the type), ``id`` (the sender's request number) and the type's fields; the answer to a
request is ``{"t": "ok", "id": …, …}`` or ``{"t": "error", "id": …, "reason": …, "message": …}``.
:func:`decode` checks the size, the type and every field's type and length before anything else
looks at the message; a message that fails raises :class:`~meshd.errors.ProtocolError`.

============  ==========================================================================
``join``      a joiner redeems an invitation: ``mesh`` (16 B), ``invite`` (8 B), ``proof``
              (32 B), ``inviter`` (32 B, whom the invitation names), ``record`` (the joiner's
              signed site record)
``sync``      push-pull of signed objects between members: ``mesh``, ``items`` (list of
              signed envelopes); answered with the other side's ``items``
``rekey``     a site whose key a member does not know presents the rotations that lead to it
              from a key the member holds: ``mesh``, ``items`` (signed rotations, oldest
              first; checked by :mod:`meshd.daemon.rekeys`); the one request besides ``join``
              that a key not in the mesh may send
``swim``      one membership-protocol message (``m``: ``meshd.swim.to_bytes``), one way: the
              membership core matches its own acks, so it is never answered
``chan``      a channel control message (``op``: ``dial``, ``relay``, ``reach?``, ``reach``;
              ``b``: its msgpack body, checked by :mod:`meshd.daemon.channels.service`), one way
``tunl``      a tunnel control message (``op``: ``svc?``, ``svc``; ``b``: its msgpack body,
              checked by :mod:`meshd.tunnel.control`), one way
============  ==========================================================================
"""

from __future__ import annotations

from typing import Any

import msgpack

from meshd.errors import ProtocolError

MAX_MESSAGE_BYTES = 1 << 20
"""Largest peer control message; the peer socket drops a connection that sends a bigger one."""

MAX_ITEMS = 4096
"""Most signed objects one sync message may carry."""

MAX_REKEY_ITEMS = 64
"""Most rotations one ``rekey`` message may carry."""

# field name -> (type, (min length, max length) or None)
_BIN = bytes
_FIELDS: dict[str, dict[str, tuple[type, tuple[int, int] | None]]] = {
    "join": {"mesh": (_BIN, (16, 16)), "invite": (_BIN, (8, 8)), "proof": (_BIN, (32, 32)),
             "inviter": (_BIN, (32, 32)), "record": (_BIN, (1, 4096))},
    "sync": {"mesh": (_BIN, (16, 16)), "items": (list, (0, MAX_ITEMS))},
    "rekey": {"mesh": (_BIN, (16, 16)), "items": (list, (1, MAX_REKEY_ITEMS))},
    "swim": {"m": (_BIN, (1, MAX_MESSAGE_BYTES))},
    "chan": {"op": (str, (1, 16)), "b": (_BIN, (0, 65536))},
    "tunl": {"op": (str, (1, 16)), "b": (_BIN, (0, 65536))},
    "ok": {},
    "error": {"reason": (str, (1, 64)), "message": (str, (0, 1024))},
}
_OPTIONAL: dict[str, dict[str, tuple[type, tuple[int, int] | None]]] = {
    "ok": {"status": (str, (1, 32)), "vouch": (_BIN, (1, 4096)), "items": (list, (0, MAX_ITEMS)),
           "inviter_fp": (str, (1, 32)), "joiner_fp": (str, (1, 32)),
           "inviter_name": (str, (1, 64))},
    "error": {"retry_after": (float, None)},
}


def encode(message: dict[str, Any]) -> bytes:
    """Pack a message (the caller builds it from the fields above)."""
    data: bytes = msgpack.packb(message, use_bin_type=True)
    return data


def decode(data: bytes) -> dict[str, Any]:
    """Unpack and check one peer message; raises ProtocolError naming what is wrong."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}",
                            reason="oversized")
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=MAX_MESSAGE_BYTES,
                              max_str_len=4096, max_array_len=MAX_ITEMS, max_map_len=32)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ProtocolError(f"undecodable message: {type(exc).__name__}",
                            reason="malformed") from None
    if not isinstance(msg, dict):
        raise ProtocolError("message is not a map", reason="malformed")
    kind = msg.get("t")
    if not isinstance(kind, str) or kind not in _FIELDS:
        raise ProtocolError(f"unknown message type {kind!r}", reason="type")
    rid = msg.get("id")
    if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid < 2**63:
        raise ProtocolError("message id missing or not an unsigned integer", reason="malformed")
    required, optional = _FIELDS[kind], _OPTIONAL.get(kind, {})
    for name in msg:
        if name not in ("t", "id") and name not in required and name not in optional:
            raise ProtocolError(f"{kind}: unexpected field {name!r}", reason="malformed")
    for name, spec in required.items():
        if name not in msg:
            raise ProtocolError(f"{kind}: missing field {name!r}", reason="malformed")
        _check(kind, name, msg[name], spec)
    for name, spec in optional.items():
        if name in msg:
            _check(kind, name, msg[name], spec)
    if "items" in msg and not all(isinstance(i, bytes) and len(i) <= 4096 for i in msg["items"]):
        raise ProtocolError(f"{kind}: items must be signed envelopes of at most 4096 bytes",
                            reason="malformed")
    return msg


def _check(kind: str, name: str, value: Any, spec: tuple[type, tuple[int, int] | None]) -> None:
    typ, bounds = spec
    ok = isinstance(value, typ) and not isinstance(value, bool)
    if typ is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise ProtocolError(f"{kind}: field {name!r} must be {typ.__name__}", reason="malformed")
    if bounds is not None:
        lo, hi = bounds
        if not lo <= len(value) <= hi:
            raise ProtocolError(f"{kind}: field {name!r} has length {len(value)},"
                                f" expected {lo}..{hi}", reason="malformed")


def error(rid: int, reason: str, message: str, retry_after: float | None = None) -> dict[str, Any]:
    """An error answer to request ``rid``."""
    out: dict[str, Any] = {"t": "error", "id": rid, "reason": reason[:64], "message": message[:1024]}
    if retry_after is not None:
        out["retry_after"] = float(retry_after)
    return out
