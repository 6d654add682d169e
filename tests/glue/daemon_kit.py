"""In-memory meshes of real daemon services for the glue tests of ``meshd.daemon``.

:func:`real_mesh` builds sites with real keys, stores and mesh views (one founder vouching for
the others), and :class:`Net` is a fake ``MemberLinks`` between them: a one-way send or a
request is handed straight to the receiving site's handler, and every delivery notifies one
condition that tests wait on (never a sleep).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshd.daemon.counters import Counters
from meshd.daemon.site import LocalSite
from meshd.errors import RemoteError
from meshd.peer.dialer import Unreachable
from meshd.state.home import Home
from meshd.state.site import SiteKeys, init_site
from meshd.state.store import Store
from meshd.state.view import MeshView
from meshd.trust import records
from meshd.trust.records import SiteRecord, Vouch

T = 10.0
"""Seconds: the bound on every wait for something that should happen soon."""


@dataclass
class Node:
    """One site: its state directory, key holder, store and mesh view."""

    home: Home
    site: LocalSite
    store: Store
    view: MeshView
    counters: Counters = field(default_factory=Counters)

    @property
    def key(self) -> bytes:
        return self.site.keys.public


def make_node(root: Path, name: str, addrs: tuple[str, ...]) -> Node:
    home = Home(root / name)
    key = init_site(home, name, None)
    store = Store(home.db_path)
    keys = SiteKeys(key)
    return Node(home, LocalSite(name, keys, addrs[0] if addrs else None, list(addrs)), store,
                MeshView(store, keys))


def signed_record(node: Node, mesh_id: bytes, now: int, seq: int = 1) -> records.Signed:
    key = node.site.keys.key
    return records.sign(SiteRecord(key.public, mesh_id, node.site.name, tuple(node.site.addrs),
                                   node.site.reachable, seq, now), key)


def real_mesh(root: Path, *specs: tuple[str, tuple[str, ...]]) -> list[Node]:
    """Sites named in ``specs`` (name, advertised addresses; none: it only dials out), the first
    founding the mesh and vouching for the others as introducers; every view holds it all."""
    now = int(time.time())
    nodes = [make_node(root, name, addrs) for name, addrs in specs]
    founder = nodes[0]
    founder.view.found("glue", b"\x07" * 16, now)
    mesh_id = founder.view.mesh_id
    assert mesh_id is not None
    fkey = founder.site.keys.key
    items = [signed_record(founder, mesh_id, now).raw]
    for n in nodes[1:]:
        items.append(records.sign(Vouch(mesh_id, fkey.public, n.key, n.site.name, "introducer",
                                        now, 0), fkey).raw)
        items.append(signed_record(n, mesh_id, now).raw)
    result = founder.view.ingest(items, now)
    assert not result.refused, result.refused
    for n in nodes[1:]:
        n.view.adopt(founder.view.snapshot(), mesh_id, now)
    return nodes


Handler = Callable[[bytes, dict[str, Any]], "dict[str, Any] | None"]


class Net:
    """The fake network: one :class:`FakeLinks` per site, delivering to that site's handlers."""

    def __init__(self) -> None:
        self.handlers: dict[bytes, Handler] = {}
        self.cut: set[bytes] = set()
        """Sites whose messages, both ways, are lost."""
        self.log: list[tuple[str, bytes, bytes, dict[str, Any]]] = []
        self.changed = asyncio.Condition()

    def links(self, node: Node) -> FakeLinks:
        return FakeLinks(self, node)

    async def until(self, cond: Callable[[], bool], timeout: float = T) -> None:
        """Wait until ``cond()`` holds, re-checked after every delivery."""
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(cond), timeout)

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def carry(self, kind: str, src: bytes, dest: bytes,
                    msg: dict[str, Any]) -> dict[str, Any] | None:
        self.log.append((kind, src, dest, msg))
        try:
            if src in self.cut or dest in self.cut or dest not in self.handlers:
                raise Unreachable(f"no answer from {dest.hex()[:8]}")
            return self.handlers[dest](src, msg)
        finally:
            await self.notify()


class FakeLinks:
    """``MemberLinks`` over :class:`Net`: dial addresses from the view's records."""

    def __init__(self, net: Net, node: Node) -> None:
        self.net = net
        self.node = node
        self.sightings: dict[bytes, Any] = {}
        self.forgotten: list[bytes] = []

    def dial_addresses(self, key: bytes) -> list[str]:
        rec = self.node.view.record_of(key)
        return list(rec.addrs) if rec is not None else []

    async def send(self, key: bytes, msg: dict[str, Any]) -> bool:
        try:
            await self.net.carry("send", self.node.key, key, msg)
        except (Unreachable, RemoteError):
            pass
        return True

    async def request(self, key: bytes, msg: dict[str, Any], timeout: float,
                      addrs: list[str] | None = None) -> dict[str, Any]:
        try:
            reply = await self.net.carry("request", self.node.key, key, msg)
        except RemoteError as exc:
            if isinstance(exc, Unreachable):
                raise
            return {"t": "error", "reason": exc.reason, "message": exc.message}
        assert reply is not None
        return reply

    def forget(self, key: bytes) -> None:
        self.forgotten.append(key)

    def rtt(self, key: bytes) -> float | None:
        return None

    def inbound(self, key: bytes) -> bool:
        return False


async def settle(tasks: Awaitable[Any]) -> Any:
    return await asyncio.wait_for(tasks, T)
