"""Membership from vouches and revocations: chains, roles, expiry, revocation rules, order."""

from __future__ import annotations

import random
from typing import Iterable

from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.trust.records import ROLES, Genesis, Revocation, Rotation, Vouch
from meshd.trust.rules import Member, may_revoke, members, revoked

NOW = 1_800_000_000


def k(n: int) -> bytes:
    return bytes([n]) * 32


F, A, B, C, D, E, X = (k(i) for i in range(1, 8))  # F founds; X is an outsider
GENESIS = Genesis(F, "mesh", NOW - 10_000, b"\x01" * 16)
MESH = GENESIS.mesh_id
OTHER_MESH = Genesis(F, "other", NOW - 10_000, b"\x01" * 16).mesh_id


def v(voucher: bytes, subject: bytes, role: str = "member", expires: int = 0,
      mesh: bytes = MESH) -> Vouch:
    return Vouch(mesh, voucher, subject, "s", role, NOW - 100, expires)


def intro(voucher: bytes, subject: bytes, expires: int = 0) -> Vouch:
    return v(voucher, subject, "introducer", expires)


def r(revoker: bytes, subject: bytes, mesh: bytes = MESH) -> Revocation:
    return Revocation(mesh, revoker, subject, NOW - 50, "")


def ms(vouches: Iterable[Vouch], revocations: Iterable[Revocation] = (), now: int = NOW
       ) -> dict[bytes, Member]:
    return members(GENESIS, vouches, revocations, now)


# --- the vouch graph -----------------------------------------------------------------------


def test_founder_alone_is_an_introducer() -> None:
    assert ms([]) == {F: Member(F, "introducer", None, 0)}


def test_chain_through_introducers() -> None:
    got = ms([intro(F, A), intro(A, B), v(B, C, expires=NOW + 5)])
    assert set(got) == {F, A, B, C}
    assert got[A] == Member(A, "introducer", F, 0)
    assert got[B] == Member(B, "introducer", A, 0)
    assert got[C] == Member(C, "member", B, NOW + 5)


def test_a_member_cannot_admit_anyone() -> None:
    got = ms([v(F, A), v(A, B), intro(A, C)])
    assert set(got) == {F, A}


def test_vouches_without_a_chain_to_the_founder_admit_nobody() -> None:
    assert set(ms([intro(A, B), intro(B, A), intro(X, A)])) == {F}


def test_input_may_be_any_iterable_even_a_generator() -> None:
    vouches = (x for x in [intro(F, A), v(A, B)])
    revs = (x for x in [r(F, B)])
    assert set(members(GENESIS, vouches, revs, NOW)) == {F, A}


def test_expired_vouches_count_for_nothing_and_expiry_cascades() -> None:
    vouches = [intro(F, A, expires=NOW + 10), v(A, B)]
    assert set(ms(vouches, now=NOW + 9)) == {F, A, B}
    assert set(ms(vouches, now=NOW + 10)) == {F}  # expires <= now: expired
    assert set(ms(vouches, now=NOW + 11)) == {F}


def test_other_mesh_vouches_are_ignored() -> None:
    assert set(ms([v(F, A, "introducer", mesh=OTHER_MESH)])) == {F}


def test_unknown_roles_are_ignored() -> None:
    assert set(ms([v(F, A, "admin")])) == {F}


def test_best_role_wins() -> None:
    got = ms([v(F, A), intro(F, B), intro(B, A)])
    assert got[A].role == "introducer" and got[A].vouched_by == B
    got = ms([v(F, A), intro(F, B), v(B, A), intro(A, C)])
    assert got[A].role == "member"
    assert C not in got


def test_equal_roles_prefer_later_expiry_then_smaller_voucher() -> None:
    got = ms([intro(F, B), v(F, A, expires=NOW + 5), v(B, A, expires=NOW + 9)])
    assert got[A] == Member(A, "member", B, NOW + 9)
    got = ms([intro(F, B), v(F, A, expires=NOW + 5), v(B, A, expires=0)])
    assert got[A] == Member(A, "member", B, 0)  # 0 = never, the latest
    got = ms([intro(F, B), v(F, A), v(B, A)])
    assert got[A].vouched_by == min(F, B)


