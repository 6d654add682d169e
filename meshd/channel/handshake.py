"""End-to-end channel keys: an ephemeral X25519 exchange signed by both site keys (pure).

Theory of operation
-------------------
Two messages, initiator (the sending site) → responder (the receiving site) and back::

    Hello  = ver | 1 | channel_id(16) | initiator(32) | responder(32) | eph_i(32) | nonce(16)
             | time_ms(u64) | n(u8) | ciphers(n) | sig_i(64)
    Accept = ver | 2 | channel_id(16) | eph_r(32) | cipher(u8) | sig_r(64)

``sig_i`` is the initiator's Ed25519 signature of ``HELLO_DOMAIN + Hello-without-sig``; it binds
both site keys (so a Hello made for B is refused by C: no identity misbinding), the channel id,
the initiator's ephemeral key, a fresh nonce and the time.  ``sig_r`` is the responder's
signature of ``ACCEPT_DOMAIN + BLAKE2b(Hello) + Accept-without-sig``: it binds the whole Hello
(both site keys, both ephemeral keys, channel id, nonce, offered ciphers) and the chosen cipher.

Keys: libsodium ``crypto_kx`` (initiator = client, responder = server) gives one 32-byte key per
direction; each is then bound to the transcript: ``BLAKE2b-256(key=kx_key, data=th | direction,
person="meshd-chan-key")`` with ``th = BLAKE2b-256(Hello | Accept-without-sig, person="meshd-chan-th")``.

A relay that forwards these messages sees two public ephemeral keys and learns nothing; it
cannot substitute an ephemeral key or a cipher (both signatures break), move an Accept to another
Hello (the Accept signs the hash of its Hello), or move a Hello to another responder.

Replay: a replayed Hello must not make the responder answer again (a daemon would otherwise
reset a live channel).  The Hello carries the initiator's clock; the responder refuses it when it
lies more than ``MAX_SKEW`` from its own ``now``, and remembers ``(channel_id, nonce)`` of every
Hello it accepted until that window has passed.  So the replay cache needs only the window, and
its size bound (``max_remembered``) never forces it to forget a Hello that could still be
replayed: when full of live entries it refuses new Hellos (``busy``) rather than evict.  The
cache is in memory, so a restarted responder is made with ``not_before`` = its start time and
refuses older Hellos (the initiator retries with a fresh one).

The responder learns that the initiator is live only when the first frame sealed with the new
keys arrives; until then the channel is unconfirmed (the keys are useless to a replayer).

Every failure raises :class:`~meshd.errors.ProtocolError` with one of these reasons:

=====================  ===================================================================
``truncated``          shorter than the message's fixed size
``oversized``          longer than it
``version``            an unknown protocol version
``malformed``          wrong message type, cipher list empty/too long/with unknown or repeated ids
``wrong-responder``    a Hello addressed to another site key
``unknown-peer``       a Hello from a site key the responder does not accept channels from
``wrong-channel``      an Accept for another channel id than the one we opened
``bad-signature``      a signature does not verify under the expected site key (an Accept
                       from any other site than the responder we named fails here)
``stale``/``future``   the Hello's time lies more than ``MAX_SKEW`` before/after ``now``
                       (``stale`` also: made before the responder's ``not_before``)
``replay``             this Hello (channel id + nonce) was already accepted
``busy``               the replay cache is full of live entries
``bad-eph-key``        an ephemeral key is a low-order or otherwise unusable X25519 point
``no-common-cipher``   no cipher both sides support
``done``               an Accept after the handshake has completed
=====================  ===================================================================
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import secrets
import struct
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field

import nacl.bindings
import nacl.exceptions

from meshd.errors import LocalError, ProtocolError
from meshd.trust.identity import SiteKey, verify_signature

from .frames import AES256GCM, CHACHA20POLY1305, CIPHERS, DIR_I2R, DIR_R2I

__all__ = [
    "ACCEPT_SIZE",
    "HELLO_MAX_SIZE",
    "HELLO_MIN_SIZE",
    "MAX_SKEW",
    "VERSION",
    "ChannelKeys",
    "Initiator",
    "Responder",
    "choose_cipher",
]

VERSION = 1
MAX_SKEW = 600.0
"""Seconds a Hello's time may differ from the responder's clock (as signed records allow)."""
_SKEW_MS = int(MAX_SKEW * 1000)
HELLO_DOMAIN = b"meshd-channel-hello-v1\x00"
ACCEPT_DOMAIN = b"meshd-channel-accept-v1\x00"
_T_HELLO = 1
_T_ACCEPT = 2
_MAX_CIPHERS = 4
_HELLO_HEAD = struct.Struct(">BB16s32s32s32s16sQB")  # … up to n, then ciphers, then sig
HELLO_MIN_SIZE = _HELLO_HEAD.size + 1 + 64
HELLO_MAX_SIZE = _HELLO_HEAD.size + _MAX_CIPHERS + 64
_ACCEPT_BODY = struct.Struct(">BB16s32sB")
ACCEPT_SIZE = _ACCEPT_BODY.size + 64


def _fail(reason: str, message: str) -> ProtocolError:
    return ProtocolError(f"channel handshake: {message}", reason=reason)


def _hash(data: bytes, person: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32, person=person).digest()


@dataclass(frozen=True, slots=True)
class ChannelKeys:
    """What a completed handshake gives one side.  ``repr`` never shows the keys."""

    channel_id: bytes
    initiator: bool
    """True on the side that sent the Hello."""
    peer: bytes
    """The other side's Ed25519 site key (verified)."""
    cipher: int
    """The agreed AEAD, ``frames.AES256GCM`` or ``frames.CHACHA20POLY1305``."""
    send_direction: int
    recv_direction: int
    transcript_hash: bytes
    send_key: bytes = field(repr=False)
    recv_key: bytes = field(repr=False)


