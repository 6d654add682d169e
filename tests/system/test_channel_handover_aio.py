"""Handed-over channels with the asyncio API between real daemons: the event loop runs the
sending application's data connection (:mod:`meshd.app.aio_direct`).  The guarantees of the
sync flavour hold: in order and exactly once across a broken connection and a restart of the
sending daemon, batches move on while the application awaits something else, a channel that
ends says so at the next call."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import numpy as np
import pytest

import meshd
from meshd.errors import ChannelClosed
from meshd.testing.processes import wait_until_async
from tests.helpers import mesh_of

HANDOVER = {"aps": "channel_handover = true"}


async def _drain(rx: Any, n: int) -> list[int]:
    got = []
    for _ in range(n):
        msg = await rx.recv(timeout=60)
        got.append(int(msg.meta["i"]))
        assert np.array_equal(msg.array, np.full(msg.array.shape, msg.meta["i"] % 251,
                                                 dtype=np.uint8))
    return got


async def _send(tx: Any, first: int, n: int, size: int = 200_000) -> int:
    for i in range(first, first + n):
        await tx.send(np.full(size, i % 251, dtype=np.uint8), meta={"i": i})
    return first + n


def _break(tx: Any) -> None:
    """Cut the application's data connection (as a failing network would, from its side)."""
    link = tx._direct
    assert link is not None and link.sock is not None
    link.sock.shutdown(socket.SHUT_RDWR)


def _out(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in rows if c["direction"] == "out"]


async def test_an_asyncio_handed_over_channel_delivers_in_order_exactly_once(
        sites: Any) -> None:
    a, b = mesh_of(sites, "aps", "alcf", configs=HANDOVER)
    sizes = [10, 70_000, 1 << 20, 300, 3 << 20, 5]
    async with meshd.aconnect(b.home) as mb, meshd.aconnect(a.home) as ma:
        rx = await mb.receiver("frames")
        tx = await ma.sender("frames", to="alcf")
        assert tx._direct is not None and tx._sock is None and tx._ring is None
        n = 0
        for _ in range(20):
            for size in sizes:
                await tx.send(np.full(size, n % 251, dtype=np.uint8), meta={"i": n})
                n += 1
        await tx.flush(timeout=60)
        assert await _drain(rx, n) == list(range(n))
        (out,) = _out(await ma.channels())
        assert out["handed_over"] and out["path"] == "direct"
        assert out["messages"] == n and out["acked_messages"] == n
        await wait_until_async(lambda: [c["messages"] for c in mb.client.channels()
                                        if c["direction"] == "in"] == [n], 30,
                               "the receiving application to report its counters")
        (inc,) = [c for c in await mb.channels() if c["direction"] == "in"]
        assert inc["messages"] == n
        assert a.client.status()["counters"].get("channel_handovers", 0) >= 1
        await tx.close()
        assert tx._direct.sock is None
        await wait_until_async(lambda: not [c for c in b.client.channels()
                                            if c["direction"] == "in"], 30,
                               "the receiving daemon to forget the closed channel")


async def test_a_broken_connection_resumes_through_the_daemon_with_nothing_lost(
        sites: Any) -> None:
    a, b = mesh_of(sites, "aps", "alcf", configs=HANDOVER)
    async with meshd.aconnect(b.home) as mb, meshd.aconnect(a.home) as ma:
        rx = await mb.receiver("frames")
        tx = await ma.sender("frames", to="alcf")
        n = await _send(tx, 0, 100)
        for _ in range(3):
            _break(tx)
            n = await _send(tx, n, 100)
        await tx.flush(timeout=60)
        assert await _drain(rx, n) == list(range(n))
        assert a.client.status()["counters"]["channel_handovers"] >= 4
        (out,) = _out(await ma.channels())
        assert out["renegotiations"] >= 3 and out["acked_messages"] == n
        await wait_until_async(lambda: [c["messages"] for c in mb.client.channels()
                                        if c["direction"] == "in"] == [n], 30,
                               "the receiving application to report its counters")
        (inc,) = [c for c in await mb.channels() if c["direction"] == "in"]
        assert inc["messages"] == n


