"""Tunnel carriers in one process over loopback: a real consumer carrier and a real owner
(``Owning``, its allow-list checks and its target connections) pumping real tunnel cores over a
real data connection, with plain asyncio TCP clients and an echo target."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from meshd.channel import link
from meshd.channel.handshake import Initiator, Responder
from meshd.channel.inbound import open_first
from meshd.daemon.channels.connection import DataConnection
from meshd.daemon.channels.dialing import dial
from meshd.daemon.counters import Counters
from meshd.daemon.tasks import TaskSet
from meshd.daemon.tunnels.carrier import Carrier
from meshd.daemon.tunnels.local import LocalStream
from meshd.daemon.tunnels.owner import Owning
from meshd.state.tunnels import Exposure
from meshd.trust.identity import SiteKey
from meshd.tunnel import TunnelEnd

pytestmark = pytest.mark.glue
A = SiteKey(bytes(range(32)))       # the consumer
B = SiteKey(bytes(range(1, 33)))    # the owner
T = 10.0


async def _echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while data := await r.read(1 << 16):
        w.write(data)
        await w.drain()
    w.write_eof()
    await w.drain()
    w.close()


@dataclass
class Rig:
    owning: Owning
    consumer: Carrier
    listen: int
    counters: Counters


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    loop = asyncio.get_running_loop()
    target = await asyncio.start_server(_echo, "127.0.0.1", 0)
    tport = target.sockets[0].getsockname()[1]
    allow = [A.public.hex()]
    exposed = {"echo": Exposure("echo", "127.0.0.1", tport, tuple(allow))}
    counters = Counters()
    tasks = TaskSet("test")
    owning = Owning(exposed=exposed, name_of=lambda k: "site-a" if k == A.public else "?",
                    is_member=lambda k: True, counters=counters.scoped("tunnel_"), tasks=tasks)

    init = Initiator(A, B.public, b"\x05" * 16, now=1_800_000_000.0)
    accept, rkeys = Responder(B).on_hello(init.hello, now=1_800_000_000.0, peers={A.public})
    ikeys = init.on_accept(accept)

    def first(conn: DataConnection, kind: int, body: Any) -> None:  # the receiving end's hook
        opener, _, name = open_first(rkeys, body)
        owning.accept(conn, rkeys, opener, name, "direct", None)

    def made() -> DataConnection:
        conn = DataConnection()
        conn.handler = first
        return conn

    data_srv = await loop.create_server(made, "127.0.0.1", 0)
    conn = await dial(f"127.0.0.1:{data_srv.sockets[0].getsockname()[1]}", timeout=T)
    end = TunnelEnd(ikeys, "echo")
    conn.send(link.FRAME, end.first_frame())
    carrier = Carrier(conn, end, path="direct", relay=None, on_lost=lambda c: None)

    def client() -> LocalStream:
        local = LocalStream()
        local.connected.add_done_callback(lambda f: carrier.open_stream(local))
        return local

    listener = await loop.create_server(client, "127.0.0.1", 0)
    yield Rig(owning, carrier, listener.sockets[0].getsockname()[1], counters)
    carrier.close("done")
    owning.close()
    for srv in (listener, data_srv, target):
        srv.close()
    await tasks.close()


async def roundtrip(port: int, data: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(data)
    w.write_eof()
    got = await asyncio.wait_for(r.read(), T)
    w.close()
    return got


async def test_streams_carry_bytes_and_half_closes_through_the_carriers(rig: Rig) -> None:
    payloads = [bytes([i]) * (300_000 + i) for i in range(8)]
    got = await asyncio.gather(*(roundtrip(rig.listen, p) for p in payloads))
    assert got == payloads
    assert rig.consumer.bytes_total == 2 * sum(map(len, payloads))
    assert rig.counters.snapshot().get("tunnel_streams") == 8


async def test_a_site_taken_off_the_allow_list_gets_a_reset_per_new_stream(rig: Rig) -> None:
    assert await roundtrip(rig.listen, b"ok") == b"ok"
    exp = rig.owning.exposed["echo"]
    rig.owning.exposed["echo"] = Exposure(exp.name, exp.host, exp.port, ("someone-else",))
    with pytest.raises(ConnectionResetError):
        await roundtrip(rig.listen, b"refused")
    assert rig.counters.snapshot().get("tunnel_refused_not_allowed") == 1
    assert not rig.consumer.closed  # one stream refused, not the data connection


async def test_a_hostile_frame_closes_the_data_connection_and_resets_every_stream(rig: Rig) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", rig.listen)
    w.write(b"held open")
    assert await asyncio.wait_for(r.readexactly(9), T) == b"held open"
    rig.consumer.conn.send(link.FRAME, b"\x01" * 100)  # not a frame of this tunnel
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(r.read(), T)
    w.close()
    await asyncio.wait_for(rig.consumer.conn.closed, T)
    assert rig.consumer.closed


async def test_big_streams_at_once_arrive_intact_through_the_reused_buffers(rig: Rig) -> None:
    # several MiB per stream: reads fill the shared read buffer, frames of ~1 MiB are sealed
    # from it, records land in the reused body buffer and decrypt into the reused plaintext
    payloads = [random.Random(i).randbytes(3_000_000 + 4099 * i) for i in range(4)]
    got = await asyncio.gather(*(roundtrip(rig.listen, p) for p in payloads))
    assert [hashlib.sha256(g).digest() for g in got] == \
        [hashlib.sha256(p).digest() for p in payloads]
    assert rig.consumer.conn.reuse_bodies and not rig.consumer.closed
    # with no stream left the connection drops its reused buffers
    for _ in range(int(T / 0.01)):
        if rig.consumer._arena is None and rig.consumer.end._plain is None:
            break
        await asyncio.sleep(0.01)
    assert rig.consumer._arena is None and rig.consumer.end._plain is None
    assert rig.consumer.conn._spare is None