def choose_cipher(offered: Sequence[int], mine: Sequence[int]) -> int | None:
    """The cipher for a channel: AES-256-GCM only if both sides rank it first (both have fast
    AES), else ChaCha20-Poly1305 if both support it, else any cipher both support, else None.

    AES without hardware support is several times slower than ChaCha20 (see bench/cipher.py),
    so one slow side is enough to pick ChaCha20-Poly1305."""
    if offered and mine and offered[0] == mine[0] == AES256GCM:
        return AES256GCM
    if CHACHA20POLY1305 in offered and CHACHA20POLY1305 in mine:
        return CHACHA20POLY1305
    for c in mine:
        if c in offered:
            return c
    return None


def _derive(kx_key: bytes, th: bytes, direction: int) -> bytes:
    return hashlib.blake2b(
        th + bytes([direction]), digest_size=32, key=kx_key, person=b"meshd-chan-key"
    ).digest()


def _parse_ciphers(raw: bytes) -> tuple[int, ...]:
    ids = tuple(raw)
    if not ids or len(ids) > _MAX_CIPHERS or len(set(ids)) != len(ids):
        raise _fail("malformed", "bad cipher list")
    if any(c not in CIPHERS for c in ids):
        raise _fail("malformed", f"unknown cipher id in {list(ids)}")
    return ids


def _check_ciphers(ciphers: Sequence[int]) -> tuple[int, ...]:
    ids = tuple(ciphers)
    if not ids or len(ids) > _MAX_CIPHERS or len(set(ids)) != len(ids) or any(
        c not in CIPHERS for c in ids
    ):
        raise LocalError(f"bad cipher preference {list(ids)}", reason="bad-ciphers")
    return ids


def _check_time(now: float) -> int:
    if not (0 <= now < 2**53 / 1000):
        raise LocalError(f"now={now!r} is not a usable time", reason="bad-time")
    return int(now * 1000)


