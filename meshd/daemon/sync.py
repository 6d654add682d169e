"""Anti-entropy of signed objects: pushed to every member at once on a change (:meth:`announce`),
pulled from one random member every ``sync_interval``, and answered when a member asks.

An exchange carries every signed object this site holds (see docs/architecture.md, "Record
propagation"); ``MeshView.ingest`` verifies what comes back before anything is kept.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from meshd.daemon.contacts import Contacts
from meshd.daemon.counters import Counters
from meshd.daemon.links import MemberLinks
from meshd.daemon.site import LocalSite
from meshd.daemon.tasks import TaskSet
from meshd.errors import RemoteError
from meshd.peer.dialer import Unreachable
from meshd.state.config import Config
from meshd.state.view import IngestResult, MeshView
from meshd.trust.identity import site_id_of

log = logging.getLogger("meshd")


class MeshSync:
    """Exchanges of signed objects with members.

    ``on_change`` follows a change of the mesh view (``Roster.changed``); ``start_membership``
    starts the membership core once this site is in a mesh."""

    def __init__(self, *, site: LocalSite, view: MeshView, config: Config, links: MemberLinks,
                 contacts: Contacts, counters: Counters, tasks: TaskSet,
                 on_change: Callable[[], None], start_membership: Callable[[], None],
                 rng: random.Random | None = None) -> None:
        self.site = site
        self.view = view
        self.config = config
        self.links = links
        self.contacts = contacts
        self.counters = counters
        self.tasks = tasks
        self.on_change = on_change
        self.start_membership = start_membership
        self.rng = rng or random.Random()

    def _push(self) -> dict[str, Any]:
        return {"t": "sync", "mesh": self.view.mesh_id, "items": self.view.snapshot()}

    async def sync_with(self, key: bytes) -> bool:
        """One push-pull exchange with a member; True if it answered."""
        if not self.links.dial_addresses(key) or self.view.mesh_id is None:
            return False
        try:
            reply = await self.links.request(key, self._push(), self.config.request_timeout)
        except Unreachable as exc:
            self.contacts.failed(key, str(exc))
            return False
        if reply["t"] == "error":
            self.contacts.failed(key, reply["message"])
            log.warning("%s refused sync: %s", self.view.name_of(key), reply["message"])
            return False
        self.contacts.ok(key)
        self.ingest(reply.get("items", []), key)
        return True

    def on_sync(self, key: bytes, msg: dict[str, Any]) -> dict[str, Any]:
        """A member's ``sync``: take its objects and answer with ours (the answer is dropped
        when it came one-way, from a member we cannot dial: see :meth:`announce`)."""
        if msg["mesh"] != self.view.mesh_id:
            raise RemoteError("sync for another mesh", reason="wrong-mesh")
        self.ingest(msg["items"], key)
        return {"t": "ok", "items": self.view.snapshot()}

    def ingest(self, items: list[bytes], key: bytes) -> IngestResult:
        """Verify and keep the signed objects a member sent; count and log what was refused."""
        result = self.view.ingest(items, int(time.time()))
        if result.stored:
            self.counters.count("records_stored", result.stored)
            self.on_change()
        for reason, n in result.refused.items():
            self.counters.count(f"records_refused_{reason.replace('-', '_')}", n)
            log.warning("refused %d signed object(s) from %s: %s", n,
                        self.view.name_of(key) or site_id_of(key), reason)
        return result

    def announce(self) -> None:
        """Push our signed objects to every member, now: an exchange with each member we can
        dial, a one-way push over its own connection to each member that only dials out."""
        self.on_change()
        self.start_membership()
        push: dict[str, Any] | None = None  # one snapshot for every member that only dials out
        for key in list(self.view.members):
            if key == self.site.keys.public:
                continue
            if self.links.dial_addresses(key):
                self.tasks.spawn(self.sync_with(key), "announce")
            elif self.view.mesh_id is not None:
                if push is None:
                    push = self._push()
                self.tasks.spawn(self.links.send(key, push), "announce-push")

    def on_sighting(self, key: bytes) -> None:
        """A daemon seen on the LAN: a member not heard from yet gets an exchange now."""
        if self.view.is_member(key) and key not in self.contacts:
            self.tasks.spawn(self.sync_with(key), "sync-discovered")

    async def run(self) -> None:
        """Anti-entropy: an exchange with one random member we can dial, every
        ``sync_interval`` (jittered), until cancelled."""
        while True:
            interval = self.config.sync_interval
            await asyncio.sleep(interval * (0.5 + self.rng.random()))
            await self.round()

    async def round(self) -> None:
        """One round of :meth:`run`."""
        if self._expiry_passed():  # a vouch lapsed: membership changes with the clock
            self.view.load(int(time.time()))
            self.on_change()
        others = [k for k in self.view.members if k != self.site.keys.public
                  and self.links.dial_addresses(k)]
        if others:
            try:
                await self.sync_with(self.rng.choice(others))
            except Exception:  # one bad round must not end anti-entropy for good
                log.exception("a sync round failed")

    def _expiry_passed(self) -> bool:
        now = int(time.time())
        return any(0 < m.expires <= now for m in self.view.members.values())