def test_self_vouches_cannot_upgrade_a_role() -> None:
    got = ms([v(F, A), intro(A, A)])
    assert got[A].role == "member"


def test_the_founder_cannot_be_demoted_by_a_vouch() -> None:
    got = ms([intro(F, A), v(A, F)])
    assert got[F] == Member(F, "introducer", None, 0)


def test_result_is_sorted_founder_first() -> None:
    got = ms([intro(F, C), v(F, A), v(C, B)])
    assert list(got) == [F, A, B, C]


# --- revocation ----------------------------------------------------------------------------


BASE = [intro(F, A), intro(F, B), v(A, C), v(B, D)]


def test_revocation_by_the_founder() -> None:
    assert set(ms(BASE, [r(F, C)])) == {F, A, B, D}


def test_revocation_by_the_subject_itself() -> None:
    assert set(ms(BASE, [r(C, C)])) == {F, A, B, D}
    assert may_revoke(GENESIS, BASE, r(C, C), NOW)


def test_revocation_by_any_introducer_even_not_the_voucher() -> None:
    assert set(ms(BASE, [r(B, C)])) == {F, A, B, D}
    assert may_revoke(GENESIS, BASE, r(B, C), NOW)


def test_revocation_by_an_unauthorized_site_is_ignored() -> None:
    for rev in (r(D, C), r(X, C), r(C, D), r(D, A)):
        assert not may_revoke(GENESIS, BASE, rev, NOW)
        assert set(ms(BASE, [rev])) == {F, A, B, C, D}


def test_revocation_by_an_expired_introducer_is_ignored() -> None:
    vouches = [intro(F, A, expires=NOW), intro(F, B)]
    assert not may_revoke(GENESIS, vouches, r(A, B), NOW)
    assert B in ms(vouches, [r(A, B)])


def test_revocation_in_another_mesh_is_ignored() -> None:
    rev = r(F, C, mesh=OTHER_MESH)
    assert not may_revoke(GENESIS, BASE, rev, NOW)
    assert C in ms(BASE, [rev])


def test_the_founder_cannot_be_revoked() -> None:
    for rev in (r(A, F), r(F, F)):
        assert not may_revoke(GENESIS, BASE, rev, NOW)
        assert F in ms(BASE, [rev])


def test_revoked_introducer_cascades_to_sites_admitted_only_through_it() -> None:
    vouches = [intro(F, A), intro(A, B), v(B, C), v(A, D), v(F, D), intro(F, E), v(E, C)]
    got = ms(vouches, [r(F, A)])
    # B reached only through A: out; C also vouched by E: in; D also vouched by F: in.
    assert set(got) == {F, C, D, E}
    assert got[C].vouched_by == E and got[D].vouched_by == F
    assert revoked(GENESIS, vouches, [r(F, A)], NOW) == {A}


def test_a_revoked_site_stays_out_whoever_vouches_for_it() -> None:
    got = ms([intro(F, A), intro(F, B), v(B, A), v(F, C)], [r(F, A)])
    assert A not in got


def test_revocations_use_the_graph_without_revocations_so_no_cycles() -> None:
    vouches = [intro(F, A), intro(F, B), v(F, C)]
    # A and B revoke each other: both honoured, both out.
    assert set(ms(vouches, [r(A, B), r(B, A)])) == {F, C}
    # A revoked by F; A's own revocation of C still stands.
    assert set(ms(vouches, [r(F, A), r(A, C)])) == {F, B}


def test_authority_over_revocation_is_an_introducer_at_any_depth() -> None:
    vouches = [intro(F, A), intro(A, B), v(F, C)]
    assert may_revoke(GENESIS, vouches, r(B, C), NOW)
    assert set(ms(vouches, [r(B, C)])) == {F, A, B}


