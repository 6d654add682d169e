"""The port multiplexer with real sockets on loopback: ZeroMQ spliced through it, other
connections handed to their protocol, and the limits on connections that say nothing."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import zmq
import zmq.asyncio
from nacl.public import PrivateKey
from zmq.utils.monitor import recv_monitor_message

from meshd.peer import wire
from meshd.peer.server import PeerInfo, PeerServer
from meshd.peer.portmux import STAT_KEYS, AliasPool, PortMux
from meshd.testing.processes import wait_until_async

T = 10.0  # seconds: the bound on every wait for something that should happen at once


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    c = zmq.asyncio.Context()
    yield c
    c.destroy(linger=0)


@pytest.fixture
async def router(ctx: zmq.asyncio.Context) -> AsyncIterator[tuple[zmq.asyncio.Socket, str]]:
    """A plain ROUTER on loopback (the internal endpoint) and its HOST:PORT."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:0")
    yield sock, sock.getsockopt_string(zmq.LAST_ENDPOINT).removeprefix("tcp://")
    sock.close(0)


def dealer(ctx: zmq.asyncio.Context, public: str, source: str | None = None) -> zmq.asyncio.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{source}:0;{public}" if source else f"tcp://{public}")
    return sock


class Recorder(asyncio.Protocol):
    """An ``on_other`` protocol that collects what it is given."""

    def __init__(self, want: int) -> None:
        self.want = want
        self.data = bytearray()
        self.made = False
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        assert not self.data, "connection_made must come before the first bytes"
        self.made = True
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= self.want and not self.done.done():
            self.done.set_result(bytes(self.data))


