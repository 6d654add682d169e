"""Signed records: everything one site believes about another.

Four kinds of body, each a frozen dataclass with a fixed field order:

============  ====  ===================================================================
kind          code  meaning
============  ====  ===================================================================
genesis       1     founds a mesh; signed by the founder; its digest is the mesh id
site-record   2     a site's own record (name, addresses, reachability); highest seq wins
vouch         3     voucher admits subject to the mesh with a role until ``expires``
revocation    4     revoker shuts subject out of the mesh (permanently; see ``trust``)
rotation      5     old key hands its membership to new key; signed by both (see ``trust``)
============  ====  ===================================================================

Canonical body bytes are msgpack of the list of fields (``use_bin_type=True``).  The signature
covers ``DOMAIN[kind] + body``, one distinct prefix per kind, so a signature made for one kind
never verifies as another.  On the wire a record is the envelope msgpack
``[kind_code, body_bytes, signature]``, at most ``MAX_SIGNED_BYTES``.

Field rules: keys 32 bytes, mesh ids and salts 16 bytes; names 1-64 of ``[A-Za-z0-9._-]``
starting with a letter or digit; at most 8 addresses of 1-255 printable ASCII characters without
spaces; a revocation reason of at most 256 printable ASCII characters (no control characters
reach a terminal); roles from ``ROLES``; integers 0..2**63-1, and a bool is never an integer.

``decode`` accepts only canonical bytes (re-encoding the parsed envelope and body gives back the
exact input), so one record has exactly one wire form and ``Signed.digest`` is a stable id.  It
raises only ``RecordError``; the checks run in this order, the first failure wins:

``oversized``  input longer than ``MAX_SIGNED_BYTES`` (checked before unpacking)
``malformed``  not a canonical envelope, unknown kind code, wrong field count or type (a bool is
               not an int), keys not valid 32-byte Ed25519 public keys (a small-order or
               off-curve key is refused here, so later X25519 conversion cannot fail), bad
               names/addresses/roles, integers outside 0..2**63-1
``type``       the kind is not in ``kinds``
``mesh``       ``mesh_id`` given and the record's mesh id (a genesis: its computed id) differs
``signature``  the signature does not verify under the signer's key and the kind's domain
``future``     ``issued`` (genesis: ``created``) is more than ``MAX_CLOCK_SKEW`` after ``now``
``expired``    a vouch with ``expires != 0`` and ``expires <= now``
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Union

import msgpack

from meshd.errors import LocalError, RecordError
from meshd.trust.identity import SiteKey, curve_public_of, verify_signature

__all__ = [
    "DOMAIN",
    "KINDS",
    "MAX_CLOCK_SKEW",
    "MAX_SIGNED_BYTES",
    "ROLES",
    "Body",
    "Genesis",
    "Revocation",
    "Rotation",
    "Signed",
    "SiteRecord",
    "Vouch",
    "decode",
    "digest_of",
    "is_valid_name",
    "peek",
    "sign",
    "sign_rotation",
]

ROLES = ("member", "introducer")
"""Vouch roles, weakest first.  Introducers' vouches admit new sites; members' do not."""
MAX_SIGNED_BYTES = 4096
"""Largest envelope accepted by ``decode``."""
MAX_CLOCK_SKEW = 600
"""Seconds a record's ``issued`` time may lie ahead of our clock."""
MAX_ADDRS = 8
MAX_ADDR_LEN = 255
MAX_REASON_LEN = 256
MAX_INT = 2**63 - 1

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_PRINTABLE_RE = re.compile(r"[\x20-\x7e]*")
_ADDR_RE = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True, slots=True)
class Genesis:
    """Founds a mesh; signed by ``founder``.  ``salt`` (16 random bytes) makes ids unique."""

    founder: bytes
    mesh_name: str
    created: int
    salt: bytes

    @property
    def mesh_id(self) -> bytes:
        """16-byte BLAKE2b of the canonical body: self-certifying, it names the founder."""
        body = _pack_body(self)
        return hashlib.blake2b(body, digest_size=16, person=b"meshd-mesh-id").digest()


@dataclass(frozen=True, slots=True)
class SiteRecord:
    """A site's own record, signed by ``key``; of two records the higher ``seq`` wins."""

    key: bytes
    mesh_id: bytes
    name: str
    addrs: tuple[str, ...]
    reachable: bool
    seq: int
    issued: int


@dataclass(frozen=True, slots=True)
class Vouch:
    """``voucher`` admits ``subject`` to the mesh with ``role`` until ``expires`` (0: never)."""

    mesh_id: bytes
    voucher: bytes
    subject: bytes
    subject_name: str
    role: str
    issued: int
    expires: int