def test_a_members_revocation_of_another_member_is_ignored() -> None:
    vouches = [v(F, A), v(F, B)]
    assert set(ms(vouches, [r(A, B)])) == {F, A, B}


# --- properties ----------------------------------------------------------------------------

SITES = [F, A, B, C, D, E, X]

vouch_st = st.builds(
    lambda vo, su, role, exp, mesh: v(vo, su, role, exp, mesh),
    st.sampled_from(SITES),
    st.sampled_from(SITES),
    st.sampled_from(ROLES),
    st.sampled_from([0, NOW - 1, NOW, NOW + 1, NOW + 100]),
    st.sampled_from([MESH, MESH, MESH, OTHER_MESH]),
)
rev_st = st.builds(
    lambda rv, su, mesh: r(rv, su, mesh),
    st.sampled_from(SITES),
    st.sampled_from(SITES),
    st.sampled_from([MESH, MESH, MESH, OTHER_MESH]),
)


def reference(vouches: list[Vouch], revocations: list[Revocation], now: int) -> set[bytes]:
    """Naive fixpoint of the documented rules (membership set only)."""

    def graph(excluded: set[bytes]) -> dict[bytes, str]:
        roles = {F: "introducer"}
        changed = True
        while changed:
            changed = False
            for x in vouches:
                ok = (
                    x.mesh_id == MESH and (x.expires == 0 or x.expires > now)
                    and x.voucher != x.subject and x.subject != F
                    and x.voucher not in excluded and x.subject not in excluded
                    and roles.get(x.voucher) == "introducer"
                )
                if ok and (x.subject not in roles or
                           (roles[x.subject] == "member" and x.role == "introducer")):
                    roles[x.subject] = x.role
                    changed = True
        return roles

    free = graph(set())
    out = {
        x.subject for x in revocations
        if x.mesh_id == MESH and x.subject != F
        and (free.get(x.revoker) == "introducer" or x.revoker == x.subject)
    }
    return set(graph(out))


@settings(max_examples=300, deadline=None)
@given(
    vouches=st.lists(vouch_st, max_size=14),
    revocations=st.lists(rev_st, max_size=4),
    seed=st.randoms(use_true_random=False),
)
def test_order_independent_and_matches_the_reference(
    vouches: list[Vouch], revocations: list[Revocation], seed: random.Random
) -> None:
    got = ms(vouches, revocations)
    shuffled_v, shuffled_r = list(vouches), list(revocations)
    seed.shuffle(shuffled_v)
    seed.shuffle(shuffled_r)
    again = ms(shuffled_v * 2, shuffled_r)  # duplicates change nothing either
    assert again == got
    assert list(again) == list(got)
    assert set(got) == reference(vouches, revocations, NOW)


@settings(max_examples=200, deadline=None)
@given(vouches=st.lists(vouch_st, max_size=14), revocations=st.lists(rev_st, max_size=4))
def test_every_member_was_admitted_by_an_introducer_member(
    vouches: list[Vouch], revocations: list[Revocation]
) -> None:
    got = ms(vouches, revocations)
    assert got[F] == Member(F, "introducer", None, 0)
    gone = revoked(GENESIS, vouches, revocations, NOW)
    assert not gone & set(got)
    for key, m in got.items():
        if key == F:
            continue
        assert m.vouched_by in got and got[m.vouched_by].role == "introducer"
        assert m.expires == 0 or m.expires > NOW
        assert any(
            x.voucher == m.vouched_by and x.subject == key and x.role == m.role
            and x.expires == m.expires and x.mesh_id == MESH
            for x in vouches
        )


@settings(max_examples=100, deadline=None)
@given(vouches=st.lists(vouch_st, max_size=14), revocations=st.lists(rev_st, max_size=4))
def test_revocations_only_ever_remove_members(
    vouches: list[Vouch], revocations: list[Revocation]
) -> None:
    assert set(ms(vouches, revocations)) <= set(ms(vouches))
    for rev in revocations:
        if may_revoke(GENESIS, vouches, rev, NOW):
            assert rev.subject not in ms(vouches, revocations)


