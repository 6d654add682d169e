"""MeshView: the one gate signed objects pass to reach the trust store.

Real SiteKeys, a real SQLite file per test, ``now`` passed explicitly.  What the view refuses
must never reach the tables, so the tests read the SQLite file directly as well.
"""

from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path

import pytest

from meshd.trust import records
from meshd.errors import RecordError
from meshd.trust.identity import SiteKey
from meshd.state.site import SiteKeys
from meshd.state.view import MeshView
from meshd.trust.records import Genesis, Revocation, Signed, SiteRecord, Vouch
from meshd.state.store import Store

NOW = 1_800_000_000
SALT = b"\x01" * 16


def key(n: int) -> SiteKey:
    return SiteKey(bytes([n]) * 32)


F, A, B, C, M, X = (key(i) for i in range(1, 7))  # F founds; X is an outsider


def vouch(by: SiteKey, subject: SiteKey, mesh_id: bytes, role: str = "member",
          name: str | None = None, expires: int = 0, issued: int = NOW) -> Signed:
    return records.sign(Vouch(mesh_id, by.public, subject.public,
                              name or f"site-{subject.public[0]}", role, issued, expires), by)


def site_record(k: SiteKey, mesh_id: bytes, seq: int = 1, name: str | None = None,
                addrs: tuple[str, ...] = ("10.0.0.1:4750",)) -> Signed:
    return records.sign(SiteRecord(k.public, mesh_id, name or f"site-{k.public[0]}", addrs,
                                   True, seq, NOW), k)


def revocation(by: SiteKey, subject: SiteKey, mesh_id: bytes) -> Signed:
    return records.sign(Revocation(mesh_id, by.public, subject.public, NOW, "test"), by)


def forge(s: Signed) -> bytes:
    """The same envelope with the last signature byte flipped (still canonical msgpack)."""
    return s.raw[:-1] + bytes([s.raw[-1] ^ 0x01])


def rows(path: Path, table: str) -> list[tuple[object, ...]]:
    db = sqlite3.connect(path)
    try:
        return list(db.execute(f"SELECT * FROM {table}"))
    finally:
        db.close()


def raws(path: Path, table: str) -> set[bytes]:
    db = sqlite3.connect(path)
    try:
        return {r[0] for r in db.execute(f"SELECT raw FROM {table}")}
    finally:
        db.close()


@pytest.fixture
def founded(tmp_path: Path):
    """A founder's store and view over a fresh mesh."""
    path = tmp_path / "founder.db"
    store = Store(path)
    view = MeshView(store, SiteKeys(F))
    view.found("testmesh", SALT, NOW)
    yield path, store, view
    store.close()


def mesh_of(view: MeshView) -> bytes:
    assert view.mesh_id is not None
    return view.mesh_id


# --- found ------------------------------------------------------------------------------------


def test_found_makes_the_founder_the_only_introducer(founded) -> None:
    path, _, view = founded
    assert set(view.members) == {F.public}
    assert view.members[F.public].role == "introducer"
    assert view.mesh_name == "testmesh"
    db = sqlite3.connect(path)
    meta = dict(db.execute("SELECT key, value FROM meta"))
    db.close()
    assert meta["mesh_id"] == view.mesh_id
    assert meta["role"] == "introducer"
    assert records.decode(meta["genesis"], now=NOW, kinds=("genesis",)).raw == view.genesis.raw


# --- refusals ---------------------------------------------------------------------------------


def test_forged_record_is_refused_counted_and_never_stored(founded) -> None:
    path, _, view = founded
    mesh = mesh_of(view)
    assert view.ingest([vouch(F, A, mesh).raw], NOW).stored == 1
    good = site_record(A, mesh)
    forged_vouch = forge(vouch(F, B, mesh))
    result = view.ingest([forge(good), forged_vouch, forge(revocation(F, A, mesh))], NOW)
    assert result.stored == 0
    assert result.refused == {"signature": 3}
    assert view.refused["signature"] == 3
    assert rows(path, "site_records") == []
    assert rows(path, "revocations") == []
    assert [r[0] for r in rows(path, "vouches")] == [vouch(F, A, mesh).digest]
    assert B.public not in view.members and A.public in view.members