class Initiator:
    """The side that opens a channel.  Make it, send :attr:`hello`, feed the answer to
    :meth:`on_accept`.  Bad Accepts raise and leave the state usable, so a forged Accept from a
    relay cannot stop the real one from completing the handshake."""

    __slots__ = (
        "_channel_id",
        "_ciphers",
        "_done",
        "_eph_pk",
        "_eph_sk",
        "_responder",
        "_site",
        "hello",
    )

    def __init__(
        self,
        site_key: SiteKey,
        responder: bytes,
        channel_id: bytes,
        *,
        now: float,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
        ciphers: Sequence[int] = (AES256GCM, CHACHA20POLY1305),
    ) -> None:
        """``randbytes`` must be a cryptographic source outside tests (never ``random``)."""
        if not isinstance(responder, bytes) or len(responder) != 32:
            raise LocalError("a responder site key is 32 bytes", reason="bad-key")
        if responder == site_key.public:
            raise LocalError("a channel to oneself", reason="bad-key")
        if not isinstance(channel_id, bytes) or len(channel_id) != 16:
            raise LocalError("a channel id is 16 bytes", reason="bad-channel-id")
        self._site = site_key
        self._responder = responder
        self._channel_id = channel_id
        self._ciphers = _check_ciphers(ciphers)
        self._eph_pk, self._eph_sk = nacl.bindings.crypto_kx_seed_keypair(randbytes(32))
        nonce = randbytes(16)
        body = _HELLO_HEAD.pack(VERSION, _T_HELLO, channel_id, site_key.public, responder,
                                self._eph_pk, nonce, _check_time(now),
                                len(self._ciphers)) + bytes(self._ciphers)
        self.hello: bytes = body + site_key.sign(HELLO_DOMAIN + body)
        """The Hello to send (the same bytes may be resent until the Accept arrives)."""
        self._done = False

    def on_accept(self, data: bytes) -> ChannelKeys:
        """Check the responder's Accept and derive the keys; ProtocolError if it is bad."""
        if self._done:
            raise _fail("done", "the handshake has already completed")
        if len(data) < ACCEPT_SIZE:
            raise _fail("truncated", f"Accept of {len(data)} bytes")
        if len(data) > ACCEPT_SIZE:
            raise _fail("oversized", f"Accept of {len(data)} bytes")
        body, sig = bytes(data[: _ACCEPT_BODY.size]), bytes(data[_ACCEPT_BODY.size :])
        ver, kind, channel_id, eph_r, cipher = _ACCEPT_BODY.unpack(body)
        if ver != VERSION:
            raise _fail("version", f"Accept of version {ver}")
        if kind != _T_ACCEPT:
            raise _fail("malformed", f"message type {kind} where an Accept was expected")
        if not hmac.compare_digest(channel_id, self._channel_id):
            raise _fail("wrong-channel", "Accept for another channel")
        hello_hash = _hash(self.hello, b"meshd-chan-hello")
        if not verify_signature(self._responder, ACCEPT_DOMAIN + hello_hash + body, sig):
            raise _fail("bad-signature", "Accept not signed by the responder over our Hello")
        if cipher not in self._ciphers:
            raise _fail("no-common-cipher", f"Accept chose cipher {cipher} we did not offer")
        try:
            rx, tx = nacl.bindings.crypto_kx_client_session_keys(self._eph_pk, self._eph_sk,
                                                                 eph_r)
        except nacl.exceptions.CryptoError:
            raise _fail("bad-eph-key", "unusable responder ephemeral key") from None
        th = _hash(self.hello + body, b"meshd-chan-th")
        self._done = True
        self._eph_sk = b""  # forget the ephemeral secret (as far as Python lets us)
        return ChannelKeys(channel_id=self._channel_id, initiator=True, peer=self._responder,
                           cipher=cipher, send_direction=DIR_I2R, recv_direction=DIR_R2I,
                           transcript_hash=th, send_key=_derive(tx, th, DIR_I2R),
                           recv_key=_derive(rx, th, DIR_R2I))


