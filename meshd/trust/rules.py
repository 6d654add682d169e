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

5. **Key rotation** (``successors``).  A rotation (signed by the old key and the new one) makes
   the new key stand wherever the old one stood: every vouch, revocation and the founder's place
   are read with the old key replaced by its successor (chains followed), so the site keeps its
   role and the sites it admitted stay admitted; the retired key is no member.  A key rotated to
   two different keys, or in a cycle, is taken as compromised: its rotations are void and it is
   shut out (a thief of a retired key can at worst make the site leave).  For the founder's
   key that ends the mesh: with the root of every chain void there is no member at all (the
   alternative, the founder's place back to the old key, would hand it to the thief).

The result depends only on the sets of inputs, never on their order.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from typing import Iterable

from meshd.trust.records import ROLES, Genesis, Revocation, Rotation, Vouch

__all__ = ["Member", "may_revoke", "members", "revoked", "successors"]

_RANK = {role: i for i, role in enumerate(ROLES)}
_INTRODUCER = "introducer"


@dataclass(frozen=True, slots=True)
class Member:
    """A member of the mesh.  ``vouched_by`` is None for the founder; ``expires`` 0 = never."""

    key: bytes
    role: str
    vouched_by: bytes | None
    expires: int


def _valid(mesh_id: bytes, founder: bytes, vouches: Iterable[Vouch], now: int) -> list[Vouch]:
    return [
        v
        for v in vouches
        if v.mesh_id == mesh_id
        and v.role in _RANK
        and (v.expires == 0 or v.expires > now)
        and v.voucher != v.subject
        and v.subject != founder
    ]


def _preference(v: Vouch) -> tuple[int, float, bytes]:
    """Sort key: best role, then latest expiry (0 = never), then smallest voucher."""
    return (-_RANK[v.role], -(float("inf") if v.expires == 0 else v.expires), v.voucher)


def _graph(founder: bytes, vouches: list[Vouch], excluded: frozenset[bytes]) -> dict[bytes, Member]:
    """Rule 2 over already-valid vouches, with ``excluded`` sites and their vouches removed.
    An excluded founder (its key rotated to two keys: rule 5) leaves no member at all."""
    if founder in excluded:
        return {}
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


def successors(genesis: Genesis, rotations: Iterable[Rotation]) -> tuple[dict[bytes, bytes],
                                                                       frozenset[bytes]]:
    """Rule 5: (retired key -> the key that holds its membership now, keys shut out because
    they were rotated to two different keys or in a cycle)."""
    step: dict[bytes, set[bytes]] = {}
    for r in rotations:
        if r.mesh_id == genesis.mesh_id and r.old != r.new:
            step.setdefault(r.old, set()).add(r.new)
    conflicted = {old for old, news in step.items() if len(news) > 1}
    final: dict[bytes, bytes] = {}
    for old in step:
        seen = [old]
        key = old
        while key in step and key not in conflicted:
            (key,) = step[key]
            if key in seen:
                conflicted.update(seen)
                break
            seen.append(key)
        else:
            if key in conflicted:
                conflicted.add(old)
            else:
                final[old] = key
    return {k: v for k, v in final.items() if k not in conflicted}, frozenset(conflicted)


class _Rewritten:
    """The inputs with every retired key replaced by its successor (rule 5)."""

    def __init__(self, genesis: Genesis, vouches: Iterable[Vouch],
                 revocations: Iterable[Revocation], rotations: Iterable[Rotation]) -> None:
        alias, self.conflicted = successors(genesis, rotations)

        def a(key: bytes) -> bytes:
            return alias.get(key, key)

        self.mesh_id = genesis.mesh_id
        self.founder = a(genesis.founder)
        self.vouches = [replace(v, voucher=a(v.voucher), subject=a(v.subject)) for v in vouches]
        self.revocations = [replace(r, revoker=a(r.revoker), subject=a(r.subject))
                            for r in revocations]
        self.alias = a


def _may_revoke(w: _Rewritten, valid: list[Vouch], r: Revocation) -> bool:
    if r.mesh_id != w.mesh_id or r.subject == w.founder:
        return False
    if r.revoker in (w.founder, r.subject):
        return True
    held = _graph(w.founder, valid, frozenset()).get(r.revoker)
    return held is not None and held.role == _INTRODUCER


def may_revoke(
    genesis: Genesis, vouches: Iterable[Vouch], revocation: Revocation, now: int,
    rotations: Iterable[Rotation] = (),
) -> bool:
    """True if ``revocation`` is honoured under rule 3 of the module doc."""
    w = _Rewritten(genesis, vouches, [revocation], rotations)
    return _may_revoke(w, _valid(w.mesh_id, w.founder, w.vouches, now), w.revocations[0])


def _revoked(w: _Rewritten, valid: list[Vouch]) -> frozenset[bytes]:
    unrevoked = _graph(w.founder, valid, frozenset())
    authorities = {k for k, m in unrevoked.items() if m.role == _INTRODUCER}
    return frozenset(
        r.subject
        for r in w.revocations
        if r.mesh_id == w.mesh_id
        and r.subject != w.founder
        and (r.revoker in authorities or r.revoker == r.subject)
    ) | w.conflicted


def revoked(
    genesis: Genesis, vouches: Iterable[Vouch], revocations: Iterable[Revocation], now: int,
    rotations: Iterable[Rotation] = (),
) -> frozenset[bytes]:
    """The keys shut out by honoured revocations (rule 3) and by conflicting rotations (rule 5)."""
    w = _Rewritten(genesis, vouches, revocations, rotations)
    return _revoked(w, _valid(w.mesh_id, w.founder, w.vouches, now))


def members(
    genesis: Genesis, vouches: Iterable[Vouch], revocations: Iterable[Revocation], now: int,
    rotations: Iterable[Rotation] = (),
) -> dict[bytes, Member]:
    """Every member of the mesh of ``genesis`` at ``now``, keyed by public key (module doc)."""
    w = _Rewritten(genesis, vouches, revocations, rotations)
    valid = _valid(w.mesh_id, w.founder, w.vouches, now)
    return _graph(w.founder, valid, _revoked(w, valid))
