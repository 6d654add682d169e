"""Relaying channels for other members: pairing two signed legs and splicing them (asyncio glue).

A sender S that cannot reach receiver R directly dials this site X with a relay preamble signed
by S (role ``s``); X holds that leg (reading nothing), tells R (``relay`` control message), and
R dials X with its own signed preamble (role ``r``).  X then splices the two legs byte for byte
(:mod:`meshd.peer.splice`): it sees only ciphertext.  A leg waits at most :data:`RELAY_WAIT`
seconds; at most :data:`MAX_RELAY_WAITING` wait at once.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from meshd.channel import link
from meshd.channel.control import RelayNotice, peer_message
from meshd.daemon.channels.connection import DataConnection
from meshd.daemon.counters import Counters
from meshd.daemon.links import MemberLinks
from meshd.daemon.site import LocalSite
from meshd.daemon.tasks import CoreTimer, TaskSet
from meshd.state.config import Config
from meshd.state.view import MeshView

log = logging.getLogger("meshd.daemon.channels.relay")

RELAY_WAIT = 10.0
MAX_RELAY_WAITING = 256

LegKey = tuple[bytes, bytes, bytes]
"""(channel id, sender, receiver)"""


class Relay:
    """The legs waiting here and the pairs spliced here (see the module docstring)."""

    def __init__(self, *, site: LocalSite, view: MeshView, config: Config, links: MemberLinks,
                 counters: Counters, tasks: TaskSet) -> None:
        self.site = site
        self.view = view
        self.config = config
        self.links = links
        self.counters = counters
        self.tasks = tasks
        self.waiting: dict[LegKey, DataConnection] = {}
        self.relayed: dict[LegKey, tuple[DataConnection, DataConnection, float]] = {}
        self.relayed_bytes = 0

    def take_leg(self, conn: DataConnection, pre: link.Preamble) -> None:
        """A data connection with a relay preamble (from a member)."""
        if pre.relay != self.site.public:
            conn.refuse("wrong-relay")
            return
        if not self.config.relay:
            self.counters.count("relay_refused_disabled")
            conn.refuse("relaying-disabled: this site does not relay")
            return
        why = pre.verify(int(time.time() * 1000))
        if why is not None:
            self.counters.count("relay_refused_signature")
            conn.refuse(f"{why}: relay preamble")
            return
        if not self.view.is_member(pre.to):
            conn.refuse("not-member: the far end is not a member")
            return
        conn.trust()  # a member signed it
        s, r = (pre.sender, pre.to) if pre.role == "s" else (pre.to, pre.sender)
        key = (pre.cid, s, r)
        conn.handler = None
        conn.hold()
        if pre.role == "s":
            self._wait(key, conn)
        else:
            self._pair(key, conn)

    def _wait(self, key: LegKey, conn: DataConnection) -> None:
        # A held leg does not read, so it cannot notice that its sender gave up: a new leg for
        # the same channel (a later attempt, signed by the same sender) replaces it.
        old = self.waiting.pop(key, None)
        if old is not None:
            old.refuse("replaced: a newer leg for this channel arrived")
        if len(self.waiting) >= MAX_RELAY_WAITING:
            conn.refuse("busy: too many legs waiting")
            return
        self.waiting[key] = conn
        conn.owner = ("relay-leg", key)
        conn.on_lost = lambda c: self._leg_lost(key, c)
        expiry = CoreTimer(lambda now: self._expired(key, conn))
        expiry.arm(CoreTimer.now() + RELAY_WAIT)
        self.tasks.spawn(self._notify_receiver(key, conn), "relay-notify")

    def _pair(self, key: LegKey, conn: DataConnection) -> None:
        partner = self.waiting.pop(key, None)
        if partner is None:
            conn.refuse("unknown-channel: no sender waits here for this channel")
            return
        partner.on_lost = lambda c: self._done(key)
        conn.on_lost = lambda c: self._done(key)
        partner.splice(conn)
        conn.splice(partner)
        self.relayed[key] = (partner, conn, time.time())
        self.counters.count("relayed")
        _, s, r = key
        log.info("relaying a channel from %s to %s", self.view.name_of(s), self.view.name_of(r))

    async def _notify_receiver(self, key: LegKey, conn: DataConnection) -> None:
        cid, s, r = key
        if not await self.links.send(r, peer_message(RelayNotice(cid, s))):
            if self._drop_waiting(key, conn):
                conn.refuse("unreachable: the relay cannot reach the far end")

    def _drop_waiting(self, key: LegKey, conn: DataConnection) -> bool:
        """Forget ``conn`` if it is the leg waiting for ``key``; True if it was."""
        if self.waiting.get(key) is conn:
            del self.waiting[key]
            return True
        return False

    def _leg_lost(self, key: LegKey, conn: DataConnection) -> None:
        self._drop_waiting(key, conn)

    def _expired(self, key: LegKey, conn: DataConnection) -> None:
        if self._drop_waiting(key, conn):
            conn.refuse("timeout: the far end did not come to the relay")

    def _done(self, key: LegKey) -> None:
        pair = self.relayed.pop(key, None)
        if pair is not None:
            a, b, _ = pair
            self.relayed_bytes += a.bytes_in + b.bytes_in
            a.close()
            b.close()

    def cut_member(self, key: bytes) -> None:
        """Close every leg waiting for, and every pair relaying, a channel of ``key`` (it was
        revoked)."""
        for leg, conn in list(self.waiting.items()):
            if key in leg[1:]:
                self._drop_waiting(leg, conn)
                conn.abort("a site of this channel was revoked")
        for leg, (a, b, _) in list(self.relayed.items()):
            if key in leg[1:]:
                a.abort("a site of this channel was revoked")
                b.abort("a site of this channel was revoked")
                self._done(leg)

    def close(self) -> None:
        for a, b, _ in self.relayed.values():
            a.close()
            b.close()
        for conn in list(self.waiting.values()):
            conn.close()

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for (cid, s, r), (a, b, since) in self.relayed.items():
            out.append({"id": cid.hex(), "name": None, "direction": "relay",
                        "peer": f"{self.view.name_of(s)} -> {self.view.name_of(r)}",
                        "peer_id": None, "path": "relay", "relay": self.site.name,
                        "state": "open", "bytes": a.bytes_in + b.bytes_in, "messages": None,
                        "rate_Bps": round((a.bytes_in + b.bytes_in)
                                          / max(1e-9, time.time() - since))})
        return out
