"""Signed records: round trips, every rejection reason, tampering and fuzzing of ``decode``."""

from __future__ import annotations

import string
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd.errors import LocalError, RecordError, RemoteError
from meshd.trust.identity import SiteKey
from meshd.trust.records import (
    DOMAIN,
    KINDS,
    MAX_CLOCK_SKEW,
    MAX_SIGNED_BYTES,
    ROLES,
    Body,
    Genesis,
    Revocation,
    Rotation,
    Signed,
    SiteRecord,
    Vouch,
    decode,
    sign,
    sign_rotation,
)

NOW = 1_800_000_000
KEYS = [SiteKey(bytes([i]) * 32) for i in range(1, 5)]
FOUNDER, ALICE, BOB, MALLORY = KEYS
GENESIS = Genesis(FOUNDER.public, "beamline-mesh", NOW - 1000, b"\x07" * 16)
MESH = GENESIS.mesh_id
CODES = {"genesis": 1, "site-record": 2, "vouch": 3, "revocation": 4, "rotation": 5}


def site_record(key: SiteKey = ALICE, **kw: Any) -> SiteRecord:
    fields: dict[str, Any] = dict(
        key=key.public,
        mesh_id=MESH,
        name="aps-8id",
        addrs=("192.0.2.1:7946", "[2001:db8::1]:7946"),
        reachable=True,
        seq=3,
        issued=NOW,
    )
    fields.update(kw)
    return SiteRecord(**fields)


def vouch(voucher: SiteKey = FOUNDER, subject: SiteKey = ALICE, **kw: Any) -> Vouch:
    fields: dict[str, Any] = dict(
        mesh_id=MESH,
        voucher=voucher.public,
        subject=subject.public,
        subject_name="alcf",
        role="member",
        issued=NOW,
        expires=NOW + 3600,
    )
    fields.update(kw)
    return Vouch(**fields)


def revocation(revoker: SiteKey = FOUNDER, subject: SiteKey = ALICE, **kw: Any) -> Revocation:
    fields: dict[str, Any] = dict(
        mesh_id=MESH, revoker=revoker.public, subject=subject.public, issued=NOW, reason="lost"
    )
    fields.update(kw)
    return Revocation(**fields)


def rotation(old: SiteKey = ALICE, new: SiteKey = FOUNDER, **kw: Any) -> Rotation:
    body = sign_rotation(kw.pop("mesh_id", MESH), old, new, kw.pop("issued", NOW)).body
    assert isinstance(body, Rotation) and not kw
    return body


SAMPLES: dict[str, tuple[Body, SiteKey]] = {
    "genesis": (GENESIS, FOUNDER),
    "site-record": (site_record(), ALICE),
    "vouch": (vouch(), FOUNDER),
    "revocation": (revocation(), FOUNDER),
    "rotation": (rotation(), ALICE),
}


def envelope(
    kind: str, fields: list[Any], key: SiteKey, *, domain: bytes | None = None, code: Any = None
) -> bytes:
    """Sign arbitrary field values, bypassing ``sign``'s checks (a hostile but keyed peer)."""
    body = msgpack.packb(fields, use_bin_type=True)
    sig = key.sign((DOMAIN[kind] if domain is None else domain) + body)
    return msgpack.packb([CODES[kind] if code is None else code, body, sig], use_bin_type=True)


def fields_of(body: Body) -> list[Any]:
    from meshd.trust.records import _fields

    return _fields(body)


def reason_of(raw: Any, **kw: Any) -> str:
    kw.setdefault("now", NOW)
    with pytest.raises(RecordError) as err:
        decode(raw, **kw)
    assert err.value.message  # a clear human message next to the reason
    return err.value.reason


# --- strategies ----------------------------------------------------------------------------