# --- key rotation (rule 5) -----------------------------------------------------------------


def rot(old: bytes, new: bytes, mesh: bytes = MESH) -> Rotation:
    return Rotation(mesh, old, new, NOW, b"\x00" * 64)  # signatures are records.decode's job


def msr(vouches: Iterable[Vouch], rotations: Iterable[Rotation],
        revocations: Iterable[Revocation] = ()) -> dict[bytes, Member]:
    return members(GENESIS, vouches, revocations, NOW, rotations)


def test_rotated_site_keeps_its_role_and_those_it_admitted() -> None:
    a, a2, b = A, k(11), B
    vs = [intro(F, a), v(a, b)]
    got = msr(vs, [rot(a, a2)])
    assert set(got) == {F, a2, b}
    assert got[a2].role == "introducer" and got[b].vouched_by == a2


def test_rotations_chain_and_the_founder_may_rotate() -> None:
    a, a2, a3, f2 = A, k(11), k(12), k(13)
    got = msr([intro(F, a)], [rot(a, a2), rot(a2, a3), rot(F, f2)])
    assert set(got) == {f2, a3}
    assert got[f2].vouched_by is None and got[a3].vouched_by == f2


def test_a_key_rotated_twice_is_shut_out() -> None:
    a, a2, thief = A, k(11), k(66)
    vs = [intro(F, a), v(a, B)]
    got = msr(vs, [rot(a, a2), rot(a, thief)])
    assert a not in got and a2 not in got and thief not in got and B not in got
    assert a in revoked(GENESIS, vs, [], NOW, [rot(a, a2), rot(a, thief)])


def test_a_founder_key_rotated_twice_ends_the_mesh_and_gives_the_thief_nothing() -> None:
    """Found by attack: the founder was exempt from rule 5's shutting out, so a conflicted
    founder key stood in the founder's place again, held by the thief of the retired key,
    who could then admit anyone.  Now no key holds the place and nobody is a member."""
    f1, thief = k(13), k(66)
    vs = [intro(F, A), v(A, B), v(F, C)]
    rots = [rot(F, f1), rot(F, thief)]
    assert msr(vs, rots) == {}
    assert msr(vs + [intro(F, k(67))], rots) == {}  # a vouch the thief signs with F: nothing
    assert F in revoked(GENESIS, vs, [], NOW, rots)
    assert set(msr(vs, [rot(F, f1)])) == {f1, A, B, C}  # one rotation: the founder moves on


def test_a_rotation_cycle_is_void_and_shut_out() -> None:
    a, b = A, B
    got = msr([intro(F, a), v(F, b)], [rot(a, b), rot(b, a)])
    assert a not in got and b not in got


def test_rotation_for_another_mesh_is_ignored() -> None:
    a, a2 = A, k(11)
    assert set(msr([intro(F, a)], [rot(a, a2, OTHER_MESH)])) == {F, a}


def test_revoking_a_retired_key_revokes_its_successor() -> None:
    a, a2 = A, k(11)
    got = msr([intro(F, a)], [rot(a, a2)], [r(F, a)])
    assert set(got) == {F}
    assert may_revoke(GENESIS, [intro(F, a)], r(a, C), NOW, [rot(a, a2)])  # a acts as a2


@settings(max_examples=50, deadline=None)
@given(st.permutations(range(4)))
def test_rotations_are_order_independent(order: list[int]) -> None:
    a, a2, a3, b = A, k(11), k(12), B
    rots = [rot(a, a2), rot(a2, a3), rot(b, k(21)), rot(b, k(22))]
    vs = [intro(F, a), intro(F, b)]
    assert msr(vs, [rots[i] for i in order]) == msr(vs, rots)
