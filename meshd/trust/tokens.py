"""Invitation tokens: the text one site admin mails to another to invite it into a mesh.

Pure: no IO, no clock reads.  A token is ``MESHD1`` followed by Crockford base32 of a binary
payload, in groups of five symbols joined by ``-``::

    frame     = total_len:u8  version:u8  body  crc32:u32be        (the same in every version)
    body (v1) = flags:u8  mesh_id:16  inviter_key:32  secret:16  expires:u32be
                address*n_addrs  alternate*n_alt  name_hint:utf8 (the rest of the body)
    flags     = bit0 approve | bits1-3 n_addrs (0..4) | bits4-5 n_alt (0..2) | bits6-7 zero
    address   = kind:u8 (4 | 6 | 0)  (4 bytes | 16 bytes | len:u8 ascii)  port:u16be
    alternate = key:32  n:u8 (0..2)  address*n

``total_len`` counts the whole frame, so the parser knows how many symbols to take after the
prefix and ignores what follows.  The CRC-32 (``zlib.crc32``) covers every byte before it.  A
symbol carries 5 consecutive bits, so one changed symbol, or two swapped neighbours, alter at most
10 bits lying in at most 3 consecutive bytes: a burst CRC-32 always detects (the tests check every
such change, at every alignment).  A change that hits ``total_len`` itself moves the check code
instead; such a token is then accepted with probability 2**-32.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import unicodedata
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime

from meshd.trust import base32, mail
from meshd.errors import TokenError

__all__ = [
    "MAX_INPUT",
    "MAX_NAME_BYTES",
    "PREFIX",
    "Address",
    "Alternate",
    "Invitation",
    "armor",
    "check_expiry",
    "check_size",
    "encode",
    "join_proof",
    "parse",
]

PREFIX = "MESHD1"
MAX_INPUT = 1 << 20
"""The most ``parse`` reads, in bytes (UTF-8 for text): a mail holding an invitation is far
smaller, and the control socket takes requests of at most 1 MiB."""
MAX_NAME_BYTES = 32
VERSION = 1
MAX_ADDRS = 4
MAX_ALTERNATES = 2
MAX_ALTERNATE_ADDRS = 2
MAX_PAYLOAD = 255  # total_len is one byte
ARMOR_BEGIN = "-----BEGIN MESHD INVITATION-----"
ARMOR_END = "-----END MESHD INVITATION-----"
ARMOR_WIDTH = 64
GROUP = 5

_KIND_DNS, _KIND_V4, _KIND_V6 = 0, 4, 6
_FRAME_OVERHEAD = 1 + 1 + 4  # total_len, version, crc32
_FIXED_BODY = 1 + 16 + 32 + 16 + 4  # flags, mesh_id, inviter_key, secret, expires
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")


# --- addresses -------------------------------------------------------------------------------


def _canonical_host(host: object) -> tuple[int, str]:
    """(kind, canonical text) of an IPv4 literal, IPv6 literal or DNS name; else ValueError."""
    if not isinstance(host, str) or not host:
        raise ValueError(f"address host must be a non-empty string, not {host!r}")
    if ":" in host:
        if "%" in host:
            raise ValueError(f"IPv6 address {host!r} must not carry a zone (%...)")
        try:
            return _KIND_V6, str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ValueError(f"{host!r} is not a valid IPv6 address") from None
    try:
        return _KIND_V4, str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    labels = host.split(".")
    if (
        len(host) > 253
        or not host.isascii()
        or not all(_LABEL.fullmatch(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise ValueError(f"{host!r} is not an IPv4 address, IPv6 address or DNS name")
    return _KIND_DNS, host


@dataclass(frozen=True, slots=True)
class Address:
    """Where a site may be reached.  IP literals are kept in canonical form (``::0001`` -> ``::1``);
    a DNS name is ASCII letters, digits and hyphens in dot-separated labels, at most 253 bytes."""

    host: str
    port: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", _canonical_host(self.host)[1])
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ValueError(f"port must be an integer 1..65535, not {self.port!r}")

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse ``host:port`` or ``[ipv6]:port`` (what ``str`` makes); ValueError says what is wrong."""
        s = text.strip()
        if s.startswith("["):
            host, sep, port = s[1:].partition("]:")
            if not sep or ":" not in host:
                raise ValueError(f"invalid address {text!r}: write an IPv6 address as [address]:port")
        else:
            host, sep, port = s.rpartition(":")
            if not sep:
                raise ValueError(f"invalid address {text!r}: it needs a port, as in host:port")
            if ":" in host:
                raise ValueError(f"invalid address {text!r}: put an IPv6 address in brackets, as in [::1]:{port}")
        if not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
            raise ValueError(f"invalid address {text!r}: the port must be a number 1..65535")
        try:
            return cls(host, int(port))
        except ValueError as e:
            raise ValueError(f"invalid address {text!r}: {e}") from None


