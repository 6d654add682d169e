"""What this site believes about its mesh: verified signed objects, and who is a member.

``MeshView`` is the one place signed objects enter the trust store.  Every object is decoded and
verified (``records.decode``) before anything else looks at it, vouches and revocations are kept
only when ``trust`` says their signer had the authority, and site records only for members and
only when their sequence is newer.  Refusals are counted by reason; nothing refused is stored.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

from meshd.trust import records
from meshd.trust import rules as trust
from meshd.errors import RecordError, StateError
from meshd.trust.identity import SiteKey, curve_public_of
from meshd.trust.records import Genesis, Revocation, Rotation, Signed, SiteRecord, Vouch
from meshd.state.site import SiteKeys
from meshd.state.store import Store

log = logging.getLogger("meshd.state.view")

_STORED_SKEW = 2**62
"""Objects read back from the store were checked for clock skew when they arrived."""

_FOREVER = frozenset({"signature", "malformed", "oversized", "type", "mesh", "wrong-key",
                      "invalid-record", "stale"})
"""Refusals that no later time or state can turn into an acceptance (a site record's sequence
only grows): the same bytes are refused again from memory, without another signature check."""
MAX_REMEMBERED_REFUSALS = 4096
"""Digests of refused objects remembered (oldest forgotten first)."""


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What became of a batch of signed objects."""

    stored: int
    duplicate: int
    refused: dict[str, int]


@dataclass(slots=True)
class Screened:
    """Objects of a batch left to verify after the cheap checks (:meth:`MeshView.screen`)."""

    fresh: list[bytes]
    duplicate: int
    refused: Counter[str]


@dataclass(slots=True)
class Verified:
    """Objects whose signatures checked out (:func:`verify`), and those refused, with why."""

    signed: list[Signed]
    rejects: list[tuple[bytes, str]]


def verify(fresh: list[bytes], now: int, mesh_id: bytes | None) -> Verified:
    """Decode and verify each object (signatures, mesh, clock): reads no view state, so it may
    run in another thread while the view goes on."""
    signed: list[Signed] = []
    rejects: list[tuple[bytes, str]] = []
    for raw in fresh:
        try:
            signed.append(records.decode(raw, now=now, mesh_id=mesh_id))
        except RecordError as exc:
            rejects.append((raw, exc.reason))
    return Verified(signed, rejects)


class Screen:
    """Drops what needs no signature check: objects held (by the digest of their bytes),
    copies within a batch, and bytes refused for good before (at most
    ``MAX_REMEMBERED_REFUSALS``)."""

    def __init__(self) -> None:
        self._known: set[bytes] | None = None
        self._refusals: dict[bytes, str] = {}

    def invalidate(self) -> None:
        """The objects held changed."""
        self._known = None

    def screen(self, items: Iterable[bytes], held: Callable[[], Iterable[Signed]]) -> Screened:
        if self._known is None:
            self._known = {s.digest for s in held()}
        known = self._known
        seen: set[bytes] = set()
        fresh: list[bytes] = []
        refused: Counter[str] = Counter()
        duplicate = 0
        for raw in items:
            if not isinstance(raw, bytes):
                refused["malformed"] += 1
                continue
            if len(raw) > records.MAX_SIGNED_BYTES:
                refused["oversized"] += 1
                continue
            d = records.digest_of(raw)
            if d in known or d in seen:
                duplicate += 1
                continue
            seen.add(d)
            reason = self._refusals.get(d)
            if reason is not None:
                refused[reason] += 1
                continue
            fresh.append(raw)
        return Screened(fresh, duplicate, refused)

    def remember_all(self, rejects: list[tuple[bytes, str]]) -> Counter[str]:
        """:meth:`remember` each; returns the count by reason."""
        for raw, reason in rejects:
            self.remember(raw, reason)
        return Counter(reason for _, reason in rejects)

    def remember(self, raw: bytes, reason: str) -> None:
        """``raw`` was refused for ``reason``: remember it if no later time can change that."""
        if reason in _FOREVER:
            self._refusals[records.digest_of(raw)] = reason
            if len(self._refusals) > MAX_REMEMBERED_REFUSALS:
                del self._refusals[next(iter(self._refusals))]


