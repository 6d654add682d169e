"""What travels on a data connection between two daemons, before and around the frames (pure).

A data connection is a plain TCP connection to a site's one peer port (the port multiplexer
tells it from ZeroMQ by its first byte).  It carries *records*::

    type u8 | length u32 (big-endian) | body (length bytes)

``PREAMBLE``  first record from the dialer, always: a msgpack map saying what the connection is
              for (below).  Never trusted for anything but routing: the end-to-end handshake or
              an authentic frame is what binds a connection to a channel.
``HELLO``     the channel handshake's Hello (initiator = the channel's sender), raw bytes
``ACCEPT``    the handshake's Accept (responder = the channel's receiver), raw bytes
``FRAME``     one AEAD frame (:mod:`.frames`): data from sender to receiver, control both ways
``REFUSE``    a plain-text reason (hint only, unauthenticated) just before the closing side
              closes
``ROTATIONS`` the answer to a ``rotations`` preamble: a msgpack array of signed rotations
              (raw bytes, oldest first), then the answering side closes.  Unauthenticated like
              the connection; each rotation is signed, and the asker checks them all

Preamble fields (every one required, no other allowed)::

    v      1
    mode   "direct"  a connection between the channel's two ends
           "relay"   a leg to a relay, which pairs it with the other end's leg
           "probe"   a reachability dial-back: the dialer closes right after
           "rotations"  which rotations of this site hand over ``to`` (a key of this site the
                     dialer knows, from before rotations it missed): answered with one
                     ``ROTATIONS`` record (see :mod:`meshd.daemon.rekeys`)
    cid    16 B     the channel id (zeros for a probe)
    from   32 B     the dialer's site key
    to     32 B     the site at the far end of the channel (for a probe: the site dialed)
    role   "s"/"r"  the dialer is the channel's sender / receiver
    relay  32 B     the relay's site key (mode relay), else empty
    t      int      milliseconds since the epoch when made
    sig    64 B     Ed25519 by ``from`` over the domain and the other fields (mode relay), else
                    empty: a relay must know that both legs come from members before it spends
                    anything on them; the ends authenticate each other with the handshake.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from meshd.errors import ProtocolError
from meshd.trust.identity import SiteKey, verify_signature

from .frames import FRAME_OVERHEAD, MAX_PAYLOAD

__all__ = [
    "ACCEPT",
    "FRAME",
    "HELLO",
    "MAX_RECORD",
    "MAX_ROTATIONS",
    "MIN_RECORD_RATE",
    "PREAMBLE",
    "RECORD_HEADER",
    "REFUSE",
    "ROTATIONS",
    "STALL_TIMEOUT",
    "Preamble",
    "RecordReader",
    "decode_preamble",
    "encode_preamble",
    "record_header",
]

PREAMBLE = 0x50  # "P": never 0xFF, which starts a ZMTP greeting
HELLO = 2
ACCEPT = 3
FRAME = 4
REFUSE = 5
ROTATIONS = 6
TYPES = frozenset({PREAMBLE, HELLO, ACCEPT, FRAME, REFUSE, ROTATIONS})

RECORD_HEADER = struct.Struct(">BI")
MAX_RECORD = MAX_PAYLOAD + FRAME_OVERHEAD
"""Largest record body (a frame of the largest payload)."""
MAX_SMALL = 4096
"""Largest body of any record but FRAME and ROTATIONS."""
MAX_ROTATIONS = 65 * 4096 + 1024
"""Largest body of a ROTATIONS record: 64 rotations and a site record, each of the largest size
of a signed object, and msgpack's framing."""
STALL_TIMEOUT = 15.0
"""Seconds a record being received may go without a byte before its connection is closed (by
the daemon's :class:`~meshd.daemon.channels.connection.DataConnection` and a receiving
application's reader alike)."""
MIN_RECORD_RATE = 1 << 20
"""Bytes per second a record being received must average (after STALL_TIMEOUT of grace)."""

_DOMAIN = b"meshd-link-preamble-v1\x00"
_MODES = ("direct", "relay", "probe", "rotations")
_MAX_SKEW_MS = 600_000


def record_header(kind: int, length: int) -> bytes:
    return RECORD_HEADER.pack(kind, length)


def check_record(kind: int, length: int) -> None:
    """ProtocolError unless a record of this type may have this length."""
    if kind not in TYPES:
        raise ProtocolError(f"unknown record type {kind}", reason="malformed")
    limit = MAX_RECORD if kind == FRAME else MAX_ROTATIONS if kind == ROTATIONS else MAX_SMALL
    if length > limit:
        raise ProtocolError(f"record of {length} bytes (type {kind}) exceeds {limit}",
                            reason="oversized")


