"""Joins: the ones this site makes (``meshd join``) and the ones it answers as inviter, or passes
on to the inviter as an alternate named in a token.

The decisions (is the proof right, is the invitation used up, does it wait for approval) are
``Admissions``'s; this module moves the messages and follows each attempt for the control API.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshd.daemon.counters import Counters
from meshd.daemon.links import MemberLinks
from meshd.daemon.own_record import OwnRecord
from meshd.daemon.site import LocalSite
from meshd.daemon.tasks import TaskSet
from meshd.errors import JoinRefused, MeshdError, RecordError, TokenError
from meshd.peer.dialer import Unreachable
from meshd.peer.server import PeerInfo
from meshd.state.admission import Admissions
from meshd.state.config import Config
from meshd.state.view import MeshView
from meshd.trust import records, tokens
from meshd.trust.identity import curve_public_of
from meshd.trust.records import Vouch

log = logging.getLogger("meshd")

PENDING_POLL = 1.0
"""Seconds between two asks of an inviter while a join waits for approval."""


@dataclass(slots=True)
class JoinAttempt:
    """A join this site is making, as the control API reports it."""

    id: str
    invitation: tokens.Invitation
    state: str = "connecting"
    inviter_name: str | None = None
    error: dict[str, str] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def set(self, state: str, **changes: Any) -> None:
        self.state = state
        for k, v in changes.items():
            setattr(self, k, v)
        self.changed.set()
        self.changed = asyncio.Event()


@dataclass(kw_only=True, eq=False)
class Joins:
    """Makes joins (:meth:`start`) and answers them (:meth:`answer`, the ``join`` peer request).

    ``announce`` pushes our objects to every member (after an admission, or once joined);
    ``advertise_mesh`` tells the LAN which mesh this site is in now."""

    site: LocalSite
    view: MeshView
    admissions: Admissions
    config: Config
    links: MemberLinks
    own_record: OwnRecord
    counters: Counters
    tasks: TaskSet
    announce: Callable[[], None]
    advertise_mesh: Callable[[], None]
    attempts: dict[str, JoinAttempt] = field(default_factory=dict, init=False)

    # -- answering --------------------------------------------------------------------------------

    async def answer(self, msg: dict[str, Any], info: PeerInfo) -> dict[str, Any]:
        """A ``join`` request to our peer port: decided here if this site is the inviter,
        else passed on to the inviter."""
        now = int(time.time())
        if msg["inviter"] != self.site.keys.public:
            return await self._forward(msg, info.address, now)
        source = info.address
        before = self.admissions.admitted
        forwarded = info.curve_key in self.view.by_curve  # an alternate passing a join on
        reply = self.admissions.handle_join(msg, info.curve_key, source, now, forwarded=forwarded)
        if self.admissions.admitted != before:
            log.info("admitted a new site (fingerprint %s)", reply.get("joiner_fp"))
            self.announce()
        elif reply.get("status") == "pending":
            log.info("join from %s waits for approval: meshd approve %s", source,
                     reply.get("joiner_fp"))
        return reply

    async def _forward(self, msg: dict[str, Any], source: str, now: int) -> dict[str, Any]:
        """An alternate named in a token passes a join on to the inviter (it sees only a proof).

        The alternate throttles the joiner's address as the inviter would, since the inviter
        sees only the alternate's."""
        self.admissions.check_throttle(source, now)
        inviter = msg["inviter"]
        rec = self.view.record_of(inviter)
        if rec is None or not self.view.is_member(inviter):
            raise JoinRefused("this site cannot forward the join: it does not know the inviter",
                              reason="unknown")
        fwd = {k: v for k, v in msg.items() if k != "id"}
        try:
            reply = await self.links.request(inviter, fwd, self.config.request_timeout,
                                             addrs=list(rec.addrs))
        except Unreachable as exc:
            raise JoinRefused(f"the inviter is unreachable from this alternate: {exc}",
                              reason="unreachable") from None
        self.counters.count("joins_forwarded")
        if reply["t"] == "error" and reply["reason"] in ("unknown", "bad-secret", "bad-record"):
            self.admissions.throttle.failure(source, now)
        return {k: v for k, v in reply.items() if k != "id"}

    # -- joining another mesh -------------------------------------------------------------------------

    def start(self, text: str) -> JoinAttempt:
        """Check a pasted invitation and start redeeming it; errors come back at once."""
        inv = tokens.parse(text)
        try:
            for key in (inv.inviter_key, *(alt.key for alt in inv.alternates)):
                curve_public_of(key)
        except ValueError:
            raise TokenError("the invitation names a key that is not a valid site key; ask for a"
                             " new invitation", reason="malformed") from None
        tokens.check_expiry(inv, time.time())
        if inv.inviter_key == self.site.keys.public:
            raise TokenError("this invitation was issued by this very site", reason="own-token")
        view = self.view
        if view.mesh_id is not None:
            if view.mesh_id == inv.mesh_id:
                raise TokenError(f"this site is already a member of mesh {view.mesh_name}",
                                 reason="member")
            if len(view.members) > 1:
                raise TokenError(
                    f"the invitation is for another mesh ({inv.mesh_id.hex()[:12]}…) than the one"
                    f" this site belongs to ({view.mesh_name}, {view.mesh_id.hex()[:12]}…)",
                    reason="wrong-mesh")
        for attempt in self.attempts.values():
            if attempt.invitation == inv and attempt.state in ("connecting", "pending"):
                return attempt
        attempt = JoinAttempt(secrets.token_hex(8), inv)
        self.attempts[attempt.id] = attempt
        self.tasks.spawn(self._run(attempt), f"join-{attempt.id}")
        return attempt

    async def _run(self, attempt: JoinAttempt) -> None:
        inv = attempt.invitation
        record = self.own_record.for_mesh(inv.mesh_id)
        msg = {"t": "join", "mesh": inv.mesh_id, "invite": inv.invite_id,
               "inviter": inv.inviter_key, "record": record.raw,
               "proof": tokens.join_proof(inv.secret, mesh_id=inv.mesh_id,
                                          inviter_key=inv.inviter_key,
                                          joiner_key=self.site.keys.public)}
        routes = [(inv.inviter_key, [str(a) for a in inv.addrs])]
        routes += [(alt.key, [str(a) for a in alt.addrs]) for alt in inv.alternates]
        deadline = time.monotonic() + 24 * 3600
        try:
            while time.monotonic() < deadline:
                reply = await self._ask_any(routes, msg)
                if reply["t"] == "error":
                    attempt.set("failed", error={"reason": reply["reason"],
                                                 "message": reply["message"]})
                    return
                attempt.inviter_name = reply.get("inviter_name")
                if reply.get("status") == "pending":
                    if attempt.state != "pending":
                        attempt.set("pending")
                    await asyncio.sleep(PENDING_POLL)
                    continue
                if reply.get("status") == "admitted":
                    self._complete(inv, reply, record)
                    attempt.set("admitted")
                    return
                attempt.set("failed", error={"reason": "protocol",
                                             "message": "the inviter's answer made no sense"})
                return
        except MeshdError as exc:
            attempt.set("failed", error={"reason": exc.reason, "message": exc.message})

    async def _ask_any(self, routes: list[tuple[bytes, list[str]]],
                       msg: dict[str, Any]) -> dict[str, Any]:
        failures = []
        for key, addrs in routes:
            try:
                return await self.links.request(key, msg, self.config.request_timeout,
                                                addrs=addrs)
            except Unreachable as exc:
                failures.append(str(exc))
        raise Unreachable("could not reach the inviter or any alternate: " + "; ".join(failures))

    def _complete(self, inv: tokens.Invitation, reply: dict[str, Any],
                  record: records.Signed) -> None:
        now = int(time.time())
        vouch = records.decode(reply.get("vouch", b""), now=now, mesh_id=inv.mesh_id,
                               kinds=("vouch",))
        body = vouch.body
        assert isinstance(body, Vouch)
        if body.subject != self.site.keys.public or body.voucher != inv.inviter_key:
            raise RecordError("the inviter sent a vouch for another site", reason="unauthorized")
        self.view.adopt([*reply.get("items", []), vouch.raw, record.raw], inv.mesh_id, now)
        self.own_record.refresh()
        self.advertise_mesh()
        log.info("joined mesh %s (%s) through %s; %d members", self.view.mesh_name,
                 inv.mesh_id.hex(), reply.get("inviter_name"), len(self.view.members))
        self.announce()