def test_stale_or_equal_seq_is_refused_and_newer_is_kept(founded) -> None:
    path, store, view = founded
    mesh = mesh_of(view)
    view.ingest([vouch(F, A, mesh).raw], NOW)
    v2 = site_record(A, mesh, seq=2, addrs=("10.0.0.2:1",))
    assert view.ingest([v2.raw], NOW).stored == 1
    older = site_record(A, mesh, seq=1, addrs=("10.0.0.9:1",))
    same_seq_other = site_record(A, mesh, seq=2, addrs=("10.0.0.3:1",))
    result = view.ingest([older.raw, same_seq_other.raw], NOW)
    assert result.refused == {"stale": 2}
    assert result.stored == 0
    assert view.ingest([v2.raw], NOW).duplicate == 1
    assert rows(path, "site_records") == [(A.public, 2, v2.raw)]
    assert view.record_of(A.public) == v2.body
    assert store.record_seq(A.public) == 2


def test_record_of_a_non_member_is_unauthorized(founded) -> None:
    path, _, view = founded
    result = view.ingest([site_record(X, mesh_of(view)).raw], NOW)
    assert result.refused == {"unauthorized": 1}
    assert rows(path, "site_records") == []


def test_vouches_for_an_outsider_by_an_outsider_are_unauthorized(founded) -> None:
    path, _, view = founded
    result = view.ingest([vouch(X, B, mesh_of(view), role="introducer").raw], NOW)
    assert result.refused == {"unauthorized": 1}
    assert rows(path, "vouches") == []


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_dependent_vouches_in_one_batch_are_admitted_in_any_order(tmp_path: Path, order) -> None:
    path = tmp_path / "f.db"
    store = Store(path)
    view = MeshView(store, SiteKeys(F))
    view.found("testmesh", SALT, NOW)
    mesh = mesh_of(view)
    chain = [vouch(F, A, mesh, "introducer"), vouch(A, B, mesh, "introducer"), vouch(B, C, mesh)]
    result = view.ingest([chain[i].raw for i in order], NOW)
    assert result.stored == 3 and result.refused == {}
    assert set(view.members) == {F.public, A.public, B.public, C.public}
    assert view.members[C.public].role == "member"
    assert raws(path, "vouches") == {s.raw for s in chain}
    store.close()


def test_vouch_by_a_member_role_site_is_refused(founded) -> None:
    path, _, view = founded
    mesh = mesh_of(view)
    by_member = vouch(M, X, mesh, "introducer")
    result = view.ingest([vouch(F, M, mesh, "member").raw, by_member.raw], NOW)
    assert result.stored == 1
    assert result.refused == {"unauthorized": 1}
    assert X.public not in view.members
    assert by_member.raw not in raws(path, "vouches")


def test_revocation_by_an_introducer_removes_the_subject_and_its_dependants(founded) -> None:
    path, _, view = founded
    mesh = mesh_of(view)
    view.ingest([vouch(F, A, mesh, "introducer").raw, vouch(A, B, mesh, "introducer").raw,
                 vouch(B, C, mesh).raw, vouch(F, M, mesh).raw], NOW)
    assert set(view.members) == {F.public, A.public, B.public, C.public, M.public}
    rev = revocation(A, B, mesh)
    result = view.ingest([rev.raw], NOW)
    assert result.stored == 1 and result.refused == {}
    assert set(view.members) == {F.public, A.public, M.public}  # C came only through B
    assert view.is_revoked(B.public) and not view.is_revoked(C.public)
    assert raws(path, "revocations") == {rev.raw}
    # B's own record is refused from now on.
    assert view.ingest([site_record(B, mesh).raw], NOW).refused == {"unauthorized": 1}


def test_revocation_by_a_plain_member_is_refused(founded) -> None:
    path, _, view = founded
    mesh = mesh_of(view)
    view.ingest([vouch(F, A, mesh, "introducer").raw, vouch(F, M, mesh).raw], NOW)
    result = view.ingest([revocation(M, A, mesh).raw], NOW)
    assert result.refused == {"unauthorized": 1}
    assert A.public in view.members
    assert rows(path, "revocations") == []


