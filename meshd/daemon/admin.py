"""The site admin's actions on the mesh: invitations, manual approval, revocation, and finding a
member by what the admin typed."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from meshd.daemon.own_record import OwnRecord
from meshd.daemon.site import LocalSite
from meshd.errors import LocalError, StateError
from meshd.state.admission import Admissions, PendingJoin, normalize_fingerprint
from meshd.state.config import Config
from meshd.state.store import Redemption
from meshd.state.view import MeshView
from meshd.trust import records, tokens
from meshd.trust.identity import fingerprint_of, site_id_of
from meshd.trust.records import Revocation

log = logging.getLogger("meshd")


@dataclass(kw_only=True, eq=False)
class Admin:
    """Invite, approve, deny, revoke (for the control API).

    ``announce`` pushes our objects to every member after a change; ``advertise_mesh`` tells the
    LAN which mesh this site is in once it founded one."""

    site: LocalSite
    view: MeshView
    admissions: Admissions
    config: Config
    own_record: OwnRecord
    announce: Callable[[], None]
    advertise_mesh: Callable[[], None]

    def invite(self, name_hint: str, expires: float | None, uses: int, role: str,
               approve: bool) -> tokens.Invitation:
        """An invitation to this site's mesh; the first one founds the mesh."""
        now = int(time.time())
        view, me = self.view, self.site.keys.public
        if view.mesh_id is None:
            view.found(self.site.name, os.urandom(16), now)
            self.own_record.refresh()
            self.advertise_mesh()
            log.info("founded mesh %s (%s)", view.mesh_name, view.mesh_id.hex()
                     if view.mesh_id else "")
        addrs = [tokens.Address.parse(a) for a in self.site.addrs]
        alternates = []
        for key in view.members:
            rec = view.record_of(key)
            if key != me and rec is not None and rec.reachable and rec.addrs:
                alternates.append(tokens.Alternate(key, tuple(tokens.Address.parse(a)
                                                              for a in rec.addrs[:2])))
        if addrs:
            alternates = alternates[:1]
        inv = self.admissions.invite(addrs=addrs, alternates=alternates[:2], name_hint=name_hint,
                                     expires_in=expires or self.config.invite_expiry, uses=uses,
                                     role=role, approve=approve, now=now)
        log.info("issued an invitation (%s, %d use(s), role %s%s, expires %s)",
                 name_hint or "no name hint", uses, role, ", needs approval" if approve else "",
                 time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(inv.expires)))
        return inv

    def pending(self) -> list[PendingJoin]:
        """Joins waiting for :meth:`approve` or :meth:`deny`."""
        return self.admissions.pending()

    def approve(self, fingerprint: str) -> Redemption:
        done = self.admissions.approve(fingerprint, int(time.time()))
        log.info("approved the join of %s (%s)", done.name, fingerprint_of(done.joiner))
        self.announce()
        return done

    def deny(self, fingerprint: str) -> Redemption:
        done = self.admissions.deny(fingerprint, int(time.time()))
        log.info("denied the join of %s (%s)", done.name, fingerprint_of(done.joiner))
        return done

    def find_site(self, text: str) -> bytes:
        """A member's key by name, site id, or fingerprint (a unique prefix is enough); of a
        name that a rotated site's old and new keys share, the current member's."""
        view = self.view
        wanted = text.strip()
        candidates = set(view.members) | set(view.site_records)
        hits = [k for k in candidates if view.name_of(k) == wanted or site_id_of(k) == wanted]
        if not hits and len(wanted) >= 4:
            fp = normalize_fingerprint(wanted)
            hits = [k for k in candidates if site_id_of(k).startswith(wanted.lower())
                    or (fp and normalize_fingerprint(fingerprint_of(k)).startswith(fp))]
        if not hits:
            raise LocalError(f"no member named or identified as {text!r}; see meshd peers",
                             reason="not-found")
        if len(hits) > 1:  # a site's retired key keeps its name: the member it is now wins
            current = [k for k in hits if view.is_member(k)]
            if len(current) == 1:
                return current[0]
            raise LocalError(f"{text!r} matches {len(hits)} sites; give the site id",
                             reason="ambiguous")
        return hits[0]

    def revoke(self, site: str, reason: str) -> bytes:
        """Shut a member out of the mesh; returns its key."""
        mesh_id = self.view.mesh_id
        if mesh_id is None:
            raise StateError("this site is in no mesh", reason="no-mesh")
        subject = self.find_site(site)
        key = self.site.keys.key
        if subject == key.public and self.view.genesis is not None \
                and self.view.genesis.signer == subject:
            raise LocalError("the founder of a mesh cannot be revoked", reason="usage")
        now = int(time.time())
        signed = records.sign(Revocation(mesh_id, key.public, subject, now, reason[:200]), key)
        result = self.view.ingest([signed.raw], now)
        if result.stored != 1 and not result.duplicate:
            raise LocalError("only the founder, an introducer, or the site itself may revoke a"
                             " site", reason="unauthorized")
        log.info("revoked %s (%s)", self.view.name_of(subject), site_id_of(subject))
        self.announce()
        return subject
