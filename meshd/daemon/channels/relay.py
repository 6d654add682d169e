"""Relaying channels for other members: pairing two signed legs and splicing them (asyncio glue).

A sender S that cannot reach receiver R directly dials this site X with a relay preamble signed
by S (role ``s``); X holds that leg (reading nothing), tells R (``relay`` control message), and
R dials X with its own signed preamble (role ``r``).  X then splices the two legs byte for byte:
it sees only ciphertext.  On Linux the kernel does the splicing (:mod:`meshd.peer.ksplice`: the
bytes never enter the daemon); elsewhere the daemon copies them (:mod:`meshd.peer.splice`).  A
leg waits at most :data:`RELAY_WAIT` seconds; at most :data:`MAX_RELAY_WAITING` wait at once.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from meshd.channel import link
from meshd.channel.control import RelayNotice, peer_message
from meshd.daemon.channels.connection import DataConnection, detach
from meshd.daemon.counters import Counters
from meshd.daemon.links import MemberLinks
from meshd.daemon.site import LocalSite
from meshd.daemon.tasks import CoreTimer, TaskSet
from meshd.peer import ksplice
from meshd.state.config import Config
from meshd.state.view import MeshView

log = logging.getLogger("meshd.daemon.channels.relay")

RELAY_WAIT = 10.0
MAX_RELAY_WAITING = 256

LegKey = tuple[bytes, bytes, bytes]
"""(channel id, sender, receiver)"""


class Pair:
    """Two legs relayed to each other: by the kernel once their sockets are detached
    (:attr:`kernel`), by the daemon's copying splice where the kernel cannot."""

    def __init__(self, s_leg: DataConnection, r_leg: DataConnection) -> None:
        self.legs = (s_leg, r_leg)
        self.kernel: ksplice.KernelSplice | None = None
        self.since = time.time()

    @property
    def bytes(self) -> int:
        """Bytes relayed, both ways."""
        legs = sum(c.bytes_in for c in self.legs)
        return legs + (self.kernel.bytes if self.kernel is not None else 0)

    def close(self) -> None:
        if self.kernel is not None:
            self.kernel.close()
        for c in self.legs:
            c.close()

    def abort(self, reason: str) -> None:
        if self.kernel is not None:
            self.kernel.close(reason, reset=True)
        for c in self.legs:
            c.abort(reason)


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
        self.relayed: dict[LegKey, Pair] = {}
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
        pair = self.relayed[key] = Pair(partner, conn)
        if ksplice.AVAILABLE:
            self.tasks.spawn(self._to_kernel(key, pair), "relay-splice")
        else:
            partner.splice(conn)
            conn.splice(partner)
        self.counters.count("relayed")
        _, s, r = key
        log.info("relaying a channel from %s to %s", self.view.name_of(s), self.view.name_of(r))

    async def _to_kernel(self, key: LegKey, pair: Pair) -> None:
        """Hand both legs' sockets to a kernel splice (with what each read past its
        preamble); the pair ends if a leg closed meanwhile."""
        detached = [await detach(c) for c in pair.legs]
        if self.relayed.get(key) is not pair or None in detached:
            for d in detached:
                if d is not None:
                    d[0].close()
            self._done(key, pair)
            return
        (s_sock, s_left), (r_sock, r_left) = detached  # type: ignore[misc]
        pair.kernel = ksplice.KernelSplice(s_sock, r_sock, lambda k: self._done(key, pair),
                                           a_first=s_left, b_first=r_left)
        self.counters.count("relayed_in_kernel")

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

    def _done(self, key: LegKey, which: Pair | None = None) -> None:
        pair = self.relayed.get(key)
        if pair is None or (which is not None and pair is not which):
            if which is not None:
                which.close()
            return
        del self.relayed[key]
        self.relayed_bytes += pair.bytes
        pair.close()

    def cut_member(self, key: bytes) -> None:
        """Close every leg waiting for, and every pair relaying, a channel of ``key`` (it was
        revoked)."""
        for leg, conn in list(self.waiting.items()):
            if key in leg[1:]:
                self._drop_waiting(leg, conn)
                conn.abort("a site of this channel was revoked")
        for leg, pair in list(self.relayed.items()):
            if key in leg[1:]:
                pair.abort("a site of this channel was revoked")
                self._done(leg)

    def close(self) -> None:
        for pair in list(self.relayed.values()):  # (a kernel splice's end removes its pair)
            pair.close()
        for conn in list(self.waiting.values()):
            conn.close()

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for (cid, s, r), pair in self.relayed.items():
            out.append({"id": cid.hex(), "name": None, "direction": "relay",
                        "peer": f"{self.view.name_of(s)} -> {self.view.name_of(r)}",
                        "peer_id": None, "path": "relay", "relay": self.site.name,
                        "state": "open", "bytes": pair.bytes, "messages": None,
                        "rate_Bps": round(pair.bytes / max(1e-9, time.time() - pair.since))})
        return out