def test_records_of_another_mesh_are_refused(founded) -> None:
    path, _, view = founded
    mesh = mesh_of(view)
    other_genesis = records.sign(Genesis(F.public, "other", NOW, b"\x02" * 16), F)
    other = other_genesis.body.mesh_id  # type: ignore[union-attr]
    view.ingest([vouch(F, A, mesh).raw], NOW)
    items = [other_genesis.raw, vouch(F, B, other).raw, site_record(A, other).raw,
             revocation(F, A, other).raw]
    result = view.ingest(items, NOW)
    assert result.refused == {"mesh": 4}
    assert result.stored == 0
    assert rows(path, "site_records") == [] and rows(path, "revocations") == []
    assert len(rows(path, "vouches")) == 1
    assert view.ingest([view.genesis.raw], NOW).duplicate == 1


# --- adopt ------------------------------------------------------------------------------------


def test_adopt_makes_the_joiner_a_member(founded, tmp_path: Path) -> None:
    _, _, view = founded
    mesh = mesh_of(view)
    view.ingest([vouch(F, A, mesh, "introducer").raw, site_record(A, mesh).raw], NOW)
    jstore = Store(tmp_path / "a.db")
    joiner = MeshView(jstore, SiteKeys(A))
    joiner.adopt(view.snapshot(), mesh, NOW)
    assert joiner.members == view.members
    assert joiner.mesh_id == mesh
    assert jstore.get_meta("role") == "introducer"
    assert joiner.record_of(A.public) is not None
    jstore.close()


def test_adopt_a_snapshot_without_us_raises_and_writes_nothing(founded, tmp_path: Path) -> None:
    _, _, view = founded
    mesh = mesh_of(view)
    view.ingest([vouch(F, A, mesh).raw, site_record(A, mesh).raw], NOW)
    path = tmp_path / "x.db"
    xstore = Store(path)
    outsider = MeshView(xstore, SiteKeys(X))
    with pytest.raises(RecordError) as exc:
        outsider.adopt(view.snapshot(), mesh, NOW)
    assert exc.value.reason == "unauthorized"
    assert outsider.genesis is None and outsider.members == {}
    for table in ("site_records", "vouches", "revocations"):
        assert rows(path, table) == []
    assert xstore.get_meta("genesis") is None and xstore.get_meta("mesh_id") is None
    xstore.close()


def test_adopt_refuses_a_snapshot_with_one_forged_item_and_keeps_the_old_mesh(
        founded, tmp_path: Path) -> None:
    _, _, view = founded
    mesh = mesh_of(view)
    view.ingest([vouch(F, A, mesh).raw], NOW)
    path = tmp_path / "a.db"
    astore = Store(path)
    a = MeshView(astore, SiteKeys(A))
    a.found("mine", b"\x03" * 16, NOW)
    before = astore.get_meta("genesis")
    with pytest.raises(RecordError) as exc:
        a.adopt([*view.snapshot(), forge(site_record(A, mesh))], mesh, NOW)
    assert exc.value.reason == "signature"
    assert astore.get_meta("genesis") == before
    assert rows(path, "vouches") == []
    astore.close()


# --- load -------------------------------------------------------------------------------------


def _populated(path: Path) -> tuple[Store, MeshView, bytes]:
    store = Store(path)
    view = MeshView(store, SiteKeys(F))
    view.found("testmesh", SALT, NOW)
    mesh = mesh_of(view)
    view.ingest([vouch(F, A, mesh, "introducer").raw, vouch(A, B, mesh).raw,
                 vouch(F, C, mesh).raw, site_record(A, mesh).raw, site_record(B, mesh).raw,
                 revocation(F, C, mesh).raw], NOW)
    return store, view, mesh


def test_load_after_reopening_gives_the_same_members(tmp_path: Path) -> None:
    path = tmp_path / "f.db"
    store, view, _ = _populated(path)
    members, revoked, snapshot = view.members, view.revoked, set(view.snapshot())
    assert set(members) == {F.public, A.public, B.public}
    store.close()
    store2 = Store(path)
    again = MeshView(store2, SiteKeys(F))
    again.load(NOW + 10)
    assert again.members == members
    assert again.revoked == revoked == frozenset({C.public})
    assert set(again.snapshot()) == snapshot
    store2.close()


def _tamper(path: Path, table: str, where: str, arg: bytes) -> bytes:
    """Flip the last byte (in the signature) of one stored blob; returns the tampered blob."""
    db = sqlite3.connect(path)
    (raw,) = db.execute(f"SELECT raw FROM {table} WHERE {where} = ?", (arg,)).fetchone()
    tampered = raw[:-1] + bytes([raw[-1] ^ 0x01])
    db.execute(f"UPDATE {table} SET raw = ? WHERE {where} = ?", (tampered, arg))
    db.commit()
    db.close()
    return bytes(tampered)