@dataclass(frozen=True, slots=True)
class Preamble:
    mode: str
    cid: bytes
    sender: bytes
    """``from``: the dialer's site key."""
    to: bytes
    role: str
    relay: bytes = b""
    t: int = 0
    sig: bytes = b""

    def body(self) -> bytes:
        packed: bytes = msgpack.packb([self.mode, self.cid, self.sender, self.to, self.role,
                                       self.relay, self.t], use_bin_type=True)
        return _DOMAIN + packed

    def signed(self, key: SiteKey) -> Preamble:
        return Preamble(self.mode, self.cid, self.sender, self.to, self.role, self.relay,
                        self.t, key.sign(self.body()))

    def verify(self, now_ms: int) -> str | None:
        """None if the signature is good and fresh, else why not."""
        if abs(now_ms - self.t) > _MAX_SKEW_MS:
            return "stale"
        if not verify_signature(self.sender, self.body(), self.sig):
            return "bad-signature"
        return None


def encode_preamble(p: Preamble) -> bytes:
    data: bytes = msgpack.packb({"v": 1, "mode": p.mode, "cid": p.cid, "from": p.sender,
                                 "to": p.to, "role": p.role, "relay": p.relay, "t": p.t,
                                 "sig": p.sig}, use_bin_type=True)
    return data


_SPEC: dict[str, tuple[int, int]] = {
    "cid": (16, 16), "from": (32, 32), "to": (32, 32), "relay": (0, 32), "sig": (0, 64),
}


def decode_preamble(data: bytes | bytearray | memoryview) -> Preamble:
    """Parse and check a preamble; ProtocolError (``malformed``) naming what is wrong."""
    if len(data) > MAX_SMALL:
        raise ProtocolError("preamble too large", reason="oversized")
    try:
        m: Any = msgpack.unpackb(bytes(data), raw=False, max_map_len=16, max_str_len=16,
                                 max_bin_len=64, max_array_len=0)
    except Exception:  # msgpack raises several unrelated types on garbage
        raise ProtocolError("preamble is not msgpack", reason="malformed") from None
    if not isinstance(m, dict) or set(m) != {"v", "mode", "cid", "from", "to", "role", "relay",
                                               "t", "sig"}:
        raise ProtocolError("preamble fields missing or unexpected", reason="malformed")
    if m["v"] != 1:
        raise ProtocolError(f"preamble version {m['v']!r}", reason="version")
    if m["mode"] not in _MODES or m["role"] not in ("s", "r"):
        raise ProtocolError("preamble mode or role unknown", reason="malformed")
    for name, (lo, hi) in _SPEC.items():
        v = m[name]
        if not isinstance(v, bytes) or not lo <= len(v) <= hi:
            raise ProtocolError(f"preamble field {name} malformed", reason="malformed")
    t = m["t"]
    if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < 2**63:
        raise ProtocolError("preamble time malformed", reason="malformed")
    if m["mode"] == "relay" and (len(m["relay"]) != 32 or len(m["sig"]) != 64):
        raise ProtocolError("a relay preamble names its relay and is signed", reason="malformed")
    if m["from"] == m["to"]:
        raise ProtocolError("a connection to oneself", reason="malformed")
    return Preamble(m["mode"], m["cid"], m["from"], m["to"], m["role"], m["relay"], t, m["sig"])


class RecordReader:
    """Splits a byte stream into records (sans-IO): :meth:`feed` bytes as they arrive, then
    take the complete records from :meth:`records`.  ``max_body`` bounds every record's body
    (ProtocolError ``oversized`` beyond, and for an unknown type ``malformed``)."""

    __slots__ = ("_buf", "_max")

    def __init__(self, max_body: int = MAX_RECORD) -> None:
        self._buf = bytearray()
        self._max = max_body

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def records(self) -> list[tuple[int, bytearray]]:
        """Every complete record fed so far, in order."""
        out: list[tuple[int, bytearray]] = []
        buf, pos, hs = self._buf, 0, RECORD_HEADER.size
        while len(buf) - pos >= hs:
            kind, length = RECORD_HEADER.unpack_from(buf, pos)
            check_record(kind, length)
            if length > self._max:
                raise ProtocolError(f"record of {length} bytes exceeds {self._max}",
                                    reason="oversized")
            if len(buf) - pos - hs < length:
                break
            out.append((kind, buf[pos + hs:pos + hs + length]))
            pos += hs + length
        if pos:
            del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete record held."""
        return len(self._buf)
