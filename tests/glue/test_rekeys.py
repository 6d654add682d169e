"""The ``rekey`` request: a member that missed a site's rotations takes them from that site.

A real MeshView over a real SQLite file, real keys and signatures; the request is the decoded
peer message as the peer port hands it over.  What is refused must leave the store untouched,
and a refused address is throttled before any signature is checked."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from meshd.daemon.counters import Counters
from meshd.daemon.rekeys import (CHECKS_BURST, CHECKS_PER_SECOND, MAX_CHAIN, Rekeys,
                                  rotation_chain)
from meshd.errors import JoinRefused, ProtocolError
from meshd.peer import wire
from meshd.peer.server import PeerInfo
from meshd.state.site import SiteKeys
from meshd.state.store import Store
from meshd.state.throttle import Throttle
from meshd.state.view import MeshView
from meshd.trust import records
from meshd.trust.identity import SiteKey, curve_public_of
from meshd.trust.records import Revocation, SiteRecord, Vouch


def key(n: int) -> SiteKey:
    return SiteKey(bytes([n]) * 32)


F, A, A1, A2, A3, X, B, B1 = (key(i) for i in range(1, 9))  # F founds; A rotates; X outsider


class Mesh:
    """F's view, with A vouched in; ``rekeys`` answers as F's daemon would."""

    def __init__(self, path: Path) -> None:
        self.now = int(time.time())
        self.path = path
        self.store = Store(path)
        self.view = MeshView(self.store, SiteKeys(F))
        self.view.found("testmesh", b"\x01" * 16, self.now)
        assert self.view.mesh_id is not None
        self.mesh = self.view.mesh_id
        self.view.ingest([records.sign(Vouch(self.mesh, F.public, A.public, "alcf", "member",
                                             self.now, 0), F).raw], self.now)
        self.counters = Counters()
        self.rekeys = Rekeys(view=self.view, counters=self.counters,
                             keep=lambda k, screened, verified: self.view.apply(
                                 screened, verified, self.now),
                             throttle=Throttle(base=5.0, cap=60.0))

    def rotation(self, old: SiteKey, new: SiteKey, dt: int = 0) -> bytes:
        return records.sign_rotation(self.mesh, old, new, self.now + dt).raw

    def ask(self, items: list[Any], sender: SiteKey, *, mesh: bytes | None = None,
            address: str = "192.0.2.7") -> dict[str, Any]:
        msg = {"t": "rekey", "id": 1, "mesh": self.mesh if mesh is None else mesh,
               "items": items}
        info = PeerInfo(curve_public_of(sender.public), address)
        return asyncio.run(self.rekeys.answer(msg, info))

    def refused(self, items: list[Any], sender: SiteKey, **kw: Any) -> JoinRefused:
        before = self.store_bytes()
        with pytest.raises(JoinRefused) as caught:
            self.ask(items, sender, **kw)
        assert self.store_bytes() == before  # nothing kept
        return caught.value

    def store_bytes(self) -> list[bytes]:
        return sorted(self.view.snapshot())


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path / "f.db")
    yield m
    m.store.close()


def test_two_missed_rotations_are_taken_from_the_site_that_made_them(mesh: Mesh) -> None:
    assert mesh.ask([mesh.rotation(A, A1), mesh.rotation(A1, A2, 1)], A2) == {"t": "ok"}
    assert mesh.view.by_curve[curve_public_of(A2.public)] == A2.public
    assert A.public not in mesh.view.members and mesh.view.members[A2.public].role == "member"
    assert mesh.view.retired == {A.public: A2.public, A1.public: A2.public}
    assert mesh.counters.snapshot()["rekeys_taken"] == 1


def test_a_member_asking_again_costs_no_signature_check(mesh: Mesh) -> None:
    """A member's key is known: answered at once, even with garbage that would not decode."""
    assert mesh.ask([b"not a record"], A) == {"t": "ok"}
    assert "rekeys_refused" not in mesh.counters.snapshot()


