"""The channel glue pumping real cores: real ChannelServices on loopback TCP, no daemons.

Each site is a :class:`~meshd.daemon.channels.service.ChannelService` with a real key holder
and mesh view (:mod:`tests.glue.daemon_kit`), a real port multiplexer handing it data
connections, and a fake ``MemberLinks`` carrying ``chan`` messages straight to the other
site's ``on_control``.  Applications are real ZeroMQ sockets on the services' ipc endpoints.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio

from meshd.channel import batch, link
from meshd.channel.control import ReachRequest, encode
from meshd.channel.handshake import Initiator
from meshd.daemon.channels.dialing import dial_any
from meshd.daemon.channels.service import ChannelService
from meshd.errors import ProtocolError
from meshd.peer.portmux import PortMux
from meshd.state.config import Config
from meshd.trust.identity import SiteKey
from tests.glue.daemon_kit import T, Net, Node, real_mesh

pytestmark = pytest.mark.glue


@dataclass
class Site:
    node: Node
    svc: ChannelService
    mux: PortMux | None

    @property
    def key(self) -> bytes:
        return self.node.key


@dataclass
class Mesh:
    sites: dict[str, Site]
    net: Net
    zctx: zmq.asyncio.Context

    def __getitem__(self, name: str) -> Site:
        return self.sites[name]


@pytest.fixture
async def mesh_factory(tmp_path: Path) -> AsyncIterator[Any]:
    zctx = zmq.asyncio.Context()
    made: list[Mesh] = []

    async def make(*specs: tuple[str, bool], configs: dict[str, Config] | None = None) -> Mesh:
        """Sites (name, listens?) of one mesh, each with its ChannelService started."""
        services: dict[str, ChannelService] = {}
        muxes: dict[str, PortMux] = {}
        addrs: dict[str, tuple[str, ...]] = {}
        for name, listens in specs:
            if listens:
                mux = PortMux(zmq_target="127.0.0.1:9",
                              on_other=lambda t, f, n=name: services[n].accept(t, f))
                addrs[name] = (await mux.start("127.0.0.1:0"),)
                muxes[name] = mux
            else:
                addrs[name] = ()
        nodes = real_mesh(tmp_path / str(len(made)), *[(n, addrs[n]) for n, _ in specs])
        net = Net()
        sites = {}
        for node in nodes:
            name = node.site.name
            svc = services[name] = ChannelService(
                site=node.site, view=node.view, config=(configs or {}).get(name, Config()),
                home=node.home, zctx=zctx, links=net.links(node),  # type: ignore[arg-type]
                liveness=lambda key: "alive", counters=node.counters.scoped("channel_"))
            net.handlers[node.key] = (lambda src, msg, svc=svc:
                                      svc.on_control(src, msg["op"], msg["b"]))
            svc.start()
            sites[name] = Site(node, svc, muxes.get(name))
        m = Mesh(sites, net, zctx)
        made.append(m)
        return m

    yield make
    for m in made:
        for site in m.sites.values():
            await site.svc.stop()
            if site.mux is not None:
                await site.mux.close()
            site.node.store.close()
    zctx.destroy(linger=0)


async def until(cond: Any, timeout: float = T) -> None:
    """Wait until ``cond()`` holds (polled every 10 ms, bounded by ``timeout``)."""
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), timeout)


async def send_and_receive(m: Mesh, src: str, dst: str, paths: list[str], n: int = 40
                           ) -> tuple[list[list[bytes]], Any]:
    """``n`` one-message batches from ``src``'s application to ``dst``'s, over ``paths``."""
    a, b = m[src], m[dst]
    port = b.svc.open_receiver("frames", None)
    rx = m.zctx.socket(zmq.PULL)
    rx.connect(port.endpoint)
    ch = a.svc.open_sender("frames", b.key, paths)
    tx = m.zctx.socket(zmq.PUSH)
    tx.connect(ch.endpoint)
    try:
        for i in range(n):
            await tx.send(batch.pack([(b"h", i.to_bytes(4, "big"))]))
        got = [await asyncio.wait_for(rx.recv_multipart(), T) for _ in range(n)]
        assert await ch.flush(n, T) == n
    finally:
        tx.close(0)
        rx.close(0)
    return got, ch


def check_in_order(got: list[list[bytes]], sender: Site, sender_name: str) -> None:
    for i, (meta, payload) in enumerate(got):
        cid, key, first, name = msgpack.unpackb(meta)
        assert (key, first, name) == (sender.key, i, sender_name)
        ((_, body),) = batch.split(payload)
        assert bytes(body) == i.to_bytes(4, "big")


async def test_a_direct_channel_delivers_in_order_exactly_once(mesh_factory: Any) -> None:
    m = await mesh_factory(("a", True), ("b", True))
    got, ch = await send_and_receive(m, "a", "b", ["direct"])
    check_in_order(got, m["a"], "a")
    (out,) = [c for c in m["a"].svc.describe() if c["direction"] == "out"]
    assert out["path"] == "direct" and out["state"] == "open" and out["acked_messages"] == 40
    (inc,) = m["b"].svc.describe()
    assert inc["messages"] == 40 and inc["peer"] == "a" and inc["state"] == "open"
    assert m["b"].node.counters.get("channel_accepted") >= 1
    m["a"].svc.close_sender(ch.cid)
    # closed by the sender, everything delivered: it leaves the list at once
    await until(lambda: m["b"].svc.describe() == [])
    assert m["b"].node.counters.get("channel_in_ended_closed") == 1


async def test_a_receiver_that_only_dials_out_is_reached_by_the_reversed_path(
        mesh_factory: Any) -> None:
    m = await mesh_factory(("a", True), ("edge", False))
    got, _ = await send_and_receive(m, "a", "edge", ["reversed"], n=5)
    check_in_order(got, m["a"], "a")
    (out,) = m["a"].svc.describe()
    assert out["path"] == "reversed"
    assert m["edge"].node.counters.get("channel_hello_in_dial") == 1


async def test_a_relay_splices_two_legs_and_carries_the_channel(mesh_factory: Any) -> None:
    m = await mesh_factory(("a", True), ("b", True), ("r", True))
    got, _ = await send_and_receive(m, "a", "b", ["relay"], n=20)
    check_in_order(got, m["a"], "a")
    (out,) = m["a"].svc.describe()
    assert out["path"] == "relay" and out["relay"] == "r"
    (row,) = m["r"].svc.describe()
    assert row["direction"] == "relay" and row["peer"] == "a -> b" and row["bytes"] > 0
    assert m["r"].node.counters.get("channel_relayed") == 1


async def test_a_site_that_does_not_relay_refuses_legs_and_the_channel_has_no_path(
        mesh_factory: Any) -> None:
    m = await mesh_factory(("a", True), ("b", True), ("r", True),
                           configs={"r": Config(relay=False)})
    ch = m["a"].svc.open_sender("frames", m["b"].key, ["relay"])
    await until(lambda: ch.state == "no-path")
    assert "relaying-disabled" in (ch.core.error or "")
    assert m["r"].node.counters.get("channel_relay_refused_disabled") >= 1


async def test_reach_request_is_answered_by_a_dial_back_and_a_report(mesh_factory: Any) -> None:
    m = await mesh_factory(("a", True), ("b", True))
    a, b = m["a"], m["b"]
    assert a.svc.reach_of(b.key) == {"we_dial": "unknown", "dials_us": "unknown"}
    op, body = encode(ReachRequest())
    b.svc.on_control(a.key, op, body)  # a asks b to dial it back
    await m.net.until(lambda: a.svc.reach_of(b.key)["dials_us"] == "yes")
    assert b.svc.reach_of(a.key)["we_dial"] == "yes"
    assert a.node.counters.get("channel_probes_answered") == 1
    assert b.node.counters.get("channel_control_reach_req") == 1
    assert a.node.counters.get("channel_control_reach") == 1


async def test_a_malformed_control_message_is_dropped_and_counted(mesh_factory: Any) -> None:
    m = await mesh_factory(("a", True), ("b", True))
    m["b"].svc.on_control(m["a"].key, "dial", b"\xc1")
    m["b"].svc.on_control(m["a"].key, "teleport", msgpack.packb({}))
    assert m["b"].node.counters.get("channel_control_dial") == 1
    assert m["b"].node.counters.get("channel_control_teleport") == 1


async def hello_to(site: Site, sender: Node, to: bytes) -> bytes:
    """A direct data connection from ``sender`` to ``site``, with a Hello for key ``to``; the
    Accept (ProtocolError if refused)."""
    assert site.mux is not None and site.mux.address is not None
    conn, _, _ = await dial_any([site.mux.address], timeout=T)
    cid = b"\x42" * 16
    init = Initiator(sender.site.keys.key, to, cid, now=time.time())
    try:
        conn.send(link.PREAMBLE, link.encode_preamble(
            link.Preamble("direct", cid, sender.key, to, "s", b"", 0)))
        conn.send(link.HELLO, init.hello)
        accept = bytes(await conn.expect(link.ACCEPT, timeout=T))
        init.on_accept(accept)  # signed by the key the Hello was for
        return accept
    finally:
        conn.close()


async def test_after_a_key_rotation_a_hello_for_the_new_key_is_accepted(
        mesh_factory: Any) -> None:
    m = await mesh_factory(("a", True), ("b", True))
    a, b = m["a"], m["b"]
    await hello_to(b, a.node, b.key)
    old = b.key
    new = SiteKey.generate()
    b.node.site.keys.rotate_to(new)  # what `meshd rotate` does to the one key holder
    await hello_to(b, a.node, new.public)
    with pytest.raises(ProtocolError):  # the old key is another site's now
        await hello_to(b, a.node, old)