@dataclass(frozen=True, slots=True)
class Revocation:
    """``revoker`` shuts ``subject`` out of the mesh; ``reason`` is free printable text."""

    mesh_id: bytes
    revoker: bytes
    subject: bytes
    issued: int
    reason: str


@dataclass(frozen=True, slots=True)
class Rotation:
    """``old`` retires and hands its membership to ``new``; signed by both keys: the envelope
    by ``old``, and ``new_sig`` by ``new`` over ``ROTATION_NEW_DOMAIN`` + the other fields."""

    mesh_id: bytes
    old: bytes
    new: bytes
    issued: int
    new_sig: bytes

    def handover(self) -> bytes:
        """The bytes ``new`` signs: the domain and the packed fields other than ``new_sig``."""
        return ROTATION_NEW_DOMAIN + bytes(msgpack.packb(
            [self.mesh_id, self.old, self.new, self.issued], use_bin_type=True))


ROTATION_NEW_DOMAIN = b"meshd/v1/rotation-new\x00"

Body = Union[Genesis, SiteRecord, Vouch, Revocation, Rotation]


class _Invalid(ValueError):
    """A body or envelope field is invalid (internal; mapped to RecordError or LocalError)."""


def _key(v: object, what: str) -> bytes:
    if not isinstance(v, bytes) or len(v) != 32:
        raise _Invalid(f"{what} is not a 32-byte key")
    try:
        curve_public_of(v)  # the key must be usable for key exchange later, not just stored
    except ValueError:
        raise _Invalid(f"{what} is not a valid Ed25519 public key") from None
    return v


def _id16(v: object, what: str) -> bytes:
    if not isinstance(v, bytes) or len(v) != 16:
        raise _Invalid(f"{what} is not 16 bytes")
    return v


def _uint(v: object, what: str) -> int:
    if type(v) is not int or not 0 <= v <= MAX_INT:
        raise _Invalid(f"{what} is not a non-negative integer")
    return v


def is_valid_name(name: str) -> bool:
    """True if ``name`` may name a site or a mesh: 1..64 of ``[A-Za-z0-9._-]``, starting with a
    letter or digit."""
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


def _name(v: object, what: str) -> str:
    if not isinstance(v, str) or not _NAME_RE.fullmatch(v):
        raise _Invalid(
            f"{what} is not a name (1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit)"
        )
    return v


def _sig64(v: object, what: str) -> bytes:
    if not isinstance(v, bytes) or len(v) != 64:
        raise _Invalid(f"{what} is not a 64-byte signature")
    return v


def _bool(v: object, what: str) -> bool:
    if type(v) is not bool:
        raise _Invalid(f"{what} is not a boolean")
    return v


def _role(v: object, what: str) -> str:
    if not isinstance(v, str) or v not in ROLES:
        raise _Invalid(f"{what} is not one of {', '.join(ROLES)}")
    return v


def _addrs(v: object, what: str) -> tuple[str, ...]:
    if not isinstance(v, tuple) or len(v) > MAX_ADDRS:
        raise _Invalid(f"{what} is not a list of at most {MAX_ADDRS} addresses")
    for a in v:
        if not isinstance(a, str) or len(a) > MAX_ADDR_LEN or not _ADDR_RE.fullmatch(a):
            raise _Invalid(
                f"{what} holds an address that is not 1-{MAX_ADDR_LEN} printable ASCII characters"
            )
    return tuple(v)


def _reason(v: object, what: str) -> str:
    if not isinstance(v, str) or len(v) > MAX_REASON_LEN or not _PRINTABLE_RE.fullmatch(v):
        raise _Invalid(f"{what} is not at most {MAX_REASON_LEN} printable ASCII characters")
    return v


_Check = Callable[[object, str], Any]

