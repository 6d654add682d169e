"""What the control API reports: status, members (peers), LAN sightings and join attempts."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshd import __version__
from meshd.daemon.contacts import Contacts
from meshd.daemon.counters import Counters
from meshd.daemon.joins import JoinAttempt
from meshd.daemon.links import MemberLinks
from meshd.daemon.membership import MembershipService
from meshd.daemon.site import LocalSite
from meshd.state.admission import Admissions
from meshd.state.view import MeshView
from meshd.trust.identity import fingerprint_of, site_id_of
from meshd.trust.records import SiteRecord


@dataclass(kw_only=True, eq=False)
class Reports:
    """Read-only views of the daemon's state, as JSON-ready dicts.

    ``reach_of`` is the channel service's reachability of a member (``we_dial``, ``dials_us``);
    ``dropped`` the count of messages the peer port dropped; ``port`` the peer port's counters
    and gauges (:meth:`meshd.peer.server.PeerServer.port_stats`) and ``untrusted`` the count of
    accepted data connections not authenticated yet."""

    site: LocalSite
    view: MeshView
    admissions: Admissions
    counters: Counters
    contacts: Contacts
    membership: MembershipService
    links: MemberLinks
    reach_of: Callable[[bytes], dict[str, Any]]
    dropped: Callable[[], int]
    port: Callable[[], tuple[dict[str, int], dict[str, int]]]
    untrusted: Callable[[], int]

    def status(self) -> dict[str, Any]:
        site, key, view = self.site, self.site.keys.key, self.view
        me = view.members.get(key.public)
        counters = self.counters.snapshot()
        for reason, n in view.refused.items():
            counters[f"records_refused_{reason.replace('-', '_')}"] = n
        for reason, n in self.admissions.refused.items():
            counters[f"joins_refused_{reason.replace('-', '_')}"] = n
        counters["joins_admitted"] = self.admissions.admitted
        counters["peer_dropped"] = self.dropped()
        port_counters, port_gauges = self.port()
        for name, n in port_counters.items():
            counters[f"peer_port_{name}"] = n
        untrusted = self.untrusted()
        gauges = {**port_gauges, "untrusted_data": untrusted,
                  "unauthenticated": port_gauges.get("sniffing", 0) + untrusted}
        return {
            "name": site.name, "site_id": key.site_id, "fingerprint": key.fingerprint,
            "mesh_id": view.mesh_id.hex() if view.mesh_id else None,
            "mesh_name": view.mesh_name or None, "role": me.role if me else None,
            "listen": site.bound, "addrs": site.addrs, "members": len(view.members),
            "version": __version__, "pid": os.getpid(), "counters": counters,
            "peer_port": gauges,
        }

    def peers(self, *, revoked: bool = False) -> list[dict[str, Any]]:
        """Members with their verified records and what the membership protocol knows of them;
        with ``revoked``, the revoked sites instead."""
        out = []
        view, me = self.view, self.site.keys.public
        keys = sorted(view.revoked) if revoked else list(view.members)
        for key in keys:
            member = view.members.get(key)
            rec = view.record_of(key)
            contact = self.contacts.get(key)
            swim_state = self.membership.state_of(key)
            if revoked:
                swim_state["state"] = "revoked"
            elif key != me and self._unseen(swim_state):
                swim_state["state"] = "unseen"
            rtt = swim_state["rtt_ms"]
            if rtt is None and (r := self.links.rtt(key)) is not None:
                rtt = round(r * 1000, 3)
            out.append({
                "name": view.name_of(key), "site_id": site_id_of(key),
                "fingerprint": fingerprint_of(key), "role": member.role if member else None,
                "self": key == me, **swim_state, "rtt_ms": rtt,
                "reached": self._reached(key, rec),
                **(self.reach_of(key) if key != me else {"we_dial": None, "dials_us": None}),
                "addrs": list(rec.addrs) if rec else [],
                "reachable": bool(rec.reachable) if rec else False,
                "seq": rec.seq if rec else None,
                "vouched_by": site_id_of(member.vouched_by) if member and member.vouched_by else None,
                "verified": rec is not None,
                "error": contact.error if contact else None,
            })
        return out

    @staticmethod
    def _unseen(swim_state: dict[str, Any]) -> bool:
        """No sign of life yet: alive only because we seeded it so (incarnation 0), with no
        message from it and no news of it (a running daemon starts at incarnation 1 or more).
        A site whose daemon never ran stays so; failure detection is not changed by it."""
        return (swim_state["state"] == "alive" and swim_state["incarnation"] == 0
                and swim_state["last_seen"] is None)

    def _reached(self, key: bytes, rec: SiteRecord | None) -> str:
        """How this site reaches a member: self, lan, direct, inbound (over the connection the
        member keeps to us: it cannot be dialed) or indirect (only through other members)."""
        if key == self.site.keys.public:
            return "self"
        if key in self.links.sightings:
            return "lan"
        if rec is not None and rec.reachable and rec.addrs:
            return "direct"
        if self.links.inbound(key):
            return "inbound"
        return "indirect"

    def discovered(self) -> list[dict[str, Any]]:
        """Daemons seen on the LAN; only members are trusted, and only after a handshake."""
        return [{"name": s.name, "site_id": s.site_id, "fingerprint": fingerprint_of(s.key),
                 "mesh_id": s.mesh_id.hex() if s.mesh_id else None, "addrs": list(s.addrs),
                 "member": self.view.is_member(s.key), "seen": s.seen}
                for s in sorted(self.links.sightings.values(), key=lambda s: s.name)]

    def join_view(self, attempt: JoinAttempt) -> dict[str, Any]:
        inv = attempt.invitation
        return {"id": attempt.id, "state": attempt.state,
                "inviter": site_id_of(inv.inviter_key), "inviter_name": attempt.inviter_name,
                "inviter_fingerprint": fingerprint_of(inv.inviter_key),
                "fingerprint": self.site.keys.key.fingerprint, "mesh_id": inv.mesh_id.hex(),
                "approve": inv.approve, "error": attempt.error}