class Responder:
    """The side that accepts channels: one per site, long-lived (it holds the replay cache).

    ``site_key`` is the key itself (a fixed key) or a provider called at each Hello: a running
    site passes ``lambda: keys.key`` so that a key rotation reaches the responder at once, while
    the replay cache carries over the rotation."""

    __slots__ = ("_ciphers", "_expiry", "_max", "_not_before_ms", "_randbytes", "_seen",
                 "_site")

    def __init__(
        self,
        site_key: SiteKey | Callable[[], SiteKey],
        *,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
        ciphers: Sequence[int] = (AES256GCM, CHACHA20POLY1305),
        max_remembered: int = 65536,
        not_before: float = 0.0,
    ) -> None:
        """``not_before``: refuse Hellos made before this time (as ``stale``).  Pass the start
        time of the process: the replay cache lives in memory, so without it a Hello accepted
        just before a restart could be replayed just after."""
        if max_remembered < 1:
            raise LocalError("max_remembered must be at least 1", reason="bad-config")
        self._site: Callable[[], SiteKey] = (
            site_key if callable(site_key) else (lambda: site_key))
        self._ciphers = _check_ciphers(ciphers)
        self._randbytes = randbytes
        self._max = max_remembered
        self._not_before_ms = _check_time(not_before)
        self._seen: set[bytes] = set()
        self._expiry: list[tuple[int, bytes]] = []  # heap of (forget after ms, channel_id+nonce)

    @property
    def remembered(self) -> int:
        """How many accepted Hellos the replay cache holds now."""
        return len(self._seen)

    def _prune(self, now_ms: int) -> None:
        # An entry is forgotten exactly when its Hello would be refused as stale.
        while self._expiry and self._expiry[0][0] < now_ms:
            _, key = heapq.heappop(self._expiry)
            self._seen.discard(key)

    def on_hello(self, data: bytes, *, now: float,
                 peers: Container[bytes]) -> tuple[bytes, ChannelKeys]:
        """Check a Hello from one of ``peers`` (site keys allowed to open channels to us) and
        return ``(accept_bytes, keys)``; ProtocolError if it is bad, replayed or not for us."""
        now_ms = _check_time(now)
        if len(data) < HELLO_MIN_SIZE:
            raise _fail("truncated", f"Hello of {len(data)} bytes")
        if len(data) > HELLO_MAX_SIZE:
            raise _fail("oversized", f"Hello of {len(data)} bytes")
        data = bytes(data)
        (ver, kind, channel_id, initiator, responder, eph_i, nonce, t_ms,
         n) = _HELLO_HEAD.unpack_from(data)
        if ver != VERSION:
            raise _fail("version", f"Hello of version {ver}")
        if kind != _T_HELLO:
            raise _fail("malformed", f"message type {kind} where a Hello was expected")
        expected = _HELLO_HEAD.size + n + 64
        if len(data) < expected:
            raise _fail("truncated", f"Hello of {len(data)} bytes, {expected} expected")
        if len(data) > expected:
            raise _fail("oversized", f"Hello of {len(data)} bytes, {expected} expected")
        body, sig = data[:-64], data[-64:]
        offered = _parse_ciphers(body[_HELLO_HEAD.size :])
        site = self._site()  # the current key: read at each Hello, never kept
        if not hmac.compare_digest(responder, site.public):
            raise _fail("wrong-responder", "Hello addressed to another site")
        if initiator not in peers:
            raise _fail("unknown-peer", "Hello from a site we take no channels from")
        if not verify_signature(initiator, HELLO_DOMAIN + body, sig):
            raise _fail("bad-signature", "Hello not signed by its initiator")
        if t_ms + _SKEW_MS < now_ms or t_ms < self._not_before_ms:
            raise _fail("stale", "Hello too old (or the clocks differ by more than MAX_SKEW)")
        if t_ms > now_ms + _SKEW_MS:
            raise _fail("future", "Hello from the future (clocks differ by more than MAX_SKEW)")
        key = channel_id + nonce
        self._prune(now_ms)
        if key in self._seen:
            raise _fail("replay", "Hello already accepted")
        if len(self._seen) >= self._max:
            raise _fail("busy", "too many recent channel handshakes")
        cipher = choose_cipher(offered, self._ciphers)
        if cipher is None:
            raise _fail("no-common-cipher", f"no common cipher in {list(offered)}")
        eph_pk, eph_sk = nacl.bindings.crypto_kx_seed_keypair(self._randbytes(32))
        try:
            rx, tx = nacl.bindings.crypto_kx_server_session_keys(eph_pk, eph_sk, eph_i)
        except nacl.exceptions.CryptoError:
            raise _fail("bad-eph-key", "unusable initiator ephemeral key") from None
        self._seen.add(key)
        heapq.heappush(self._expiry, (t_ms + _SKEW_MS, key))
        a_body = _ACCEPT_BODY.pack(VERSION, _T_ACCEPT, channel_id, eph_pk, cipher)
        hello_hash = _hash(data, b"meshd-chan-hello")
        accept = a_body + site.sign(ACCEPT_DOMAIN + hello_hash + a_body)
        th = _hash(data + a_body, b"meshd-chan-th")
        keys = ChannelKeys(channel_id=channel_id, initiator=False, peer=initiator, cipher=cipher,
                           send_direction=DIR_R2I, recv_direction=DIR_I2R, transcript_hash=th,
                           send_key=_derive(tx, th, DIR_R2I), recv_key=_derive(rx, th, DIR_I2R))
        return accept, keys
