"""Crockford base32: the case-insensitive alphabet used in tokens and fingerprints.

The alphabet leaves out I, L, O and U; on decoding, ``I``/``L`` read as ``1`` and ``O`` as ``0``,
so the usual misreadings of a token typed from paper or dictated by phone still decode.
"""

from __future__ import annotations

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DECODE: dict[str, int] = {c: i for i, c in enumerate(ALPHABET)}
_DECODE.update({c.lower(): i for i, c in enumerate(ALPHABET)})
for _alias, _canon in (("I", "1"), ("L", "1"), ("O", "0")):
    _DECODE[_alias] = _DECODE[_canon]
    _DECODE[_alias.lower()] = _DECODE[_canon]


def is_symbol(ch: str) -> bool:
    """True if ``ch`` decodes as a base32 symbol (either case, with the I/L/O aliases)."""
    return ch in _DECODE


def canonical(ch: str) -> str:
    """The upper-case alphabet symbol that ``ch`` stands for (``i`` -> ``1``, ``o`` -> ``0``)."""
    return ALPHABET[_DECODE[ch]]


def encode(data: bytes) -> str:
    """Encode ``data`` as upper-case Crockford base32, no padding (ceil(8*len/5) symbols)."""
    bits = int.from_bytes(data, "big") if data else 0
    nbits = 8 * len(data)
    pad = (-nbits) % 5
    bits <<= pad
    nsym = (nbits + pad) // 5
    return "".join(ALPHABET[(bits >> (5 * (nsym - 1 - i))) & 31] for i in range(nsym))


def decode(text: str) -> bytes:
    """Decode symbols made by :func:`encode`; raises ``ValueError`` on a foreign character or
    on a symbol count that ``encode`` never produces."""
    nsym = len(text)
    nbytes = (5 * nsym) // 8
    if encoded_length(nbytes) != nsym:
        raise ValueError(f"{nsym} symbols is not a whole number of bytes")
    bits = 0
    for ch in text:
        try:
            bits = (bits << 5) | _DECODE[ch]
        except KeyError:
            raise ValueError(f"{ch!r} is not a base32 symbol") from None
    pad = 5 * nsym - 8 * nbytes
    if bits & ((1 << pad) - 1):
        raise ValueError("non-zero padding bits")
    return (bits >> pad).to_bytes(nbytes, "big")


def encoded_length(nbytes: int) -> int:
    """Number of symbols :func:`encode` makes for ``nbytes`` bytes."""
    return (8 * nbytes + 4) // 5