def test_rotations_that_end_at_another_key_are_refused(mesh: Mesh) -> None:
    """X replays A's genuine rotation: it must not make X's connection count as A1."""
    err = mesh.refused([mesh.rotation(A, A1)], X)
    assert err.reason == "unauthorized" and "the key that sent them" in err.message
    assert A1.public not in mesh.view.members


def test_a_rotation_of_a_key_that_never_was_a_member_is_refused(mesh: Mesh) -> None:
    err = mesh.refused([mesh.rotation(X, A3)], A3)
    assert err.reason == "not-member"
    assert A3.public not in mesh.view.members


def test_a_rotation_of_a_revoked_member_is_refused(mesh: Mesh) -> None:
    mesh.view.ingest([records.sign(Revocation(mesh.mesh, F.public, A.public, mesh.now, "lost"),
                                   F).raw], mesh.now)
    err = mesh.refused([mesh.rotation(A, A1)], A1)
    assert err.reason == "not-member"


@pytest.mark.parametrize("what", ["vouch", "record"])
def test_only_rotations_pass_this_door(mesh: Mesh, what: str) -> None:
    """A stranger must not slip any other signed object into the view this way."""
    other = {"vouch": lambda: records.sign(Vouch(mesh.mesh, A.public, X.public, "x", "member",
                                                 mesh.now, 0), A),
             "record": lambda: records.sign(SiteRecord(X.public, mesh.mesh, "x", ("1.2.3.4:5",),
                                                       True, 1, mesh.now), X)}[what]()
    err = mesh.refused([mesh.rotation(A, A1), other.raw], A1)
    assert err.reason == "type"
    assert A1.public not in mesh.view.members and X.public not in mesh.view.members


def test_rotations_that_do_not_hand_over_one_to_the_next_are_refused(mesh: Mesh) -> None:
    err = mesh.refused([mesh.rotation(A, A1), mesh.rotation(A2, A3)], A3)
    assert err.reason == "malformed"


def test_a_forged_signature_and_another_mesh_are_refused(mesh: Mesh) -> None:
    raw = mesh.rotation(A, A1)
    assert mesh.refused([raw[:-1] + bytes([raw[-1] ^ 1])], A1).reason == "signature"
    assert mesh.refused([raw], A1, mesh=b"\x02" * 16, address="192.0.2.9").reason == "not-member"


def test_a_refused_address_and_key_is_throttled_before_any_check(mesh: Mesh) -> None:
    mesh.refused([mesh.rotation(X, A3)], A3)
    err = mesh.refused([mesh.rotation(A, A1)], A3)  # the same key again, from the same address
    assert err.reason == "throttled" and err.retry_after is not None and err.retry_after > 0
    assert mesh.counters.snapshot()["rekeys_throttled"] == 1
    # A stranger sharing the site's address (a NAT) does not shut the site out.
    assert mesh.ask([mesh.rotation(A, A1)], A1) == {"t": "ok"}


@pytest.mark.parametrize("whose", ["a member's", "the founder's"])
def test_a_thief_of_a_retired_key_cannot_add_a_second_rotation_through_this_door(
        mesh: Mesh, whose: str) -> None:
    """Found by attack: the chain was stored before the last check refused it, and a second
    rotation of a retired key shuts its identity out (a member's: the site lost its place in
    the whole mesh) or, for the founder's key, gave the founder's place back to the old key,
    which the thief holds.  A chain must start at a key that is a member now."""
    old, new = (A, A1) if whose == "a member's" else (F, key(30))
    mesh.view.ingest([mesh.rotation(old, new)], mesh.now)  # every member heard of it
    thief = key(31)
    err = mesh.refused([mesh.rotation(old, thief, 5)], thief)
    assert err.reason == "not-member"
    assert mesh.view.is_member(new.public) and not mesh.view.is_member(old.public)
    assert not mesh.view.is_member(thief.public) and len(mesh.view.rotations) == 1