class BufferedRecorder(asyncio.BufferedProtocol):
    """Hands out tiny buffers, so the first bytes must be copied in a loop."""

    def __init__(self, want: int, chunk: int = 3) -> None:
        self.want = want
        self.buf = bytearray(chunk)
        self.data = bytearray()
        self.made = False
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert not self.data
        self.made = True

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buf)

    def buffer_updated(self, nbytes: int) -> None:
        self.data += self.buf[:nbytes]
        if len(self.data) >= self.want and not self.done.done():
            self.done.set_result(bytes(self.data))


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before it closed (or reset) the connection."""
    try:
        return await asyncio.wait_for(reader.read(), T)
    except ConnectionResetError:
        return b""


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


# -- ZeroMQ through the splice ---------------------------------------------------------------


async def test_zmq_messages_both_ways_and_large_ones(
        ctx: zmq.asyncio.Context, router: tuple[zmq.asyncio.Socket, str]) -> None:
    rsock, internal = router
    mux = PortMux(zmq_target=internal, on_other=lambda t, b: None)
    public = await mux.start("127.0.0.1:0")
    assert public.startswith("127.0.0.1:") and public != internal
    d = dealer(ctx, public)
    try:
        big = os.urandom(5 << 20)
        for payload in (b"hello", big, b"", big[::-1]):
            await d.send(payload)
            ident, frame = await asyncio.wait_for(rsock.recv_multipart(copy=False), T)
            assert frame.bytes == payload
            raw = frame.get("Peer-Address")
            assert raw.startswith("127.") and raw not in ("127.0.0.1",)
            assert mux.real_address(raw) == "127.0.0.1"
            await rsock.send_multipart([ident.bytes, payload[::-1]])
            assert await asyncio.wait_for(d.recv(), T) == payload[::-1]
        assert mux.stats["zmtp"] == 1 and mux.stats["accepted"] == 1
        assert mux.stats["other"] == 0 and mux.open_splices == 1
    finally:
        d.close(0)
        await mux.close()


async def test_each_remote_ip_gets_its_own_alias_that_maps_back(
        ctx: zmq.asyncio.Context, router: tuple[zmq.asyncio.Socket, str]) -> None:
    rsock, internal = router
    mux = PortMux(zmq_target=internal, on_other=lambda t, b: None)
    public = await mux.start("127.0.0.1:0")
    socks = [dealer(ctx, public, "127.0.0.5"), dealer(ctx, public, "127.0.0.6"),
             dealer(ctx, public, "127.0.0.5")]
    try:
        seen: dict[bytes, str] = {}
        for i, s in enumerate(socks):
            await s.send(b"%d" % i)
            ident, frame = await asyncio.wait_for(rsock.recv_multipart(copy=False), T)
            seen[frame.bytes] = frame.get("Peer-Address")
        assert seen[b"0"] == seen[b"2"] != seen[b"1"]  # one alias per remote IP, shared
        assert mux.real_address(seen[b"0"]) == "127.0.0.5"
        assert mux.real_address(seen[b"1"]) == "127.0.0.6"
        assert mux.real_address("10.1.2.3") == "10.1.2.3"  # not an alias: unchanged
    finally:
        for s in socks:
            s.close(0)
        await mux.close()


async def test_peer_server_reports_the_remote_ip_and_keeps_curve(ctx: zmq.asyncio.Context) -> None:
    server_secret, client_secret = PrivateKey.generate(), PrivateKey.generate()
    got: asyncio.Future[PeerInfo] = asyncio.get_running_loop().create_future()

    async def handler(msg: dict[str, Any], info: PeerInfo) -> dict[str, Any] | None:
        if not got.done():
            got.set_result(info)
        return {"t": "ok"}

    others: list[bytes] = []

    def on_other(transport: asyncio.Transport, first: bytes) -> asyncio.BaseProtocol | None:
        others.append(first)
        return None

    server = PeerServer(ctx, (bytes(server_secret.public_key), bytes(server_secret)), handler,
                        on_other=on_other)
    public = await server.start("127.0.0.1:0")
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.curve_secretkey, d.curve_publickey = bytes(client_secret), bytes(client_secret.public_key)
    d.curve_serverkey = bytes(server_secret.public_key)
    d.connect(f"tcp://127.0.0.7:0;{public}")
    try:
        await d.send(wire.encode({"t": "sync", "id": 7, "mesh": b"\x00" * 16, "items": []}))
        reply = wire.decode(await asyncio.wait_for(d.recv(), T))
        assert reply["t"] == "ok" and reply["id"] == 7
        info = await asyncio.wait_for(got, T)
        assert info.address == "127.0.0.7"
        assert info.curve_key == bytes(client_secret.public_key)
        # A port that is taken: OSError naming it (Daemon._bind relies on this).
        second = PeerServer(ctx, (bytes(server_secret.public_key), bytes(server_secret)),
                            handler, server._auth)
        with pytest.raises(OSError, match=f"cannot listen on {public}"):
            await second.start(public)
        await second.close(keep_auth=True)
        # Something that is not ZeroMQ reaches on_other, then (None) is closed.
        reader, writer = await asyncio.open_connection(*host_port(public))
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        assert await closed_by_server(reader) == b""
        writer.close()
        assert others == [b"GET / HTTP/1.0\r\n\r\n"]
    finally:
        d.close(0)
        await server.close()


async def test_either_side_closing_closes_the_other(
        ctx: zmq.asyncio.Context, router: tuple[zmq.asyncio.Socket, str]) -> None:
    rsock, internal = router
    monitor = rsock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
    mux = PortMux(zmq_target=internal, on_other=lambda t, b: None)
    public = await mux.start("127.0.0.1:0")

    async def next_event(kind: int) -> None:
        while (await asyncio.wait_for(recv_monitor_message(monitor), T))["event"] != kind:
            pass

    try:
        # ZeroMQ drops a connection that asks for a mechanism it does not use (PLAIN, not NULL):
        # the remote side is closed.
        reader, writer = await asyncio.open_connection(*host_port(public))
        writer.write(b"\xff" + bytes(8) + b"\x7f\x03\x00" + b"PLAIN".ljust(20, b"\x00") + bytes(32))
        await next_event(zmq.EVENT_ACCEPTED)
        await closed_by_server(reader)
        writer.close()
        await next_event(zmq.EVENT_DISCONNECTED)
        # The remote side closes: ZeroMQ sees its connection go.
        reader, writer = await asyncio.open_connection(*host_port(public))
        writer.write(b"\xff")
        await next_event(zmq.EVENT_ACCEPTED)
        writer.close()
        await next_event(zmq.EVENT_DISCONNECTED)
        assert mux.stats["zmtp"] == 2
    finally:
        rsock.disable_monitor()
        monitor.close(0)
        await mux.close()


# -- other connections -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [Recorder, BufferedRecorder])
async def test_other_connections_reach_their_protocol_with_first_bytes_intact(
        router: tuple[zmq.asyncio.Socket, str], kind: type[Recorder] | type[BufferedRecorder]) -> None:
    first = b"\x01\x00\x00\x00\x05hello" + bytes(range(255))  # anything but 0xFF first
    more = os.urandom(300_000)
    handed: asyncio.Future[tuple[bytes, Recorder | BufferedRecorder]] = \
        asyncio.get_running_loop().create_future()

    def on_other(transport: asyncio.Transport, data: bytes) -> asyncio.BaseProtocol:
        proto = kind(len(first) + len(more))
        handed.set_result((data, proto))
        return proto

    mux = PortMux(zmq_target=router[1], on_other=on_other)
    public = await mux.start("127.0.0.1:0")
    reader, writer = await asyncio.open_connection(*host_port(public))
    try:
        writer.write(first)
        await writer.drain()
        seen, proto = await asyncio.wait_for(handed, T)
        assert seen and first.startswith(seen)  # one write on loopback: in practice all of it
        writer.write(more)
        assert await asyncio.wait_for(proto.done, T) == first + more
        assert proto.made
        assert mux.stats == {**dict.fromkeys(STAT_KEYS, 0), "accepted": 1, "other": 1}
    finally:
        writer.close()
        await mux.close()


async def test_other_connection_survives_mux_close(router: tuple[zmq.asyncio.Socket, str]) -> None:
    handed: asyncio.Future[Recorder] = asyncio.get_running_loop().create_future()

    def on_other(transport: asyncio.Transport, data: bytes) -> asyncio.BaseProtocol:
        handed.set_result(Recorder(4))
        return handed.result()

    mux = PortMux(zmq_target=router[1], on_other=on_other)
    public = await mux.start("127.0.0.1:0")
    reader, writer = await asyncio.open_connection(*host_port(public))
    writer.write(b"ab")
    proto = await asyncio.wait_for(handed, T)
    await mux.close()
    writer.write(b"cd")
    assert await asyncio.wait_for(proto.done, T) == b"abcd"
    with pytest.raises(OSError):  # nothing listens any more
        await asyncio.open_connection(*host_port(public))
    writer.close()
    assert proto.transport is not None
    proto.transport.close()


# -- connections that say nothing ----------------------------------------------------------


async def test_silent_connections_time_out(router: tuple[zmq.asyncio.Socket, str]) -> None:
    mux = PortMux(zmq_target=router[1], on_other=lambda t, b: None, sniff_timeout=0.2)
    public = await mux.start("127.0.0.1:0")
    try:
        reader, writer = await asyncio.open_connection(*host_port(public))
        assert await closed_by_server(reader) == b""
        writer.close()
        assert mux.stats["sniff_timeouts"] == 1 and mux.stats["accepted"] == 1
    finally:
        await mux.close()


async def test_too_many_pending_connections_are_dropped_at_once(
        router: tuple[zmq.asyncio.Socket, str]) -> None:
    handed: asyncio.Queue[bytes] = asyncio.Queue()

    def on_other(transport: asyncio.Transport, data: bytes) -> None:
        handed.put_nowait(data)
        transport.write(b"ok")
        return None

    mux = PortMux(zmq_target=router[1], on_other=on_other, max_pending=2, sniff_timeout=60)
    public = await mux.start("127.0.0.1:0")
    conns = [await asyncio.open_connection(*host_port(public)) for _ in range(3)]
    try:
        # The server accepts in arrival order: the third finds two pending and is dropped.
        assert await closed_by_server(conns[2][0]) == b""
        assert mux.stats["refused_busy"] == 1 and mux.stats["accepted"] == 3
        # The first two still wait; once one speaks, a new connection is welcome again.
        conns[0][1].write(b"A")
        assert await asyncio.wait_for(handed.get(), T) == b"A"
        assert await closed_by_server(conns[0][0]) == b"ok"
        conns.append(await asyncio.open_connection(*host_port(public)))
        conns[3][1].write(b"B")
        assert await asyncio.wait_for(handed.get(), T) == b"B"
        conns[1][1].write(b"C")
        assert await asyncio.wait_for(handed.get(), T) == b"C"
        assert mux.stats == {**dict.fromkeys(STAT_KEYS, 0), "accepted": 4, "other": 3,
                             "refused_busy": 1}
    finally:
        for _, w in conns:
            w.close()
        await mux.close()


async def test_one_source_cannot_take_every_pending_slot(
        router: tuple[zmq.asyncio.Socket, str], caplog: pytest.LogCaptureFixture) -> None:
    mux = PortMux(zmq_target=router[1], on_other=lambda t, b: None, max_pending=8,
                  max_pending_per_source=2, sniff_timeout=60)
    public = await mux.start("127.0.0.1:0")
    host, port = host_port(public)
    conns = []
    try:
        with caplog.at_level(logging.DEBUG, "meshd.peer.portmux"):
            for _ in range(5):  # from 127.0.0.2: two wait, three are refused at once
                conns.append(await asyncio.open_connection(host, port, local_addr=("127.0.0.2", 0)))
            for reader, _ in conns[2:]:
                assert await closed_by_server(reader) == b""
            other = await asyncio.open_connection(host, port, local_addr=("127.0.0.3", 0))
            conns.append(other)
            await wait_until_async(lambda: mux.gauges()["sniffing"] == 3, T, "3 sniffing")
        assert mux.stats["refused_busy_source"] == 3 and mux.stats["refused_busy"] == 0
        # three refusals, one WARNING line (the rest counted into the next one)
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "peer port busy" in warnings[0].getMessage()
    finally:
        for _, w in conns:
            w.close()
        await mux.close()


async def test_zeromq_splices_are_bounded_per_source(
        router: tuple[zmq.asyncio.Socket, str]) -> None:
    mux = PortMux(zmq_target=router[1], max_splices=10, max_splices_per_source=2)
    public = await mux.start("127.0.0.1:0")
    host, port = host_port(public)
    conns = []
    try:
        for _ in range(4):
            r, w = await asyncio.open_connection(host, port, local_addr=("127.0.0.4", 0))
            w.write(b"\xff" + b"\x00" * 8 + b"\x7f")  # a ZMTP signature, then nothing
            conns.append((r, w))
        # (which two win is up to the order the loop reads them in)
        await wait_until_async(lambda: mux.stats["refused_splices_source"] == 2, T, "refusals")
        assert mux.open_splices == 2
        assert mux.gauges()["splices"] == 2 and mux.gauges()["splice_sources"] == 1
    finally:
        for _, w in conns:
            w.close()
        await mux.close()


async def test_close_drops_pending_and_spliced_connections(
        ctx: zmq.asyncio.Context, router: tuple[zmq.asyncio.Socket, str]) -> None:
    rsock, internal = router
    handed: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def on_other(transport: asyncio.Transport, data: bytes) -> None:
        handed.set_result(data)
        return None

    mux = PortMux(zmq_target=internal, on_other=on_other)
    public = await mux.start("127.0.0.1:0")
    spliced_r, spliced_w = await asyncio.open_connection(*host_port(public))
    spliced_w.write(b"\xff" + b"\x00" * 8 + b"\x7f")  # the start of a ZMTP greeting
    # ZeroMQ answers with its own greeting once the splice is up.
    assert (await asyncio.wait_for(spliced_r.readexactly(10), T))[0] == 0xFF
    pending_r, pending_w = await asyncio.open_connection(*host_port(public))
    # Connections are accepted in arrival order: once a later one has been handed over, the
    # pending one is in the sniff phase (not merely in the kernel's queue).
    later_r, later_w = await asyncio.open_connection(*host_port(public))
    later_w.write(b"x")
    await asyncio.wait_for(handed, T)
    later_w.close()
    await mux.close()
    await closed_by_server(spliced_r)  # the rest of the greeting, then the end
    assert await closed_by_server(pending_r) == b""
    spliced_w.close()
    pending_w.close()
    with pytest.raises(OSError):
        await asyncio.open_connection(*host_port(public))


async def test_port_taken_is_an_oserror_naming_it(router: tuple[zmq.asyncio.Socket, str]) -> None:
    holder = socket.create_server(("127.0.0.1", 0))
    try:
        port = holder.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}") as info:
            await PortMux(zmq_target=router[1], on_other=lambda t, b: None).start(
                f"127.0.0.1:{port}")
        assert info.value.errno is not None
    finally:
        holder.close()


# -- the alias pool (pure) -----------------------------------------------------------------


def test_alias_pool_shares_counts_and_lingers() -> None:
    pool = AliasPool(linger=2)
    a = pool.acquire("10.0.0.1")
    assert a == "127.0.0.2"
    assert pool.acquire("10.0.0.1") == a  # shared while open
    b = pool.acquire("10.0.0.2")
    assert b == "127.0.0.3" and pool.remote_of(b) == "10.0.0.2"
    pool.release("10.0.0.1")
    pool.release("10.0.0.1")
    assert pool.remote_of(a) == "10.0.0.1"  # lingers: late messages still map back
    assert pool.acquire("10.0.0.1") == a  # the same remote comes back to the same alias
    pool.release("10.0.0.1")
    for i in range(3, 6):  # three more freed: the linger list (2) forgets the oldest
        pool.acquire(f"10.0.0.{i}")
        pool.release(f"10.0.0.{i}")
    assert pool.remote_of(a) is None
    assert pool.remote_of(b) == "10.0.0.2"  # still open


def test_alias_pool_skips_network_broadcast_and_open_aliases() -> None:
    pool = AliasPool(linger=0)
    seen = {pool.acquire(f"r{i}") for i in range(600)}
    assert len(seen) == 600
    assert all(int(s.rsplit(".", 1)[1]) not in (0, 255) for s in seen)
    assert "127.0.0.1" not in seen and "127.0.1.0" not in seen
    # Wrap around: the cursor skips aliases still open.
    pool._cursor = 2
    assert pool.acquire("late") not in seen
