"""The inviter's decisions on join requests, driven directly (no sockets, ``now`` passed in).

Join messages go through ``wire.encode``/``wire.decode`` first, so they look exactly like what
the peer socket hands to ``Admissions.handle_join``.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from meshd.trust import records
from meshd.trust import tokens
from meshd.peer import wire
from meshd.state.admission import Admissions
from meshd.state.config import Config
from meshd.errors import JoinRefused, LocalError
from meshd.trust.identity import SiteKey, curve_public_of
from meshd.state.site import SiteKeys
from meshd.state.view import MeshView
from meshd.trust.records import Revocation, SiteRecord, Vouch
from meshd.state.store import Store

NOW = 1_800_000_000
HOUR = 3600
SRC = "192.0.2.7"


def key(n: int) -> SiteKey:
    return SiteKey(bytes([n]) * 32)


INVITER = key(1)
J1, J2, J3 = key(11), key(12), key(13)


@dataclass
class Inviter:
    path: Path
    store: Store
    view: MeshView
    adm: Admissions

    @property
    def mesh(self) -> bytes:
        assert self.view.mesh_id is not None
        return self.view.mesh_id

    def invite(self, *, uses: int = 1, approve: bool = False, role: str = "member",
               expires_in: float = HOUR) -> tokens.Invitation:
        return self.adm.invite(addrs=[tokens.Address("192.0.2.1", 4750)], alternates=[],
                               name_hint="", expires_in=expires_in, uses=uses, role=role,
                               approve=approve, now=NOW)

    def used(self, inv: tokens.Invitation) -> int:
        row = self.store.invitation(inv.invite_id)
        assert row is not None
        return row.used


def open_inviter(path: Path, key_: SiteKey = INVITER) -> Inviter:
    store = Store(path)
    view = MeshView(store, SiteKeys(key_))
    view.load(NOW)
    return Inviter(path, store, view, Admissions(store, view, SiteKeys(key_), Config()))


@pytest.fixture
def inviter(tmp_path: Path) -> Iterator[Inviter]:
    path = tmp_path / "inviter.db"
    store = Store(path)
    MeshView(store, SiteKeys(INVITER)).found("testmesh", b"\x01" * 16, NOW)
    store.close()
    inv = open_inviter(path)
    yield inv
    inv.store.close()


def joiner_record(joiner: SiteKey, mesh: bytes, name: str = "joiner",
                  signer: SiteKey | None = None) -> bytes:
    return records.sign(SiteRecord(joiner.public, mesh, name, ("198.51.100.2:4750",), True, 1,
                                   NOW), signer or joiner).raw


def join_msg(inv: tokens.Invitation, joiner: SiteKey, *, name: str = "joiner",
             secret: bytes | None = None, record: bytes | None = None) -> dict[str, Any]:
    msg = {"t": "join", "id": 1, "mesh": inv.mesh_id, "invite": inv.invite_id,
           "proof": tokens.join_proof(secret or inv.secret, mesh_id=inv.mesh_id,
                                      inviter_key=inv.inviter_key, joiner_key=joiner.public),
           "inviter": inv.inviter_key,
           "record": record or joiner_record(joiner, inv.mesh_id, name)}
    return wire.decode(wire.encode(msg))


def join(inviter: Inviter, inv: tokens.Invitation, joiner: SiteKey, *, name: str = "joiner",
         source: str = SRC, now: int = NOW, curve: bytes | None = None,
         **kw: Any) -> dict[str, Any]:
    answer = inviter.adm.handle_join(join_msg(inv, joiner, name=name, **kw),
                                     curve or curve_public_of(joiner.public), source, now)
    wire.decode(wire.encode({**answer, "id": 1}))  # the answer fits the wire protocol
    return answer


def refused(inviter: Inviter, inv: tokens.Invitation, joiner: SiteKey, **kw: Any) -> str:
    with pytest.raises(JoinRefused) as exc:
        join(inviter, inv, joiner, **kw)
    return exc.value.reason


# --- admitted ---------------------------------------------------------------------------------


def test_admitted_answer_is_adopted_by_a_fresh_joiner_store(inviter: Inviter,
                                                            tmp_path: Path) -> None:
    inv = inviter.invite(role="introducer")
    answer = join(inviter, inv, J1, name="alice")
    assert answer["status"] == "admitted"
    assert answer["joiner_fp"] == J1.fingerprint and answer["inviter_fp"] == INVITER.fingerprint
    v = records.decode(answer["vouch"], now=NOW, mesh_id=inviter.mesh, kinds=("vouch",)).body
    assert isinstance(v, Vouch)
    assert (v.voucher, v.subject, v.role, v.subject_name) == (
        INVITER.public, J1.public, "introducer", "alice")
    assert inviter.view.is_member(J1.public) and inviter.adm.admitted == 1

    jstore = Store(tmp_path / "joiner.db")
    jview = MeshView(jstore, SiteKeys(J1))
    jview.adopt(answer["items"], inviter.mesh, NOW)
    assert jview.members == inviter.view.members
    assert jview.members[J1.public].role == "introducer"
    assert jview.record_of(J1.public) is not None
    assert jstore.get_meta("role") == "introducer"
    jstore.close()


def test_retry_by_the_same_joiner_is_admitted_again_without_another_use(
        inviter: Inviter) -> None:
    inv = inviter.invite(uses=2)
    first = join(inviter, inv, J1)
    again = join(inviter, inv, J1, now=NOW + 60)
    assert first["status"] == again["status"] == "admitted"
    assert first["vouch"] == again["vouch"]
    assert inviter.used(inv) == 1


def test_second_joiner_on_a_single_use_token_is_refused_used(inviter: Inviter) -> None:
    inv = inviter.invite()
    join(inviter, inv, J1, name="alice")
    assert refused(inviter, inv, J2, name="bob") == "used"
    assert not inviter.view.is_member(J2.public)
    assert inviter.used(inv) == 1


def test_expired_token_is_refused_even_when_otherwise_fine(inviter: Inviter) -> None:
    inv = inviter.invite()
    assert refused(inviter, inv, J1, now=inv.expires) == "expired"
    assert inviter.used(inv) == 0
    assert join(inviter, inv, J1, now=inv.expires - 1)["status"] == "admitted"


def test_wrong_proof_is_bad_secret_then_the_source_is_throttled(inviter: Inviter) -> None:
    inv = inviter.invite()
    assert refused(inviter, inv, J1, secret=b"\x00" * 16) == "bad-secret"
    # Even the right secret is not looked at from that source until the wait is over.
    assert refused(inviter, inv, J1) == "throttled"
    assert inviter.used(inv) == 0
    assert join(inviter, inv, J1, source="198.51.100.9")["status"] == "admitted"
    assert inviter.adm.refused["bad-secret"] == 1 and inviter.adm.refused["throttled"] == 1


def test_throttle_lifts_after_the_wait(inviter: Inviter) -> None:
    inv = inviter.invite()
    assert refused(inviter, inv, J1, secret=b"\x00" * 16) == "bad-secret"
    wait = inviter.adm.throttle.retry_after(SRC, NOW)
    assert wait > 0
    assert join(inviter, inv, J1, now=NOW + int(wait) + 1)["status"] == "admitted"


def test_unknown_invite_id_is_refused_unknown(inviter: Inviter) -> None:
    inviter.invite()
    stranger = tokens.Invitation(mesh_id=inviter.mesh, inviter_key=INVITER.public,
                                 secret=b"\x42" * 16, expires=NOW + HOUR)
    assert refused(inviter, stranger, J1) == "unknown"


def test_record_of_another_key_than_the_connection_is_refused(inviter: Inviter) -> None:
    inv = inviter.invite()
    reason = refused(inviter, inv, J1, curve=curve_public_of(J2.public))
    assert reason == "bad-record"
    assert inviter.used(inv) == 0 and not inviter.view.is_member(J1.public)


def test_record_with_a_forged_signature_is_refused(inviter: Inviter) -> None:
    inv = inviter.invite()
    raw = joiner_record(J1, inviter.mesh)
    forged = raw[:-1] + bytes([raw[-1] ^ 1])
    assert refused(inviter, inv, J1, record=forged) == "bad-record"
    assert inviter.used(inv) == 0


def test_revoked_joiner_is_refused_revoked(inviter: Inviter) -> None:
    first = inviter.invite()
    join(inviter, first, J1)
    inviter.view.add_own(records.sign(Revocation(inviter.mesh, INVITER.public, J1.public, NOW,
                                                 "lost laptop"), INVITER), NOW)
    assert not inviter.view.is_member(J1.public)
    second = inviter.invite()
    assert refused(inviter, second, J1) == "revoked"
    assert inviter.used(second) == 0


def test_name_taken_is_refused(inviter: Inviter) -> None:
    inv = inviter.invite(uses=2)
    join(inviter, inv, J1, name="alice")
    assert refused(inviter, inv, J2, name="alice") == "name-taken"
    assert inviter.used(inv) == 1
    assert join(inviter, inv, J2, name="bob")["status"] == "admitted"


# --- manual approval --------------------------------------------------------------------------


def test_approve_flow_with_a_lower_case_undashed_fingerprint_prefix(inviter: Inviter) -> None:
    inv = inviter.invite(approve=True)
    assert join(inviter, inv, J1, name="alice")["status"] == "pending"
    assert not inviter.view.is_member(J1.public)
    (p,) = inviter.adm.pending()
    assert (p.name, p.fingerprint, p.invite) == ("alice", J1.fingerprint, inv.invite_id.hex())
    assert p.since == NOW
    assert join(inviter, inv, J1, name="alice")["status"] == "pending"  # still waiting
    inviter.adm.approve(J1.fingerprint.replace("-", "").lower()[:6], NOW + 5)
    assert inviter.adm.pending() == []
    answer = join(inviter, inv, J1, name="alice", now=NOW + 10)
    assert answer["status"] == "admitted"
    assert inviter.view.is_member(J1.public)
    assert inviter.used(inv) == 1


def test_pending_shows_the_joiners_addresses(inviter: Inviter) -> None:
    """The record was verified when redeemed; pending() must not re-judge it by the wall clock
    (NOW here lies months ahead of the real clock, as in a simulation)."""
    inv = inviter.invite(approve=True)
    join(inviter, inv, J1, name="alice")
    (p,) = inviter.adm.pending()
    assert p.addrs == ("198.51.100.2:4750",)


def test_deny_refuses_the_joiner_and_gives_the_use_back(inviter: Inviter) -> None:
    inv = inviter.invite(approve=True)
    join(inviter, inv, J1, name="alice")
    assert inviter.used(inv) == 1
    inviter.adm.deny(J1.fingerprint, NOW + 5)
    assert inviter.used(inv) == 0
    assert refused(inviter, inv, J1, name="alice") == "denied"
    assert join(inviter, inv, J2, name="bob")["status"] == "pending"
    assert inviter.used(inv) == 1
    assert not inviter.view.is_member(J1.public)


def test_approve_of_an_unknown_fingerprint_is_a_local_error(inviter: Inviter) -> None:
    inv = inviter.invite(approve=True)
    join(inviter, inv, J1)
    other = "".join(c for c in J2.fingerprint if c != "-")
    assert not J1.fingerprint.replace("-", "").startswith(other[:6])
    with pytest.raises(LocalError) as exc:
        inviter.adm.approve(other[:6], NOW)
    assert exc.value.reason == "not-found"


# --- durability and roles ---------------------------------------------------------------------


def test_single_use_survives_closing_and_reopening_the_store(inviter: Inviter) -> None:
    inv = inviter.invite()
    join(inviter, inv, J1, name="alice")
    inviter.store.close()
    reopened = open_inviter(inviter.path)
    try:
        assert refused(reopened, inv, J2, name="bob") == "used"
        assert join(reopened, inv, J1, name="alice")["status"] == "admitted"
        assert reopened.view.is_member(J1.public)
    finally:
        reopened.store.close()
    inviter.store = Store(inviter.path)  # for the fixture's close
    db = sqlite3.connect(inviter.path)
    assert db.execute("SELECT used, uses FROM invitations").fetchall() == [(1, 1)]
    db.close()


def test_invite_by_a_member_role_site_is_refused(inviter: Inviter, tmp_path: Path) -> None:
    answer = join(inviter, inviter.invite(role="member"), J1)
    jstore = Store(tmp_path / "member.db")
    jview = MeshView(jstore, SiteKeys(J1))
    jview.adopt(answer["items"], inviter.mesh, NOW)
    adm = Admissions(jstore, jview, SiteKeys(J1), Config())
    with pytest.raises(LocalError) as exc:
        adm.invite(addrs=[tokens.Address("192.0.2.3", 4750)], alternates=[], name_hint="",
                   expires_in=HOUR, uses=1, role="member", approve=False, now=NOW)
    assert exc.value.reason == "not-introducer"
    db = sqlite3.connect(tmp_path / "member.db")
    assert db.execute("SELECT COUNT(*) FROM invitations").fetchone() == (0,)
    db.close()
    jstore.close()


# --- forwarded joins, retry hints, decisions re-checked ---------------------------------------


def test_throttled_refusal_carries_the_wait_for_the_joiner(inviter: Inviter) -> None:
    inv = inviter.invite()
    with pytest.raises(JoinRefused) as first:
        join(inviter, inv, J1, secret=b"\x00" * 16)
    assert first.value.retry_after is not None and first.value.retry_after > 0
    with pytest.raises(JoinRefused) as second:
        join(inviter, inv, J1)
    assert second.value.reason == "throttled"
    assert second.value.retry_after == pytest.approx(first.value.retry_after)


def test_forwarded_joins_do_not_throttle_the_forwarding_member(inviter: Inviter) -> None:
    inv = inviter.invite()
    member_curve = curve_public_of(J3.public)  # the alternate's connection, not the joiner's
    for _ in range(3):
        with pytest.raises(JoinRefused) as exc:
            inviter.adm.handle_join(join_msg(inv, J1, secret=b"\x00" * 16), member_curve, SRC,
                                    NOW, forwarded=True)
        assert exc.value.reason == "bad-secret"
    assert inviter.adm.throttle.retry_after(SRC, NOW) == 0
    answer = inviter.adm.handle_join(join_msg(inv, J2), member_curve, SRC, NOW, forwarded=True)
    assert answer["status"] == "admitted"


def test_approve_refuses_a_joiner_revoked_while_it_waited(inviter: Inviter) -> None:
    inv = inviter.invite(approve=True)
    assert join(inviter, inv, J1, name="alice")["status"] == "pending"
    inviter.view.add_own(records.sign(Revocation(inviter.mesh, INVITER.public, J1.public, NOW,
                                                 "stolen key"), INVITER), NOW)
    with pytest.raises(LocalError) as exc:
        inviter.adm.approve(J1.fingerprint, NOW + 1)
    assert exc.value.reason == "revoked"
    assert not inviter.view.is_member(J1.public)
    assert [p.fingerprint for p in inviter.adm.pending()] == [J1.fingerprint]
