"""The sync and the asyncio application API against a fake daemon: the control routes they call
on a real unix socket (aiohttp) and real ZeroMQ ipc endpoints, in a thread of its own.  Both
flavours ship byte-identical batches for the same sends and decode deliveries alike."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.asyncio
from aiohttp import web

import meshd
from meshd.app.message import encode
from meshd.channel import batch
from meshd.errors import LocalError
from meshd.local import api, ipc
from meshd.local.ring import DESCRIPTOR, RING_MARK, Ring
from meshd.state.home import Home

T = 10.0  # seconds: the bound on every wait for something that should happen at once
SENDER_KEY = b"\x05" * 32


class FakeDaemon:
    """The daemon's side of one sender and one receiver: records every batch the application
    ships (inline or through its ring), acknowledges flushes once it has the messages (unless
    ``acking`` is off), and delivers what the test gives it."""

    def __init__(self, root: Path) -> None:
        root.mkdir()
        self.root = root
        self.tx = f"ipc://{root}/tx"
        self.rx = f"ipc://{root}/rx"
        self.batches: list[tuple[str, bytes]] = []
        """(``inline`` or ``ring``, payload) for each batch received."""
        self.flushes: list[int] = []
        self.closed: list[str] = []
        self.acking = True
        self.tx_ring: Ring | None = None
        self.rx_ring: Ring | None = None
        self._messages = 0
        self._ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_until_complete, args=(self._run(),))
        self._thread.start()
        assert self._ready.wait(T), "the fake daemon did not start"

    async def _run(self) -> None:
        self._stop = asyncio.Event()
        self._have = asyncio.Condition()
        ctx = zmq.asyncio.Context()
        self._pull = ctx.socket(zmq.PULL)
        self._pull.bind(self.tx)
        self._push = ctx.socket(zmq.PUSH)
        self._push.bind(self.rx)
        app = web.Application()
        app.add_routes([
            web.get(api.STATUS, self._status),
            web.post(api.CHANNELS, self._open_sender),
            web.post(api.CHANNELS + "/{id}/ring", self._attach_ring),
            web.post(api.CHANNELS + "/{id}/flush", self._flush),
            web.delete(api.CHANNELS + "/{id}", self._close),
            web.post(api.RECEIVERS, self._open_receiver),
            web.delete(api.RECEIVERS + "/{name}", self._close),
        ])
        runner = web.AppRunner(app)
        await runner.setup()
        await web.UnixSite(runner, str(Home(self.root).socket_path)).start()
        reader = asyncio.create_task(self._read())
        self._ready.set()
        await self._stop.wait()
        reader.cancel()
        await runner.cleanup()
        ctx.destroy(0)

    async def _read(self) -> None:
        while True:
            parts = await self._pull.recv_multipart(copy=False)
            if len(parts) == 2 and parts[0].bytes == RING_MARK and self.tx_ring is not None:
                start, view = self.tx_ring.record(parts[1].bytes)
                self.batches.append(("ring", bytes(view)))
                self.tx_ring.release(start + view.nbytes)
            else:
                (frame,) = parts
                self.batches.append(("inline", frame.bytes))
            async with self._have:
                self._messages += batch.check(self.batches[-1][1])
                self._have.notify_all()

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response({"name": "fake"})

    async def _open_sender(self, request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"id": "c1", "name": body["name"], "peer": body["to"],
                                  "endpoint": self.tx})

    async def _attach_ring(self, request: web.Request) -> web.Response:
        self.tx_ring = Ring.attach((await request.json())["ring"])
        return web.json_response({"ring": True})

    async def _flush(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.flushes.append(body["messages"])
        try:
            async with self._have:
                await asyncio.wait_for(self._have.wait_for(
                    lambda: self.acking and self._messages >= body["messages"]), body["timeout"])
        except asyncio.TimeoutError:
            return web.json_response(api.error_body("timeout", "not acknowledged"), status=400)
        return web.json_response({"acked_messages": self._messages})

    async def _close(self, request: web.Request) -> web.Response:
        self.closed.append(request.path)
        return web.json_response({})

    async def _open_receiver(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body["ring_bytes"]:
            self.rx_ring = Ring.create(body["ring_bytes"], self.root, background=False)
        return web.json_response({"name": body["name"], "endpoint": self.rx,
                                  "ring": None if self.rx_ring is None else str(self.rx_ring.path)})

    def deliver(self, *parts: bytes) -> None:
        async def send() -> None:
            await self._push.send_multipart(parts)
        asyncio.run_coroutine_threadsafe(send(), self.loop).result(T)

    def deliver_in_ring(self, meta: bytes, payload: bytes) -> None:
        assert self.rx_ring is not None
        start = self.rx_ring.reserve(len(payload))
        assert start is not None
        self.rx_ring.region(start, len(payload))[:] = payload
        self.deliver(meta, RING_MARK, DESCRIPTOR.pack(start, len(payload)))

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(T)
        self.loop.close()


@pytest.fixture
def daemons() -> Iterator[Callable[[str], FakeDaemon]]:
    """``daemons(name)``: a fake daemon whose home is a short path (unix socket paths are short)."""
    root = Path(tempfile.mkdtemp(prefix="meshd-glue-"))
    made: list[FakeDaemon] = []

    def make(name: str) -> FakeDaemon:
        made.append(FakeDaemon(root / name))
        return made[-1]

    yield make
    for d in made:
        d.stop()
    shutil.rmtree(root)


# -- what both flavours do -----------------------------------------------------------------------

SMALL = [(np.arange(i + 1, dtype=np.float32), {"i": i} if i % 3 == 0 else None) for i in range(40)]
SMALL += [(bytes([i]) * (i + 10), None) for i in range(10)]
LONE = (np.ones(300 << 10, dtype=np.uint8), {"lone": True})  # more than a batch: goes alone
MEDIUM = [(np.full(100 << 10, i, dtype=np.uint8), None) for i in range(7)]  # ring-worthy
TAIL = [(b"tail %d" % i, {"t": i}) for i in range(5)]
STEPS: list[Any] = [*SMALL[:25], "flush", *SMALL[25:], LONE, "ring", *MEDIUM, "flush", *TAIL]
"""Sends, and ``flush``, and ``ring``: wait until the sender's ring is ready (its memory is
allocated in the background), so that what follows goes through it."""


def expected_batches() -> list[bytes]:
    def packed(items: list[tuple[Any, Any]]) -> bytes:
        return batch.pack([encode(obj, meta) for obj, meta in items])
    return [packed(SMALL[:25]), packed(SMALL[25:]), packed([LONE]), packed(MEDIUM[:3]),
            packed(MEDIUM[3:6]), packed(MEDIUM[6:]), packed(TAIL)]


def send_sync(home: Path) -> None:
    with meshd.connect(home) as mesh:
        tx = mesh.sender("frames", to="alcf", linger=60.0, ring_bytes=4 << 20)
        for step in STEPS:
            if step == "flush":
                tx.flush(timeout=T)
            elif step == "ring":
                assert tx._ring is not None and tx._ring.wait_ready(T)
            else:
                tx.send(*step)
        tx.close(timeout=T)


async def send_async(home: Path) -> None:
    async with meshd.aconnect(home) as mesh:
        tx = await mesh.sender("frames", to="alcf", linger=60.0, ring_bytes=4 << 20)
        for step in STEPS:
            if step == "flush":
                await tx.flush(timeout=T)
            elif step == "ring":
                assert tx._ring is not None and tx._ring.wait_ready(T)
            else:
                await tx.send(*step)
        await tx.close(timeout=T)


async def test_both_flavours_ship_byte_identical_batches(
        daemons: Callable[[str], FakeDaemon]) -> None:
    sync_d, async_d = daemons("s"), daemons("a")
    await asyncio.to_thread(send_sync, sync_d.root)
    await send_async(async_d.root)
    want = expected_batches()
    for d in (sync_d, async_d):
        assert [payload for _, payload in d.batches] == want
        assert [kind for kind, _ in d.batches[3:]] == ["ring"] * 3 + ["inline"]  # small: inline
        assert d.batches[0][0] == d.batches[1][0] == "inline"
        assert d.flushes == [25, 58, 63]
        assert d.closed == ["/v1/channels/c1"]


def test_a_close_that_times_out_closes_all_the_same_and_says_so(
        daemons: Callable[[str], FakeDaemon]) -> None:
    d = daemons("t")
    d.acking = False
    mesh = meshd.connect(d.root)
    tx = mesh.sender("frames", to="alcf", linger=60.0)
    tx.send(b"never acknowledged")
    with pytest.raises(LocalError) as err:
        mesh.close(timeout=0.2)
    assert err.value.reason == "timeout"
    assert d.closed == ["/v1/channels/c1"] and d.flushes == [1]
    with pytest.raises(LocalError, match="the sender is closed"):
        tx.send(b"late")


async def test_an_async_close_that_times_out_closes_all_the_same_and_says_so(
        daemons: Callable[[str], FakeDaemon]) -> None:
    d = daemons("t")
    d.acking = False
    mesh = meshd.aconnect(d.root)
    tx = await mesh.sender("frames", to="alcf", linger=60.0)
    await tx.send(b"never acknowledged")
    with pytest.raises(LocalError) as err:
        await mesh.close(timeout=0.2)
    assert err.value.reason == "timeout"
    assert d.closed == ["/v1/channels/c1"] and d.flushes == [1]


async def test_the_linger_timer_ships_a_batch_in_both_flavours(
        daemons: Callable[[str], FakeDaemon]) -> None:
    sync_d, async_d = daemons("s"), daemons("a")
    with meshd.connect(sync_d.root) as mesh:
        tx = mesh.sender("frames", to="alcf", linger=0.01)
        tx.send(b"alone for a while")
        await asyncio.to_thread(wait_for_batches, sync_d, 1)
    async with meshd.aconnect(async_d.root) as amesh:
        atx = await amesh.sender("frames", to="alcf", linger=0.01)
        await atx.send(b"alone for a while")
        await asyncio.to_thread(wait_for_batches, async_d, 1)
    alone = batch.pack([encode(b"alone for a while", None)])
    assert sync_d.batches == async_d.batches == [("inline", alone)]
    assert sync_d.flushes == async_d.flushes == [1]  # the close's flush: nothing was left to ship


def wait_for_batches(d: FakeDaemon, n: int) -> None:
    async def wait() -> None:
        async with d._have:
            await d._have.wait_for(lambda: len(d.batches) >= n)
    asyncio.run_coroutine_threadsafe(asyncio.wait_for(wait(), T), d.loop).result(T + 1)


# -- receiving -------------------------------------------------------------------------------------


def deliveries(d: FakeDaemon) -> None:
    """Inline, in the ring, malformed (skipped), inline again."""
    first = [(np.arange(6, dtype=np.int16).reshape(2, 3), {"a": 1}), (b"raw bytes", None)]
    d.deliver(ipc.pack_meta(b"c1", SENDER_KEY, 0, "aps"),
              batch.pack([encode(o, m) for o, m in first]))
    d.deliver_in_ring(ipc.pack_meta(b"c1", SENDER_KEY, 2, "aps"),
                      batch.pack([encode(np.full(100 << 10, 7, dtype=np.uint8), None)]))
    d.deliver(ipc.pack_meta(b"c1", SENDER_KEY, 3, "aps"))
    d.deliver(ipc.pack_meta(b"c1", SENDER_KEY, 4, "aps"),
              batch.pack([encode(np.float64(2.5), {"z": None})]))


def seen(msgs: list[meshd.Message]) -> list[Any]:
    return [(m.seq, m.sender, m.sender_id, m.channel, m.kind, m.meta, m.array.dtype.str,
             m.array.shape, m.bytes()) for m in msgs]


def receive_sync(d: FakeDaemon) -> tuple[list[Any], str]:
    with meshd.connect(d.root) as mesh:
        rx = mesh.receiver("frames", ring_bytes=1 << 20)
        deliveries(d)
        got = seen([rx.recv(timeout=T) for _ in range(4)])
        with pytest.raises(TimeoutError) as err:
            rx.recv(timeout=0.05)
    return got, str(err.value)


async def test_both_flavours_decode_deliveries_alike(daemons: Callable[[str], FakeDaemon],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    sync_d, async_d = daemons("s"), daemons("a")
    with caplog.at_level("WARNING", logger="meshd.app.streams"):
        sync_got, sync_err = await asyncio.to_thread(receive_sync, sync_d)
        async with meshd.aconnect(async_d.root) as mesh:
            rx = await mesh.receiver("frames", ring_bytes=1 << 20)
            await asyncio.to_thread(deliveries, async_d)
            async_got = seen([await rx.recv(timeout=T) for _ in range(4)])
            with pytest.raises(TimeoutError) as err:
                await rx.recv(timeout=0.05)
    assert sync_got == async_got
    assert [g[0] for g in sync_got] == [0, 1, 2, 4]  # the malformed delivery's seq is missing
    assert sync_got[2][8] == b"\x07" * (100 << 10)
    assert sync_err == str(err.value) == "no message on 'frames' within 0.05 s"
    assert caplog.text.count("skipped a malformed delivery") == 2
    assert sync_d.closed == async_d.closed == ["/v1/receivers/frames"]