def _address_size(addr: Address) -> int:
    kind, host = _canonical_host(addr.host)
    return 1 + {_KIND_V4: 4, _KIND_V6: 16}.get(kind, 1 + len(host)) + 2


# --- invitations -----------------------------------------------------------------------------


def _check_bytes(what: str, value: object, size: int) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        raise ValueError(f"{what} must be {size} bytes, not {value!r}")


def _check_addrs(what: str, addrs: object, limit: int) -> None:
    if not isinstance(addrs, tuple) or not all(isinstance(a, Address) for a in addrs):
        raise ValueError(f"{what} must be a tuple of Address, not {addrs!r}")
    if len(addrs) > limit:
        raise ValueError(f"{what}: at most {limit} addresses, not {len(addrs)}")


@dataclass(frozen=True, slots=True)
class Alternate:
    """Another member that can forward the join: its 32-byte Ed25519 key and up to 2 addresses."""

    key: bytes
    addrs: tuple[Address, ...]

    def __post_init__(self) -> None:
        _check_bytes("alternate key", self.key, 32)
        _check_addrs("alternate addrs", self.addrs, MAX_ALTERNATE_ADDRS)


@dataclass(frozen=True, slots=True)
class Invitation:
    """What a token carries.  The constructor raises ValueError on a wrong size, count, port,
    name or expiry, and when the whole would not fit in a token (255 bytes)."""

    mesh_id: bytes
    inviter_key: bytes
    secret: bytes
    expires: int
    addrs: tuple[Address, ...] = ()
    alternates: tuple[Alternate, ...] = ()
    name_hint: str = ""
    approve: bool = False

    def __post_init__(self) -> None:
        _check_bytes("mesh_id", self.mesh_id, 16)
        _check_bytes("inviter_key", self.inviter_key, 32)
        _check_bytes("secret", self.secret, 16)
        if isinstance(self.expires, bool) or not isinstance(self.expires, int) or not 0 <= self.expires <= 0xFFFFFFFF:
            raise ValueError(f"expires must be unix seconds 0..2**32-1, not {self.expires!r}")
        _check_addrs("addrs", self.addrs, MAX_ADDRS)
        if not isinstance(self.alternates, tuple) or not all(isinstance(a, Alternate) for a in self.alternates):
            raise ValueError(f"alternates must be a tuple of Alternate, not {self.alternates!r}")
        if len(self.alternates) > MAX_ALTERNATES:
            raise ValueError(f"at most {MAX_ALTERNATES} alternates, not {len(self.alternates)}")
        if not isinstance(self.name_hint, str):
            raise ValueError(f"name_hint must be a string, not {self.name_hint!r}")
        try:
            name = self.name_hint.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"name_hint {self.name_hint!r} is not valid Unicode text") from None
        if len(name) > MAX_NAME_BYTES:
            raise ValueError(f"name_hint is {len(name)} bytes in UTF-8; at most {MAX_NAME_BYTES}")
        if any(unicodedata.category(c) == "Cc" for c in self.name_hint):
            raise ValueError(f"name_hint {self.name_hint!r} contains control characters")
        if not isinstance(self.approve, bool):
            raise ValueError(f"approve must be a bool, not {self.approve!r}")
        size = (
            _FRAME_OVERHEAD
            + _FIXED_BODY
            + sum(_address_size(a) for a in self.addrs)
            + sum(32 + 1 + sum(_address_size(a) for a in alt.addrs) for alt in self.alternates)
            + len(name)
        )
        if size > MAX_PAYLOAD:
            raise ValueError(
                f"the invitation would take {size} bytes, more than the {MAX_PAYLOAD} a token holds;"
                " use fewer or shorter address hints"
            )

    @property
    def invite_id(self) -> bytes:
        """8-byte public name of this invitation, derived from the secret (safe to log)."""
        return hashlib.blake2b(self.secret, digest_size=8, person=b"meshd-invite-id").digest()