keys = st.sampled_from(KEYS)
names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
times = st.integers(0, NOW + MAX_CLOCK_SKEW)
big = st.integers(0, 2**63 - 1)
mesh_ids = st.binary(min_size=16, max_size=16)
addrs = st.text(alphabet=string.ascii_letters + string.digits + ".:[]-_/", min_size=1, max_size=255)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[Body, SiteKey]:
    kind = draw(st.sampled_from(KINDS))
    k = draw(keys)
    if kind == "genesis":
        return Genesis(k.public, draw(names), draw(times), draw(mesh_ids)), k
    if kind == "site-record":
        rec = SiteRecord(
            k.public,
            draw(mesh_ids),
            draw(names),
            tuple(draw(st.lists(addrs, max_size=8))),
            draw(st.booleans()),
            draw(big),
            draw(times),
        )
        return rec, k
    if kind == "vouch":
        expires = draw(st.one_of(st.just(0), st.integers(NOW + 1, 2**63 - 1)))
        v = Vouch(
            draw(mesh_ids), k.public, draw(keys).public, draw(names), draw(st.sampled_from(ROLES)),
            draw(times), expires,
        )
        return v, k
    if kind == "rotation":
        new = draw(keys.filter(lambda n: n.public != k.public))
        return rotation(k, new, mesh_id=draw(mesh_ids), issued=draw(times)), k
    reason = draw(st.text(alphabet=string.printable[:95], max_size=256))
    return Revocation(draw(mesh_ids), k.public, draw(keys).public, draw(times), reason), k


# --- round trips ---------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(bodies())
def test_round_trip_every_kind(sample: tuple[Body, SiteKey]) -> None:
    body, key = sample
    signed = sign(body, key)
    assert len(signed.raw) <= MAX_SIGNED_BYTES
    got = decode(signed.raw, now=NOW)
    assert got == signed
    assert got.body == body
    assert got.signer == key.public
    assert got.kind in KINDS and isinstance(got.body, type(body))
    assert len(got.digest) == 16 and got.digest == signed.digest
    mesh = body.mesh_id
    assert decode(signed.raw, now=NOW, mesh_id=mesh, kinds=(got.kind,)) == signed


def test_properties_of_each_sample() -> None:
    for kind, (body, key) in SAMPLES.items():
        signed = sign(body, key)
        assert signed.kind == kind
        assert signed.signer == key.public
        assert decode(signed.raw, now=NOW, mesh_id=body.mesh_id, kinds=(kind,)) == signed


def test_signing_is_deterministic_and_digests_distinct() -> None:
    raws = {sign(b, k).raw for b, k in SAMPLES.values()}
    assert len(raws) == len(KINDS)
    assert sign(*SAMPLES["vouch"]).digest == sign(*SAMPLES["vouch"]).digest
    assert len({sign(b, k).digest for b, k in SAMPLES.values()}) == len(KINDS)


def test_mesh_id_is_self_certifying() -> None:
    assert len(MESH) == 16
    for other in (
        Genesis(ALICE.public, GENESIS.mesh_name, GENESIS.created, GENESIS.salt),
        Genesis(FOUNDER.public, "other", GENESIS.created, GENESIS.salt),
        Genesis(FOUNDER.public, GENESIS.mesh_name, GENESIS.created + 1, GENESIS.salt),
        Genesis(FOUNDER.public, GENESIS.mesh_name, GENESIS.created, b"\x08" * 16),
    ):
        assert other.mesh_id != MESH


def test_records_are_frozen() -> None:
    with pytest.raises(AttributeError):
        vouch().role = "introducer"  # type: ignore[misc]


def test_domains_are_distinct_and_prefix_free() -> None:
    prefixes = list(DOMAIN.values())
    assert len(set(prefixes)) == len(KINDS)
    for a in prefixes:
        assert a.endswith(b"\x00")
        for b in prefixes:
            assert a == b or not b.startswith(a)


# --- sign refuses misuse -------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_sign_with_the_wrong_key(kind: str) -> None:
    body, _ = SAMPLES[kind]
    with pytest.raises(LocalError) as err:
        sign(body, MALLORY)
    assert err.value.reason == "wrong-key"


@pytest.mark.parametrize(
    "body",
    [
        vouch(role="admin"),
        vouch(subject_name="-bad"),
        vouch(expires=-1),
        site_record(reachable=1),
        site_record(seq=True),
        site_record(addrs=("a",) * 9),
        revocation(reason="line\nbreak"),
        Genesis(FOUNDER.public, "m", NOW, b"short"),
    ],
)
def test_sign_refuses_what_decode_would_reject(body: Body) -> None:
    signer = {Genesis: FOUNDER, SiteRecord: ALICE, Vouch: FOUNDER, Revocation: FOUNDER}
    with pytest.raises(LocalError) as err:
        sign(body, signer[type(body)])
    assert err.value.reason == "invalid-record"