def _load_untrusting(path: Path) -> MeshView | RecordError:
    store = Store(path)
    view = MeshView(store, SiteKeys(F))
    try:
        view.load(NOW)
    except RecordError as exc:
        store.close()
        return exc
    return view


def test_load_drops_a_tampered_vouch(tmp_path: Path) -> None:
    path = tmp_path / "f.db"
    store, view, mesh = _populated(path)
    digest = vouch(A, B, mesh).digest
    store.close()
    _tamper(path, "vouches", "digest", digest)
    got = _load_untrusting(path)
    # Observed behaviour: the tampered vouch is silently dropped and B is no member.
    assert isinstance(got, MeshView)
    assert digest not in got.vouches
    assert B.public not in got.members and A.public in got.members
    got.store.close()


def test_load_leaves_out_and_counts_a_tampered_site_record(tmp_path: Path) -> None:
    path = tmp_path / "f.db"
    store, view, mesh = _populated(path)
    store.close()
    tampered = _tamper(path, "site_records", "key", A.public)
    got = _load_untrusting(path)
    assert isinstance(got, MeshView)
    assert tampered not in got.snapshot() and A.public not in got.site_records
    assert got.refused["stored_signature"] == 1
    assert A.public in got.members  # membership comes from vouches, which are intact
    got.store.close()


def test_load_refuses_a_store_with_a_tampered_revocation(tmp_path: Path) -> None:
    """Leaving the revocation out would let the revoked site back in: refuse the whole store."""
    path = tmp_path / "f.db"
    store, view, mesh = _populated(path)
    store.close()
    _tamper(path, "revocations", "digest", revocation(F, C, mesh).digest)
    got = _load_untrusting(path)
    assert isinstance(got, RecordError) and got.reason == "signature"


def test_load_accepts_records_issued_ahead_of_a_clock_set_back(tmp_path: Path) -> None:
    path = tmp_path / "f.db"
    store, view, mesh = _populated(path)
    members = set(view.members)
    store.close()
    store = Store(path)
    later = MeshView(store, SiteKeys(F))
    later.load(NOW - 3600)  # the clock went back an hour since these were stored
    assert set(later.members) == members and not later.refused
    store.close()


def test_vouch_by_a_revoked_introducer_is_refused(founded) -> None:
    path, _, view = founded
    mesh = mesh_of(view)
    view.ingest([vouch(F, A, mesh, "introducer").raw, revocation(F, A, mesh).raw], NOW)
    late = vouch(A, X, mesh)
    assert view.ingest([late.raw], NOW).refused == {"unauthorized": 1}
    assert X.public not in view.members
    assert late.raw not in raws(path, "vouches")


