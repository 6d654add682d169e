"""Anti-entropy of signed objects: pushed to every member at once on a change (:meth:`announce`),
pulled from one random member every ``sync_interval``, and answered when a member asks.

An exchange carries every signed object this site holds (see docs/architecture.md, "Record
propagation"); ``MeshView`` verifies what comes back before anything is kept.

A member cannot make this site spend its event loop on signature checks: objects already held,
copies within a batch and bytes refused for good before are dropped by the digest of their bytes
before any check (``MeshView.screen``); each member has a budget of objects per interval
(``SYNC_BUDGET`` / ``SYNC_REFILL``) and one exchange in verification at a time, past which it is
answered ``busy`` with a ``retry_after`` (counted ``sync_refused_busy``); and a batch with more
than ``VERIFY_INLINE`` objects left to check is verified in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from meshd.daemon.contacts import Contacts
from meshd.daemon.counters import Counters
from meshd.daemon.links import MemberLinks
from meshd.daemon.rekeys import ask_rotations, check_chain, rotation_chain
from meshd.daemon.site import LocalSite
from meshd.daemon.tasks import TaskSet
from meshd.errors import RemoteError, StateError
from meshd.peer.dialer import Unreachable
from meshd.state.config import Config
from meshd.state.throttle import Budgets
from meshd.peer.wire import MAX_ITEMS
from meshd.state.view import IngestResult, MeshView, Screened, Verified, verify
from meshd.trust.identity import site_id_of

log = logging.getLogger("meshd")

SYNC_BUDGET = 2 * MAX_ITEMS
"""Signed objects one member may send in a burst: two full exchanges of the largest size."""
SYNC_REFILL = MAX_ITEMS / 10.0
"""Objects per second by which a member's budget refills (one full exchange per 10 s)."""
VERIFY_INLINE = 64
"""Batches with more objects than this left to verify are verified off the event loop."""
REFUSED_SYNC_GAP = 10.0
"""Seconds between two exchanges started because a member refused our messages."""
ASK_ROTATIONS_GAP = 30.0
"""Seconds between two questions to a silent member's port whether it rotated its key."""
MAX_ASKED_ADDRESSES = 8
"""Addresses of a silent member asked in turn, at most, from its signed record (which holds at
most 8), and as many again seen on the LAN, after those."""
MAX_BUDGETS = 10_000
"""Members whose budget is tracked at once (the one used longest ago is forgotten first)."""


