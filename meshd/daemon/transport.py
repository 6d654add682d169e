"""How this site is reached and reaches others: the peer port, the links it dials, and its LAN
advertisement, all under the current site key (restarted together after a key rotation).

Starting sets ``site.bound`` and ``site.addrs``, and gives ``links`` the server, dialer and LAN
sightings it sends through.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import zmq.asyncio

from meshd.daemon.discovery import Discovery, Sighting
from meshd.daemon.host import advertised_addresses
from meshd.daemon.links import MemberLinks
from meshd.daemon.site import LocalSite
from meshd.daemon.tasks import TaskSet
from meshd.errors import LocalError
from meshd.peer.dialer import Dialer, OneWay
from meshd.peer.portmux import OnOther
from meshd.peer.server import Handler, PeerServer
from meshd.state.config import Config
from meshd.state.store import Store
from meshd.state.view import MeshView

log = logging.getLogger("meshd")

REBIND_TRIES = 50
REBIND_PAUSE = 0.05
"""After a rotation the old peer socket closes asynchronously: try to bind again this often."""


class Transport:
    """The peer port (if ``config.listen``), the dialer and LAN discovery (if ``config.discovery``).

    ``on_request`` answers what arrives at the peer port, ``on_link_message`` what comes back on
    dialed links, ``on_other`` takes connections that are not ZeroMQ (channel data), and
    ``on_sighting`` hears of each daemon seen on the LAN."""

    def __init__(self, *, site: LocalSite, config: Config, view: MeshView, store: Store,
                 links: MemberLinks, zctx: zmq.asyncio.Context, on_request: Handler,
                 on_link_message: OneWay, on_other: OnOther,
                 on_sighting: Callable[[Sighting], None]) -> None:
        self.site = site
        self.config = config
        self.view = view
        self.store = store
        self.links = links
        self.zctx = zctx
        self.on_request = on_request
        self.on_link_message = on_link_message
        self.on_other = on_other
        self.on_sighting = on_sighting
        self.server: PeerServer | None = None
        self.dialer: Dialer | None = None
        self.discovery: Discovery | None = None
        self._tasks = TaskSet("transport")

    @property
    def dropped(self) -> int:
        """Messages the peer port dropped (malformed, or from no authenticated key)."""
        return self.server.dropped if self.server is not None else 0

    def port_stats(self) -> tuple[dict[str, int], dict[str, int]]:
        """The peer port's defensive counters and what it holds open now (empty: no port)."""
        return self.server.port_stats() if self.server is not None else ({}, {})

    async def start(self) -> None:
        """Bind the peer port, make the dialer, and start LAN discovery."""
        curve = self.site.keys.key.curve_keypair()
        self.dialer = Dialer(self.zctx, curve, on_message=self.on_link_message)
        if self.config.listen:
            self.server = PeerServer(self.zctx, curve, self.on_request, on_other=self.on_other)
            try:
                self.site.bound = await self._bind(self.server, self.config.listen)
            except OSError as exc:  # one line, not a traceback; nothing else was started
                raise LocalError(f"{exc}; if another program holds that port, choose another"
                                 " with listen = \"HOST:PORT\" in config.toml",
                                 reason="port-in-use") from None
        self.site.addrs = advertised_addresses(self.config, self.site.bound)
        self.links.server, self.links.dialer = self.server, self.dialer
        if self.config.discovery:
            await self._start_discovery()

    async def _bind(self, server: PeerServer, listen: str) -> str:
        """Bind the peer port; with port 0, prefer the port picked last time, so that addresses
        in records and tokens stay valid across restarts."""
        host, _, port = listen.rpartition(":")
        last = self.store.get_meta("last_port")
        if port == "0" and isinstance(last, int):
            try:
                return await server.start(f"{host}:{last}")
            except OSError:
                log.info("port %d used last time is taken; picking another", last)
        bound = await server.start(listen)
        self.store.set_meta("last_port", int(bound.rpartition(":")[2]))
        return bound

    async def _start_discovery(self) -> None:
        site = self.site
        interfaces = list(self.config.discovery_interfaces)
        host = site.bound.rpartition(":")[0] if site.bound else ""
        if not interfaces and host and host not in ("0.0.0.0", "*"):
            interfaces = [host]
        self.discovery = Discovery(
            name=site.name, key=site.keys.public, mesh_id=self.view.mesh_id,
            port=int(site.bound.rpartition(":")[2]) if site.bound else None,
            addresses=[a.rpartition(":")[0] for a in site.addrs], interfaces=interfaces or None,
            on_sighting=self.on_sighting)
        try:
            await self.discovery.start()
        except OSError as exc:
            log.warning("LAN discovery is off: %s", exc)
            self.discovery = None
        self.links.sightings = self.discovery.sightings if self.discovery is not None else {}

    def advertise_mesh(self) -> None:
        """Advertise the mesh this site is in now on the LAN (after founding or joining one)."""
        if self.discovery is not None:
            self._tasks.spawn(self.discovery.update(self.view.mesh_id), "discovery-update")

    async def restart(self) -> None:
        """Peer port, links and LAN advertisement under the current key (after a rotation)."""
        curve = self.site.keys.key.curve_keypair()
        if self.dialer is not None:
            self.dialer.close()
        self.dialer = self.links.dialer = Dialer(self.zctx, curve,
                                                 on_message=self.on_link_message)
        if self.server is not None and self.site.bound is not None:
            auth = self.server._auth
            await self.server.close(keep_auth=True)
            self.server = self.links.server = PeerServer(self.zctx, curve, self.on_request, auth,
                                                         on_other=self.on_other)
            for attempt in range(REBIND_TRIES):
                try:
                    await self.server.start(self.site.bound)
                    break
                except OSError:
                    if attempt == REBIND_TRIES - 1:
                        raise
                    await asyncio.sleep(REBIND_PAUSE)
        if self.discovery is not None:
            await self.discovery.close()
            await self._start_discovery()

    async def close(self) -> None:
        await self._tasks.close()
        if self.discovery is not None:
            await self.discovery.close()
        if self.server is not None:
            await self.server.close()
        if self.dialer is not None:
            self.dialer.close()
        self.links.server = self.links.dialer = None