# --- encoding --------------------------------------------------------------------------------


def _pack_address(addr: Address) -> bytes:
    kind, host = _canonical_host(addr.host)
    if kind == _KIND_V4:
        raw = ipaddress.IPv4Address(host).packed
    elif kind == _KIND_V6:
        raw = ipaddress.IPv6Address(host).packed
    else:
        raw = bytes([len(host)]) + host.encode("ascii")
    return bytes([kind]) + raw + addr.port.to_bytes(2, "big")


def _payload(inv: Invitation) -> bytes:
    flags = int(inv.approve) | len(inv.addrs) << 1 | len(inv.alternates) << 4
    body = bytearray([VERSION, flags])
    body += inv.mesh_id + inv.inviter_key + inv.secret + inv.expires.to_bytes(4, "big")
    for addr in inv.addrs:
        body += _pack_address(addr)
    for alt in inv.alternates:
        body += alt.key + bytes([len(alt.addrs)])
        for addr in alt.addrs:
            body += _pack_address(addr)
    body += inv.name_hint.encode("utf-8")
    frame = bytes([1 + len(body) + 4]) + body
    return frame + zlib.crc32(frame).to_bytes(4, "big")


def encode(inv: Invitation) -> str:
    """The token: ``MESHD1-XXXXX-XXXXX-...-XXX``, upper case, groups of 5 symbols."""
    symbols = base32.encode(_payload(inv))
    return "-".join([PREFIX] + [symbols[i : i + GROUP] for i in range(0, len(symbols), GROUP)])


def armor(inv: Invitation) -> str:
    """The block ``meshd invite`` prints: BEGIN line, the token wrapped after a ``-`` into lines of
    at most 64 characters, END line, trailing newline.  The token lines concatenate to ``encode``."""
    lines: list[str] = []
    line = ""
    for group in encode(inv).split("-"):
        if not line:
            line = group
        elif len(line) + 1 + len(group) + 1 <= ARMOR_WIDTH:  # room for a trailing '-'
            line = f"{line}-{group}"
        else:
            lines.append(line + "-")
            line = group
    lines.append(line)
    return "\n".join([ARMOR_BEGIN, *lines, ARMOR_END]) + "\n"


# --- parsing ---------------------------------------------------------------------------------

_PREFIX_RE = re.compile(r"\s*".join(PREFIX), re.IGNORECASE | re.ASCII)
_QUOTE_RE = re.compile(r"^[ \t]*(?:>[ \t]*)+", re.MULTILINE)
_SOFT_BREAK = re.compile(r"=[ \t]*(?:\n|\Z)")
# Skipped between symbols besides '-' and whitespace: soft hyphen, Unicode dashes, zero-widths.
_SKIP = frozenset("\u00ad\u2010\u2011\u2012\u2013\u2014\u2212\u200b\u200c\u200d\u2060\ufeff")

_NOT_FOUND = "no meshd invitation found in the input; paste the whole token starting with MESHD1"
_CHECKSUM = "the invitation has a typo: its check code does not match; copy it again"

# Bounds on the work for hostile input: prefixes tried, separators in a row within a token.
_MAX_CANDIDATES = 100
_MAX_GAP = 200

# How far a failed candidate got; parse reports the error of the one that got furthest.
_RANK_BAD_LENGTH, _RANK_TRUNCATED, _RANK_CHECKSUM, _RANK_VERSION, _RANK_MALFORMED = range(5)


class _Rejected(Exception):
    def __init__(self, rank: int, error: TokenError) -> None:
        super().__init__(rank, error)
        self.rank = rank
        self.error = error
        self.key = (rank, 0)  # (rank, symbols collected): the larger got further


