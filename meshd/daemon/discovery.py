"""LAN discovery with zeroconf (mDNS/DNS-SD): each daemon advertises itself and browses for others.

What is advertised is only a hint: a service ``<name>-<id prefix>._meshd._tcp.local.`` with the
peer port and TXT properties ``v`` (1), ``name``, ``key`` (the site's public key, Crockford
base32) and ``mesh`` (the mesh id, hex, or empty).  Nothing learned here is trusted: a sighting of
a member only adds a LAN address to try when dialing it, and the CURVE handshake then proves the
key; a sighting of anyone else is only listed (``meshd peers --discovered``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable

from meshd.daemon.tasks import TaskSet
from meshd.trust import base32
from meshd.trust.identity import site_id_of
from meshd.trust.records import is_valid_name

log = logging.getLogger("meshd.daemon.discovery")

SERVICE_TYPE = "_meshd._tcp.local."
MAX_SIGHTINGS = 1024
"""Most daemons remembered from the LAN; the longest unseen is forgotten first."""
TXT_VERSION = "1"


@dataclass(frozen=True, slots=True)
class Sighting:
    """A meshd daemon seen on the LAN (unverified until a CURVE handshake proves ``key``)."""

    name: str
    key: bytes
    mesh_id: bytes | None
    addrs: tuple[str, ...]
    seen: float

    @property
    def site_id(self) -> str:
        return site_id_of(self.key)


def txt_properties(name: str, key: bytes, mesh_id: bytes | None) -> dict[str, str]:
    return {"v": TXT_VERSION, "name": name, "key": base32.encode(key),
            "mesh": mesh_id.hex() if mesh_id else ""}


def parse_properties(props: dict[bytes, bytes | None]) -> tuple[str, bytes, bytes | None] | None:
    """(name, key, mesh id) from TXT properties, or None when anything is missing or malformed."""
    try:
        text = {k.decode("ascii"): (v or b"").decode("utf-8") for k, v in props.items()}
        if text.get("v") != TXT_VERSION:
            return None
        name = text["name"]
        key = base32.decode(text["key"])
        mesh = bytes.fromhex(text["mesh"]) if text.get("mesh") else None
    except (KeyError, ValueError, UnicodeDecodeError):
        return None
    if len(key) != 32 or not is_valid_name(name) or (mesh is not None and len(mesh) != 16):
        return None
    return name, key, mesh


class Discovery:
    """Advertise this site and keep the latest sighting of every other daemon on the LAN."""

    def __init__(self, *, name: str, key: bytes, mesh_id: bytes | None, port: int | None,
                 addresses: list[str], interfaces: list[str] | None,
                 on_sighting: Callable[[Sighting], None] | None = None) -> None:
        self.name = name
        self.key = key
        self.mesh_id = mesh_id
        self.port = port
        self.addresses = addresses
        self.interfaces = interfaces
        self.on_sighting = on_sighting
        self.sightings: dict[bytes, Sighting] = {}
        self._azc: Any = None
        self._browser: Any = None
        self._info: Any = None
        self._tasks = TaskSet("discovery")
        self._advertising = asyncio.Lock()

    @property
    def instance(self) -> str:
        return f"{self.name}-{site_id_of(self.key)[:8]}.{SERVICE_TYPE}"

    async def start(self) -> None:
        from zeroconf import InterfaceChoice, IPVersion
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

        ifaces = self.interfaces if self.interfaces else InterfaceChoice.All
        self._azc = AsyncZeroconf(interfaces=ifaces, ip_version=IPVersion.V4Only)
        if self.port:
            # Probing the name on the LAN takes about a second (RFC 6762, three probes 250 ms
            # apart): the daemon serves meanwhile rather than wait for it.
            self._tasks.spawn(self._advertise(), "advertise")
        self._browser = AsyncServiceBrowser(self._azc.zeroconf, [SERVICE_TYPE],
                                            handlers=[self._on_change])

    async def _register(self) -> None:
        from zeroconf.asyncio import AsyncServiceInfo

        assert self._azc is not None
        packed = []
        for a in self.addresses:
            try:
                packed.append(socket.inet_aton(a))
            except OSError:
                continue
        self._info = AsyncServiceInfo(
            SERVICE_TYPE, self.instance, addresses=packed, port=self.port,
            properties=txt_properties(self.name, self.key, self.mesh_id),
            server=f"meshd-{site_id_of(self.key)[:12]}.local.")
        await self._azc.async_register_service(self._info, allow_name_change=True)

    async def _advertise(self) -> None:
        """Advertise this site (again, with what it is now), one advertisement at a time."""
        async with self._advertising:
            if self._azc is None:
                return
            if self._info is not None:
                await self._azc.async_unregister_service(self._info)
                self._info = None
            await self._register()

    async def update(self, mesh_id: bytes | None) -> None:
        """Advertise a new mesh id (after founding or joining a mesh)."""
        if mesh_id == self.mesh_id:
            return
        self.mesh_id = mesh_id
        if self._azc is not None and self.port:
            await self._advertise()

    def _on_change(self, zeroconf: object, service_type: str, name: str,
                   state_change: object) -> None:
        from zeroconf import ServiceStateChange

        if state_change is ServiceStateChange.Removed:
            return
        self._tasks.spawn(self._resolve(service_type, name), "resolve")

    async def _resolve(self, service_type: str, name: str) -> None:
        from zeroconf.asyncio import AsyncServiceInfo

        assert self._azc is not None
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._azc.zeroconf, 3000) or not info.port:
            return
        parsed = parse_properties(info.properties)
        if parsed is None:
            log.debug("ignored a malformed advertisement %r", name)
            return
        peer_name, key, mesh_id = parsed
        if key == self.key:
            return
        addrs = tuple(f"{ip}:{info.port}" for ip in info.parsed_addresses())[:8]
        sighting = Sighting(peer_name, key, mesh_id, addrs, time.time())
        new = key not in self.sightings
        if new and len(self.sightings) >= MAX_SIGHTINGS:
            del self.sightings[min(self.sightings, key=lambda k: self.sightings[k].seen)]
        self.sightings[key] = sighting
        if new:
            log.info("discovered %s (%s) on the LAN at %s", peer_name, sighting.site_id,
                     ", ".join(addrs))
        if self.on_sighting is not None:
            self.on_sighting(sighting)

    async def close(self) -> None:
        await self._tasks.close()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._azc is not None:
            await self._azc.async_unregister_all_services()
            await self._azc.async_close()