def test_a_chain_with_the_held_rotations_first_adds_only_the_new_ones(mesh: Mesh) -> None:
    mesh.view.ingest([mesh.rotation(A, A1)], mesh.now)  # heard of the first one only
    assert mesh.ask([mesh.rotation(A, A1), mesh.rotation(A1, A2, 1)], A2) == {"t": "ok"}
    assert mesh.view.is_member(A2.public) and len(mesh.view.rotations) == 2
    # A held rotation after one this site does not hold: not a chain it can follow.
    err = mesh.refused([mesh.rotation(A2, A3, 2), mesh.rotation(A, A1)], A1, address="192.0.2.9")
    assert err.reason == "malformed"


def test_a_forged_chain_costs_at_most_two_signature_checks(
        mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full chain whose first rotation forges a member's signature: the check stops there.
    (Before, every rotation was checked before the cheap checks, 2 per rotation.)"""
    calls = []
    real = records.verify_signature

    def counting(*args: Any) -> bool:
        calls.append(1)
        return bool(real(*args))

    monkeypatch.setattr(records, "verify_signature", counting)
    keys = [key(60 + i) for i in range(MAX_CHAIN)]  # the thief's own keys: signed genuinely
    first = mesh.rotation(A, keys[0])
    chain = [first[:-1] + bytes([first[-1] ^ 1])]  # but the member's signature is forged
    chain += [records.sign_rotation(mesh.mesh, o, n, mesh.now).raw
              for o, n in zip(keys, keys[1:])]
    assert len(chain) == MAX_CHAIN
    assert mesh.refused(chain, keys[-1]).reason == "signature"
    assert len(calls) <= 2
    # Genuinely signed, from a key that is no member: refused before any signature check.
    calls.clear()
    own = [records.sign_rotation(mesh.mesh, X, keys[0], mesh.now).raw] + chain[1:]
    assert mesh.refused(own, keys[-1], address="192.0.2.99").reason == "not-member"
    assert calls == []


def test_chains_from_many_addresses_share_one_budget_of_signature_checks(mesh: Mesh) -> None:
    """A burst from many addresses must not keep the event loop checking signatures: past the
    budget the answer is busy, with a time to come back, and no address is held against it."""
    busy = 0
    start = time.monotonic()
    for i in range(300):
        thief = key(100 + i % 100)
        raw = mesh.rotation(A, thief)
        raw = raw[:-1] + bytes([raw[-1] ^ 1])  # forged, so each costs a check and is refused
        try:
            mesh.ask([raw], thief, address=f"198.51.{i // 100}.{i % 100}")
        except JoinRefused as exc:
            busy += exc.reason == "busy"
    took = time.monotonic() - start
    counters = mesh.counters.snapshot()
    assert busy > 0 and counters["rekeys_busy"] == busy
    assert counters["rekeys_refused"] + busy == 300
    # Three budgeted per rotation: the burst, and what refilled while the loop ran.
    assert counters["rekeys_refused"] <= (CHECKS_BURST + CHECKS_PER_SECOND * took) / 3 + 1


def test_one_address_changing_keys_is_held_to_its_own_budget(mesh: Mesh) -> None:
    """Found by the second attack: refusals are throttled per address and key, so one address
    with a fresh key each time drained the port's budget and starved a legitimate chain."""
    busy = 0
    for i in range(200):
        thief = key(100 + i % 100)
        raw = mesh.rotation(A, thief, i)
        try:
            mesh.ask([raw[:-1] + bytes([raw[-1] ^ 1])], thief, address="198.51.100.1")
        except JoinRefused as exc:
            busy += exc.reason == "busy"
    assert busy > 0
    # The site itself, from its own address, still gets through at once.
    assert mesh.ask([mesh.rotation(A, A1), mesh.rotation(A1, A2, 1)], A2) == {"t": "ok"}


def test_a_stranger_behind_the_sites_own_address_cannot_drain_the_sites_budget(
        mesh: Mesh) -> None:
    """Found by the third attack: forged chains naming the founder's public key as the old
    key, from the site's own address (a NAT), kept the address's budget empty and the site's
    own chain out for as long as they came.  The budget is per address and key handed over."""
    busy = 0
    for i in range(200):
        thief = key(100 + i % 100)
        raw = records.sign_rotation(mesh.mesh, F, thief, mesh.now + i).raw
        try:
            mesh.ask([raw[:-1] + bytes([raw[-1] ^ 1])], thief)
        except JoinRefused as exc:
            busy += exc.reason == "busy"
    assert busy > 0  # the stranger is held to its budget...
    assert mesh.ask([mesh.rotation(A, A1)], A1) == {"t": "ok"}  # ...and the site is not


def test_a_chain_that_hands_over_to_a_key_the_site_knows_is_refused_and_nothing_kept(
        mesh: Mesh) -> None:
    """Found by the second attack: a member holding another site's retired key sent [A -> B,
    B -> Z] from Z; refused at the last check, but both rotations had been kept (shutting both
    identities out).  A rotation must hand over to a key this site has never seen."""
    mesh.view.ingest([records.sign(Vouch(mesh.mesh, F.public, B.public, "b", "member",
                                         mesh.now, 0), F).raw], mesh.now)
    mesh.view.ingest([mesh.rotation(B, B1)], mesh.now)  # B is retired
    z = key(90)
    err = mesh.refused([mesh.rotation(A, B), mesh.rotation(B, z, 1)], z)
    assert err.reason == "unauthorized" and "knows already" in err.message
    assert mesh.view.is_member(A.public) and mesh.view.is_member(B1.public)


def test_a_chain_from_a_stranger_costs_one_parse(mesh: Mesh,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by the second attack: every rotation was parsed (two key conversions each) before
    the member check, about 10 ms for 64, unbudgeted."""
    parses = []
    real = records.peek

    def counting(*args: Any, **kw: Any) -> Any:
        parses.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(records, "peek", counting)
    keys = [key(60 + i) for i in range(MAX_CHAIN + 1)]
    chain = [records.sign_rotation(mesh.mesh, o, n, mesh.now).raw for o, n in zip(keys, keys[1:])]
    assert mesh.refused(chain, keys[-1]).reason == "not-member"
    assert parses == [1]


def test_refusals_are_logged_at_most_once_a_minute(mesh: Mesh,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    for i in range(5):
        mesh.refused([mesh.rotation(X, A3)], A3, address=f"203.0.113.{i}")
    warnings = [r for r in caplog.records if "refused a rotation chain" in r.getMessage()]
    assert len(warnings) == 1 and mesh.counters.snapshot()["rekeys_refused"] == 5


def test_the_wire_bounds_the_chain() -> None:
    for n in (0, wire.MAX_REKEY_ITEMS + 1):
        data = wire.encode({"t": "rekey", "id": 1, "mesh": b"\x01" * 16, "items": [b"x"] * n})
        with pytest.raises(ProtocolError):
            wire.decode(data)
    assert MAX_CHAIN == wire.MAX_REKEY_ITEMS


def test_the_chain_is_oldest_first_and_keeps_the_newest(mesh: Mesh) -> None:
    keys = [A] + [key(40 + i) for i in range(MAX_CHAIN + 3)]
    signed = [records.decode(mesh.rotation(o, n, i), now=mesh.now + 100)
              for i, (o, n) in enumerate(zip(keys, keys[1:]))]
    chain = rotation_chain(reversed(signed), keys[-1].public)
    assert chain == [s.raw for s in signed[-MAX_CHAIN:]]
    assert rotation_chain(signed, keys[3].public, limit=2) == [signed[1].raw, signed[2].raw]
    assert rotation_chain(signed, A.public) == [] and rotation_chain([], keys[-1].public) == []
