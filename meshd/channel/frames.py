"""AEAD framing of a channel's traffic (pure).

Frame = 32-byte header, authenticated as associated data, then ciphertext and a 16-byte tag::

    version u8 | kind u8 | direction u8 | flags u8 | channel_id 16 B | seq u64 | length u32

``kind`` is ``KIND_DATA`` (the reliable layer's messages; ``seq`` is the delivery sequence) or
``KIND_CONTROL`` (acks, credit, probes; ``seq`` is a separate per-direction counter the sealer
keeps).  ``length`` is the plaintext length.  Integers are big-endian.

Nonce (96 bits) = ``direction | kind | 0 0 | seq u64``.  Each direction has its own key from the
handshake, ``direction`` and ``kind`` are in the nonce as well, and a sealer never seals two
different plaintexts under one ``(kind, seq)`` (the reliable layer resends the *sealed bytes*, it
never re-seals), so no nonce is ever reused under a key.  Because the nonce is derived from the
header's ``seq``, a relay that rewrites ``seq``, moves a frame to another channel or direction,
or flips any bit, makes the tag fail; replay and reordering are then visible as authentic but
unexpected sequence numbers (``open(..., expect_seq=…)`` and the reliable layer refuse them;
control frames must arrive with increasing ``seq``).

Key schedule: frames ``seq`` with the same ``seq >> EPOCH_BITS`` use the key
``BLAKE2b-256(key=direction_key, data=epoch u64, person="meshd-chan-epch")``.  With payloads of
at most ``MAX_PAYLOAD`` (16 MiB + 128 KiB) one key encrypts at most 2**14 * 16 MiB = 256 GiB = 2**34 AES
blocks, inside the AES-GCM margin TLS 1.3 keeps (RFC 8446 §5.5: 2**24.5 records of 16 KiB); a
multi-GB/s stream would cross that per-key limit within minutes without it.

Cipher choice, measured with ``python bench/cipher.py --rounds 2`` (2-core x86-64 with AES-NI,
VAES and VPCLMULQDQ; cryptography 48, pynacl 1.6.2; MB/s, encrypt/decrypt, 2026-12-02; see
docs/performance.md)::

                                    64 B       64 KiB        1 MiB         16 MiB
    pynacl ChaCha20-Poly1305-IETF   16/17      1218/1224     1243/1236     1157/855
    pynacl AES-256-GCM              17/17      3409/3809     3288/3367     2898/2996
    cryptography ChaCha20Poly1305   45/47      3049/3123     3682/3164     3099/3541   (*_into)
    cryptography AESGCM-256         97/112     12139/11537   11312/11241   11951/11455 (*_into)
    cryptography AESGCM-128         92/94      13538/13246   17579/11770   12199/10754 (*_into)
    on cold buffers (a stream's data), encrypt:  AESGCM-256 5292 (1 MiB) / 2424 (16 MiB),
                                                 AESGCM-128 5095 / 2820, ChaCha20 2348 / 1155

(An older figure here, 17-20 GB/s for AESGCM, was a cache-hot loop on another day; from
cache this machine gives 9-12 GB/s, and a real stream 2.4-5.3 GB/s per core.)  ``cryptography``
AES-256-GCM is the default (``AES256GCM``): AES-128-GCM is no faster on cold data, where memory
bounds both, and ChaCha20 is 2-4x slower.  Without AES hardware OpenSSL falls back to
constant-time bitsliced AES, several times slower than ChaCha20, so a site whose CPU lacks AES
acceleration (libsodium's probe, :func:`aes_accelerated`) ranks ``CHACHA20POLY1305`` first and
the handshake then picks ChaCha20-Poly1305 for the channel.  Both are ``cryptography``
(OpenSSL) implementations: pynacl's are slower at every size.

Zero copy: :meth:`Sealer.seal` takes any C-contiguous buffer (bytes, memoryview, numpy array)
without copying it, and encrypts with ``encrypt_into`` straight into the frame after the header,
so sealing costs one pass over the data and one allocation; :meth:`Sealer.seal_into` seals
several buffers as one payload into a buffer the caller reuses (AES-GCM streams through the
pieces, no join); :meth:`Opener.open` decrypts with ``decrypt_into`` from a memoryview of the
frame.  The whole frame path (same run, ``meshd_frames``; AES-GCM, MB/s, hot)::

                                    64 B    64 KiB   1 MiB    16 MiB
    Sealer.seal(numpy array)        27      8592     8782     12493
    Opener.open                     20      7237     8812     11479
    naive: tobytes+encrypt+concat   88      5982     3631     610

so sealing an array costs no copy beyond the encryption itself; at 64 B the few us of Python
per frame dominate: batch small messages above this layer.

Errors: :class:`~meshd.errors.ProtocolError` from :meth:`Opener.open` with reason
``truncated``, ``length``, ``oversized``, ``version``, ``malformed`` (unknown kind),
``wrong-direction``, ``wrong-channel``, ``auth-failed``, ``unexpected-seq``, ``replay``
(a control frame not newer than the last one); :class:`~meshd.errors.LocalError` for caller
misuse (``too-large``, ``bad-seq``, ``not-contiguous``, ``bad-key`` …).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Union, cast

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from meshd.errors import LocalError, ProtocolError

if TYPE_CHECKING:
    import numpy.typing as npt


class FrameKeys(Protocol):
    """What a frame layer needs of :class:`.handshake.ChannelKeys` (typed here, so that this
    module, which the handshake imports, does not import it back)."""

    @property
    def channel_id(self) -> bytes: ...
    @property
    def cipher(self) -> int: ...
    @property
    def send_key(self) -> bytes: ...
    @property
    def recv_key(self) -> bytes: ...
    @property
    def send_direction(self) -> int: ...
    @property
    def recv_direction(self) -> int: ...

Buffer = Union[bytes, bytearray, memoryview, "npt.NDArray[np.generic]"]
"""What ``seal`` takes without copying: any C-contiguous buffer (numpy arrays included)."""
Block = Union[bytearray, memoryview]
"""A writable buffer this layer made: a bytearray, or for big sizes a memoryview (format ``B``)
of memory that was never zero-filled (see :func:`new_block`)."""
BIG_BLOCK = 64 << 10


def new_block(n: int) -> Block:
    """A writable buffer of ``n`` bytes that the caller overwrites entirely.  From 64 KiB on it
    is not zero-filled: ``bytearray(n)`` spends as long filling a 1 MiB frame with zeros (and
    faulting its pages in) as AES-GCM spends encrypting it."""
    if n < BIG_BLOCK:
        return bytearray(n)
    return memoryview(np.empty(n, dtype=np.uint8))  # type: ignore[arg-type]

__all__ = [
    "AES256GCM",
    "CHACHA20POLY1305",
    "CIPHERS",
    "DIR_I2R",
    "DIR_R2I",
    "EPOCH_BITS",
    "FRAME_OVERHEAD",
    "HEADER_SIZE",
    "KIND_CONTROL",
    "KIND_DATA",
    "MAX_PAYLOAD",
    "MAX_SEQ",
    "TAG_SIZE",
    "Buffer",
    "Frame",
    "Opener",
    "Sealer",
    "aes_accelerated",
    "byte_view",
    "frame_size",
    "local_cipher_preference",
]

AES256GCM = 1
CHACHA20POLY1305 = 2
CIPHERS = {AES256GCM: AESGCM, CHACHA20POLY1305: ChaCha20Poly1305}
DIR_I2R = 0
"""Direction of frames from the initiator (sender site) to the responder."""
DIR_R2I = 1
KIND_DATA = 0
KIND_CONTROL = 1
VERSION = 1
_HEADER = struct.Struct(">BBBB16sQI")
HEADER_SIZE = _HEADER.size  # 32
TAG_SIZE = 16
FRAME_OVERHEAD = HEADER_SIZE + TAG_SIZE
MAX_PAYLOAD = (1 << 24) + (1 << 17)
"""16 MiB of application data plus 128 KiB for its array header and batch framing."""
"""Largest plaintext of one frame (16 MiB); bigger messages are split above this layer."""
MAX_SEQ = (1 << 64) - 1
"""Sequence numbers are u64; ``MAX_SEQ`` itself is never used, so the space never wraps."""
EPOCH_BITS = 14


def aes_accelerated() -> bool:
    """True if this CPU has AES and carry-less multiply instructions (libsodium's probe)."""
    try:
        import nacl.bindings  # noqa: F401  (runs sodium_init, which detects CPU features)
        from nacl._sodium import lib  # private; pynacl 1.6 exposes no public probe

        return bool(lib.crypto_aead_aes256gcm_is_available() == 1)
    except Exception:  # unknown: answer "slow AES", since ChaCha20 is never slow
        return False


def local_cipher_preference(aes_fast: bool | None = None) -> tuple[int, ...]:
    """The cipher ids this site offers, fastest first (``aes_fast`` defaults to the probe)."""
    if aes_fast is None:
        aes_fast = aes_accelerated()
    return (AES256GCM, CHACHA20POLY1305) if aes_fast else (CHACHA20POLY1305, AES256GCM)


@dataclass(frozen=True, slots=True)
class Frame:
    """An authentic, decrypted frame."""

    kind: int
    seq: int
    flags: int
    payload: Block


def frame_size(payload_bytes: int) -> int:
    """The size of the frame of a payload of ``payload_bytes``."""
    return payload_bytes + FRAME_OVERHEAD


def byte_view(payload: Buffer) -> memoryview:
    """A flat unsigned-byte view of ``payload`` (no copy); LocalError if not C-contiguous."""
    view = memoryview(cast(Any, payload))  # numpy's stubs lack __buffer__ before Python 3.12
    if not view.c_contiguous:
        raise LocalError("payload buffer is not C-contiguous", reason="not-contiguous")
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def _nonce(direction: int, kind: int, seq: int) -> bytes:
    return bytes((direction, kind, 0, 0)) + seq.to_bytes(8, "big")


class _Keyed:
    __slots__ = ("_cache", "_cls", "_key", "channel_id", "direction")

    def __init__(self, cipher: int, key: bytes, channel_id: bytes, direction: int) -> None:
        if cipher not in CIPHERS:
            raise LocalError(f"unknown cipher id {cipher}", reason="bad-cipher")
        if not isinstance(key, bytes) or len(key) != 32:
            raise LocalError("a channel key is 32 bytes", reason="bad-key")
        if not isinstance(channel_id, bytes) or len(channel_id) != 16:
            raise LocalError("a channel id is 16 bytes", reason="bad-channel-id")
        if direction not in (DIR_I2R, DIR_R2I):
            raise LocalError(f"direction {direction}", reason="bad-direction")
        self._cls: Any = CIPHERS[cipher]
        self._key = key
        self.channel_id = channel_id
        self.direction = direction
        self._cache: dict[int, Any] = {}

    def _epoch_key(self, seq: int) -> bytes:
        return hashlib.blake2b((seq >> EPOCH_BITS).to_bytes(8, "big"), digest_size=32,
                               key=self._key, person=b"meshd-chan-epch").digest()

    def _aead(self, seq: int) -> Any:
        epoch = seq >> EPOCH_BITS
        aead = self._cache.get(epoch)
        if aead is None:
            if len(self._cache) >= 2:  # the current epoch and the one before (resends)
                self._cache.pop(min(self._cache))
            aead = self._cache[epoch] = self._cls(self._epoch_key(seq))
        return aead

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(channel_id={self.channel_id.hex()},"
                f" direction={self.direction}, cipher={self._cls.__name__})")


class Sealer(_Keyed):
    """Seals the frames of one direction of one channel."""

    __slots__ = ("next_control_seq",)

    def __init__(self, cipher: int, key: bytes, channel_id: bytes, direction: int) -> None:
        super().__init__(cipher, key, channel_id, direction)
        self.next_control_seq = 0

    @classmethod
    def for_channel(cls, keys: FrameKeys) -> Sealer:
        return cls(keys.cipher, keys.send_key, keys.channel_id, keys.send_direction)

    def seal(self, seq: int, payload: Buffer, *, kind: int = KIND_DATA,
             flags: int = 0) -> Block:
        """The frame for ``payload`` at ``seq``.  Seal each ``(kind, seq)`` once: the caller
        keeps the result for resends (resealing other bytes at a used seq reuses a nonce)."""
        if not (0 <= seq < MAX_SEQ):
            raise LocalError(f"seq {seq} outside 0..2**64-2", reason="bad-seq")
        if kind not in (KIND_DATA, KIND_CONTROL):
            raise LocalError(f"frame kind {kind}", reason="bad-kind")
        if not (0 <= flags <= 255):
            raise LocalError(f"flags {flags}", reason="bad-flags")
        view = byte_view(payload)
        n = view.nbytes
        if n > MAX_PAYLOAD:
            raise LocalError(f"payload of {n} bytes > {MAX_PAYLOAD}", reason="too-large")
        header = _HEADER.pack(VERSION, kind, self.direction, flags, self.channel_id, seq, n)
        out = new_block(HEADER_SIZE + n + TAG_SIZE)
        out[:HEADER_SIZE] = header
        self._aead(seq).encrypt_into(_nonce(self.direction, kind, seq), view, header,
                                     memoryview(out)[HEADER_SIZE:])
        return out

    def seal_into(self, seq: int, parts: list[Buffer], out: Block) -> Block:
        """:meth:`seal` of the concatenation of ``parts`` into ``out`` (a writable buffer of
        exactly :func:`frame_size` bytes, which the caller may reuse once the frame is
        acknowledged); returns ``out``.  AES-GCM seals the parts one after the other without
        joining them (GCM is a stream mode: the bytes equal :meth:`seal`'s); ChaCha20-Poly1305
        joins them first (one copy)."""
        if not (0 <= seq < MAX_SEQ):
            raise LocalError(f"seq {seq} outside 0..2**64-2", reason="bad-seq")
        views = [byte_view(p) for p in parts]
        n = sum(v.nbytes for v in views)
        if n > MAX_PAYLOAD:
            raise LocalError(f"payload of {n} bytes > {MAX_PAYLOAD}", reason="too-large")
        dst = memoryview(out)
        if dst.nbytes != HEADER_SIZE + n + TAG_SIZE:
            raise LocalError("out is not the frame's size", reason="bad-buffer")
        header = _HEADER.pack(VERSION, KIND_DATA, self.direction, 0, self.channel_id, seq, n)
        dst[:HEADER_SIZE] = header
        nonce = _nonce(self.direction, KIND_DATA, seq)
        if len(views) == 1:
            self._aead(seq).encrypt_into(nonce, views[0], header, dst[HEADER_SIZE:])
        elif self._cls is AESGCM:
            enc = Cipher(algorithms.AES(self._epoch_key(seq)), modes.GCM(nonce)).encryptor()
            enc.authenticate_additional_data(header)
            pos = HEADER_SIZE
            for v in views:
                pos += enc.update_into(v, dst[pos:pos + v.nbytes])
            enc.finalize()
            dst[pos:pos + TAG_SIZE] = enc.tag
        else:
            self._aead(seq).encrypt_into(nonce, b"".join(views), header, dst[HEADER_SIZE:])
        return out

    def seal_control(self, payload: Buffer) -> Block:
        """A control frame at the next control sequence number."""
        frame = self.seal(self.next_control_seq, payload, kind=KIND_CONTROL)
        self.next_control_seq += 1
        return frame


class Opener(_Keyed):
    """Opens the frames of one direction of one channel."""

    __slots__ = ("next_control_seq",)

    def __init__(self, cipher: int, key: bytes, channel_id: bytes, direction: int) -> None:
        super().__init__(cipher, key, channel_id, direction)
        self.next_control_seq = 0
        """Lowest control seq still accepted."""

    @classmethod
    def for_channel(cls, keys: FrameKeys) -> Opener:
        return cls(keys.cipher, keys.recv_key, keys.channel_id, keys.recv_direction)

    def open(self, frame: Buffer, *, expect_seq: int | None = None,
             out: Block | None = None, in_place: bool = False) -> Frame:
        """Authenticate and decrypt one frame; ProtocolError if it is not an authentic frame
        of this channel and direction (or, with ``expect_seq``, not the one expected).  The
        payload is decrypted into the start of ``out`` if it is given and big enough (a buffer
        the caller reuses), else, with ``in_place``, over its ciphertext in ``frame`` (a
        writable buffer the caller gives up: the payload is a view of it; if the frame is not
        authentic its bytes are left garbled), else into a new block."""
        view = byte_view(frame)
        size = view.nbytes
        if size < FRAME_OVERHEAD:
            raise ProtocolError(f"frame of {size} bytes", reason="truncated")
        header = bytes(view[:HEADER_SIZE])
        version, kind, direction, flags, channel_id, seq, length = _HEADER.unpack(header)
        if version != VERSION:
            raise ProtocolError(f"frame version {version}", reason="version")
        if kind not in (KIND_DATA, KIND_CONTROL):
            raise ProtocolError(f"frame kind {kind}", reason="malformed")
        if direction != self.direction:
            raise ProtocolError("frame for the other direction", reason="wrong-direction")
        if not hmac.compare_digest(channel_id, self.channel_id):
            raise ProtocolError("frame of another channel", reason="wrong-channel")
        if length > MAX_PAYLOAD:
            raise ProtocolError(f"frame of {length} bytes", reason="oversized")
        if length != size - FRAME_OVERHEAD:
            raise ProtocolError(f"frame length {length} but {size - FRAME_OVERHEAD} bytes",
                                reason="length")
        if seq == MAX_SEQ:
            raise ProtocolError("frame at seq 2**64-1", reason="malformed")
        if out is not None and len(out) >= length:
            plain: Block = memoryview(out)[:length]
        elif in_place:
            plain = view[HEADER_SIZE:HEADER_SIZE + length]
        else:
            plain = new_block(length)
        try:
            self._aead(seq).decrypt_into(_nonce(direction, kind, seq), view[HEADER_SIZE:],
                                         header, plain)
        except InvalidTag:
            raise ProtocolError("frame failed authentication", reason="auth-failed") from None
        if kind == KIND_CONTROL:
            if seq < self.next_control_seq:
                raise ProtocolError(f"control frame {seq} not newer than"
                                    f" {self.next_control_seq - 1}", reason="replay")
            self.next_control_seq = seq + 1
        elif expect_seq is not None and seq != expect_seq:
            raise ProtocolError(f"frame {seq} where {expect_seq} was expected",
                                reason="unexpected-seq")
        return Frame(kind, seq, flags, plain)