# --- tampering -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_every_flipped_bit_is_rejected(kind: str) -> None:
    body, key = SAMPLES[kind]
    raw = sign(body, key).raw
    for i in range(len(raw) * 8):
        bad = bytearray(raw)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(RecordError):
            decode(bytes(bad), now=NOW)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(KINDS),
    data=st.data(),
)
def test_random_edits_never_yield_another_valid_record(kind: str, data: st.DataObject) -> None:
    body, key = SAMPLES[kind]
    raw = bytearray(sign(body, key).raw)
    op = data.draw(st.sampled_from(["replace", "insert", "delete", "truncate", "append"]))
    i = data.draw(st.integers(0, len(raw) - 1))
    if op == "replace":
        b = data.draw(st.integers(0, 255).filter(lambda b: b != raw[i]))
        raw[i] = b
    elif op == "insert":
        raw.insert(i, data.draw(st.integers(0, 255)))
    elif op == "delete":
        del raw[i]
    elif op == "truncate":
        del raw[i:]
    else:
        raw += data.draw(st.binary(min_size=1, max_size=8))
    with pytest.raises(RecordError):
        decode(bytes(raw), now=NOW)


@pytest.mark.parametrize("kind", KINDS)
def test_a_signature_made_under_another_kinds_domain_fails(kind: str) -> None:
    body, key = SAMPLES[kind]
    for other in KINDS:
        if other != kind:
            raw = envelope(kind, fields_of(body), key, domain=DOMAIN[other])
            assert reason_of(raw) == "signature"


@pytest.mark.parametrize("kind", KINDS)
def test_a_record_relabelled_as_another_kind_fails(kind: str) -> None:
    body, key = SAMPLES[kind]
    _, payload, sig = msgpack.unpackb(sign(body, key).raw)
    for other in KINDS:
        if other != kind:
            raw = msgpack.packb([CODES[other], payload, sig], use_bin_type=True)
            assert reason_of(raw) in ("malformed", "signature")


def test_relabelled_record_with_a_matching_shape_fails_on_signature() -> None:
    # A 7-field list valid as both a site-record and a vouch does not exist, so build the
    # strongest replay we can: a vouch-shaped body signed under the site-record domain.
    v = vouch()
    raw = envelope("vouch", fields_of(v), FOUNDER, domain=DOMAIN["site-record"])
    assert reason_of(raw) == "signature"


# --- each reason ---------------------------------------------------------------------------


def test_oversized_is_checked_before_unpacking() -> None:
    assert reason_of(b"\xc1" * (MAX_SIGNED_BYTES + 1)) == "oversized"  # 0xc1 never valid msgpack
    huge = msgpack.packb([3, b"x" * MAX_SIGNED_BYTES, b"s" * 64], use_bin_type=True)
    assert reason_of(huge) == "oversized"


def test_exactly_max_size_is_not_oversized() -> None:
    assert reason_of(b"\xc1" * MAX_SIGNED_BYTES) == "malformed"


def _genesis_fields(**kw: Any) -> list[Any]:
    f = dict(founder=FOUNDER.public, name="m", created=NOW, salt=b"\x00" * 16)
    f.update(kw)
    return list(f.values())


def _env(code: Any, body: Any, sig: Any, *, bin_type: bool = True) -> bytes:
    return msgpack.packb([code, body, sig], use_bin_type=bin_type)


_GB = msgpack.packb(_genesis_fields(), use_bin_type=True)
MALFORMED_ENVELOPES: list[Any] = [
    b"",
    b"\x93",
    msgpack.packb([1, b"x"]),
    msgpack.packb([1, b"x", b"s" * 64, 0]),
    msgpack.packb({"kind": 1}),
    msgpack.packb("text"),
    _env(9, msgpack.packb([]), b"s" * 64),  # unknown kind code
    _env(True, _GB, b"s" * 64),  # bool kind code
    _env(1.0, _GB, b"s" * 64),  # float kind code
    _env(1, "body", b"s" * 64),  # body as str
    _env(1, _GB, b"s" * 63),  # short signature
    _env(1, _GB, b"s" * 64) + b"\x00",  # trailing bytes
    _env(1, _GB, b"s" * 64, bin_type=False),  # bytes as raw str
    "not bytes",
    None,
    12,
]