def _held(view: MeshView) -> Iterable[Signed]:
    yield from view.vouches.values()
    yield from view.revocations.values()
    yield from view.rotations.values()
    yield from view.site_records.values()
    if view.genesis is not None:
        yield view.genesis



@dataclass(slots=True)
class _Pending:
    """A verified batch by kind (see :func:`_by_kind`)."""

    duplicate: int = 0
    other_mesh: int = 0
    vouches: list[Signed] = field(default_factory=list)
    revocations: list[Signed] = field(default_factory=list)
    rotations: list[Signed] = field(default_factory=list)
    records: list[Signed] = field(default_factory=list)


def _in_rounds(pending: list[Signed], admit: Callable[[Signed], bool],
               recompute: Callable[[], None]) -> int:
    """Admit ``pending`` objects in rounds until a round admits none (one may depend on another
    admitted before it: ``recompute`` after each round that admitted some); ``pending`` keeps
    the ones never admitted.  Returns how many were."""
    admitted = 0
    progress = True
    while pending and progress:
        progress = False
        for s in list(pending):
            if admit(s):
                pending.remove(s)
                admitted += 1
                progress = True
        if progress:
            recompute()
    return admitted


def _by_kind(signed: Iterable[Signed], genesis: bytes, held: Callable[[bytes], bool]) -> _Pending:
    """``signed`` sorted by kind; our own genesis and objects ``held`` (by digest) counted as
    duplicates, another mesh's genesis counted apart."""
    out = _Pending()
    for s in signed:
        if s.kind == "genesis":
            out.duplicate += s.raw == genesis
            out.other_mesh += s.raw != genesis
        elif held(s.digest):
            out.duplicate += 1
        else:
            {"rotation": out.rotations, "vouch": out.vouches, "revocation": out.revocations,
             "record": out.records}.get(s.kind, out.records).append(s)
    return out

