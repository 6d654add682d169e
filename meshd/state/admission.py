"""The inviter's side of joining: issuing invitations and deciding on each redemption.

A join request names an invitation by id and proves its secret with ``tokens.join_proof``, bound
to the inviter's and the joiner's keys; the secret itself never crosses the wire.  The checks run
cheapest and least revealing first: the throttle on the source address, then the invitation and
proof (a failure is counted against the source and slows its next try), then expiry, uses,
revocation and the joiner's own signed record, whose key must be the one that authenticated the
connection.  A use is taken in the same SQLite transaction that notes the redemption, so a token
is single-use across crashes and restarts.  A retry by the same joiner gets the same answer again.
"""

from __future__ import annotations

import hmac
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from meshd.trust import base32
from meshd.trust import records
from meshd.trust import tokens
from meshd.state.config import Config
from meshd.errors import JoinRefused, LocalError, RecordError, StateError
from meshd.trust.identity import SiteKey, curve_public_of, fingerprint_of, site_id_of
from meshd.state.view import MeshView
from meshd.trust.records import SiteRecord, Vouch
from meshd.state.site import SiteKeys
from meshd.state.store import InvitationRow, Redemption, Store
from meshd.state.throttle import Throttle


@dataclass(frozen=True, slots=True)
class PendingJoin:
    """A join waiting for ``meshd approve`` / ``meshd deny``."""

    name: str
    site_id: str
    fingerprint: str
    invite: str
    since: int
    addrs: tuple[str, ...]


def normalize_fingerprint(text: str) -> str:
    """Canonical form of a typed fingerprint: Crockford symbols only, upper case, I/L/O read as 1/1/0."""
    return "".join(base32.canonical(c) for c in text if base32.is_symbol(c))


