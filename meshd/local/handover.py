"""The hand-over socket: how a daemon gives its application a channel's data connection.

``<home>/handover.sock`` is a unix stream socket, mode 0600 in the 0700 state directory (only
the site's user connects).  An application opens one connection per sending channel and keeps
it for the channel's life: the daemon takes its end of file as the application's death.  Both
ways the stream is a sequence of messages::

    message = length u32 (big-endian) | msgpack map (length bytes, at most 64 KiB)

Application -> daemon::

    {"t": "take", "id": hex}            this connection serves channel ``id`` (first message)
    {"t": "lost", "cs": int, "co": int} the data connection broke: resume the channel; ``cs`` /
                                        ``co`` are the control seqs the application's sealer
                                        would use next / its opener takes from
    {"t": "count", "messages", "bytes", "acked", "retransmits", "buffered"}
                                        the channel's counters, for ``meshd channels``

Daemon -> application::

    {"t": "grant", "cid", "cipher", "sk", "rk", "sd", "rd", "cs", "co", "ms", "mb",
     "fb": [ack, max_seq, max_bytes, gap] | nil, "path", "left"}
                                        with ONE descriptor (SCM_RIGHTS) in the same
                                        ``sendmsg``: the connected data socket, and the
                                        :class:`~meshd.channel.stream.Grant` to run it with
    {"t": "ended", "reason", "message"} the channel ended on its own (``revoked``,
                                        ``no-path``, ``failed``) or cannot be taken
                                        (``not-found``, ``not-handover``)

Receiving ends (a receiver's channels) go to the application the same way, over one connection
per receiver (the lease of all its channels).  Application -> daemon::

    {"t": "receive", "port": hex}       this connection serves the receiver whose open answer
                                        carried ``port`` (first message)
    {"t": "lost", "id": hex, "cs", "co", "rx": [5 ints], "m", "b", "closed", "why"}
                                        channel ``id``'s data connection broke (or was yielded;
                                        ``why``: a line for the daemon's log): the daemon goes
                                        on from this state (:class:`~meshd.channel.inbound.InGrant`)
    {"t": "finished", "id": hex, "m", "b"}
                                        the sender closed channel ``id`` and every message was
                                        delivered: the daemon forgets it and sends the end
                                        notice on the receiver's ipc socket
    {"t": "count", "id": hex, "m", "b", "dup"}
                                        a channel's counters, for ``meshd channels``
    {"t": "adopt-in", <the fields of grant-in>, "ce": int, "live": bool}
                                        a channel this application holds, offered to a daemon
                                        that restarted under it (``ce``: the end of its lease
                                        of control seqs; ``live``: it still holds a working
                                        connection, else the daemon waits for the sender to
                                        resume); the daemon refuses it with ``cut`` and
                                        ``tell``

Daemon -> application::

    {"t": "grant-in", "cid", "cipher", "sk", "rk", "sd", "rd", "cs", "co", "rx", "m", "b",
     "closed", "name", "sender", "sname", "path", "left"}
                                        with ONE descriptor: a channel's data socket and its
                                        receiving end (``m``: the number of its next message;
                                        those before it came over the ipc socket)
    {"t": "yield", "id": hex}           the sender resumed channel ``id`` on a new connection:
                                        give the channel back (``lost``)
    {"t": "cut", "id": hex, "reason", "message", "tell"?}
                                        channel ``id`` ended (its sender revoked): deliver
                                        nothing more of it; with ``tell`` (an ``adopt-in``
                                        refused) no end notice follows: the application ends
                                        the channel itself, after what it holds

The keys in a grant are the channel's two direction keys (``sk`` the application seals with,
``rk`` it opens the receiver's feedback with), nothing else: no site key, no other channel's.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import replace
from typing import Any, NamedTuple

import msgpack

from meshd.channel.events import Feedback
from meshd.channel.inbound import InGrant
from meshd.channel.stream import Grant
from meshd.errors import LocalError, ProtocolError

__all__ = ["MAX_MESSAGE", "SOCKET_NAME", "InGrantInfo", "MessageReader", "as_bytes", "as_count",
           "decode_adopt_in",
           "decode_grant", "decode_in_grant", "decode_state", "encode_adopt_in", "encode_grant",
           "encode_in_grant", "encode_state", "pack", "recv_messages", "send_message"]

SOCKET_NAME = "handover.sock"
MAX_MESSAGE = 64 << 10
_LEN = struct.Struct(">I")


def pack(msg: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(msg, use_bin_type=True)
    return _LEN.pack(len(body)) + body


def as_count(value: Any) -> int:
    """``value``, a number field of a message: an integer from 0 to 2**64 - 1; ValueError if it
    is anything else (a float, ``inf``, a bool, a string)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 64:
        raise ValueError(f"a number field is {type(value).__name__} {str(value)[:20]}")
    return value


