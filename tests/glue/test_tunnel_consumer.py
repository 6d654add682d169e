"""The consuming side of a tunnel (:class:`meshd.daemon.tunnels.consumer.ConsumerTunnel`) with
its real listener, real TCP clients and real path race, its data-connection dials held by a
stand-in for the channel service (each dial waits until the test lets it fail)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path as FsPath
from typing import Any

import pytest

from meshd.channel.paths import PathKind
from meshd.channel.reach import ReachabilityTable
from meshd.daemon.counters import Counters
from meshd.daemon.tasks import TaskSet
from meshd.daemon.tunnels.consumer import ConsumerTunnel, Dialing
from tests.glue.daemon_kit import T, real_mesh

pytestmark = pytest.mark.glue


class HeldDials:
    """The channel service's ``connect``: every call is recorded and waits for ever."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []
        self.changed = asyncio.Condition()

    async def connect(self, peer: bytes, cid: bytes, path: Any, timeout: float,
                      hello: Any = None) -> Any:
        async with self.changed:
            self.calls.append(peer)
            self.changed.notify_all()
        await asyncio.Event().wait()

    async def until(self, n: int) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: len(self.calls) >= n), T)


class NoRelays:
    def __init__(self) -> None:
        self.table = ReachabilityTable()

    def relay_candidates(self, peer: bytes) -> list[bytes]:
        return []


async def test_a_client_waiting_through_a_key_rotation_gets_a_new_race(tmp_path: FsPath) -> None:
    """The owner rotates its key while a client waits for the data connection: the race to the
    old key stops, and one to the new key starts for that client at once (it used to wait for
    the next client to arrive)."""
    consumer, owner, rotated = real_mesh(tmp_path, ("consumer", ()), ("owner", ("127.0.0.1:1",)),
                                         ("owner2", ("127.0.0.1:2",)))
    dials = HeldDials()
    tasks = TaskSet("test")
    ctx = Dialing(consumer.site, consumer.view, dials, NoRelays(),  # type: ignore[arg-type]
                  (PathKind.DIRECT,), tasks, Counters())
    tun = ConsumerTunnel(ctx, owner.key, "svc", "127.0.0.1", 0)
    await tun.listen()
    client = socket.create_connection(("127.0.0.1", tun.port))
    try:
        await dials.until(1)
        assert dials.calls == [owner.key] and len(tun.waiting) == 1
        tun.rekey(rotated.key)
        await dials.until(2)
        assert dials.calls[1] == rotated.key and tun.racing and len(tun.waiting) == 1
    finally:
        tun.close()
        await tasks.close()
        client.close()
