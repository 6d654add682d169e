"""The asyncio glue of the membership core (``meshd.swim``) in the daemon: feed, flush, re-arm.

Only verified members of the mesh ever reach the core: a message from a key that is not a
member is refused by the peer port, and gossip about non-members (updates and push-pull rows)
is cut out before the core sees it, so a peer cannot make us believe in a site that no chain of
vouches admits.  Messages travel as one-way ``swim`` peer messages, back over the connection a
peer made to us when there is one (the only way to reach a site that cannot be dialed), else
over a link we dial.  Signed objects ride on the core's push-pull as blobs, verified by
``MeshView.ingest`` before the core keeps or forwards them.

The sender the core is told is the member whose CURVE key authenticated the connection, never
a field of the message: that is what lets the core take any incarnation a member gives itself
and bound what it says about others (``max_incarnation_step``).  Messages the codec refuses for
an incarnation above ``swim.MAX_INCARNATION`` count as ``swim_refused_incarnation``, claims the
core cut down as ``swim_clamped_incarnation``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import time
from collections import deque
from typing import Any, Callable

from meshd import swim
from meshd.daemon.counters import Counters
from meshd.daemon.links import MemberLinks
from meshd.daemon.site import LocalSite
from meshd.daemon.tasks import CoreTimer, TaskSet
from meshd.errors import ProtocolError
from meshd.state.store import Store
from meshd.state.view import MeshView
from meshd.trust import records
from meshd.trust.identity import site_id_of

log = logging.getLogger("meshd.daemon.membership")

_UPDATES = (swim.Ping, swim.PingReq, swim.Ack, swim.Nack, swim.Gossip)
_STATES = (swim.PushPullRequest, swim.PushPullResponse)
EVENT_HISTORY = 1000
"""Membership events kept for ``meshd events`` (a client that connects later sees them)."""


class MembershipService:
    """Runs one ``swim.Membership`` core for the daemon.

    ``store`` keeps the incarnation across restarts; ``links`` sends the core's messages;
    ``on_change`` is called (soon, from the loop) when gossip brought a new signed object."""

    def __init__(self, *, site: LocalSite, view: MeshView, store: Store, links: MemberLinks,
                 counters: Counters, on_change: Callable[[], None],
                 config: swim.SwimConfig | None = None) -> None:
        self.site = site
        self.view = view
        self.store = store
        self.links = links
        self.counters = counters
        self.on_change = on_change
        # The mesh view says who is a member: a dead member is never forgotten by the core (it
        # keeps getting rejoin probes until it answers); revoked and retired keys are forgotten
        # through sync_members.
        self.config = config or swim.SwimConfig(dead_retention=math.inf)
        self.on_back: Callable[[bytes], None] | None = None
        """Called with a member's key when it comes back: alive after it was dead or left."""
        self.on_suspect: Callable[[bytes], None] | None = None
        """Called with a member's key when this site suspects it (its own probe failed): it may
        have rotated its key.  Not on others' suspicions: a site suspected across the mesh
        would be asked by every member at once."""
        self._down: set[bytes] = set()
        self.core: swim.Membership | None = None
        self._timer = CoreTimer(self._on_timer)
        self._sends = TaskSet("membership")
        self._left = asyncio.Event()
        self._pings: dict[int, tuple[bytes, float]] = {}
        self.rtt: dict[bytes, float] = {}
        self.history: deque[dict[str, Any]] = deque(maxlen=EVENT_HISTORY)
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self.sent = 0
        self.received = 0
        self.filtered = 0

    now = staticmethod(CoreTimer.now)

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the core once this site is in a mesh (at start-up, or when it founds or joins one)."""
        if self.core is not None or self.view.mesh_id is None:
            return
        now = self.now()
        # A restarted site must outrank what others remember of it (left, or dead, at the
        # incarnation it had): start above the last one used, and remember it first.
        incarnation = min(self.store.get_int("incarnation") + 1, swim.MAX_INCARNATION)
        self.store.set_meta("incarnation", incarnation)
        self._left.clear()
        self.core = swim.Membership(
            self.site.keys.public, self.config, random.Random(), now,
            reachable=self.site.reachable, verify_blob=self._verify_blob,
            incarnation=incarnation)
        self.sync_blobs()
        self.sync_members()
        self._flush()

    async def restart(self) -> None:
        """A new core under the current site key (after a rotation); listeners and history stay."""
        await self.close()
        self._pings.clear()
        self.rtt.clear()
        self.start()

    def sync_members(self) -> None:
        """Tell the core about members it does not know yet (after an admission or a join),
        and make it forget keys that are members no more (revoked, or retired by a rotation)."""
        core = self.core
        if core is None:
            return
        now = self.now()
        known = {m.node for m in core.members()}
        for gone in known - set(self.view.members) - {self.site.keys.public}:
            core.forget(gone)
        new = [k for k in self.view.members if k not in known]
        if not new:
            self.sync_blobs()
            return
        reachable = {k: bool(r.reachable) if (r := self.view.record_of(k)) else True
                     for k in new}
        core.restore([(k, 0, b"", reachable[k]) for k in new], now)
        core.join([k for k in new if self.links.dial_addresses(k)], now)
        self.sync_blobs()
        self._flush()

    def sync_blobs(self) -> None:
        """Make the core carry exactly the mesh view's signed objects: new ones published,
        superseded ones (an older site record, a revoked site's) dropped."""
        core = self.core
        if core is None:
            return
        wanted = {records.digest_of(raw): raw for raw in self.view.snapshot()}
        held = core.blobs()
        for key in held.keys() - wanted.keys():
            core.remove_blob(key)
        for key in wanted.keys() - held.keys():
            core.publish_blob(wanted[key])

    async def leave(self, timeout: float) -> None:
        """Gossip a graceful leave (the daemon is stopping) and wait up to ``timeout`` seconds
        until the core has sent it as often as it means to."""
        if self.core is None or self.view.mesh_id is None:
            return
        self.core.leave(self.now())
        self._flush()
        try:
            await asyncio.wait_for(self._left.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def close(self) -> None:
        """Stop the core: its timer and the sends in flight."""
        self._timer.cancel()
        self.core = None
        await self._sends.close()

    # -- input -------------------------------------------------------------------------------------

    def deliver(self, data: bytes, sender: bytes) -> None:
        """One ``swim`` message from a member (already authenticated and checked to be one)."""
        core = self.core
        if core is None:
            return
        try:
            msg = swim.from_bytes(data)
        except ProtocolError as exc:  # counted; a hostile member could flood the log
            self.counters.count("refused_incarnation" if exc.reason == "incarnation" else "malformed")
            log.debug("dropped a bad membership message from %s: %s", site_id_of(sender), exc)
            return
        self.received += 1
        now = self.now()
        if isinstance(msg, swim.Ack):
            sent = self._pings.pop(msg.seq, None)
            if sent is not None and sent[0] == sender:
                self.rtt[sender] = now - sent[1]
        clamped = core.clamped
        core.receive(self._members_only(msg), sender, now)
        if core.clamped != clamped:
            self.counters.count("clamped_incarnation", core.clamped - clamped)
        self._flush()

    def _members_only(self, msg: swim.Message) -> swim.Message:
        is_member = self.view.is_member
        if isinstance(msg, _UPDATES):
            kept = tuple(u for u in msg.updates if is_member(u.node))
            if len(kept) != len(msg.updates):
                self.filtered += len(msg.updates) - len(kept)
                return dataclasses.replace(msg, updates=kept)
        elif isinstance(msg, _STATES):
            rows = tuple(s for s in msg.states if is_member(s.node))
            if len(rows) != len(msg.states):
                self.filtered += len(msg.states) - len(rows)
                return dataclasses.replace(msg, states=rows)
        return msg

    def _verify_blob(self, blob: bytes) -> bytes | None:
        """The core's hook: a signed object is kept and forwarded only if the mesh view takes it."""
        result = self.view.ingest([blob], int(time.time()))
        if result.stored:  # not from inside the core's own call: it is merging right now
            asyncio.get_running_loop().call_soon(self.on_change)
        return records.digest_of(blob) if result.stored or result.duplicate else None

    # -- output ------------------------------------------------------------------------------------

    def _flush(self) -> None:
        core = self.core
        if core is None:
            return
        now = self.now()
        for dest, msg in core.outgoing():
            if not self.view.is_member(dest):
                continue
            if isinstance(msg, swim.Ping) and msg.target == dest:
                self._pings[msg.seq] = (dest, now)
                if len(self._pings) > 4096:
                    self._pings.pop(next(iter(self._pings)))
            self.sent += 1
            self._sends.spawn(self.links.send(dest, {"t": "swim", "m": swim.to_bytes(msg)}),
                              "send")
        for event in core.events():
            self._publish(event)
        if core.leave_done:
            self._left.set()
        self._timer.arm(core.get_timer())

    def _on_timer(self, now: float) -> None:
        if self.core is not None:
            self.core.handle_timer(now)
            self._flush()

    # -- events -------------------------------------------------------------------------------------

    def subscribe(self, listener: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """Call ``listener`` with each membership event from now on; returns an unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def emit(self, kind: str, node: bytes, **fields: Any) -> None:
        """Record an event (also for the daemon's own: admitted, revoked, joined)."""
        event = {"type": kind, "site_id": site_id_of(node),
                 "name": self.view.name_of(node), "time": time.time(), **fields}
        self.history.append(event)
        for listener in list(self._listeners):
            listener(event)

    def _publish(self, event: swim.Event) -> None:
        kind = {swim.MemberJoined: "joined", swim.MemberUpdated: "updated",
                swim.MemberSuspect: "suspect", swim.MemberAlive: "alive",
                swim.MemberDead: "dead", swim.MemberLeft: "left",
                swim.Refuted: "refuted"}.get(type(event))
        if kind is None:
            return
        if isinstance(event, swim.Refuted):
            self.store.set_meta("incarnation", event.incarnation)
        if isinstance(event, swim.MemberSuspect) and self.on_suspect is not None \
                and event.source == self.site.keys.public:  # our own probe failed
            self.on_suspect(event.node)
        if isinstance(event, (swim.MemberDead, swim.MemberLeft)):
            self._down.add(event.node)
        elif isinstance(event, swim.MemberJoined) and event.node in self._down:
            self._down.discard(event.node)
            if self.on_back is not None:
                self.on_back(event.node)
        node = getattr(event, "node", self.site.keys.public)
        fields: dict[str, Any] = {"incarnation": event.incarnation}  # type: ignore[union-attr]
        source = getattr(event, "source", None)
        if source is not None:
            fields["by"] = site_id_of(source)
        if kind in ("suspect", "dead", "left", "refuted") or (kind == "alive"):
            log.info("member %s (%s) is %s (incarnation %d)", self.view.name_of(node),
                     site_id_of(node)[:12], kind, fields["incarnation"])
        self.emit(kind, node, **fields)

    # -- reports ------------------------------------------------------------------------------------

    def state_of(self, key: bytes) -> dict[str, Any]:
        """State, incarnation, last heard (unix time) and RTT of one member, as the core sees it."""
        core = self.core
        info = core.member(key) if core is not None else None
        if info is None:
            return {"state": "alive" if key == self.site.keys.public else "unknown",
                    "incarnation": 0, "last_seen": None, "rtt_ms": None}
        now = self.now()
        last = None if info.last_heard is None else time.time() - (now - info.last_heard)
        rtt = self.rtt.get(key)
        return {"state": info.status.name.lower(), "incarnation": info.incarnation,
                "last_seen": last, "rtt_ms": None if rtt is None else round(rtt * 1000, 3)}
