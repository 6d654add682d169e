"""The owning site's side of tunnels: the exposed services, the data connections consumers
open to them, and the connections to the targets (asyncio glue).

A data connection whose first frame names a tunnel (``CTRL_TUNNEL``) is handed here by the
channel service's receiving end after the signed handshake, so ``keys.peer`` is the
authenticated consuming site.  The service must be exposed and its allow-list must name that
site (else a REFUSE record with the reason, a log line naming the site, and a count); then the
acceptance is sent.  Every new stream is checked again against the allow-list as it is now,
then the owner connects to the service's target (only ever that ``HOST:PORT``).  Refusals
reset the client's TCP connection at the consuming site.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from meshd.channel.frames import Opener
from meshd.channel.handshake import ChannelKeys
from meshd.daemon.channels.connection import DataConnection
from meshd.daemon.counters import Counters
from meshd.daemon.tasks import TaskSet
from meshd.daemon.tunnels.carrier import Carrier
from meshd.daemon.tunnels.local import LocalStream
from meshd.channel import link
from meshd.peer.limits import RateLimitedLog, fd_budget
from meshd.state.tunnels import Exposure
from meshd.tunnel import TunnelEnd, check_service

log = logging.getLogger("meshd.daemon.tunnels")

TARGETS_CAP = 1 << 16
"""Most target connections the owner holds at once, whatever the open-file limit."""
CONNECT_TIMEOUT = 10.0
"""Seconds the owner waits for its target to accept a connection; then the stream is reset
(``refused``)."""


class Owning:
    """Every data connection consumers hold to this site's services."""

    def __init__(self, *, exposed: dict[str, Exposure], name_of: Callable[[bytes], str],
                 is_member: Callable[[bytes], bool], counters: Counters,
                 tasks: TaskSet, per_site: int = 4096, total: int | None = None) -> None:
        self.exposed = exposed
        self.per_site = per_site
        """Most target connections one member's streams may hold (``tunnel_streams_per_site``)."""
        self._total = total
        self.name_of = name_of
        self.is_member = is_member
        self.counters = counters
        self.tasks = tasks
        self.carriers: set[Carrier] = set()
        self._past_bytes: dict[str, int] = {}
        """Bytes carried by data connections that are gone, by service."""
        self._quiet: dict[tuple[bytes | str, str], RateLimitedLog] = {}
        """Per-stream refusals, by site (or service) and reason: a member can send tens of
        thousands of OPENs a second, so each kind is one log line a minute with its count."""

    @property
    def total(self) -> int:
        """Most target connections of all members together: half the open files left under
        the limit (read when asked: the daemon raises its limit after it is built), so the
        control socket, the peer port, the channels and this site's own tunnels keep theirs."""
        return self._total if self._total is not None else fd_budget(2, TARGETS_CAP)

    def _refusal(self, service: str, key: bytes) -> str | None:
        exp = self.exposed.get(service)
        if exp is None:
            return "unknown-service"
        if not self.is_member(key) or not exp.allows(key):
            return "not-allowed"
        return None

    def accept(self, conn: DataConnection, keys: ChannelKeys, opener: Opener, service: str,
               path: str, relay: bytes | None) -> None:
        """A consumer's data connection asks for ``service`` (its handshake done)."""
        try:
            check_service(service)
            why = self._refusal(service, keys.peer)
        except ValueError:
            why = "unknown-service"
        if why is not None:
            self._refused(service, keys.peer, why)
            text = ("not-allowed: this site does not expose it to you" if why == "not-allowed"
                    else "unknown-service: this site exposes no service of that name")
            conn.refuse(f"{text} ({service!r})")
            return
        # A consumer keeps one data connection per service: a newer one replaces it (the old
        # one is dead to the consumer, or the consumer is hoarding connections).
        self.cut(key=keys.peer, service=service, why="replaced by a newer data connection")
        end = TunnelEnd(keys, service, opener=opener)
        carrier = Carrier(conn, end, path=path, relay=relay, on_lost=self._gone,
                          on_open=self._on_open)
        self.carriers.add(carrier)
        conn.send(link.FRAME, end.first_frame())
        self.counters.count("accepted")
        log.info("tunnel %r from %s open (%s%s)", service, self.name_of(keys.peer), path,
                 f" via {self.name_of(relay)}" if relay else "")

    def _gone(self, carrier: Carrier) -> None:
        self.carriers.discard(carrier)
        self._past_bytes[carrier.service] = self._past_bytes.get(carrier.service, 0) + carrier.bytes_total

    def _refused(self, service: str, key: bytes, why: str, *, stream: bool = False) -> None:
        self.counters.count(f"refused_{why.replace('-', '_')}")
        warn = self._quiet_log(key, why).warning if stream else log.warning
        warn("refused a tunnel connection to %r from %s: %s", service, self.name_of(key), why)

    def _quiet_log(self, key: bytes | str, kind: str) -> RateLimitedLog:
        if len(self._quiet) > 4096:
            self._quiet.clear()
        return self._quiet.setdefault((key, kind), RateLimitedLog(log))

    def _on_open(self, carrier: Carrier, sid: int, service: str) -> None:
        why = "not-allowed" if service != carrier.service else self._refusal(service, carrier.peer)
        if why is not None:
            self._refused(service, carrier.peer, why, stream=True)
            carrier.reset(sid, why)
            return
        held = sum(len(c.streams) for c in self.carriers if c.peer == carrier.peer)
        if held >= self.per_site or sum(len(c.streams) for c in self.carriers) >= self.total:
            # (O(data connections) per OPEN: at most members x services, each O(1).)
            self._refused(service, carrier.peer, "busy", stream=True)
            carrier.reset(sid, "busy")
            return
        exp = self.exposed[service]
        local = LocalStream(carrier, sid)
        carrier.add_target(sid, local)
        self.counters.count("streams")
        local.connecting = self.tasks.spawn(self._connect(carrier, sid, local, exp),
                                            f"target-{service}")

    async def _connect(self, carrier: Carrier, sid: int, local: LocalStream,
                       exp: Exposure) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.create_connection(lambda: local, exp.host, exp.port),
                                   CONNECT_TIMEOUT)
            return
        except Exception as exc:  # noqa: BLE001 - refused, timed out, a name the resolver refuses
            error: BaseException = exc
        finally:
            local.connecting = None  # (a reset from now on does not cancel this task)
        self.counters.count("target_refused")
        self._quiet_log(exp.name, "target").warning(
            "tunnel %r: target %s:%d refused: %s", exp.name, exp.host, exp.port,
            str(error) or type(error).__name__)
        if carrier.streams.get(sid) is local:
            carrier.reset(sid, "refused")

    def cut(self, *, key: bytes | None = None, service: str | None = None,
            relay: bytes | None = None, keep: Callable[[Carrier], bool] | None = None,
            why: str) -> int:
        """Close the data connections of site ``key``, of ``service`` and/or through
        ``relay`` (those ``keep`` does not keep): every stream on them is reset.  How many were
        closed."""
        cut = 0
        for carrier in list(self.carriers):
            if key is not None and carrier.peer != key:
                continue
            if relay is not None and carrier.relay != relay:
                continue
            if service is not None and carrier.service != service:
                continue
            if keep is not None and keep(carrier):
                continue
            carrier.close(why)
            cut += 1
        return cut

    def stats(self, service: str) -> tuple[int, int]:
        """Open connections and bytes carried (both ways) of ``service`` now."""
        conns = sum(len(c.streams) for c in self.carriers if c.service == service)
        total = sum(c.bytes_total for c in self.carriers if c.service == service)
        total += self._past_bytes.get(service, 0)
        return conns, total

    def close(self) -> None:
        for carrier in list(self.carriers):
            carrier.close("the daemon is stopping")