class MeshView:
    """The verified state of one mesh, backed by the store."""

    def __init__(self, store: Store, keys: SiteKeys) -> None:
        self.store = store
        self.keys = keys
        self.refused: Counter[str] = Counter()
        self.genesis: Signed | None = None
        self.site_records: dict[bytes, Signed] = {}
        self.vouches: dict[bytes, Signed] = {}
        self.revocations: dict[bytes, Signed] = {}
        self.rotations: dict[bytes, Signed] = {}
        self.members: dict[bytes, trust.Member] = {}
        self.by_curve: dict[bytes, bytes] = {}
        self.revoked: frozenset[bytes] = frozenset()
        self.retired: dict[bytes, bytes] = {}
        """Keys handed over by a rotation -> the key that holds their membership now."""
        self._screen = Screen()

    @property
    def mesh_id(self) -> bytes | None:
        return None if self.genesis is None else self._genesis_body.mesh_id

    @property
    def _genesis_body(self) -> Genesis:
        assert self.genesis is not None and isinstance(self.genesis.body, Genesis)
        return self.genesis.body

    @property
    def mesh_name(self) -> str:
        return "" if self.genesis is None else self._genesis_body.mesh_name

    @property
    def key(self) -> SiteKey:
        """The site key now (read from the one holder, so a rotation is seen at once)."""
        return self.keys.key

    def load(self, now: int) -> None:
        """Read the store back, verifying every object again.

        What no longer verifies (tampered with on disk, or a vouch that expired) is left out and
        counted under ``stored_<reason>``; a bad revocation stops the load instead, because
        leaving it out would let a revoked site back in."""
        raw = self.store.get_meta("genesis")
        self._screen.invalidate()
        self.genesis = None
        self.site_records.clear()
        self.vouches.clear()
        self.revocations.clear()
        self.rotations.clear()
        if not isinstance(raw, bytes):
            self._recompute(now)
            return
        self.genesis = records.decode(raw, now=now, kinds=("genesis",), max_skew=_STORED_SKEW)
        mesh_id = self.mesh_id
        for blob in self.store.revocations():
            s = records.decode(blob, now=now, mesh_id=mesh_id, kinds=("revocation",),
                               max_skew=_STORED_SKEW)
            self.revocations[s.digest] = s
        for blob in self.store.rotations():
            s = records.decode(blob, now=now, mesh_id=mesh_id, kinds=("rotation",),
                               max_skew=_STORED_SKEW)
            self.rotations[s.digest] = s
        for kind, blobs, into in (("vouch", self.store.vouches(), self.vouches),
                                  ("site-record", self.store.records(), self.site_records)):
            for blob in blobs:
                try:
                    s = records.decode(blob, now=now, mesh_id=mesh_id, kinds=(kind,),
                                       max_skew=_STORED_SKEW)
                except RecordError as exc:
                    if exc.reason != "expired":
                        log.error("a stored %s no longer verifies (%s); left out", kind, exc)
                    self.refused[f"stored_{exc.reason}"] += 1
                    continue
                into[s.digest if kind == "vouch" else s.signer] = s
        self._recompute(now)

    def _recompute(self, now: int) -> None:
        self._screen.invalidate()
        if self.genesis is None:
            self.members, self.revoked, self.by_curve, self.retired = {}, frozenset(), {}, {}
            return
        self.members = trust.members(self._genesis_body, self._vouch_bodies(),
                                     self._revocation_bodies(), now, self._rotation_bodies())
        self.revoked = trust.revoked(self._genesis_body, self._vouch_bodies(),
                                     self._revocation_bodies(), now, self._rotation_bodies())
        self.retired = {old: new for old, new in trust.successors(
            self._genesis_body, self._rotation_bodies())[0].items()}
        self.by_curve = {curve_public_of(k): k for k in self.members}

    # -- questions --------------------------------------------------------------------------------

    def is_member(self, key: bytes) -> bool:
        return key in self.members

    def is_revoked(self, key: bytes) -> bool:
        return key in self.revoked

    def record_of(self, key: bytes) -> SiteRecord | None:
        s = self.site_records.get(key)
        return s.body if s is not None and isinstance(s.body, SiteRecord) else None

    def name_of(self, key: bytes) -> str:
        """The site's name: from its record, else its vouch, else those of a key it retired."""
        for k in (key, *(old for old, new in self.retired.items() if new == key)):
            rec = self.record_of(k)
            if rec is not None:
                return rec.name
            for v in self.vouches.values():
                if isinstance(v.body, Vouch) and v.body.subject == k:
                    return v.body.subject_name
        return ""

    def snapshot(self) -> list[bytes]:
        """Every verified object, genesis first: what a new member or a sync partner is sent."""
        if self.genesis is None:
            return []
        return [self.genesis.raw, *(s.raw for s in self.vouches.values()),
                *(s.raw for s in self.revocations.values()),
                *(s.raw for s in self.rotations.values()),
                *(s.raw for k, s in self.site_records.items() if k in self.members)]

    # -- changes -----------------------------------------------------------------------------------

    def found(self, mesh_name: str, salt: bytes, now: int) -> None:
        """Make this site the founder of a new mesh (the first `meshd invite` does this)."""
        genesis = records.sign(Genesis(self.key.public, mesh_name, now, salt), self.key)
        body = genesis.body
        assert isinstance(body, Genesis)
        self.store.adopt_mesh(genesis.raw, body.mesh_id, mesh_name, "introducer", [], [], [])
        self.load(now)

    def adopt(self, items: list[bytes], mesh_id: bytes, now: int) -> None:
        """Switch to the mesh a snapshot describes (after a join), verifying all of it first.

        Raises RecordError, writing nothing, unless the snapshot holds the genesis of
        ``mesh_id`` and makes this site a member."""
        genesis: Signed | None = None
        decoded: list[Signed] = []
        for raw in items:
            s = records.decode(raw, now=now, mesh_id=mesh_id)
            if s.kind == "genesis":
                genesis = s
            else:
                decoded.append(s)
        if genesis is None:
            raise RecordError("the snapshot has no genesis of the mesh", reason="malformed")
        vouches = [s for s in decoded if s.kind == "vouch"]
        revocations = [s for s in decoded if s.kind == "revocation"]
        rotations = [s for s in decoded if s.kind == "rotation"]
        g = genesis.body
        assert isinstance(g, Genesis)
        vouch_bodies = [v.body for v in vouches if isinstance(v.body, Vouch)]
        rotation_bodies = [r.body for r in rotations if isinstance(r.body, Rotation)]
        members = trust.members(g, vouch_bodies,
                                [r.body for r in revocations if isinstance(r.body, Revocation)],
                                now, rotation_bodies)
        me = members.get(self.key.public)
        if me is None:
            raise RecordError("the snapshot does not make this site a member", reason="unauthorized")
        # Keep only what a member would have accepted one by one, so we never pass on junk.
        alias = trust.successors(g, rotation_bodies)[0]
        vouches = [v for v in vouches if isinstance(v.body, Vouch)
                   and (m := members.get(alias.get(v.body.voucher, v.body.voucher))) is not None
                   and m.role == "introducer"]
        revocations = [r for r in revocations if isinstance(r.body, Revocation)
                       and trust.may_revoke(g, vouch_bodies, r.body, now, rotation_bodies)]
        # A rotation counts only for a key that held a place: the founder's or a vouched one.
        placed = {g.founder} | {v.subject for v in vouch_bodies}
        rotations = [r for r in rotations if isinstance(r.body, Rotation)
                     and (r.body.old in placed or r.body.old in alias)]
        site_records: dict[bytes, tuple[bytes, int, bytes]] = {}
        for s in decoded:
            if s.kind == "site-record" and s.signer in members:
                body = s.body
                assert isinstance(body, SiteRecord)
                old = site_records.get(s.signer)
                if old is None or old[1] < body.seq:
                    site_records[s.signer] = (s.signer, body.seq, s.raw)
        self.store.adopt_mesh(
            genesis.raw, g.mesh_id, g.mesh_name, me.role, list(site_records.values()),
            [(v.digest, v.body.subject, v.raw) for v in vouches if isinstance(v.body, Vouch)],
            [(r.digest, r.body.subject, r.raw) for r in revocations
             if isinstance(r.body, Revocation)],
            [(r.digest, r.body.old, r.raw) for r in rotations if isinstance(r.body, Rotation)])
        self.load(now)

    def ingest(self, items: Iterable[bytes], now: int) -> IngestResult:
        """:meth:`screen`, :func:`verify` (may run off the loop), :meth:`apply`: keep what is new
        and authorised; count every refusal by reason."""
        if self.genesis is None:
            return IngestResult(0, 0, {})
        screened = self.screen(items)
        return self.apply(screened, verify(screened.fresh, now, self.mesh_id), now)

    def screen(self, items: Iterable[bytes]) -> Screened:  # see Screen
        return self._screen.screen(items, lambda: _held(self))

    def apply(self, screened: Screened, verified: Verified, now: int) -> IngestResult:
        """Keep what :func:`verify` passed and is new and authorised (on the owner's thread).
        Each object is stored, then kept in memory; if the store refuses one (StateError: a
        full disk), what came before it is kept in both, the rest in neither, and the error
        goes on."""
        try:
            return self._apply(screened, verified, now)
        except StateError:
            self._recompute(now)
            self._screen.invalidate()
            raise

    def _admit_vouch(self, s: Signed) -> bool:
        body = s.body
        assert isinstance(body, Vouch)
        voucher = self.members.get(self.retired.get(body.voucher, body.voucher))
        if voucher is None or voucher.role != "introducer":
            return False
        self.store.put_vouch(s.digest, body.subject, s.raw)
        self.vouches[s.digest] = s
        return True

    def _admit_rotation(self, s: Signed) -> bool:
        body = s.body
        assert isinstance(body, Rotation)
        # The old key hands over what it holds: it must be a member, or already retired (a
        # second, conflicting rotation is kept: it shuts the identity out, see trust).
        if body.old not in self.members and body.old not in self.retired:
            return False
        self.store.put_rotation(s.digest, body.old, s.raw)
        self.rotations[s.digest] = s
        return True

    def _apply(self, screened: Screened, verified: Verified, now: int) -> IngestResult:
        if self.genesis is None:
            return IngestResult(0, 0, {})
        refused = screened.refused + self._screen.remember_all(verified.rejects)
        stored = 0
        pending = _by_kind(verified.signed, self.genesis.raw,
                           lambda d: d in self.vouches or d in self.revocations
                           or d in self.rotations)
        duplicate = screened.duplicate + pending.duplicate
        refused["mesh"] += pending.other_mesh
        pending_vouches, pending_revocations = pending.vouches, pending.revocations
        pending_rotations, pending_records = pending.rotations, pending.records
        # Vouches in one batch may depend on each other (B vouched by A, C by B), and so may
        # rotations (k0 -> k1, then k1 -> k2: a member that missed two rotations hears both at
        # once): each kind is admitted in rounds, each round's outcome counted by the next.
        stored += _in_rounds(pending_vouches, self._admit_vouch, lambda: self._recompute(now))
        refused["unauthorized"] += len(pending_vouches)
        stored += _in_rounds(pending_rotations, self._admit_rotation,
                             lambda: self._recompute(now))
        refused["unauthorized"] += len(pending_rotations)
        for s in pending_revocations:
            body = s.body
            assert isinstance(body, Revocation)
            if trust.may_revoke(self._genesis_body, self._vouch_bodies(), body, now,
                                self._rotation_bodies()):
                self.store.put_revocation(s.digest, body.subject, s.raw)
                self.revocations[s.digest] = s
                stored += 1
            else:
                refused["unauthorized"] += 1
        if pending_revocations:
            self._recompute(now)
        for s in pending_records:
            body = s.body
            assert isinstance(body, SiteRecord)
            held = self.site_records.get(s.signer)
            if held is not None and held.raw == s.raw:
                duplicate += 1
            elif s.signer not in self.members:
                refused["unauthorized"] += 1
            elif (held is None or not isinstance(held.body, SiteRecord) or held.body.seq < body.seq) \
                    and self.store.put_record(s.signer, body.seq, s.raw):
                self.site_records[s.signer] = s
                stored += 1
            else:
                refused["stale"] += 1
                self._screen.remember(s.raw, "stale")
        if stored:
            self._screen.invalidate()
        refused = Counter({k: v for k, v in refused.items() if v})
        self.refused.update(refused)
        return IngestResult(stored, duplicate, dict(refused))

    def _vouch_bodies(self) -> list[Vouch]:
        return [v.body for v in self.vouches.values() if isinstance(v.body, Vouch)]

    def _revocation_bodies(self) -> list[Revocation]:
        return [r.body for r in self.revocations.values() if isinstance(r.body, Revocation)]

    def _rotation_bodies(self) -> list[Rotation]:
        return [r.body for r in self.rotations.values() if isinstance(r.body, Rotation)]

    def add_own(self, signed: Signed, now: int) -> None:
        """Store an object this site just signed (its record, a vouch, a revocation)."""
        result = self.ingest([signed.raw], now)
        if result.stored != 1:
            raise RecordError(f"this site's own {signed.kind} was refused: {result.refused}",
                              reason="unauthorized")
