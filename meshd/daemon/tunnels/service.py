"""Tunnels in the daemon: the registry and the API the control routes call.

At the owning site, ``expose NAME HOST:PORT --allow ...`` adds a service (:mod:`.owner` accepts
consumers' data connections to it); at the consuming site, ``connect SITE/NAME`` adds a
listener (:mod:`.consumer`).  Both are kept in ``tunnels.json`` (:mod:`meshd.state.tunnels`)
and come back at start.  Members learn what others expose to them with a ``tunl`` query over
the peer links (:mod:`meshd.tunnel.control`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
from typing import Any

from meshd.channel.paths import PathKind
from meshd.daemon.channels.service import ChannelService
from meshd.daemon.counters import Counters
from meshd.daemon.links import MemberLinks
from meshd.daemon.site import LocalSite
from meshd.daemon.tasks import TaskSet
from meshd.daemon.tunnels.consumer import ConsumerTunnel, Dialing
from meshd.daemon.tunnels.owner import Owning
from meshd.errors import LocalError, ProtocolError, StateError
from meshd.state.config import Config
from meshd.state.home import Home
from meshd.state.tunnels import EVERYONE, Consumed, Exposure, TunnelBook
from meshd.state.view import MeshView
from meshd.trust.identity import site_id_of
from meshd.tunnel import check_service
from meshd.tunnel.control import (
    ServicesQuery,
    ServicesReport,
    decode,
    format_address,
    parse_address,
    peer_message,
)

log = logging.getLogger("meshd.daemon.tunnels")

QUERY_TIMEOUT = 3.0
"""Seconds to wait for members' answers about the services they expose to us."""
MAX_EXPOSED = 256
MAX_CONSUMED = 256