def _unwrap(text: str) -> str:
    """Undo what email does to a token: CRLF, quote markers, quoted-printable soft breaks.

    Quote markers are stripped before a trailing ``=`` joins a line to the next, so a soft break
    is undone whether the text was quoted before or after quoted-printable encoding.  Regular
    expressions, not a loop over lines: a mail of a million empty lines costs milliseconds."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _SOFT_BREAK.sub("", _QUOTE_RE.sub("", text))


def _first_byte(symbols: str | list[str]) -> int:
    # Eight symbols are exactly five bytes, so decode needs no padding check.
    return base32.decode("".join(symbols[:2]) + "000000")[0]


def _collect(text: str, start: int) -> tuple[str, str]:
    """Symbols of the candidate token after a prefix ending at ``start``, as many as its length
    byte asks for (fewer if cut short), and the foreign character that ended it (or "")."""
    symbols: list[str] = []
    need = 2
    dashes = gap = 0
    for i in range(start, len(text)):  # no slice: a text may hold many prefixes
        ch = text[i]
        if len(symbols) >= need:
            break
        if base32.is_symbol(ch):
            dashes = gap = 0
            symbols.append(ch)
            if len(symbols) == 2:
                need = max(2, base32.encoded_length(_first_byte(symbols)))
            continue
        if ch == "-":
            dashes += 1
        elif ch.isspace() or ch in _SKIP:
            dashes = 0
        else:
            return "".join(symbols), ch
        gap += 1
        if dashes >= 3 or gap > _MAX_GAP:  # an armor line such as -----END MESHD INVITATION-----
            break
    return "".join(symbols), ""


def _decode_candidate(symbols: str, stop: str) -> Invitation:
    """Decode the collected symbols; raises _Rejected with how far it got."""
    total = _first_byte(symbols)
    if total < _FRAME_OVERHEAD:
        raise _Rejected(_RANK_BAD_LENGTH, TokenError(_CHECKSUM, reason="checksum"))
    need = base32.encoded_length(total)
    if len(symbols) < need:
        hint = f"; {stop!r} is not a token character" if stop.isalnum() else ""
        message = (
            f"the invitation is cut short: {len(symbols)} of {need} characters after {PREFIX}{hint};"
            " copy the whole token, including any lines that wrapped"
        )
        raise _Rejected(_RANK_TRUNCATED, TokenError(message, reason="truncated"))
    try:
        payload = base32.decode(symbols)
    except ValueError:  # non-zero padding bits in the last symbol
        raise _Rejected(_RANK_CHECKSUM, TokenError(_CHECKSUM, reason="checksum")) from None
    if zlib.crc32(payload[:-4]) != int.from_bytes(payload[-4:], "big"):
        raise _Rejected(_RANK_CHECKSUM, TokenError(_CHECKSUM, reason="checksum"))
    if payload[1] != VERSION:
        message = (
            f"the invitation has format version {payload[1]}, which this meshd does not know;"
            " it was made by a newer meshd: upgrade meshd to use it"
        )
        raise _Rejected(_RANK_VERSION, TokenError(message, reason="version"))
    try:
        return _unpack_v1(payload[2:-4])
    except (ValueError, IndexError) as e:
        message = f"the invitation is malformed ({e}); ask the inviter for a new one"
        raise _Rejected(_RANK_MALFORMED, TokenError(message, reason="malformed")) from None


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("its fields run past its end")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def u8(self) -> int:
        return self.take(1)[0]

    def rest(self) -> bytes:
        data, self.pos = self.data[self.pos :], len(self.data)
        return data


def _read_address(r: _Reader) -> Address:
    kind = r.u8()
    if kind == _KIND_V4:
        host = str(ipaddress.IPv4Address(r.take(4)))
    elif kind == _KIND_V6:
        host = str(ipaddress.IPv6Address(r.take(16)))
    elif kind == _KIND_DNS:
        host = r.take(r.u8()).decode("ascii")
    else:
        raise ValueError(f"unknown address kind {kind}")
    return Address(host, int.from_bytes(r.take(2), "big"))


def _unpack_v1(body: bytes) -> Invitation:
    r = _Reader(body)
    flags = r.u8()
    if flags & 0xC0:
        raise ValueError(f"unknown flags {flags:#04x}")
    mesh_id, inviter_key, secret = r.take(16), r.take(32), r.take(16)
    expires = int.from_bytes(r.take(4), "big")
    addrs = tuple(_read_address(r) for _ in range((flags >> 1) & 7))
    alternates = []
    for _ in range((flags >> 4) & 3):
        key = r.take(32)
        alternates.append(Alternate(key, tuple(_read_address(r) for _ in range(r.u8()))))
    return Invitation(
        mesh_id=mesh_id,
        inviter_key=inviter_key,
        secret=secret,
        expires=expires,
        addrs=addrs,
        alternates=tuple(alternates),
        name_hint=r.rest().decode("utf-8"),
        approve=bool(flags & 1),
    )


def check_size(size: int, *, more: bool = False) -> None:
    """Raise TokenError(reason="too-large"), naming both sizes, if ``size`` bytes are more than
    ``parse`` reads (``more``: the input was longer still, and not read to its end)."""
    if size > MAX_INPUT:
        raise TokenError(
            f"the input of {'more than ' if more else ''}{size} bytes exceeds the limit of"
            f" {MAX_INPUT} bytes; an invitation mail"
            " is far smaller: pass only the mail with the token, or the token itself",
            reason="too-large",
        )


def parse(raw: str | bytes) -> Invitation:
    """Find and decode the token anywhere in ``raw``: a bare token, a pasted body (quoted,
    re-wrapped, CRLF, quoted-printable, any case, prose around) or a whole MIME mail (multipart,
    base64, quoted-printable, any charset, HTML).  At most ``MAX_INPUT`` bytes (``too-large``).

    A mail's texts are read first, text/plain parts before HTML ones (``mail.read``), then
    ``raw`` itself as text.  In them, the first 100 occurrences of MESHD1 are tried in order
    (another 100 in ``raw``) and the first that decodes is returned; else the TokenError of the
    one that got furthest: ``not-found``, ``truncated``, ``checksum``, ``version`` or
    ``malformed``.  Raises nothing else, whatever the input."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    check_size(len(data))
    reading = mail.read(data)
    text = raw if isinstance(raw, str) else data.decode("utf-8", "replace")
    best: _Rejected | None = None
    budget = [_MAX_CANDIDATES]
    for texts, cap in (((*reading.plain, *reading.html), budget), ((text,), [_MAX_CANDIDATES])):
        for one in texts:
            try:
                return _scan(one, cap)
            except _Rejected as rejected:
                if best is None or rejected.key > best.key:
                    best = rejected
            except _NotFound:
                pass
    if best is None:
        found, advice = _NOT_FOUND.split(";", 1)
        hint = f" (in this mail, {reading.skipped})" if reading.skipped else ""
        raise TokenError(f"{found}{hint};{advice}", reason="not-found")
    raise best.error