@pytest.mark.parametrize("how", ["kill", "stop"])
async def test_the_sending_daemon_killed_and_restarted_mid_stream_loses_and_repeats_nothing(
        sites: Any, how: str) -> None:
    """``kill``: SIGKILL; ``stop``: SIGTERM (a clean stop does not end held channels)."""
    a, b = mesh_of(sites, "aps", "alcf", configs=HANDOVER)
    async with meshd.aconnect(b.home) as mb, meshd.aconnect(a.home) as ma:
        rx = await mb.receiver("frames")
        tx = await ma.sender("frames", to="alcf")
        n = await _send(tx, 0, 100)
        if how == "kill":
            await asyncio.to_thread(a.kill)
        else:
            assert await asyncio.to_thread(a.stop) == 0
        n = await _send(tx, n, 100)  # the application's connection does not need its daemon
        await tx.flush(timeout=60)
        await asyncio.to_thread(a.start)
        n = await _send(tx, n, 100)
        # the loop offers the channel back to the daemon while the application only waits
        await wait_until_async(lambda: any(c["acked_messages"] >= 200
                                           for c in _out(a.client.channels())), 30,
                               "the restarted daemon to list the channel it took on")
        _break(tx)  # now the restarted daemon must resume it
        n = await _send(tx, n, 100)
        await tx.flush(timeout=60)
        assert await _drain(rx, n) == list(range(n))
        assert a.client.status()["counters"]["channel_adopted"] == 1
        (out,) = _out(a.client.channels())
        assert out["handed_over"] and (out["acked_messages"] == n or out["messages"] == n)
        await tx.close()
        await wait_until_async(lambda: not [c for c in b.client.channels()
                                            if c["direction"] == "in"], 30,
                               "the receiving daemon to forget the closed channel")


async def test_what_is_sent_without_a_flush_arrives_while_the_application_awaits(
        sites: Any) -> None:
    """The batches sent before the first connection go out when it is granted, and the
    acknowledgement reaches ``meshd channels``, with no further call on the sender: the loop
    moves the link on while the application awaits its receiver."""
    a, b = mesh_of(sites, "aps", "alcf", configs=HANDOVER)
    async with meshd.aconnect(b.home) as mb, meshd.aconnect(a.home) as ma:
        rx = await mb.receiver("unflushed")
        tx = await ma.sender("unflushed", to="alcf", linger=0)
        for i in range(3):
            await tx.send(np.full(1000, i, dtype=np.uint8), meta={"i": i})
        assert tx._direct is not None and tx._direct.core is None  # nothing granted yet
        assert [int((await rx.recv(timeout=30)).meta["i"]) for _ in range(3)] == [0, 1, 2]
        await wait_until_async(lambda: [c["acked_messages"] for c in a.client.channels()
                                        if c["id"] == tx.id] == [3], 30,
                               "the acknowledgement to reach the daemon without a call")
        (row,) = [c for c in await ma.channels() if c["id"] == tx.id]
        assert row["handed_over"]
        await tx.close()


async def test_via_daemon_the_daemon_still_carries_the_data(sites: Any) -> None:
    a, b = mesh_of(sites, "aps", "alcf", configs=HANDOVER)
    async with meshd.aconnect(b.home) as mb, meshd.aconnect(a.home) as ma:
        rx = await mb.receiver("frames")
        tx = await ma.sender("frames", to="alcf", via_daemon=True)
        assert tx._direct is None and tx._sock is not None
        n = await _send(tx, 0, 50)
        await tx.flush(timeout=60)
        assert await _drain(rx, n) == list(range(n))
        (out,) = _out(await ma.channels())
        assert not out.get("handed_over") and out["acked_messages"] == n
        assert a.client.status()["counters"].get("channel_handovers", 0) == 0
        await tx.close()


async def test_a_revoked_receiver_ends_the_channel_at_the_next_call(sites: Any) -> None:
    a, b = mesh_of(sites, "aps", "alcf", configs=HANDOVER)
    async with meshd.aconnect(b.home) as mb, meshd.aconnect(a.home) as ma:
        rx = await mb.receiver("frames")
        tx = await ma.sender("frames", to="alcf")
        n = await _send(tx, 0, 20)
        await tx.flush(timeout=60)
        assert await _drain(rx, n) == list(range(n))
        await asyncio.to_thread(a.client.revoke, "alcf", "stolen key")
        assert _out(a.client.channels()) == []
        link = tx._direct
        assert link is not None
        await wait_until_async(lambda: link.ended is not None, 30,
                               "the daemon to tell the application on its lease")
        with pytest.raises(ChannelClosed) as exc:
            await tx.send(b"x")
        assert exc.value.reason == "revoked" and exc.value.peer == "alcf"
        with pytest.raises(ChannelClosed):
            await tx.flush(timeout=30)
        with pytest.raises(ChannelClosed):
            await tx.close()  # closed all the same; says why
        assert link.sock is None
    assert "Traceback" not in a.log()
