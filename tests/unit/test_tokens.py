"""Invitation tokens: round trips, email mangling, typo detection, fuzzing."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd.trust import base32
from meshd.errors import TokenError
from meshd.trust.tokens import (
    MAX_NAME_BYTES,
    PREFIX,
    Address,
    Alternate,
    Invitation,
    armor,
    check_expiry,
    encode,
    join_proof,
    parse,
)

REJECTED = {"checksum", "truncated", "version", "malformed"}

# --- strategies ------------------------------------------------------------------------------

keys = st.binary(min_size=32, max_size=32)
ids = st.binary(min_size=16, max_size=16)
labels = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,8}[a-zA-Z0-9])?", fullmatch=True)
tlds = st.from_regex(r"[a-zA-Z][a-zA-Z0-9]{0,5}", fullmatch=True)
dns_names = st.builds(lambda ls, t: ".".join([*ls, t]), st.lists(labels, max_size=2), tlds)
hosts = st.one_of(
    st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str), dns_names
)
addresses = st.builds(Address, hosts, st.integers(1, 65535))
alternates = st.builds(Alternate, keys, st.lists(addresses, max_size=2).map(tuple))
names = st.text(
    st.characters(exclude_categories=("Cc", "Cs")), max_size=MAX_NAME_BYTES
).filter(lambda s: len(s.encode()) <= MAX_NAME_BYTES)


@st.composite
def invitations(draw: st.DrawFn) -> Invitation:
    addrs = draw(st.lists(addresses, max_size=4))
    alts = draw(st.lists(alternates, max_size=2))
    fields = dict(
        mesh_id=draw(ids),
        inviter_key=draw(keys),
        secret=draw(ids),
        expires=draw(st.integers(0, 2**32 - 1)),
        name_hint=draw(names),
        approve=draw(st.booleans()),
    )
    while True:  # drop hints until it fits in 255 bytes
        try:
            return Invitation(addrs=tuple(addrs), alternates=tuple(alts), **fields)  # type: ignore[arg-type]
        except ValueError:
            (alts or addrs).pop()


def sample(**kw: object) -> Invitation:
    fields: dict[str, object] = dict(
        mesh_id=bytes(range(16)),
        inviter_key=bytes(range(100, 132)),
        secret=bytes(range(200, 216)),
        expires=1_800_000_000,
        addrs=(Address("192.0.2.7", 4433),),
    )
    fields.update(kw)
    return Invitation(**fields)  # type: ignore[arg-type]


RICH = sample(
    addrs=(Address("192.0.2.7", 4433), Address("2001:db8::7", 4433), Address("mesh.example.org", 443)),
    alternates=(Alternate(bytes(32), (Address("198.51.100.1", 1),)), Alternate(b"\xff" * 32, ())),
    name_hint="Zürich-lab",
    approve=True,
)


def symbols_of(token: str) -> str:
    assert token.startswith(PREFIX + "-")
    return token[len(PREFIX) :].replace("-", "")


def with_symbols(syms: str) -> str:
    return "-".join([PREFIX] + [syms[i : i + 5] for i in range(0, len(syms), 5)])


def reason_of(text: str) -> str:
    with pytest.raises(TokenError) as info:
        parse(text)
    return info.value.reason


# --- round trips -----------------------------------------------------------------------------


@given(invitations())
def test_encode_parse_round_trip(inv: Invitation) -> None:
    token = encode(inv)
    assert parse(token) == inv
    assert all(len(g) <= 5 for g in token.split("-")[1:])
    assert set(symbols_of(token)) <= set(base32.ALPHABET)


@given(invitations())
def test_armor_parse_round_trip(inv: Invitation) -> None:
    block = armor(inv)
    lines = block.split("\n")
    assert lines[0] == "-----BEGIN MESHD INVITATION-----"
    assert lines[-2:] == ["-----END MESHD INVITATION-----", ""]
    assert all(len(line) <= 64 for line in lines)
    assert "".join(lines[1:-2]) == encode(inv)  # wrapped only at group boundaries
    assert parse(block) == inv


def test_token_lengths() -> None:
    # 64 bytes of mesh_id, key and secret, 4 of expiry, 7 of address, 4 of CRC and 3 of framing:
    # 82 bytes, 132 symbols.  The keys, secret, expiry, address and CRC alone are 125 symbols, so
    # the brief's 120 cannot be met without shrinking a field (see the module report).
    assert len(symbols_of(encode(sample()))) == 132
    assert len(symbols_of(encode(sample(addrs=())))) == 120
    assert len(encode(sample())) == 165  # with prefix and dashes


def test_sample_is_stable() -> None:
    # The layout is a wire format: a change here breaks tokens already mailed.
    assert encode(sample()) == (
        "MESHD1-A80G4-00108-1G818-60W40-J2GB1-G6GW3-V4CNK-6ET39-D9NPR-VBEDX-R72WK-KEHTQ-CXVRF-5X7PZ"
        "-3XFSZ-R10C2-GF4CK-JPBSK-6WXKY-GT79D-7N6NT-VBPPJ-EJ002-C0002-0W8N3-K7KWM-70"
    )
    assert parse(encode(RICH)) == RICH


# --- email mangling --------------------------------------------------------------------------

PROSE_BEFORE = ["Hi Alice,", "", "below is the meshd1 token for our mesh, as promised:", ""]
PROSE_AFTER = ["", "It expires Friday. Tell me if anything fails!", "", "-- ", "Bob (meshd 1.2)"]


def wrap(text: str, width: int) -> list[str]:
    return [text[i : i + width] for i in range(0, len(text), width)] or [""]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inv=invitations(), data=st.data())
def test_mangled_email_still_parses(inv: Invitation, data: st.DataObject) -> None:
    draw = data.draw
    token = encode(inv)
    if draw(st.booleans(), "misread 0/1 as O/I/l"):
        body = token[len(PREFIX) :]
        body = body.replace("0", draw(st.sampled_from("Oo"))).replace("1", draw(st.sampled_from("IiLl")))
        token = PREFIX + body
    style = draw(st.sampled_from(["armor", "armor-dropped", "bare", "inline"]), "style")
    if style == "armor":
        token_lines = armor(inv).splitlines()
        if token != encode(inv):
            token_lines = [token_lines[0], token, token_lines[-1]]
    elif style == "inline":
        token_lines = ["the token: " + token + " (keep it secret)"]
    else:
        token_lines = [token]
    width = draw(st.none() | st.integers(1, 80), "rewrap width")
    if width is not None:
        token_lines = [piece for line in token_lines for piece in wrap(line, width)]
    prose = draw(st.booleans(), "prose")
    lines = (PROSE_BEFORE if prose else []) + token_lines + (PROSE_AFTER if prose else [])
    noise = draw(st.text(st.characters(exclude_characters="=>"), max_size=40), "random prose after")
    lines.append(noise)

    depth = draw(st.integers(0, 3), "quote depth")
    markers = [draw(st.sampled_from([">", "> ", " > ", ">  "])) for _ in range(depth)]
    qp_first = draw(st.booleans(), "quoted-printable before quoting")
    breaks = draw(st.lists(st.integers(0, 10_000), max_size=6), "soft breaks")

    def soft_breaks(text: str) -> str:  # at points of the original text, as an encoder would
        for at in sorted({b % (len(text) + 1) for b in breaks}, reverse=True):
            text = text[:at] + "=\n" + text[at:]
        return text

    if qp_first:
        lines = soft_breaks("\n".join(lines)).split("\n")
    email = "\n".join("".join(markers) + line for line in lines)
    if not qp_first:
        email = soft_breaks(email)
    case = draw(st.sampled_from(["same", "upper", "lower", "swap", "mixed"]), "case")
    if case == "upper":
        email = email.upper()
    elif case == "lower":
        email = email.lower()
    elif case == "swap":
        email = email.swapcase()
    elif case == "mixed":
        flips = draw(st.lists(st.booleans(), min_size=len(email), max_size=len(email)))
        email = "".join(c.swapcase() if f else c for c, f in zip(email, flips))
    if draw(st.booleans(), "CRLF"):
        email = email.replace("\n", "\r\n")
    assert parse(email) == inv


def test_real_world_reply() -> None:
    block = armor(RICH)
    reply = (
        "On Mon, Bob <bob@example.org> wrote:\r\n"
        + "".join(f"> > {line}\r\n" for line in ["Hi!", "", *block.splitlines(), "", "Bob"])
        + "\r\nThanks, joining now.\r\n"
    )
    assert parse(reply) == RICH
    qp = encode(RICH).lower()
    assert parse("Token: " + qp[:40] + "=\r\n" + qp[40:90] + "=  \r\n" + qp[90:] + "\r\n") == RICH


# --- typo detection --------------------------------------------------------------------------


def assert_every_substitution_rejected(inv: Invitation, positions: range | None = None) -> int:
    syms = symbols_of(encode(inv))
    count = 0
    for i in positions if positions is not None else range(len(syms)):
        for c in base32.ALPHABET:
            if c == syms[i]:
                continue
            count += 1
            assert reason_of(with_symbols(syms[:i] + c + syms[i + 1 :])) in REJECTED, (i, c)
    return count


def test_every_single_symbol_substitution_is_rejected() -> None:
    n = len(symbols_of(encode(RICH)))
    assert assert_every_substitution_rejected(RICH) == 31 * n
    assert assert_every_substitution_rejected(sample()) == 31 * 132


def test_changes_near_the_check_code_at_every_alignment() -> None:
    # Where a symbol straddles data and CRC depends on the length mod 5; try all five.
    for k in range(5):
        inv = sample(name_hint="x" * k)
        syms = symbols_of(encode(inv))
        n = len(syms)
        assert_every_substitution_rejected(inv, range(n - 12, n))
        for i in range(n - 12, n - 1):
            if syms[i] != syms[i + 1]:
                swapped = syms[:i] + syms[i + 1] + syms[i] + syms[i + 2 :]
                assert reason_of(with_symbols(swapped)) in REJECTED, (k, i)


def test_aliases_are_not_changes() -> None:
    syms = symbols_of(encode(RICH))
    misread = syms.replace("1", "l").replace("0", "O").lower()
    assert parse(with_symbols(misread)) == RICH


def test_every_adjacent_transposition_is_rejected() -> None:
    for inv in (RICH, sample()):
        syms = symbols_of(encode(inv))
        for i in range(len(syms) - 1):
            if syms[i] != syms[i + 1]:
                swapped = syms[:i] + syms[i + 1] + syms[i] + syms[i + 2 :]
                assert reason_of(with_symbols(swapped)) in REJECTED, i


def test_foreign_character_in_token_is_named() -> None:
    syms = symbols_of(encode(RICH))
    with pytest.raises(TokenError) as info:
        parse(with_symbols(syms[:30] + "U" + syms[31:]))
    assert info.value.reason == "truncated"
    assert "'U' is not a token character" in info.value.message


def test_truncation() -> None:
    syms = symbols_of(encode(RICH))
    for k in range(len(syms)):
        cut = with_symbols(syms[:k])
        for text in (cut, cut + "\n", "Hello,\n" + cut + ".\n\nBob"):
            if k < 2:
                assert reason_of(text) == "not-found"
            else:
                with pytest.raises(TokenError) as info:
                    parse(text)
                assert info.value.reason == "truncated", (k, text)
                assert f"{k} of {len(syms)} characters" in info.value.message


def test_truncated_armor_block() -> None:
    lines = armor(RICH).splitlines()
    assert len(lines) > 3
    assert reason_of("\n".join(lines[:-2] + lines[-1:]) + "\nThanks!") == "truncated"


def test_not_found() -> None:
    for text in ("", "hello", "meshd is great", "MESHD", "MESHD1", "MESHD1-", "-----BEGIN MESHD INVITATION-----"):
        with pytest.raises(TokenError) as info:
            parse(text)
        assert info.value.reason == "not-found"
        assert "MESHD1" in info.value.message


def test_prose_mention_before_real_token() -> None:
    text = "the meshd1 token below, not meshd1.2:\n" + encode(RICH)
    assert parse(text) == RICH


def test_typo_beats_prose_mention_in_error() -> None:
    syms = symbols_of(encode(RICH))
    bad = syms[:50] + ("Z" if syms[50] != "Z" else "Y") + syms[51:]
    assert reason_of("is this the meshd1 token?\n" + with_symbols(bad)) == "checksum"


def frame(version: int, body: bytes) -> str:
    import zlib

    head = bytes([2 + len(body) + 4, version]) + body
    return PREFIX + "-" + base32.encode(head + zlib.crc32(head).to_bytes(4, "big"))


def test_version() -> None:
    with pytest.raises(TokenError) as info:
        parse(frame(2, b"future"))
    assert info.value.reason == "version"
    assert "newer meshd" in info.value.message


def test_malformed() -> None:
    assert reason_of(frame(1, b"")) == "malformed"
    assert reason_of(frame(1, b"\x00" * 80)) == "malformed"  # NUL bytes in the name hint
    good = symbols_of(encode(sample()))
    payload = base32.decode(good)
    body = bytearray(payload[2:-4])
    body[0] |= 0x80  # unknown flag
    assert reason_of(frame(1, bytes(body))) == "malformed"


@settings(max_examples=300)
@given(st.integers(0, 255).filter(lambda v: v != 1), st.binary(max_size=249))
def test_any_valid_frame_is_version_error_or_canonical(version: int, body: bytes) -> None:
    for v in (1, version):
        token = frame(v, body)
        try:
            inv = parse(token)
        except TokenError as e:
            assert e.reason == ("malformed" if v == 1 else "version")
        else:
            assert v == 1 and encode(inv).replace("-", "") == token.replace("-", "")


@settings(max_examples=150)
@given(inv=invitations(), edits=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)), min_size=1, max_size=3))
def test_edited_body_with_fixed_check_code_is_malformed_or_canonical(
    inv: Invitation, edits: list[tuple[int, int]]
) -> None:
    body = bytearray(base32.decode(symbols_of(encode(inv)))[2:-4])
    for at, value in edits:
        body[at % len(body)] = value
    token = frame(1, bytes(body))
    try:
        got = parse(token)
    except TokenError as e:
        assert e.reason == "malformed"
    else:
        assert encode(got).replace("-", "") == token.replace("-", "")


# --- fuzzing ---------------------------------------------------------------------------------


@settings(max_examples=300)
@given(st.text())
def test_parse_only_raises_token_error_on_text(text: str) -> None:
    for t in (text, PREFIX + text, "meshd1-" + text):
        try:
            parse(t)
        except TokenError:
            pass


@settings(max_examples=300)
@given(st.binary())
def test_parse_only_raises_token_error_on_bytes(data: bytes) -> None:
    try:
        parse(data.decode("latin-1"))
    except TokenError:
        pass


@settings(max_examples=150)
@given(inv=invitations(), edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 2), st.characters()), max_size=4))
def test_mutated_token_is_rejected_or_unchanged(inv: Invitation, edits: list[tuple[int, int, str]]) -> None:
    text = list("Hi,\n" + armor(inv) + "Bob\n")
    for at, op, ch in edits:
        at %= len(text)
        if op == 0:
            text.insert(at, ch)
        elif op == 1:
            del text[at]
        else:
            text[at] = ch
    try:
        assert parse("".join(text)) == inv
    except TokenError:
        pass


def test_hostile_input_is_cheap() -> None:
    import time

    start = time.monotonic()
    for text in ("MESHD1 " * 100_000, ("MESHD1" + " " * 150) * 5_000, "meshd1-" + "0" * 1_000_000):
        with pytest.raises(TokenError):
            parse(text)
    assert time.monotonic() - start < 5  # each is well under 0.1 s; generous for slow CI


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(mesh_id=b"x" * 15),
        dict(inviter_key=b"x" * 31),
        dict(secret=b"x" * 17),
        dict(secret=bytearray(16)),
        dict(expires=-1),
        dict(expires=2**32),
        dict(expires=True),
        dict(addrs=tuple(Address("10.0.0.1", p) for p in range(1, 6))),
        dict(addrs=[Address("10.0.0.1", 1)]),
        dict(alternates=tuple(Alternate(bytes(32), ()) for _ in range(3))),
        dict(name_hint="é" * 17),
        dict(name_hint="bad\nname"),
        dict(name_hint="\ud800"),
        dict(approve=1),
        dict(addrs=tuple(Address("a" * 60 + ".example", 1) for _ in range(4))),  # too big for a token
    ],
)
def test_invitation_validation(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        sample(**kw)


def test_alternate_validation() -> None:
    with pytest.raises(ValueError):
        Alternate(bytes(31), ())
    with pytest.raises(ValueError):
        Alternate(bytes(32), tuple(Address("10.0.0.1", p) for p in (1, 2, 3)))


def test_name_hint_limit_is_bytes() -> None:
    assert parse(encode(sample(name_hint="é" * 16))).name_hint == "é" * 16


# --- addresses -------------------------------------------------------------------------------


@given(addresses)
def test_address_str_parse_round_trip(addr: Address) -> None:
    assert Address.parse(str(addr)) == addr


@pytest.mark.parametrize(
    "text, host, port",
    [
        ("1.2.3.4:5", "1.2.3.4", 5),
        ("[::1]:5", "::1", 5),
        ("[2001:DB8::0001]:65535", "2001:db8::1", 65535),
        ("host.example:5", "host.example", 5),
        ("localhost:80", "localhost", 80),
    ],
)
def test_address_parse(text: str, host: str, port: int) -> None:
    assert Address.parse(text) == Address(host, port)


def test_address_str() -> None:
    assert str(Address("1.2.3.4", 5)) == "1.2.3.4:5"
    assert str(Address("::1", 5)) == "[::1]:5"
    assert str(Address("host.example", 5)) == "host.example:5"


@pytest.mark.parametrize(
    "text",
    ["", "1.2.3.4", "1.2.3.4:0", "1.2.3.4:65536", "1.2.3.4:+5", "1.2.3.4:٥", "::1:5", "[::1]", "[1.2.3.4]:5",
     "[fe80::1%eth0]:5", "1.2.3.04:5", "1.2.3:5", "-bad.example:5", "a..b:5", "bad_name:5", "é.example:5",
     ":5", "a" * 254 + ":5"],
)
def test_address_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid address"):
        Address.parse(text)


def test_address_validation() -> None:
    for host, port in [("1.2.3.4", 0), ("1.2.3.4", 65536), ("1.2.3.4", True), ("", 1), ("x" * 254, 1)]:
        with pytest.raises(ValueError):
            Address(host, port)  # type: ignore[arg-type]


# --- using an invitation ---------------------------------------------------------------------


def test_invite_id() -> None:
    inv = sample()
    assert inv.invite_id == hashlib.blake2b(inv.secret, digest_size=8, person=b"meshd-invite-id").digest()
    assert sample(secret=bytes(16)).invite_id != inv.invite_id


def test_check_expiry() -> None:
    inv = sample(expires=1_800_000_000)
    check_expiry(inv, 1_799_999_999.5)
    for now in (1_800_000_000, 1_900_000_000.0):
        with pytest.raises(TokenError) as info:
            check_expiry(inv, now)
        assert info.value.reason == "expired"
        assert "2027-01-15 08:00:00 UTC" in info.value.message


def test_join_proof() -> None:
    args = dict(secret=b"s" * 16, mesh_id=b"m" * 16, inviter_key=b"i" * 32, joiner_key=b"j" * 32)
    proof = join_proof(**args)  # type: ignore[arg-type]
    assert len(proof) == 32
    assert proof == join_proof(**args)  # type: ignore[arg-type]
    assert proof == hashlib.blake2b(
        b"m" * 16 + b"i" * 32 + b"j" * 32, digest_size=32, key=b"s" * 16, person=b"meshd-join-v1"
    ).digest()
    assert b"s" * 16 not in proof
    for name, value in args.items():
        changed = dict(args, **{name: value[:-1] + b"X"})
        assert join_proof(**changed) != proof, name  # type: ignore[arg-type]
    swapped = dict(args, inviter_key=b"j" * 32, joiner_key=b"i" * 32)
    assert join_proof(**swapped) != proof  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        join_proof(b"short", mesh_id=b"m" * 16, inviter_key=b"i" * 32, joiner_key=b"j" * 32)
