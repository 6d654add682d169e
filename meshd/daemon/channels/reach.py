"""Who can dial whom: the reachability table kept fresh by dial-backs (asyncio glue).

Every ``reach_interval`` (or when the member set changes) the loop asks the members whose
dial-back result is missing or old to dial this site back (``reach?``); a member asked dials
each of the asker's addresses and says how it went (``reach``).  Every dial this daemon makes
for a channel is recorded too (:meth:`Reachability.dial`).  The path race reads the table
(:mod:`meshd.channel.paths`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from meshd.channel import link
from meshd.channel.control import ReachReport, ReachRequest, peer_message
from meshd.channel.reach import Observation, Outcome, ReachabilityTable, Tri
from meshd.daemon.channels.connection import DataConnection
from meshd.daemon.channels.dialing import dial_any
from meshd.daemon.counters import Counters
from meshd.daemon.links import MemberLinks
from meshd.daemon.site import LocalSite
from meshd.daemon.tasks import TaskSet
from meshd.state.config import Config
from meshd.state.view import MeshView

log = logging.getLogger("meshd.daemon.channels.reach")

DIAL_TIMEOUT = 3.0
LIVE = ("alive", "suspect")
"""Liveness states of a member worth dialing, asking, or relaying through."""


def now_ms() -> int:
    return int(time.time() * 1000)


class Reachability:
    """The table, the dial-back loop, and every dial made for channels (see the module
    docstring)."""

    def __init__(self, *, site: LocalSite, view: MeshView, config: Config, links: MemberLinks,
                 liveness: Callable[[bytes], str], counters: Counters, tasks: TaskSet) -> None:
        self.site = site
        self.view = view
        self.config = config
        self.links = links
        self.liveness = liveness
        self.counters = counters
        self.tasks = tasks
        self.table = ReachabilityTable()
        self._wake = asyncio.Event()

    def start(self) -> None:
        self.tasks.spawn(self._loop(), "reach-loop")

    async def dial(self, key: bytes, timeout: float) -> tuple[DataConnection, str, float]:
        """A data connection to member ``key`` (its LAN or record addresses); the outcome goes
        into the table.  OSError or TimeoutError if no address answered."""
        me = self.site.public
        try:
            conn, address, rtt = await dial_any(self.links.dial_addresses(key),
                                                timeout=min(timeout, DIAL_TIMEOUT))
        except (OSError, asyncio.TimeoutError):
            self.table.record(Observation(me, key, Outcome.FAILED, time.time()))
            raise
        self.table.record(Observation(me, key, Outcome.OK, time.time(), rtt))
        return conn, address, rtt

    def relay_candidates(self, peer: bytes) -> list[bytes]:
        """Members that may relay a channel to ``peer``: reachable, with addresses, alive."""
        out = []
        for key in self.view.members:
            if key in (self.site.public, peer):
                continue
            rec = self.view.record_of(key)
            if rec is not None and rec.reachable and rec.addrs and self.liveness(key) in LIVE:
                out.append(key)
        return out

    def on_members_changed(self) -> None:
        """The member set, or a member's record, changed: forget what we knew about dialing a
        site whose advertised addresses changed (ours included), then re-check."""
        now = time.time()
        me = self.site.public
        current: dict[bytes, list[str]] = {me: list(self.site.addrs)}
        for key in self.view.members:
            rec = self.view.record_of(key)
            if key != me and rec is not None:
                current[key] = list(rec.addrs)
        for key, addrs in current.items():
            if self.table.note_addresses(key, addrs, now):
                self.counters.count("reach_addresses_changed")
                log.info("%s advertises new addresses %s: checking reachability again",
                         "this site" if key == me else self.view.name_of(key), addrs)
        for key in self.table.members_with_addresses() - current.keys():
            self.table.forget(key)
        self._wake.set()

    def member_back(self, key: bytes) -> None:
        """``key`` (re)joined, e.g. alive again after it was declared dead: what was seen of
        dialing it or being dialed by it may be a failure from while it was down or frozen, so
        forget it (not its addresses) and check again now."""
        self.table.forget_observations(key)
        self.on_members_changed()

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.reach_interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            now = time.time()
            self.table.prune(now)
            if self.view.mesh_id is None or not self.site.addrs:
                continue  # nobody can dial a site without addresses
            me = self.site.public
            alive = [k for k in self.view.members if k != me and self.liveness(k) in LIVE]
            for key in self.table.dial_back_plan(me, alive, now):
                await self.links.send(key, peer_message(ReachRequest()))

    async def answer(self, asker: bytes) -> None:
        """``reach?``: dial ``asker`` at each of its addresses and say how it went."""
        me = self.site.public
        results: list[tuple[str, bool, float]] = []
        for address in self.links.dial_addresses(asker)[:8]:
            t0 = time.monotonic()
            try:
                conn, _, rtt = await dial_any([address], timeout=DIAL_TIMEOUT)
            except (OSError, asyncio.TimeoutError):
                results.append((address, False, 0.0))
                continue
            conn.send(link.PREAMBLE, link.encode_preamble(
                link.Preamble("probe", bytes(16), me, asker, "s", b"", now_ms())))
            conn.close()
            results.append((address, True, time.monotonic() - t0))
        report = ReachReport(tuple(results))
        self.table.record(Observation(me, asker, report.outcome, time.time(), report.rtt))
        await self.links.send(asker, peer_message(report))

    def take_report(self, dialer: bytes, report: ReachReport) -> None:
        """``reach``: how ``dialer`` fared dialing this site."""
        self.table.record(Observation(dialer, self.site.public, report.outcome, time.time(),
                                      report.rtt))

    def reach_of(self, key: bytes) -> dict[str, str]:
        now = time.time()
        me = self.site.public
        word = {Tri.YES: "yes", Tri.NO: "no", Tri.UNKNOWN: "unknown"}
        return {"we_dial": word[self.table.can_dial(me, key, now)],
                "dials_us": word[self.table.can_dial(key, me, now)]}