@pytest.mark.parametrize("raw", MALFORMED_ENVELOPES)
def test_malformed_envelopes(raw: Any) -> None:
    assert reason_of(raw) == "malformed"


def test_non_canonical_integer_encoding_is_malformed() -> None:
    # kind code 1 as uint16 (0xcd 0x00 0x01) instead of a positive fixint.
    signed = sign(*SAMPLES["genesis"])
    assert signed.raw[:2] == b"\x93\x01"
    raw = b"\x93\xcd\x00\x01" + signed.raw[2:]
    assert reason_of(raw) == "malformed"


def test_non_canonical_body_is_malformed_even_if_signed() -> None:
    fields = fields_of(GENESIS)
    body = msgpack.packb(fields, use_bin_type=True)
    assert body[0] == 0x94
    body = b"\xdc\x00\x04" + body[1:]  # array16 header instead of fixarray
    sig = FOUNDER.sign(DOMAIN["genesis"] + body)
    raw = msgpack.packb([1, body, sig], use_bin_type=True)
    assert reason_of(raw) == "malformed"


SR = fields_of(site_record())
VO = fields_of(vouch())
RV = fields_of(revocation())
GE = fields_of(GENESIS)


def _with(fields: list[Any], i: int, value: Any) -> list[Any]:
    out = list(fields)
    out[i] = value
    return out


MALFORMED_BODIES: list[tuple[str, list[Any], SiteKey]] = [
    # field count
    ("site-record", SR[:-1], ALICE),
    ("site-record", SR + [0], ALICE),
    ("vouch", [], FOUNDER),
    # bool vs int confusion
    ("site-record", _with(SR, 4, 1), ALICE),  # reachable as int
    ("site-record", _with(SR, 5, True), ALICE),  # seq as bool
    ("vouch", _with(VO, 6, False), FOUNDER),
    ("genesis", _with(GE, 2, True), FOUNDER),
    # negative and non-integers
    ("site-record", _with(SR, 5, -1), ALICE),
    ("vouch", _with(VO, 6, -5), FOUNDER),
    ("revocation", _with(RV, 3, 1.5), FOUNDER),
    ("site-record", _with(SR, 6, 2**64 - 1), ALICE),
    # keys and ids
    ("site-record", _with(SR, 0, ALICE.public[:31]), ALICE),
    ("vouch", _with(VO, 2, b"\x00" * 33), FOUNDER),
    ("vouch", _with(VO, 2, "k" * 32), FOUNDER),
    ("revocation", _with(RV, 0, b"\x00" * 15), FOUNDER),
    ("genesis", _with(GE, 3, b"\x00" * 17), FOUNDER),
    # names
    ("site-record", _with(SR, 2, ""), ALICE),
    ("site-record", _with(SR, 2, "a" * 65), ALICE),
    ("site-record", _with(SR, 2, "-lead"), ALICE),
    ("site-record", _with(SR, 2, ".hidden"), ALICE),
    ("site-record", _with(SR, 2, "has space"), ALICE),
    ("site-record", _with(SR, 2, "name\n"), ALICE),
    ("site-record", _with(SR, 2, "n\u00e9"), ALICE),
    ("site-record", _with(SR, 2, "\uff41"), ALICE),  # fullwidth a
    ("vouch", _with(VO, 3, "a/b"), FOUNDER),
    ("genesis", _with(GE, 1, b"bytes-name"), FOUNDER),
    # addresses
    ("site-record", _with(SR, 3, ["h:1"] * 9), ALICE),
    ("site-record", _with(SR, 3, ["h" * 256]), ALICE),
    ("site-record", _with(SR, 3, [""]), ALICE),
    ("site-record", _with(SR, 3, ["a b:1"]), ALICE),
    ("site-record", _with(SR, 3, ["\x1b[31m"]), ALICE),
    ("site-record", _with(SR, 3, [b"h:1"]), ALICE),
    ("site-record", _with(SR, 3, "h:1"), ALICE),
    # roles
    ("vouch", _with(VO, 4, "admin"), FOUNDER),
    ("vouch", _with(VO, 4, "Member"), FOUNDER),
    ("vouch", _with(VO, 4, 1), FOUNDER),
    # revocation reason
    ("revocation", _with(RV, 4, "x" * 257), FOUNDER),
    ("revocation", _with(RV, 4, "bell\x07"), FOUNDER),
    ("revocation", _with(RV, 4, None), FOUNDER),
    # foreign types
    ("site-record", _with(SR, 4, None), ALICE),
    ("site-record", _with(SR, 4, {}), ALICE),
]