class TunnelService:
    """Every tunnel of one daemon, both sides (see the module docstring)."""

    def __init__(self, *, site: LocalSite, view: MeshView, config: Config, home: Home,
                 channels: ChannelService, links: MemberLinks, counters: Counters) -> None:
        self.site = site
        self.view = view
        self.links = links
        self.counters = counters
        self.book = TunnelBook.load(home.tunnels_path)
        self.tasks = TaskSet("tunnels")
        self.owning = Owning(exposed=self.book.exposed, name_of=view.name_of,
                             is_member=view.is_member, counters=counters, tasks=self.tasks,
                             per_site=config.tunnel_streams_per_site)
        kinds = tuple(PathKind(p) for p in config.paths)
        self.dialing = Dialing(site, view, channels.sending, channels.reach, kinds, self.tasks,
                               counters)
        self.consumed: dict[tuple[bytes, str], ConsumerTunnel] = {}
        self._queries: dict[bytes, tuple[bytes, asyncio.Future[tuple[str, ...]]]] = {}
        channels.receiving.tunnels = self.owning.accept

    async def start(self) -> None:
        """Listen for every tunnel kept in the registry (one that cannot listen is logged)."""
        for c in list(self.book.connected.values()):
            tun = self._make(bytes.fromhex(c.site), c.name, c.host, c.port)
            try:
                await tun.listen()
            except (OSError, ValueError) as exc:  # ValueError: a host the registry should
                log.warning("tunnel %s: cannot listen on %s: %s", tun.name,  # not hold
                            format_address(c.host, c.port), getattr(exc, "strerror", None)
                            or exc)
        if self.book.exposed or self.book.connected:
            log.info("tunnels: %d services exposed, %d tunnels listening", len(self.book.exposed),
                     sum(1 for t in self.consumed.values() if t.server is not None))

    async def stop(self) -> None:
        for tun in self.consumed.values():
            tun.close()
        self.owning.close()
        await self.tasks.close()

    # -- the owning side -------------------------------------------------------------------

    def expose(self, name: str, target: str, allow: list[bytes] | None, *,
               update: bool = False) -> dict[str, Any]:
        """Expose ``target`` as ``name`` to the sites ``allow`` (None: every member).  With
        ``update`` an exposure is replaced, and connections it no longer allows are cut."""
        try:
            check_service(name)
        except ValueError as exc:
            raise LocalError(str(exc), reason="bad-name") from None
        host, port = parse_address(target)
        if name in self.book.exposed and not update:
            raise LocalError(f"{name!r} is exposed already (unexpose it first, or --update)",
                             reason="exists")
        if name not in self.book.exposed and len(self.book.exposed) >= MAX_EXPOSED:
            raise LocalError(f"at most {MAX_EXPOSED} services", reason="busy")
        old = self.book.exposed.get(name)
        exp = Exposure(name, host, port,
                       (EVERYONE,) if allow is None else tuple(sorted({k.hex() for k in allow})))
        with self.book.change():
            self.book.exposed[name] = exp
        if old is not None:
            self.owning.cut(service=name, keep=lambda c: exp.allows(c.peer),
                            why="no longer allowed")
        log.info("exposed %r -> %s to %s", name, format_address(host, port), self._allow_text(exp))
        return self._service_view(exp)

    def unexpose(self, name: str) -> dict[str, Any]:
        exp = self.book.exposed.get(name)
        if exp is None:
            raise LocalError(f"no service {name!r} is exposed here", reason="not-found")
        with self.book.change():
            del self.book.exposed[name]
        cut = self.owning.cut(service=name, why="unexposed")
        log.info("unexposed %r (%d data connections cut)", name, cut)
        return self._service_view(exp)

    def services(self) -> list[dict[str, Any]]:
        return [self._service_view(e) for e in self.book.exposed.values()]

    def _allow_text(self, exp: Exposure) -> str:
        return "every member" if EVERYONE in exp.allow else \
            ", ".join(self.view.name_of(bytes.fromhex(k)) for k in exp.allow)

    def _service_view(self, exp: Exposure) -> dict[str, Any]:
        conns, total = self.owning.stats(exp.name)
        allow = [EVERYONE] if EVERYONE in exp.allow else \
            sorted(self.view.name_of(bytes.fromhex(k)) for k in exp.allow)
        return {"name": exp.name, "target": format_address(exp.host, exp.port), "allow": allow,
                "connections": conns, "bytes": total}

    def exposed_to(self, key: bytes) -> list[str]:
        return [e.name for e in self.book.exposed.values() if e.allows(key)]

    # -- the consuming side ----------------------------------------------------------------

    def _make(self, peer: bytes, name: str, host: str, port: int) -> ConsumerTunnel:
        tun = ConsumerTunnel(self.dialing, peer, name, host, port)
        self.consumed[(peer, name)] = tun
        return tun

    async def connect(self, peer: bytes, name: str, listen: str | None) -> dict[str, Any]:
        """Listen on ``listen`` (``[ADDR:]PORT``, default 127.0.0.1 and a free port) for
        ``name`` at ``peer``.  LocalError if the site or service is unknown, the service is not
        exposed to us (when the owner answers), or the address cannot be bound."""
        try:
            check_service(name)
        except ValueError as exc:
            raise LocalError(str(exc), reason="bad-name") from None
        if peer == self.site.public:
            raise LocalError("a tunnel to this site itself; connect to the target directly",
                             reason="bad-peer")
        if not self.view.is_member(peer):
            raise LocalError("that site is not a member of this mesh", reason="not-member")
        if (peer, name) in self.consumed:
            raise LocalError(f"a tunnel to {self.view.name_of(peer)}/{name} exists already"
                             f" (on {self.consumed[(peer, name)].listen_address})",
                             reason="exists")
        if len(self.consumed) >= MAX_CONSUMED:
            raise LocalError(f"at most {MAX_CONSUMED} tunnels", reason="busy")
        host, port = parse_address(listen or "127.0.0.1:0", default_host="127.0.0.1",
                                   allow_port_zero=True)
        offered = await self._ask(peer)
        if offered is not None and name not in offered:
            raise LocalError(f"{self.view.name_of(peer)} does not expose {name!r} to this site"
                             f" (it exposes {', '.join(offered) or 'nothing'} to it)",
                             reason="not-exposed")
        if (peer, name) in self.consumed:  # made while we asked
            raise LocalError("a tunnel to that service exists already", reason="exists")
        tun = self._make(peer, name, host, port)
        try:
            await tun.listen()
        except OSError as exc:
            del self.consumed[(peer, name)]
            raise LocalError(f"cannot listen on {format_address(host, port)}:"
                             f" {exc.strerror or exc}", reason="in-use") from None
        try:
            with self.book.change():
                self.book.connected[(peer.hex(), name)] = Consumed(peer.hex(), name, host,
                                                                   tun.port)
        except StateError:
            del self.consumed[(peer, name)]
            tun.close()
            raise
        log.info("tunnel %s listening on %s", tun.name, tun.listen_address)
        return {**tun.describe(), "checked": offered is not None}

    def disconnect(self, peer: bytes, name: str) -> dict[str, Any]:
        tun = self.consumed.get((peer, name))
        if tun is None:
            raise LocalError("no such tunnel at this site", reason="not-found")
        with self.book.change():  # first: a registry that cannot be written keeps the tunnel
            self.book.connected.pop((peer.hex(), name), None)
        del self.consumed[(peer, name)]
        tun.close()
        return tun.describe()

    def tunnels(self) -> list[dict[str, Any]]:
        return [t.describe() for t in self.consumed.values()]

    # -- cutting sites off -----------------------------------------------------------------

    def cut_member(self, key: bytes, reason: str) -> None:
        """Reset every stream and close every data connection to or from site ``key``, or
        relayed through it."""
        n = self.owning.cut(key=key, why=reason)
        n += self.owning.cut(relay=key, why=f"the relay was {reason}")
        for (peer, _), tun in self.consumed.items():
            if tun.carrier is not None and key in (peer, tun.carrier.relay):
                tun.cut(reason)
                n += 1
        if n:
            log.warning("tunnels: cut %d data connections of %s (%s)", n,
                        self.view.name_of(key), reason)

    def on_members_changed(self) -> None:
        """Follow key rotations (allow-lists and tunnels name the new key), then cut the tunnels
        of sites that are members no more (revoked, or a retired key)."""
        self._follow_rotations()
        gone = {c.peer for c in self.owning.carriers if not self.view.is_member(c.peer)}
        gone |= {p for (p, _), t in self.consumed.items()
                 if t.carrier is not None and not self.view.is_member(p)}
        relays = {c.relay for c in self.owning.carriers} \
            | {t.carrier.relay for t in self.consumed.values() if t.carrier is not None}
        gone |= {r for r in relays if r is not None and not self.view.is_member(r)}
        for key in gone:
            self.cut_member(key, "no longer a member")

    def _follow_rotations(self) -> None:
        retired = self.view.retired
        if not retired:
            return
        changed = False
        for name, exp in list(self.book.exposed.items()):
            if EVERYONE in exp.allow:
                continue
            keys = tuple(sorted({retired.get(bytes.fromhex(k), bytes.fromhex(k)).hex()
                                 for k in exp.allow}))
            if keys != exp.allow:
                self.book.exposed[name] = dataclasses.replace(exp, allow=keys)
                changed = True
        for (peer, name), tun in list(self.consumed.items()):
            new = retired.get(peer)
            if new is None or (new, name) in self.consumed:
                continue
            del self.consumed[(peer, name)]
            tun.rekey(new)
            self.consumed[(new, name)] = tun
            old = self.book.connected.pop((peer.hex(), name), None)
            if old is not None:
                self.book.connected[(new.hex(), name)] = dataclasses.replace(old, site=new.hex())
            changed = True
        if changed:
            log.info("tunnels: followed a key rotation")
            try:
                self.book.save()
            except StateError as exc:  # memory has it; the next change that saves writes it
                log.warning("tunnels: %s", exc)

    # -- what members expose to us ---------------------------------------------------------

    def on_control(self, key: bytes, op: str, body: bytes) -> None:
        """A ``tunl`` message from member ``key`` (authenticated by the peer link)."""
        try:
            msg = decode(op, body)
        except ProtocolError as exc:
            self.counters.count("control_malformed")
            log.info("dropped a tunl %s message from %s: %s", op, self.view.name_of(key), exc)
            return
        if isinstance(msg, ServicesQuery):
            report = ServicesReport(msg.query, tuple(self.exposed_to(key)))
            self.tasks.spawn(self.links.send(key, peer_message(report)), "tunl-answer")
        elif isinstance(msg, ServicesReport):
            waiter = self._queries.get(msg.query)
            if waiter is not None and waiter[0] == key and not waiter[1].done():
                waiter[1].set_result(msg.names)

    async def _ask(self, key: bytes, timeout: float = QUERY_TIMEOUT) -> tuple[str, ...] | None:
        """The services ``key`` exposes to us, or None if it does not answer in time."""
        q = secrets.token_bytes(8)
        fut: asyncio.Future[tuple[str, ...]] = asyncio.get_running_loop().create_future()
        self._queries[q] = (key, fut)
        try:
            if not await self.links.send(key, peer_message(ServicesQuery(q))):
                return None
            return await asyncio.wait_for(fut, timeout)
        except (asyncio.TimeoutError, OSError):
            return None
        finally:
            self._queries.pop(q, None)

    async def remote_services(self) -> list[dict[str, Any]]:
        """What every other member exposes to this site (those that answer in time)."""
        others = [k for k in self.view.members if k != self.site.public]
        answers = await asyncio.gather(*(self._ask(k) for k in others))
        out = []
        for key, names in zip(others, answers):
            for name in names or ():
                out.append({"site": self.view.name_of(key), "site_id": site_id_of(key),
                            "name": name, "connected": (key, name) in self.consumed})
        return out

    def status(self) -> dict[str, int]:
        return {"exposed": len(self.book.exposed), "tunnels": len(self.consumed),
                "tunnel_connections": sum(t.describe()["connections"]
                                          for t in self.consumed.values())}