class SyncBusy(RemoteError):
    """This site will not look at more objects from that member now; try after ``retry_after``."""

    reason = "busy"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, reason="busy")
        self.retry_after = retry_after


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
        self._unstored_logged = -60.0  # when a refused store was last logged (monotonic)
        self.tasks = tasks
        self.on_change = on_change
        self.start_membership = start_membership
        self.rng = rng or random.Random()
        self.budgets = Budgets(SYNC_BUDGET, SYNC_REFILL, MAX_BUDGETS)
        self._verifying: set[bytes] = set()
        self._refused_syncs = Budgets(1.0, 1.0 / REFUSED_SYNC_GAP, MAX_BUDGETS)  # on_refused
        self._asked = Budgets(1.0, 1.0 / ASK_ROTATIONS_GAP, MAX_BUDGETS)  # ask_rotated
        self._asking: set[bytes] = set()
        """Members whose port is being asked now (one question at a time per member)."""
        self._pool: ThreadPoolExecutor | None = None

    def _push(self) -> dict[str, Any]:
        return {"t": "sync", "mesh": self.view.mesh_id, "items": self.view.snapshot()}

    async def sync_with(self, key: bytes, *, rekeyed: bool = False) -> bool:
        """One push-pull exchange with a member; True if it answered."""
        if not self.links.dial_addresses(key) or self.view.mesh_id is None:
            return False
        try:
            reply = await self.links.request(key, self._push(), self.config.request_timeout)
        except Unreachable as exc:
            self.contacts.failed(key, str(exc))
            if not rekeyed:
                self.on_suspect(key)
            return False
        if reply["t"] == "error" and reply["reason"] == "not-member" and not rekeyed:
            if await self._rekey(key):
                return await self.sync_with(key, rekeyed=True)
        if reply["t"] == "error":
            self.contacts.failed(key, reply["message"])
            log.warning("%s refused sync: %s", self.view.name_of(key), reply["message"])
            return False
        self.contacts.ok(key)
        items = reply.get("items", [])
        try:
            self._admit(key, items)
        except SyncBusy:
            return True  # it answered; what it sent waits for a later exchange
        await self._verify_and_ingest(key, self.view.screen(items))
        return True

    async def _rekey(self, key: bytes) -> bool:
        """``key`` does not know our key (it missed our rotation): present the rotations that
        lead to it (see :mod:`meshd.daemon.rekeys`).  True if it took them."""
        chain = rotation_chain(self.view.rotations.values(), self.site.keys.public)
        if not chain:
            return False
        try:
            reply = await self.links.request(
                key, {"t": "rekey", "mesh": self.view.mesh_id, "items": chain},
                self.config.request_timeout)
        except Unreachable:
            return False
        name = self.view.name_of(key) or site_id_of(key)
        if reply["t"] == "error":
            log.warning("%s refused the rotations that lead to our key: %s", name,
                        reply["message"])
            return False
        self.counters.count("rekeys_sent")
        log.info("%s had missed our key rotation: it took the rotations from us", name)
        return True

    def on_suspect(self, key: bytes) -> None:
        """Member ``key`` is suspected: it may be down, or have rotated its key while we were
        away (:meth:`ask_rotated`)."""
        if self.links.dial_addresses(key):
            self.tasks.spawn(self.ask_rotated(key), "ask-rotations")

    async def ask_rotated(self, key: bytes) -> bool:
        """Member ``key`` does not answer (its key may have been rotated while we were away,
        and its port no longer answers to the key we know): ask its port for the rotations
        (see :mod:`meshd.daemon.rekeys`), at most once per :data:`ASK_ROTATIONS_GAP` per
        member, at each of its addresses in turn until one answers with rotations we take (a
        stale address, or anyone on the LAN announcing its key, may answer first); then an
        exchange with the new key.  True if we took them."""
        mesh_id = self.view.mesh_id
        if mesh_id is None or not self.view.is_member(key) or key in self._asking \
                or self._asked.take(key, 1, time.monotonic()) > 0:
            return False
        # The addresses its own signed record gives first, then those seen on the LAN (which
        # anyone there may announce for its key), up to MAX_ASKED_ADDRESSES of each.
        rec = self.view.record_of(key)
        signed = list(rec.addrs)[:MAX_ASKED_ADDRESSES] if rec is not None else []
        seen = [a for a in self.links.dial_addresses(key) if a not in signed]
        name = self.view.name_of(key) or site_id_of(key)
        self._asking.add(key)
        try:
            for address in signed + seen[:MAX_ASKED_ADDRESSES]:
                new = await self._ask_rotations_at(address, key, name, mesh_id)
                if new is not None:
                    self.counters.count("rotations_taken")
                    log.info("took the new key of %s from its port at %s (rotations this site"
                             " had missed): %s", name, address, site_id_of(new))
                    await self.sync_with(new)
                    return True
                if not self.view.is_member(key):  # learnt meanwhile, some other way
                    return False
            return False
        finally:
            self._asking.discard(key)

    async def _ask_rotations_at(self, address: str, key: bytes, name: str,
                                mesh_id: bytes) -> bytes | None:
        """One address of :meth:`ask_rotated`: the new key, if we took its answer."""
        try:
            items = await ask_rotations(address, self.site.keys.public, key,
                                        timeout=self.config.request_timeout)
        except Exception as exc:  # noqa: BLE001 - refused, timed out, garbage, or an address
            # a record may hold but the resolver refuses ('a..b:80', 'h:99999'): the next one
            log.debug("could not ask %s at %s whether it rotated its key: %s", name, address,
                      exc)
            return None
        if not items:
            return None  # it did not rotate (or who answered there is not it)
        source = f"the port of {name} at {address}"
        try:
            new = check_chain(items, key, mesh_id)
        except RemoteError as exc:
            self.counters.count("rotations_refused")
            log.warning("refused the rotations %s answered: %s", source, exc.message)
            return None
        self.ingest(items, key, source=source)
        if self.view.is_member(key) or not self.view.is_member(new):
            self.counters.count("rotations_refused")
            log.warning("the rotations %s answered did not hand its membership to a new key",
                        source)
            return None
        return new

    def on_sync(self, key: bytes, msg: dict[str, Any]
                ) -> dict[str, Any] | Awaitable[dict[str, Any]]:
        """A member's ``sync``: take its objects and answer with ours (the answer is dropped
        when it came one-way, from a member we cannot dial: see :meth:`announce`).  ``busy``
        (``SyncBusy``) past the member's budget; a big batch is verified off the loop, and then
        the answer is an awaitable."""
        if msg["mesh"] != self.view.mesh_id:
            raise RemoteError("sync for another mesh", reason="wrong-mesh")
        self._admit(key, msg["items"])
        screened = self.view.screen(msg["items"])
        if len(screened.fresh) <= VERIFY_INLINE:
            self.keep_verified(key, screened, verify(screened.fresh, int(time.time()),
                                                        self.view.mesh_id))
            return {"t": "ok", "items": self.view.snapshot()}
        return self.tasks.spawn(self._answer_later(key, screened), "sync-verify")

    def _admit(self, key: bytes, items: list[bytes]) -> None:
        """Refuse (``SyncBusy``) a batch past ``key``'s budget, or while one of its batches is
        still being verified."""
        if key in self._verifying:
            wait = 1.0
        else:
            wait = self.budgets.take(key, len(items), time.monotonic())
        if wait:
            self.counters.count("sync_refused_busy")
            log.debug("sync from %s refused: busy for %.1f s", site_id_of(key), wait)
            raise SyncBusy(f"too many signed objects from you; try again in {wait:.1f} s", wait)

    async def _answer_later(self, key: bytes, screened: Screened) -> dict[str, Any]:
        await self._verify_and_ingest(key, screened)
        return {"t": "ok", "items": self.view.snapshot()}

    async def _verify_and_ingest(self, key: bytes, screened: Screened) -> IngestResult:
        """Verify ``screened.fresh`` in the worker thread when it is big, then keep what passed."""
        now, mesh_id = int(time.time()), self.view.mesh_id
        if len(screened.fresh) <= VERIFY_INLINE:
            return self.keep_verified(key, screened, verify(screened.fresh, now, mesh_id))
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshd-verify")
        self._verifying.add(key)
        try:
            self.counters.count("sync_verified_off_loop", len(screened.fresh))
            verified = await asyncio.get_running_loop().run_in_executor(
                self._pool, verify, screened.fresh, now, mesh_id)
        finally:
            self._verifying.discard(key)
        return self.keep_verified(key, screened, verified)

    def close(self) -> None:
        """Let the worker thread go (a batch it is verifying is finished and dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def ingest(self, items: list[bytes], key: bytes, *, source: str | None = None
               ) -> IngestResult:
        """Verify and keep the signed objects a member sent; count and log what was refused."""
        screened = self.view.screen(items)
        return self.keep_verified(key, screened, verify(screened.fresh, int(time.time()),
                                                           self.view.mesh_id), source=source)

    def keep_verified(self, key: bytes, screened: Screened, verified: Verified, *,
                      source: str | None = None) -> IngestResult:
        """Keep what passed :func:`verify` and is new and authorised (``key`` sent it, or
        ``source`` says who did, for the log); count and log what was refused."""
        label = source or self.view.name_of(key) or site_id_of(key)
        try:
            result = self.view.apply(screened, verified, int(time.time()))
        except StateError as exc:  # a full disk: they come again with the next exchange
            self.counters.count("records_unstored")
            self.on_change()  # some may have been kept before the store refused
            now = time.monotonic()
            if now - self._unstored_logged > 60:
                self._unstored_logged = now
                log.warning("cannot keep the signed objects %s sent: %s",
                            label, exc)
            return IngestResult(0, 0, {})
        if result.stored:
            self.counters.count("records_stored", result.stored)
            self.on_change()
        for reason, n in result.refused.items():
            self.counters.count(f"records_refused_{reason.replace('-', '_')}", n)
            log.warning("refused %d signed object(s) from %s: %s", n,
                        label, reason)
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

    def on_refused(self, key: bytes) -> None:
        """Member ``key`` refused one of our one-way messages as a stranger's (it missed our
        key rotation, or revoked us): if our key came from a rotation, an exchange now, which
        presents the rotations (:meth:`_rekey`), at most once per :data:`REFUSED_SYNC_GAP` per
        member; else nothing (the regular rounds go on)."""
        if self._refused_syncs.take(key, 1, time.monotonic()) > 0:
            return
        if not rotation_chain(self.view.rotations.values(), self.site.keys.public):
            return  # nothing an exchange could tell it (revoked, say): the rounds go on
        self.tasks.spawn(self.sync_with(key), "sync-refused")

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