def test_ingest_before_joining_a_mesh_stores_nothing(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    store = Store(path)
    view = MeshView(store, SiteKeys(X))
    view.load(NOW)
    other = records.sign(Genesis(F.public, "m", NOW, SALT), F)
    result = view.ingest([other.raw, vouch(F, X, other.body.mesh_id).raw], NOW)  # type: ignore[union-attr]
    assert result.stored == 0
    for table in ("site_records", "vouches", "revocations"):
        assert rows(path, table) == []
    store.close()


# --- key rotation -------------------------------------------------------------------------------


def test_rotation_by_a_member_hands_over_and_survives_reload(founded, tmp_path: Path) -> None:
    path, store, view = founded
    mesh = mesh_of(view)
    A2 = key(21)
    view.ingest([vouch(F, A, mesh, "introducer").raw, vouch(A, B, mesh).raw], NOW)
    rotation = records.sign_rotation(mesh, A, A2, NOW)
    result = view.ingest([rotation.raw], NOW)
    assert result.stored == 1
    assert A.public not in view.members and view.members[A2.public].role == "introducer"
    assert view.members[B.public].vouched_by == A2.public
    assert view.retired == {A.public: A2.public}
    # A vouch signed by the retired key (it admitted C before the handover) still counts.
    assert view.ingest([vouch(A, C, mesh).raw], NOW).stored == 1 and view.is_member(C.public)
    store.close()
    again = MeshView(Store(path), SiteKeys(F))
    again.load(NOW)
    assert set(again.members) == set(view.members)
    assert rotation.raw in again.snapshot()
    again.store.close()


@pytest.mark.parametrize("order", ["in-order", "reversed"])
def test_two_rotations_heard_in_one_batch_are_both_followed(founded, order: str) -> None:
    """A member that missed two rotations of a site (it was away) hears both in one exchange.
    Bug: the second (A2 -> A3) was refused because A2 became a member only after the batch,
    so the site's newest key stayed unknown for good."""
    path, _, view = founded
    mesh = mesh_of(view)
    A2, A3 = key(24), key(25)
    view.ingest([vouch(F, A, mesh, "introducer").raw], NOW)
    batch = [records.sign_rotation(mesh, A, A2, NOW).raw,
             records.sign_rotation(mesh, A2, A3, NOW + 1).raw]
    result = view.ingest(batch if order == "in-order" else batch[::-1], NOW + 2)
    assert result.stored == 2 and not result.refused
    assert A3.public in view.members and A.public not in view.members
    assert A2.public not in view.members
    assert view.retired == {A.public: A3.public, A2.public: A3.public}
    assert len(rows(path, "rotations")) == 2


def test_rotation_by_a_non_member_is_refused_and_not_stored(founded) -> None:
    path, _, view = founded
    rotation = records.sign_rotation(mesh_of(view), X, key(22), NOW)
    result = view.ingest([rotation.raw], NOW)
    assert result.refused == {"unauthorized": 1}
    assert rows(path, "rotations") == [] and not view.is_member(key(22).public)


def test_a_joiner_adopts_a_snapshot_with_a_rotated_introducer(founded, tmp_path: Path) -> None:
    _, _, view = founded
    mesh = mesh_of(view)
    A2 = key(23)
    view.ingest([vouch(F, A, mesh, "introducer").raw], NOW)
    view.ingest([records.sign_rotation(mesh, A, A2, NOW).raw], NOW)
    view.ingest([vouch(A2, B, mesh).raw], NOW)  # the new key admits B
    joiner = MeshView(Store(tmp_path / "b.db"), SiteKeys(B))
    joiner.adopt(view.snapshot(), mesh, NOW)
    assert set(joiner.members) == {F.public, A2.public, B.public}
    joiner.store.close()


# --- cheap checks before signatures (issue 11: a member flooding sync) -------------------------


def test_copies_and_held_objects_are_duplicates_before_any_signature_check(
        founded, monkeypatch) -> None:
    _, _, view = founded
    mesh = mesh_of(view)
    v = vouch(F, A, mesh)
    assert view.ingest([v.raw], NOW).stored == 1
    rec = site_record(A, mesh)
    calls = []
    real = records.decode
    monkeypatch.setattr(records, "decode", lambda raw, **kw: calls.append(raw) or real(raw, **kw))
    screened = view.screen([v.raw] * 100 + [rec.raw] * 100 + [view.genesis.raw])
    assert screened.fresh == [rec.raw] and screened.duplicate == 200
    result = view.ingest([v.raw] * 100 + [rec.raw] * 100, NOW)
    assert result.stored == 1 and result.duplicate == 199 and calls == [rec.raw]
    calls.clear()
    assert view.ingest([rec.raw] * 50, NOW).duplicate == 50 and calls == []


def test_bytes_refused_for_good_are_refused_again_without_a_signature_check(
        founded, monkeypatch) -> None:
    _, _, view = founded
    mesh = mesh_of(view)
    view.ingest([vouch(F, A, mesh).raw, site_record(A, mesh, seq=2).raw], NOW)
    forged, stale = forge(site_record(A, mesh, seq=3)), site_record(A, mesh, seq=1).raw
    unauthorized = site_record(B, mesh).raw  # B may become a member later: checked each time
    assert view.ingest([forged, stale, unauthorized], NOW).refused == {
        "signature": 1, "stale": 1, "unauthorized": 1}
    calls = []
    real = records.decode
    monkeypatch.setattr(records, "decode", lambda raw, **kw: calls.append(raw) or real(raw, **kw))
    assert view.ingest([forged, stale, unauthorized], NOW).refused == {
        "signature": 1, "stale": 1, "unauthorized": 1}
    assert calls == [unauthorized]
    assert view.screen([b"x", 5, b"\x00" * (records.MAX_SIGNED_BYTES + 1)]).refused == {  # type: ignore[list-item]
        "malformed": 1, "oversized": 1} and view.screen([b"x"]).fresh == [b"x"]