def as_bytes(value: Any) -> bytes:
    """``value``, a binary field of a message; ValueError if it is anything else.  Never
    ``bytes(value)``: an integer there would make that many zero bytes (a one-line message
    asking a daemon for gigabytes)."""
    if not isinstance(value, bytes):
        raise ValueError(f"a binary field is {type(value).__name__}")
    return value


def encode_grant(g: Grant) -> dict[str, Any]:
    fb = None if g.feedback is None else [g.feedback.ack, g.feedback.max_seq,
                                          g.feedback.max_bytes, g.feedback.gap]
    return {"t": "grant", "cid": g.cid, "cipher": g.cipher, "sk": g.send_key, "rk": g.recv_key,
            "sd": g.send_direction, "rd": g.recv_direction, "cs": g.ctl_seal, "co": g.ctl_open,
            "ms": g.max_seq, "mb": g.max_bytes, "fb": fb, "path": g.path, "peer": g.peer,
            "left": g.leftover, "relay": g.relay}


def decode_grant(m: dict[str, Any]) -> Grant:
    """The grant in a message; ProtocolError (``malformed``) if it is not one."""
    try:
        fb = m["fb"]
        return Grant(as_bytes(m["cid"]), int(m["cipher"]), as_bytes(m["sk"]), as_bytes(m["rk"]),
                     int(m["sd"]), int(m["rd"]), int(m["cs"]), int(m["co"]), int(m["ms"]),
                     int(m["mb"]),
                     None if fb is None else Feedback(int(fb[0]), int(fb[1]), int(fb[2]),
                                                      bool(fb[3])),
                     str(m["path"]), as_bytes(m["peer"]), as_bytes(m["left"]),
                     None if m.get("relay") is None else as_bytes(m["relay"]))
    except (KeyError, TypeError, ValueError, IndexError):
        raise ProtocolError("malformed grant", reason="malformed") from None


def encode_state(g: InGrant) -> dict[str, Any]:
    """The fields of a receiving end's state (in ``lost`` and ``grant-in``)."""
    return {"id": g.cid.hex(), "cs": g.ctl_seal, "co": g.ctl_open, "rx": list(g.rx),
            "m": g.messages, "b": g.nbytes, "closed": g.closed}


def decode_state(m: dict[str, Any], base: InGrant) -> InGrant:
    """``base`` with the state fields of message ``m`` (an application's ``lost``);
    ProtocolError (``malformed``) if they are not there or not of their types."""
    try:
        rx = tuple(int(v) for v in m["rx"])
        if len(rx) != 5 or not all(isinstance(v, int) and not isinstance(v, bool)
                                   for v in m["rx"]):
            raise ValueError
        for k in ("cs", "co", "m", "b"):
            if not isinstance(m[k], int) or isinstance(m[k], bool) or m[k] < 0:
                raise ValueError
        return replace(base, ctl_seal=m["cs"], ctl_open=m["co"],
                       rx=(rx[0], rx[1], rx[2], rx[3], rx[4]), messages=m["m"], nbytes=m["b"],
                       closed=bool(m["closed"]))
    except (KeyError, TypeError, ValueError):
        raise ProtocolError("malformed receiving state", reason="malformed") from None


class InGrantInfo(NamedTuple):
    """A ``grant-in`` message: the receiving end and where it comes from."""

    grant: InGrant
    sender_name: str
    path: str
    leftover: bytes
    window: tuple[int, int] | None = None
    """The receiving site's window (messages, bytes), which the application's end keeps."""
    ipc_until: int = 0
    """The number after the last message of the channel that the daemon delivered over this
    receiver's ipc socket (0: none).  The application hands out the link's messages after
    those; what went to an earlier receiver (closed since) it never waits for."""
    relay: bytes | None = None
    """The relay's site key on a relayed path (a daemon that restarts is told it again)."""


