"""Who is a member of a mesh: a pure function of the genesis, the vouches, the revocations and now.

Inputs are bodies that ``records.decode`` already verified; this module reads no clock and
checks no signatures.  The rules, applied in this order:

1. **Valid vouches.**  A vouch counts when its ``mesh_id`` is the genesis's mesh id, its role is
   in ``ROLES``, it is unexpired (``expires == 0 or expires > now``), and voucher != subject.
2. **The vouch graph.**  The founder is a member with role ``introducer`` (it cannot be vouched
   for, nor revoked).  A site is an *introducer* when an introducer gave it a valid vouch with
   role ``introducer``; it is a *member* when an introducer gave it a valid vouch of either role.
   So every voucher on a chain from the founder is an introducer; a ``member`` cannot admit anyone,
   and sites vouching for each other with no chain to the founder are not members.  When a site
   holds several admitting vouches the best role wins; ties go to the later expiry (0 = never),
   then to the smallest voucher key, which gives ``Member.vouched_by`` and ``Member.expires``.
   ``Member.expires`` is the expiry of that one vouch: a vouch higher on the chain may lapse
   earlier, so callers re-evaluate ``members`` as ``now`` advances.
3. **Who may revoke** (``may_revoke``).  A revocation in the same mesh is honoured when its
   revoker is the founder, the subject itself (a site leaving), or an introducer in the vouch graph
   computed *without* revocations.  Using the revocation-free graph means there are no cycles: a
   revoked introducer's own revocations still stand, and two introducers that revoke each other are
   both out.  Revocations do not expire and cannot be undone; re-admission takes a new key.
   Revocations of the founder are ignored.
4. **Revoked sites.**  The graph of rule 2 is computed again with every honoured subject removed:
   a revoked site is not a member and its vouches admit nobody, so sites admitted only through it
   drop out too (a site that also holds a chain through someone else stays).

The result depends only on the sets of inputs, never on their order.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterable

from meshd.records import ROLES, Genesis, Revocation, Vouch

__all__ = ["Member", "may_revoke", "members", "revoked"]

_RANK = {role: i for i, role in enumerate(ROLES)}
_INTRODUCER = "introducer"


@dataclass(frozen=True, slots=True)
class Member:
    """A member of the mesh.  ``vouched_by`` is None for the founder; ``expires`` 0 = never."""

    key: bytes
    role: str
    vouched_by: bytes | None
    expires: int


def _valid(genesis: Genesis, vouches: Iterable[Vouch], now: int) -> list[Vouch]:
    mesh_id = genesis.mesh_id
    return [
        v
        for v in vouches
        if v.mesh_id == mesh_id
        and v.role in _RANK
        and (v.expires == 0 or v.expires > now)
        and v.voucher != v.subject
        and v.subject != genesis.founder
    ]


def _preference(v: Vouch) -> tuple[int, float, bytes]:
    """Sort key: best role, then latest expiry (0 = never), then smallest voucher."""
    return (-_RANK[v.role], -(float("inf") if v.expires == 0 else v.expires), v.voucher)


def _graph(founder: bytes, vouches: list[Vouch], excluded: frozenset[bytes]) -> dict[bytes, Member]:
    """Rule 2 over already-valid vouches, with ``excluded`` sites and their vouches removed."""
    by_voucher: dict[bytes, list[Vouch]] = {}
    for v in vouches:
        if v.voucher not in excluded and v.subject not in excluded:
            by_voucher.setdefault(v.voucher, []).append(v)
    # Introducers: reachable from the founder over introducer-role vouches.
    introducers = {founder}
    queue = deque([founder])
    while queue:
        for v in by_voucher.get(queue.popleft(), ()):
            if v.role == _INTRODUCER and v.subject not in introducers:
                introducers.add(v.subject)
                queue.append(v.subject)
    # Members: anyone an introducer vouched for; keep the preferred admitting vouch.
    best: dict[bytes, Vouch] = {}
    for voucher in introducers:
        for v in by_voucher.get(voucher, ()):
            held = best.get(v.subject)
            if held is None or _preference(v) < _preference(held):
                best[v.subject] = v
    result = {founder: Member(founder, _INTRODUCER, None, 0)}
    for subject in sorted(best):
        v = best[subject]
        result[subject] = Member(subject, v.role, v.voucher, v.expires)
    return result


def may_revoke(
    genesis: Genesis, vouches: Iterable[Vouch], revocation: Revocation, now: int
) -> bool:
    """True if ``revocation`` is honoured under rule 3 of the module doc."""
    if revocation.mesh_id != genesis.mesh_id or revocation.subject == genesis.founder:
        return False
    if revocation.revoker in (genesis.founder, revocation.subject):
        return True
    unrevoked = _graph(genesis.founder, _valid(genesis, vouches, now), frozenset())
    held = unrevoked.get(revocation.revoker)
    return held is not None and held.role == _INTRODUCER


def revoked(
    genesis: Genesis, vouches: Iterable[Vouch], revocations: Iterable[Revocation], now: int
) -> frozenset[bytes]:
    """The keys shut out by honoured revocations (rule 3)."""
    valid = _valid(genesis, vouches, now)
    unrevoked = _graph(genesis.founder, valid, frozenset())
    authorities = {k for k, m in unrevoked.items() if m.role == _INTRODUCER}
    return frozenset(
        r.subject
        for r in revocations
        if r.mesh_id == genesis.mesh_id
        and r.subject != genesis.founder
        and (r.revoker in authorities or r.revoker == r.subject)
    )


def members(
    genesis: Genesis, vouches: Iterable[Vouch], revocations: Iterable[Revocation], now: int
) -> dict[bytes, Member]:
    """Every member of the mesh of ``genesis`` at ``now``, keyed by public key (module doc)."""
    valid = _valid(genesis, vouches, now)
    out = revoked(genesis, valid, revocations, now)
    return _graph(genesis.founder, valid, out)