@pytest.mark.parametrize(
    "kind, fields, key", MALFORMED_BODIES, ids=[str(i) for i in range(len(MALFORMED_BODIES))]
)
def test_malformed_bodies_even_when_correctly_signed(
    kind: str, fields: list[Any], key: SiteKey
) -> None:
    assert reason_of(envelope(kind, fields, key)) == "malformed"


def test_max_field_sizes_are_accepted() -> None:
    rec = site_record(name="a" * 64, addrs=tuple("h" * 255 for _ in range(8)))
    assert decode(sign(rec, ALICE).raw, now=NOW).body == rec
    rev = revocation(reason="~" * 256)
    assert decode(sign(rev, FOUNDER).raw, now=NOW).body == rev


def test_type() -> None:
    raw = sign(*SAMPLES["vouch"]).raw
    assert reason_of(raw, kinds=("site-record", "revocation")) == "type"
    assert reason_of(raw, kinds=()) == "type"
    assert decode(raw, now=NOW, kinds=("vouch",)).kind == "vouch"


def test_malformed_wins_over_type() -> None:
    raw = envelope("vouch", _with(VO, 4, "admin"), FOUNDER)
    assert reason_of(raw, kinds=("genesis",)) == "malformed"


@pytest.mark.parametrize("kind", ["site-record", "vouch", "revocation"])
def test_mesh_mismatch(kind: str) -> None:
    raw = sign(*SAMPLES[kind]).raw
    assert reason_of(raw, mesh_id=b"\x00" * 16) == "mesh"
    assert decode(raw, now=NOW, mesh_id=MESH).kind == kind


def test_genesis_mesh_is_computed() -> None:
    raw = sign(GENESIS, FOUNDER).raw
    assert decode(raw, now=NOW, mesh_id=MESH).body == GENESIS
    assert reason_of(raw, mesh_id=b"\x00" * 16) == "mesh"
    other = Genesis(FOUNDER.public, "other-mesh", GENESIS.created, GENESIS.salt)
    assert reason_of(sign(other, FOUNDER).raw, mesh_id=MESH) == "mesh"


@pytest.mark.parametrize("kind", KINDS)
def test_signature_by_someone_else(kind: str) -> None:
    body, _ = SAMPLES[kind]
    assert reason_of(envelope(kind, fields_of(body), MALLORY)) == "signature"


@pytest.mark.parametrize("index", [1, 2])
@pytest.mark.parametrize("bad", [b"\xff" * 32, b"\x01" + bytes(31), bytes(32)])
def test_keys_that_are_not_valid_points_are_malformed(index: int, bad: bytes) -> None:
    # Off-curve and small-order keys: a vouch for one would break X25519 conversion later.
    assert reason_of(envelope("vouch", _with(VO, index, bad), FOUNDER)) == "malformed"


def test_expired() -> None:
    for expires in (NOW, NOW - 1, 1):
        raw = sign(vouch(expires=expires, issued=0), FOUNDER).raw
        assert reason_of(raw) == "expired"
    assert decode(sign(vouch(expires=NOW + 1), FOUNDER).raw, now=NOW).body.expires == NOW + 1
    assert decode(sign(vouch(expires=0), FOUNDER).raw, now=NOW).body.expires == 0