class Admissions:
    """Issues invitations and answers join requests for one site."""

    def __init__(self, store: Store, view: MeshView, keys: SiteKeys, config: Config) -> None:
        self.store = store
        self.view = view
        self.keys = keys
        self.config = config
        self.throttle = Throttle(config.join_failure_base, config.join_failure_cap)
        self.refused: Counter[str] = Counter()
        self.admitted = 0

    # -- issuing ----------------------------------------------------------------------------------

    @property
    def key(self) -> SiteKey:
        """The site key now (read from the one holder, so a rotation is seen at once)."""
        return self.keys.key

    def invite(self, *, addrs: list[tokens.Address], alternates: list[tokens.Alternate],
               name_hint: str, expires_in: float, uses: int, role: str, approve: bool,
               now: int) -> tokens.Invitation:
        """Record a new invitation and return it (its text form is ``tokens.armor``)."""
        mesh_id = self.view.mesh_id
        if mesh_id is None:
            raise StateError("this site is in no mesh yet", reason="no-mesh")
        me = self.view.members.get(self.key.public)
        if me is None or me.role != "introducer":
            raise LocalError("only introducers can invite; this site's role is"
                             f" {me.role if me else 'none'} (ask an introducer of the mesh to"
                             " invite, or to re-admit this site with --role introducer)",
                             reason="not-introducer")
        if role not in records.ROLES:
            raise LocalError(f"role must be one of {', '.join(records.ROLES)}", reason="usage")
        if uses < 1 or uses > 1000:
            raise LocalError("uses must be between 1 and 1000", reason="usage")
        if not 60 <= expires_in <= 366 * 86400:
            raise LocalError("an invitation must expire between 1 minute and 366 days from now",
                             reason="usage")
        if not addrs and not alternates:
            raise LocalError("this site has no inbound address and no reachable member could"
                             " forward a join to it; invite from a site others can dial",
                             reason="unreachable")
        secret = os.urandom(16)
        try:
            inv = tokens.Invitation(mesh_id=mesh_id, inviter_key=self.key.public, secret=secret,
                                    expires=int(now + expires_in), addrs=tuple(addrs[:4]),
                                    alternates=tuple(alternates[:2]), name_hint=name_hint,
                                    approve=approve)
        except ValueError as exc:  # a name hint too long or with control characters
            raise LocalError(f"cannot make this invitation: {exc}", reason="usage") from None
        self.store.add_invitation(InvitationRow(inv.invite_id, mesh_id, secret, now, inv.expires,
                                                uses, 0, role, approve, name_hint))
        return inv

    # -- answering ---------------------------------------------------------------------------------

    def _refuse(self, reason: str, message: str, source: str | None = None,
                now: float = 0.0) -> JoinRefused:
        self.refused[reason] += 1
        wait = None
        if source is not None:
            wait = self.throttle.failure(source, now)
            message += f" (further tries from this address are slowed: wait {wait:.0f} s)"
        return JoinRefused(message, reason=reason, retry_after=wait)

    def check_throttle(self, source: str, now: float) -> None:
        """Refuse at once a source that must still wait after failed joins."""
        wait = self.throttle.retry_after(source, now)
        if wait > 0:
            self.refused["throttled"] += 1
            raise JoinRefused(f"too many failed joins from {source}; try again in {wait:.0f} s",
                              reason="throttled", retry_after=wait)

    def handle_join(self, msg: dict[str, Any], joiner_curve: bytes, source: str | None,
                    now: int, *, forwarded: bool = False) -> dict[str, Any]:
        """Answer one join request; raises JoinRefused with the reason for the joiner.

        ``joiner_curve`` is the key that authenticated the connection: the joiner's own, or,
        when ``forwarded``, that of the member forwarding the join (which the caller checked).
        A forwarded join is throttled by the forwarding member, which sees the joiner's address
        (see ``check_throttle``), not here: the address here is the member's."""
        if forwarded or source is None:
            source = None
        else:
            self.check_throttle(source, now)
        row = self.store.invitation(msg["invite"])
        if row is None:
            raise self._refuse("unknown", "this site issued no such invitation", source, now)
        if msg["mesh"] != row.mesh_id or self.view.mesh_id != row.mesh_id:
            raise self._refuse("wrong-mesh", "the invitation is for another mesh than this site's")
        try:
            record = records.decode(msg["record"], now=now, mesh_id=row.mesh_id,
                                    kinds=("site-record",))
        except RecordError as exc:
            raise self._refuse("bad-record", f"the joiner's site record is invalid: {exc}",
                               source, now) from None
        body = record.body
        assert isinstance(body, SiteRecord)
        joiner = body.key
        proof = tokens.join_proof(row.secret, mesh_id=row.mesh_id, inviter_key=self.key.public,
                                  joiner_key=joiner)
        if not hmac.compare_digest(proof, msg["proof"]):
            raise self._refuse("bad-secret", "the invitation's secret does not match", source, now)
        if curve_public_of(joiner) != joiner_curve and not forwarded:
            raise self._refuse("bad-record", "the joiner's record is for another key than the one"
                               " that signed the connection", source, now)
        held = self.store.redemption(row.id, joiner)
        if held is not None:
            return self._answer(held, row, now)
        if now >= row.expires:
            raise self._refuse("expired", "the invitation expired at "
                               + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(row.expires)))
        if row.used >= row.uses:
            raise self._refuse("used", "the invitation has already been used"
                               + (f" {row.used} times" if row.uses > 1 else ""))
        if self.view.is_revoked(joiner):
            raise self._refuse("revoked", "this site's key was revoked from the mesh")
        if self.view.is_member(joiner):
            raise self._refuse("member", "this site is already a member of the mesh")
        taken = [k for k in self.view.members if k != joiner and self.view.name_of(k) == body.name]
        if taken:
            raise self._refuse("name-taken", f"the mesh already has a site named {body.name!r};"
                               " pick another name (meshd init --name) and join again")
        me = self.view.members.get(self.key.public)
        if me is None or me.role != "introducer":
            raise self._refuse("not-introducer", "the inviter may no longer admit sites")
        if row.approve:
            if not self.store.redeem(row.id, joiner, body.name, record.raw, now,
                                     state="pending", vouch=None):
                raise self._refuse("used", "the invitation has already been used")
        else:
            vouch = self._vouch(joiner, body.name, row.role, now)
            if not self.store.redeem(row.id, joiner, body.name, record.raw, now,
                                     state="admitted", vouch=vouch.raw):
                raise self._refuse("used", "the invitation has already been used")
            self._admit(vouch, record.raw, now)
        held = self.store.redemption(row.id, joiner)
        assert held is not None
        return self._answer(held, row, now)

    def _vouch(self, subject: bytes, name: str, role: str, now: int) -> records.Signed:
        mesh_id = self.view.mesh_id
        assert mesh_id is not None
        lifetime = int(self.config.vouch_lifetime)
        return records.sign(Vouch(mesh_id, self.key.public, subject, name, role, now,
                                  now + lifetime if lifetime else 0), self.key)

    def _admit(self, vouch: records.Signed, record: bytes, now: int) -> None:
        self.view.ingest([vouch.raw, record], now)
        self.admitted += 1

    def _answer(self, held: Redemption, row: InvitationRow, now: int) -> dict[str, Any]:
        common = {"inviter_fp": self.key.fingerprint, "joiner_fp": fingerprint_of(held.joiner),
                  "inviter_name": self.view.name_of(self.key.public) or "?"}
        if held.state == "pending":
            return {"t": "ok", "status": "pending", **common}
        if held.state == "denied":
            raise JoinRefused("the inviter's admin denied this join", reason="denied")
        assert held.vouch is not None
        return {"t": "ok", "status": "admitted", "vouch": held.vouch,
                "items": self.view.snapshot(), **common}

    # -- manual approval ---------------------------------------------------------------------------

    def pending(self) -> list[PendingJoin]:
        out = []
        for r in self.store.redemptions("pending"):
            try:
                rec = records.decode(r.record, now=r.created, kinds=("site-record",))
                addrs = rec.body.addrs if isinstance(rec.body, SiteRecord) else ()
            except RecordError:
                addrs = ()
            out.append(PendingJoin(r.name, site_id_of(r.joiner), fingerprint_of(r.joiner),
                                   r.invite_id.hex(), r.created, tuple(addrs)))
        return out

    def _find_pending(self, fingerprint: str) -> Redemption:
        wanted = normalize_fingerprint(fingerprint)
        if len(wanted) < 4:
            raise LocalError("give the fingerprint shown by `meshd pending` (at least 4"
                             " characters)", reason="usage")
        matches = [r for r in self.store.redemptions("pending")
                   if normalize_fingerprint(fingerprint_of(r.joiner)).startswith(wanted)]
        if not matches:
            raise LocalError(f"no pending join with fingerprint {fingerprint}; see meshd pending",
                             reason="not-found")
        if len(matches) > 1:
            raise LocalError(f"fingerprint {fingerprint} matches {len(matches)} pending joins;"
                             " give more of it", reason="ambiguous")
        return matches[0]

    def approve(self, fingerprint: str, now: int) -> Redemption:
        r = self._find_pending(fingerprint)
        row = self.store.invitation(r.invite_id)
        assert row is not None
        me = self.view.members.get(self.key.public)
        if me is None or me.role != "introducer":
            raise LocalError("this site is no longer an introducer and cannot admit anyone",
                             reason="not-introducer")
        if self.view.is_revoked(r.joiner):
            raise LocalError("that site's key has been revoked from the mesh; deny it",
                             reason="revoked")
        if any(k != r.joiner and self.view.name_of(k) == r.name for k in self.view.members):
            raise LocalError(f"the mesh already has a site named {r.name!r}; deny this join",
                             reason="name-taken")
        vouch = self._vouch(r.joiner, r.name, row.role, now)
        self.store.decide(r.invite_id, r.joiner, now, state="admitted", vouch=vouch.raw)
        self._admit(vouch, r.record, now)
        done = self.store.redemption(r.invite_id, r.joiner)
        assert done is not None
        return done

    def deny(self, fingerprint: str, now: int) -> Redemption:
        r = self._find_pending(fingerprint)
        self.store.decide(r.invite_id, r.joiner, now, state="denied", vouch=None)
        self.refused["denied"] += 1
        done = self.store.redemption(r.invite_id, r.joiner)
        assert done is not None
        return done

    def recover(self, now: int) -> None:
        """After a crash: make sure every admitted redemption's vouch is in the mesh view."""
        for r in self.store.redemptions("admitted"):
            if r.vouch is not None:
                self.view.ingest([r.vouch, r.record], now)