class _NotFound(Exception):
    pass


def _scan(text: str, budget: list[int]) -> Invitation:
    """The first candidate in ``text`` that decodes; else raise the _Rejected that got furthest,
    or _NotFound.  Each prefix tried takes one from ``budget[0]``."""
    clean = _unwrap(text)
    best: _Rejected | None = None
    for m in _PREFIX_RE.finditer(clean):
        if budget[0] <= 0:
            break
        budget[0] -= 1
        symbols, stop = _collect(clean, m.end())
        if len(symbols) < 2:
            continue
        try:
            return _decode_candidate(symbols, stop)
        except _Rejected as rejected:
            rejected.key = (rejected.rank, len(symbols))
            if best is None or rejected.key > best.key:
                best = rejected
    if best is None:
        raise _NotFound
    raise best


# --- using an invitation ---------------------------------------------------------------------


def check_expiry(inv: Invitation, now: float) -> None:
    """Raise TokenError(reason="expired"), naming the expiry time in UTC, unless now < expires."""
    if now >= inv.expires:
        when = datetime.fromtimestamp(inv.expires, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        raise TokenError(f"the invitation expired at {when}; ask the inviter for a new one", reason="expired")


def join_proof(secret: bytes, *, mesh_id: bytes, inviter_key: bytes, joiner_key: bytes) -> bytes:
    """32-byte proof that the joiner knows ``secret``, bound to the mesh and both keys, that does
    not reveal it: blake2b(mesh_id | inviter_key | joiner_key, key=secret, person="meshd-join-v1").
    ValueError if a size is wrong."""
    _check_bytes("secret", secret, 16)
    _check_bytes("mesh_id", mesh_id, 16)
    _check_bytes("inviter_key", inviter_key, 32)
    _check_bytes("joiner_key", joiner_key, 32)
    return hashlib.blake2b(
        mesh_id + inviter_key + joiner_key, digest_size=32, key=secret, person=b"meshd-join-v1"
    ).digest()