@pytest.mark.parametrize("kind", KINDS)
def test_future(kind: str) -> None:
    body, key = SAMPLES[kind]
    if kind == "rotation":  # both signatures cover issued: sign anew rather than edit
        assert decode(sign(rotation(issued=NOW + MAX_CLOCK_SKEW), ALICE).raw, now=NOW).kind == kind
        assert reason_of(sign(rotation(issued=NOW + MAX_CLOCK_SKEW + 1), ALICE).raw) == "future"
        return
    fields = fields_of(body)
    idx = 2 if kind == "genesis" else {"site-record": 6, "vouch": 5, "revocation": 3}[kind]
    ok = envelope(kind, _with(fields, idx, NOW + MAX_CLOCK_SKEW), key)
    assert decode(ok, now=NOW).kind == kind
    bad = envelope(kind, _with(fields, idx, NOW + MAX_CLOCK_SKEW + 1), key)
    assert reason_of(bad) == "future"


def test_rotation_needs_the_new_keys_signature_too() -> None:
    good = rotation()
    forged = Rotation(good.mesh_id, good.old, MALLORY.public, good.issued, good.new_sig)
    assert reason_of(sign(forged, ALICE).raw) == "signature"  # new_sig is FOUNDER's, not MALLORY's
    selfie = Rotation(good.mesh_id, ALICE.public, ALICE.public, good.issued,
                      ALICE.sign(good.handover()))
    assert reason_of(sign(selfie, ALICE).raw) == "signature"
    assert decode(sign(good, ALICE).raw, now=NOW).body == good


def test_signature_is_checked_before_time() -> None:
    forged = envelope("vouch", fields_of(vouch(expires=1, issued=0)), MALLORY)
    assert reason_of(forged) == "signature"


def test_record_error_is_a_remote_error() -> None:
    with pytest.raises(RemoteError):
        decode(b"", now=NOW)


# --- fuzzing -------------------------------------------------------------------------------

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=70)
    | st.binary(max_size=70),
    lambda children: st.lists(children, max_size=10)
    | st.dictionaries(st.text(max_size=5) | st.integers(0, 5), children, max_size=3),
    max_leaves=20,
)


def _decode_only_record_error(raw: Any) -> None:
    try:
        result = decode(raw, now=NOW)
    except RecordError:
        return
    assert isinstance(result, Signed)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=MAX_SIGNED_BYTES + 8))
def test_fuzz_random_bytes(raw: bytes) -> None:
    _decode_only_record_error(raw)


@settings(max_examples=300, deadline=None)
@given(msgpack_values)
def test_fuzz_random_msgpack(value: Any) -> None:
    _decode_only_record_error(msgpack.packb(value, use_bin_type=True))
    _decode_only_record_error(msgpack.packb(value, use_bin_type=False))


@settings(max_examples=100, deadline=None)
@given(
    code=st.integers(-2, 6) | msgpack_values,
    body=st.lists(msgpack_values, max_size=9),
    key=keys,
    kind=st.sampled_from(KINDS),
)
def test_fuzz_signed_envelopes_with_random_bodies(
    code: Any, body: list[Any], key: SiteKey, kind: str
) -> None:
    raw = envelope(kind, body, key, code=code)
    _decode_only_record_error(raw)


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(KINDS), data=st.data())
def test_fuzz_one_field_of_a_correctly_signed_body(kind: str, data: st.DataObject) -> None:
    body, key = SAMPLES[kind]
    fields = fields_of(body)
    i = data.draw(st.integers(0, len(fields) - 1))
    fields[i] = data.draw(msgpack_values | st.integers() | st.text(max_size=300))
    try:
        raw = envelope(kind, fields, key)
    except (OverflowError, TypeError, ValueError):
        return  # msgpack cannot encode the value; nothing to send
    try:
        got = decode(raw, now=NOW)
    except RecordError:
        return
    # Whatever passes is exactly what was signed, and survives a round trip.
    assert fields_of(got.body) == [tuple(f) if isinstance(f, list) else f for f in fields]
    assert sign(got.body, key).raw == raw


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64))
def test_fuzz_ext_types(data: bytes) -> None:
    raw = msgpack.packb([1, msgpack.ExtType(5, data), b"s" * 64], use_bin_type=True)
    _decode_only_record_error(raw)


def test_empty_ext_is_malformed() -> None:
    assert reason_of(b"\x93\x01\xc7\x00\x05\xc4\x40" + b"s" * 64) == "malformed"


def test_deep_nesting_is_malformed() -> None:
    assert reason_of(b"\x91" * 3000 + b"\xc0") == "malformed"