# kind -> (code, body class, [(field, check)], signer field, issued field)
_SCHEMA: dict[str, tuple[int, type, tuple[tuple[str, _Check], ...], str, str]] = {
    "genesis": (
        1,
        Genesis,
        (("founder", _key), ("mesh_name", _name), ("created", _uint), ("salt", _id16)),
        "founder",
        "created",
    ),
    "site-record": (
        2,
        SiteRecord,
        (
            ("key", _key),
            ("mesh_id", _id16),
            ("name", _name),
            ("addrs", _addrs),
            ("reachable", _bool),
            ("seq", _uint),
            ("issued", _uint),
        ),
        "key",
        "issued",
    ),
    "vouch": (
        3,
        Vouch,
        (
            ("mesh_id", _id16),
            ("voucher", _key),
            ("subject", _key),
            ("subject_name", _name),
            ("role", _role),
            ("issued", _uint),
            ("expires", _uint),
        ),
        "voucher",
        "issued",
    ),
    "revocation": (
        4,
        Revocation,
        (
            ("mesh_id", _id16),
            ("revoker", _key),
            ("subject", _key),
            ("issued", _uint),
            ("reason", _reason),
        ),
        "revoker",
        "issued",
    ),
    "rotation": (
        5,
        Rotation,
        (
            ("mesh_id", _id16),
            ("old", _key),
            ("new", _key),
            ("issued", _uint),
            ("new_sig", _sig64),
        ),
        "old",
        "issued",
    ),
}
KINDS: tuple[str, ...] = tuple(_SCHEMA)
DOMAIN: dict[str, bytes] = {kind: b"meshd/v1/" + kind.encode() + b"\x00" for kind in KINDS}
_KIND_OF_CLASS: dict[type, str] = {spec[1]: kind for kind, spec in _SCHEMA.items()}
_KIND_OF_CODE: dict[int, str] = {spec[0]: kind for kind, spec in _SCHEMA.items()}


def _kind_of(body: object) -> str:
    try:
        return _KIND_OF_CLASS[type(body)]
    except KeyError:
        raise TypeError(f"not a record body: {type(body).__name__}") from None


def _fields(body: Body) -> list[Any]:
    return [getattr(body, name) for name, _ in _SCHEMA[_kind_of(body)][2]]


def _pack_body(body: Body) -> bytes:
    return bytes(msgpack.packb(_fields(body), use_bin_type=True))


def _check_body(body: Body) -> None:
    for name, check in _SCHEMA[_kind_of(body)][2]:
        check(getattr(body, name), name)


def _signer(body: Body) -> bytes:
    value: bytes = getattr(body, _SCHEMA[_kind_of(body)][3])
    return value


def _issued(body: Body) -> int:
    value: int = getattr(body, _SCHEMA[_kind_of(body)][4])
    return value


@dataclass(frozen=True, slots=True)
class Signed:
    """A verified body and its exact wire bytes (the envelope)."""

    body: Body
    raw: bytes

    @property
    def kind(self) -> str:
        """``genesis``, ``site-record``, ``vouch``, ``revocation`` or ``rotation``."""
        return _kind_of(self.body)

    @property
    def signer(self) -> bytes:
        """The key that signed the envelope: founder, key, voucher, revoker or old key."""
        return _signer(self.body)

    @property
    def digest(self) -> bytes:
        """16-byte BLAKE2b of ``raw``: a stable id (the wire form is canonical)."""
        return digest_of(self.raw)


def digest_of(raw: bytes) -> bytes:
    """The stable id of a signed object's wire bytes (``Signed.digest`` without decoding)."""
    return hashlib.blake2b(raw, digest_size=16, person=b"meshd-record-id").digest()


def sign(body: Body, key: SiteKey) -> Signed:
    """Sign ``body`` with ``key``.

    ``LocalError`` reasons: ``wrong-key`` (``key`` is not the body's signer), ``invalid-record``
    (a field ``decode`` would reject), ``oversized``.
    """
    kind = _kind_of(body)
    try:
        _check_body(body)
    except _Invalid as exc:
        raise LocalError(f"cannot sign {kind}: {exc}", reason="invalid-record") from None
    if _signer(body) != key.public:
        raise LocalError(
            f"a {kind} must be signed by its {_SCHEMA[kind][3]}, not by {key.site_id}",
            reason="wrong-key",
        )
    payload = _pack_body(body)
    signature = key.sign(DOMAIN[kind] + payload)
    raw = bytes(msgpack.packb([_SCHEMA[kind][0], payload, signature], use_bin_type=True))
    if len(raw) > MAX_SIGNED_BYTES:
        raise LocalError(
            f"signed {kind} is {len(raw)} bytes, more than {MAX_SIGNED_BYTES}", reason="oversized"
        )
    return Signed(body, raw)


def sign_rotation(mesh_id: bytes, old: SiteKey, new: SiteKey, issued: int) -> Signed:
    """A rotation from ``old`` to ``new``, signed by both."""
    unsigned = Rotation(mesh_id, old.public, new.public, issued, b"\x00" * 64)
    return sign(Rotation(mesh_id, old.public, new.public, issued,
                         new.sign(unsigned.handover())), old)


def _unpack(data: bytes, max_array: int) -> Any:
    return msgpack.unpackb(
        data,
        use_list=False,
        raw=False,
        strict_map_key=True,
        max_bin_len=MAX_SIGNED_BYTES,
        max_str_len=MAX_SIGNED_BYTES,
        max_array_len=max_array,
        max_map_len=0,
        max_ext_len=0,
    )