def encode_in_grant(g: InGrant, sender_name: str, path: str, left: bytes,
                    window: tuple[int, int], ipc_until: int = 0,
                    relay: bytes | None = None) -> dict[str, Any]:
    return {"t": "grant-in", **encode_state(g), "cid": g.cid, "cipher": g.cipher,
            "sk": g.send_key, "rk": g.recv_key, "sd": g.send_direction,
            "rd": g.recv_direction, "name": g.name, "sender": g.sender, "sname": sender_name,
            "path": path, "left": left, "wm": window[0], "wb": window[1], "iu": ipc_until,
            "relay": relay}


def decode_in_grant(m: dict[str, Any]) -> InGrantInfo:
    """The receiving end in a ``grant-in``; ProtocolError (``malformed``) if it is not one."""
    try:
        base = InGrant(as_bytes(m["cid"]), int(m["cipher"]), as_bytes(m["sk"]),
                       as_bytes(m["rk"]),
                       int(m["sd"]), int(m["rd"]), 0, 0, (0, 0, 0, 0, 0), 0, 0, False,
                       str(m["name"]), as_bytes(m["sender"]))
        wm, wb = m.get("wm"), m.get("wb")
        window = (wm, wb) if isinstance(wm, int) and isinstance(wb, int) else None
        state = decode_state(m, base)
        ipc_until = m.get("iu", 0)
        if (not isinstance(ipc_until, int) or isinstance(ipc_until, bool)
                or not 0 <= ipc_until <= state.messages):
            raise ValueError("ipc_until")
        relay = m.get("relay")
        return InGrantInfo(state, str(m["sname"]), str(m["path"]), as_bytes(m["left"]), window,
                           ipc_until, None if relay is None else as_bytes(relay))
    except (KeyError, TypeError, ValueError):
        raise ProtocolError("malformed grant", reason="malformed") from None


def encode_adopt_in(g: InGrant, ctl_end: int, sender_name: str, path: str,
                    live: bool, relay: bytes | None = None) -> dict[str, Any]:
    """``adopt-in``: a receiving application offers a channel it holds (state ``g``, its lease
    of control seqs ending at ``ctl_end``, its path and relay) to a daemon that does not know
    it (restarted); ``live``: it still holds a working connection (else the daemon waits for
    the sender to resume the channel)."""
    return {**encode_in_grant(g, sender_name, path, b"", (0, 0), relay=relay),
            "t": "adopt-in", "ce": ctl_end, "live": live}


def decode_adopt_in(m: dict[str, Any]) -> tuple[InGrantInfo, int, bool]:
    """``(state, ctl_end, live)`` of an ``adopt-in``; ProtocolError (``malformed``) if it is
    not one."""
    info = decode_in_grant(m)
    ce, live = m.get("ce"), m.get("live")
    if not isinstance(ce, int) or isinstance(ce, bool) or ce < 0 or not isinstance(live, bool):
        raise ProtocolError("malformed adopt-in", reason="malformed")
    return info, ce, live


class MessageReader:
    """Splits the hand-over stream into messages (sans-IO)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out: list[dict[str, Any]] = []
        while len(self._buf) >= _LEN.size:
            (n,) = _LEN.unpack_from(self._buf)
            if n > MAX_MESSAGE:
                raise ProtocolError(f"hand-over message of {n} bytes", reason="oversized")
            if len(self._buf) < _LEN.size + n:
                break
            body = bytes(self._buf[_LEN.size:_LEN.size + n])
            del self._buf[:_LEN.size + n]
            try:
                msg = msgpack.unpackb(body, raw=False)
            except Exception:
                raise ProtocolError("hand-over message is not msgpack",
                                    reason="malformed") from None
            if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
                raise ProtocolError("hand-over message without a type", reason="malformed")
            out.append(msg)
        return out


def send_message(sock: socket.socket, msg: dict[str, Any], fd: int | None = None) -> None:
    """Send one message (with ``fd`` attached) on a blocking or non-blocking unix socket;
    OSError if the socket cannot take it whole now."""
    data = pack(msg)
    sent = socket.send_fds(sock, [data], [fd]) if fd is not None else sock.send(data)
    if sent != len(data):  # tiny messages on an idle unix socket go whole, or not at all
        raise OSError("the hand-over socket took a partial message")


def recv_messages(sock: socket.socket, reader: MessageReader,
                  fds: list[int]) -> list[dict[str, Any]]:
    """Read once from ``sock`` (blocking as the socket is): the whole messages now complete,
    with every descriptor received appended to ``fds`` in order.  LocalError (``closed``) at
    end of file."""
    data, got, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 4)
    fds.extend(got)
    if not data:
        raise LocalError("the daemon closed the hand-over socket", reason="closed")
    return reader.feed(data)
