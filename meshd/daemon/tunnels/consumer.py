"""The consuming site's side of a tunnel: a local listener, and the data connection to the
owner that carries every accepted TCP connection (asyncio glue).

The data connection is made exactly as a channel's: a staggered race of the paths
(:class:`~meshd.channel.paths.PathRace`: direct, reversed, relayed) whose attempts dial with the
channel service's :meth:`~meshd.daemon.channels.outbound.Sending.connect` and run the signed
handshake as initiator.  The winner carries a first frame naming the service, and from then on
the multiplexer's frames (:class:`.carrier.Carrier`).  It is raced only when a client connects
and no data connection is up, so an idle tunnel costs a listening socket.  When the connection
is lost, its streams are reset and the next client races again (the lost path left out for a
while, as for channels); a client that arrives while no path exists is reset.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from meshd.channel import link
from meshd.channel.handshake import Initiator
from meshd.channel.paths import CancelAttempt, NoPath, Path, PathKind, PathRace, StartAttempt
from meshd.daemon.channels.outbound import Sending
from meshd.daemon.channels.reach import Reachability
from meshd.daemon.counters import Counters
from meshd.daemon.site import LocalSite
from meshd.daemon.tasks import CoreTimer, TaskSet
from meshd.daemon.tunnels.carrier import Carrier
from meshd.daemon.tunnels.local import LocalStream
from meshd.errors import LocalError, ProtocolError
from meshd.state.view import MeshView
from meshd.tunnel import TunnelEnd
from meshd.trust.identity import site_id_of
from meshd.tunnel.control import format_address

log = logging.getLogger("meshd.daemon.tunnels")

MAX_WAITING = 1024
"""Client connections held while the data connection is being raced; beyond, reset."""


@dataclass(frozen=True, slots=True)
class Dialing:
    """What a consuming tunnel needs of the daemon."""

    site: LocalSite
    view: MeshView
    sending: Sending
    reach: Reachability
    kinds: tuple[PathKind, ...]
    tasks: TaskSet
    counters: Counters


class ConsumerTunnel:
    """``connect SITE/NAME``: the listener and the data connection (see the module docstring)."""

    def __init__(self, ctx: Dialing, peer: bytes, service: str, host: str, port: int) -> None:
        self.ctx = ctx
        self.peer = peer
        self.service = service
        self.host = host
        self.port = port
        self.server: asyncio.AbstractServer | None = None
        self.carrier: Carrier | None = None
        self.race = PathRace(ctx.site.public, peer, ctx.reach.table,
                             ctx.reach.relay_candidates(peer), kinds=ctx.kinds)
        self.attempts: dict[Path, asyncio.Task[None]] = {}
        self.waiting: list[LocalStream] = []
        self.racing = False
        self._raced = False
        self.cid = b""
        self.error: str | None = None
        self.created = time.time()
        self.past_bytes = 0
        self.connections = 0
        self._timer = CoreTimer(self._on_timer)
        self.closed = False

    @property
    def name(self) -> str:
        return f"{self.ctx.view.name_of(self.peer)}/{self.service}"

    async def listen(self) -> None:
        """Bind the listen address (OSError if it cannot be bound, e.g. in use)."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._client, self.host, self.port,
                                               reuse_address=True, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]

    @property
    def listen_address(self) -> str:
        return format_address(self.host, self.port)

    # -- clients ---------------------------------------------------------------------------

    def _client(self) -> LocalStream:
        local = LocalStream()
        local.connected.add_done_callback(lambda f: self._arrived(local, f))
        return local

    def _arrived(self, local: LocalStream, fut: asyncio.Future[None]) -> None:
        if fut.cancelled() or fut.exception() is not None or self.closed:
            return
        self.connections += 1
        self.ctx.counters.count("clients")
        if not self.ctx.view.is_member(self.peer):  # revoked (or its key retired): never carry
            self.error = "the owning site is not a member of this mesh"
            local.reset()
            return
        carrier = self.carrier
        if carrier is not None and not carrier.closed:
            try:
                carrier.open_stream(local)
            except LocalError:  # busy or just lost
                local.reset()
            return
        if len(self.waiting) >= MAX_WAITING:
            local.reset()
            return
        self.waiting.append(local)
        self._race()

    # -- the data connection ---------------------------------------------------------------

    def _race(self) -> None:
        if self.racing or self.closed:
            return
        self.racing = True
        self.cid = secrets.token_bytes(16)
        now = CoreTimer.now()
        if self._raced:
            self.race.renegotiate(now, "connection-lost",
                                  relays=self.ctx.reach.relay_candidates(self.peer))
        else:
            self._raced = True
            self.race.start(now)
        self._pump()

    def _on_timer(self, now: float) -> None:
        self.race.handle_timer(now)
        self._pump()

    def _pump(self) -> None:
        for action in self.race.outgoing():
            if isinstance(action, StartAttempt):
                self.attempts[action.path] = self.ctx.tasks.spawn(
                    self._attempt(action.path, self.cid), f"tunnel-attempt-{action.path}")
            elif isinstance(action, CancelAttempt):
                task = self.attempts.pop(action.path, None)
                if task is not None:
                    task.cancel()
        for event in self.race.events():
            if isinstance(event, NoPath):
                self.racing = False
                self.error = "no path: " + "; ".join(f"{p}: {r}" for p, r in event.reasons)
                log.warning("tunnel %s: %s", self.name, self.error[:300])
                waiting, self.waiting = self.waiting, []
                for local in waiting:
                    local.reset()
        self._timer.arm(self.race.get_timer())

    async def _attempt(self, path: Path, cid: bytes) -> None:
        conn = None
        timeout = self.race.config.attempt_timeout
        try:
            t0 = time.monotonic()
            init = Initiator(self.ctx.site.keys.key, self.peer, cid, now=time.time())
            in_dial = path.kind is PathKind.REVERSED  # the Hello rides in the dial request
            conn = await self.ctx.sending.connect(self.peer, cid, path, timeout,
                                                  init.hello if in_dial else None)
            if not in_dial:
                conn.send(link.HELLO, init.hello)
            keys = init.on_accept(bytes(await conn.expect(link.ACCEPT, timeout=timeout)))
            relay = path.relay
            if not self.ctx.view.is_member(self.peer) or (
                    relay is not None and not self.ctx.view.is_member(relay)):
                # revoked while the race ran: the cut has already happened, carry nothing
                raise LocalError("the owner (or the relay) is no member any more",
                                 reason="not-member")
            conn.trust()
            rtt = time.monotonic() - t0
        except asyncio.CancelledError:
            if conn is not None:
                conn.close()
            raise
        except (ProtocolError, LocalError, OSError, asyncio.TimeoutError) as exc:
            if conn is not None:
                conn.close()
            self.attempts.pop(path, None)
            reason = getattr(exc, "reason", None) or type(exc).__name__
            self.race.attempt_failed(path, CoreTimer.now(), f"{reason}: {exc}"[:200])
            self._pump()
            return
        self.attempts.pop(path, None)
        if path not in self.race.running or self.closed:
            conn.close()
            return
        self.race.attempt_succeeded(path, CoreTimer.now(), rtt)
        self.racing = False
        end = TunnelEnd(keys, self.service)
        conn.send(link.FRAME, end.first_frame())
        relay = path.relay
        carrier = Carrier(conn, end, path=path.kind.value, relay=relay, on_lost=self._lost)
        self.carrier = carrier
        self.error = None
        log.info("tunnel %s: %s", self.name,
                 f"relay via {self.ctx.view.name_of(relay)}" if relay else path.kind.value)
        while not conn.inbox.empty():  # (nothing is expected before our first frame)
            item = conn.inbox.get_nowait()
            if item is not None:
                carrier._on_record(conn, *item)
        self._pump()
        waiting, self.waiting = self.waiting, []
        for local in waiting:
            if local.done:
                continue
            try:
                carrier.open_stream(local)
            except LocalError:
                local.reset()

    def _lost(self, carrier: Carrier) -> None:
        if carrier is self.carrier:
            self.carrier = None
        self.past_bytes += carrier.bytes_total
        if carrier.error:
            self.error = carrier.error
        if not self.closed:
            log.log(logging.WARNING if carrier.error and "not-allowed" in carrier.error
                    else logging.INFO, "tunnel %s: data connection lost (%s)", self.name,
                    carrier.error or "closed")

    def rekey(self, peer: bytes) -> None:
        """The owner rotated its key to ``peer``: race to it from now on."""
        self.cut("the owner's key was rotated")
        for task in self.attempts.values():
            task.cancel()
        self.attempts.clear()
        self._timer.cancel()
        self.racing = False
        self.peer = peer
        self.race = PathRace(self.ctx.site.public, peer, self.ctx.reach.table,
                             self.ctx.reach.relay_candidates(peer), kinds=self.ctx.kinds)
        self._raced = False
        if self.waiting and not self.closed:  # clients held for the old race: race for them
            self._race()

    def cut(self, why: str) -> None:
        if self.carrier is not None:
            self.carrier.close(why)

    def close(self) -> None:
        self.closed = True
        self._timer.cancel()
        if self.server is not None:
            self.server.close()
        for task in self.attempts.values():
            task.cancel()
        self.cut("disconnected")
        for local in self.waiting:
            local.reset()
        self.waiting.clear()

    def describe(self) -> dict[str, Any]:
        carrier = self.carrier
        total = self.past_bytes + (carrier.bytes_total if carrier is not None else 0)
        elapsed = max(1e-9, time.time() - self.created)
        return {
            "service": self.service, "site": self.ctx.view.name_of(self.peer),
            "site_id": site_id_of(self.peer), "listen": self.listen_address,
            "path": carrier.path if carrier is not None else None,
            "relay": self.ctx.view.name_of(carrier.relay)
            if carrier is not None and carrier.relay else None,
            "state": "open" if carrier is not None else "racing" if self.racing else "idle",
            "connections": len(carrier.streams) if carrier is not None else 0,
            "connections_total": self.connections,
            "bytes": total, "rate_Bps": round(total / elapsed), "error": self.error,
        }