def _parse(raw: bytes) -> tuple[str, Body, bytes, bytes]:
    """(kind, body, body bytes, signature) of a canonical envelope, or ``_Invalid``."""
    try:
        envelope = _unpack(raw, 3)
    except Exception as exc:  # msgpack raises assorted ValueError/TypeError subclasses
        raise _Invalid(f"not a msgpack envelope ({type(exc).__name__})") from None
    if not isinstance(envelope, tuple) or len(envelope) != 3:
        raise _Invalid("envelope is not a list of [kind, body, signature]")
    code, payload, signature = envelope
    if type(code) is not int or code not in _KIND_OF_CODE:
        raise _Invalid(f"unknown record kind code {code!r}")
    if not isinstance(payload, bytes):
        raise _Invalid("record body is not a byte string")
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise _Invalid("signature is not 64 bytes")
    kind = _KIND_OF_CODE[code]
    _, cls, spec, _, _ = _SCHEMA[kind]
    try:
        values = _unpack(payload, max(len(spec), MAX_ADDRS))
    except Exception as exc:
        raise _Invalid(f"{kind} body is not msgpack ({type(exc).__name__})") from None
    if not isinstance(values, tuple) or len(values) != len(spec):
        raise _Invalid(f"{kind} body is not a list of {len(spec)} fields")
    checked = [check(value, name) for (name, check), value in zip(spec, values)]
    body: Body = cls(*checked)
    canonical = bytes(msgpack.packb([code, payload, signature], use_bin_type=True))
    if canonical != raw or _pack_body(body) != payload:
        raise _Invalid(f"{kind} is not in canonical msgpack form")
    return kind, body, payload, signature


def _checked_parse(raw: object, kinds: tuple[str, ...] | None
                   ) -> tuple[str, Body, bytes, bytes, bytes]:
    """(kind, body, body bytes, signature, the bytes) of a canonical envelope within the size
    limit and of one of ``kinds``, signatures not checked; ``RecordError`` otherwise."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise RecordError(f"a record is bytes, not {type(raw).__name__}", reason="malformed")
    raw = bytes(raw)
    if len(raw) > MAX_SIGNED_BYTES:
        raise RecordError(
            f"record is {len(raw)} bytes, more than {MAX_SIGNED_BYTES}", reason="oversized"
        )
    try:
        kind, body, payload, signature = _parse(raw)
    except _Invalid as exc:
        raise RecordError(f"malformed record: {exc}", reason="malformed") from None
    if kinds is not None and kind not in kinds:
        raise RecordError(
            f"expected a record of kind {' or '.join(kinds) or '(none)'}, got {kind}",
            reason="type",
        )
    return kind, body, payload, signature, raw


def peek(raw: bytes, *, kinds: tuple[str, ...]) -> Body:
    """The body of a canonical envelope of one of ``kinds``, **signatures not checked**: only to
    refuse cheaply what could never be kept before :func:`decode` spends signature checks on
    it.  Never trust, keep or act on what it returns.  Raises ``RecordError`` as decode does."""
    return _checked_parse(raw, kinds)[1]


def decode(
    raw: bytes,
    *,
    now: int,
    mesh_id: bytes | None = None,
    kinds: tuple[str, ...] | None = None,
    max_skew: int = MAX_CLOCK_SKEW,
) -> Signed:
    """Verify and decode one signed record; raises only ``RecordError`` (reasons: module doc).

    ``max_skew`` bounds how far in the future ``issued`` may be; re-reading what was verified
    when it was stored passes a larger one, so a clock set back does not lock the store."""
    kind, body, payload, signature, raw = _checked_parse(raw, kinds)
    if mesh_id is not None:
        ours = body.mesh_id  # a genesis computes its own
        if ours != mesh_id:
            raise RecordError(
                f"{kind} belongs to mesh {ours.hex()}, not {bytes(mesh_id).hex()}", reason="mesh"
            )
    if not verify_signature(_signer(body), DOMAIN[kind] + payload, signature):
        raise RecordError(f"{kind} has a bad signature", reason="signature")
    if isinstance(body, Rotation) and (
            body.old == body.new or not verify_signature(body.new, body.handover(), body.new_sig)):
        raise RecordError("rotation is not signed by its new key", reason="signature")
    issued = _issued(body)
    if issued > now + max_skew:
        raise RecordError(
            f"{kind} was issued {issued - now} s in the future (more than {max_skew} s);"
            " check the clocks of both sites",
            reason="future",
        )
    if isinstance(body, Vouch) and body.expires != 0 and body.expires <= now:
        raise RecordError(f"vouch expired {now - body.expires} s ago", reason="expired")
    return Signed(body, raw)
