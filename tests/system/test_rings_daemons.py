"""The shared-memory ring between an application and its daemon (:mod:`meshd.local.ring`) between real daemons.

First the ring alone (layout, room, bounds checks, what ``attach`` trusts), the release
tracker, and ``batch.pack_into``; then big messages through rings between real daemons: in
order and intact, a full ring falling back to inline delivery without overwriting arrays the
application still holds, ``ring_bytes=0``, a hostile local application, and the asyncio API.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
import zmq

import meshd
from meshd.channel import batch
from meshd.channel.arrays import encode_message
from meshd.testing.processes import wait_until
from meshd.local.ring import (DESCRIPTOR, RING_MARK, Ring)

from tests.helpers import mesh_of

# ================================================================================ the ring alone


# ================================================================= big messages between daemons


def _big(i: int, n: int = 1 << 17) -> np.ndarray[Any, Any]:
    """A distinct float64 array per ``i`` (``n`` elements: 1 MiB by default)."""
    return np.arange(n, dtype=np.float64) + i * 1e7


def _is_ring(msg: Any) -> bool:
    """A message whose arrays view the receiver's ring (an inline one keeps its zmq frame)."""
    return isinstance(msg._frame, np.ndarray)


def test_big_arrays_cross_both_rings_in_order_and_intact(sites: Any) -> None:
    a, b = mesh_of(sites, "aps", "alcf")
    n, group = 50, 10  # a group (10 MiB) always fits the 48 MiB rings
    with meshd.connect(b.home) as mb, meshd.connect(a.home) as ma:
        rx = mb.receiver("big", via_daemon=True)
        tx = ma.sender("big", to="alcf", via_daemon=True)  # a handed-over sender needs no ring
        assert tx._ring is None and rx._ring is not None  # a sender's is made when needed
        tx.send(b"small")  # small messages need no ring
        assert tx._ring is None and rx.recv(timeout=30).bytes() == b"small"
        tx.send(_big(-1))  # the first big one makes it (and goes inline while it is allocated)
        assert tx._ring is not None and tx._ring.wait_ready(10)
        assert np.array_equal(rx.recv(timeout=30).array, _big(-1))
        assert not tx._ring.path.exists() and not rx._ring.ring.path.exists()
        assert tx._ring.path.name.startswith("meshd-ring-")
        seq = 2
        for g in range(0, n, group):
            for i in range(g, g + group):
                tx.send(_big(i), meta={"i": i})
            for i in range(g, g + group):
                msg = rx.recv(timeout=30)
                assert msg.seq == seq == i + 2 and msg.meta == {"i": i} and msg.sender == "aps"
                assert _is_ring(msg), f"message {i} was delivered inline"
                assert msg.array.dtype == np.float64 and msg.array.shape == (1 << 17,)
                assert np.array_equal(msg.array, _big(i))
                seq += 1
                del msg  # the record is released at once
        tx.flush(timeout=30)
        # every record the app wrote was sealed and released by its daemon
        assert tx._ring.head >= n * (8 << 17) and tx._ring.released == tx._ring.head
        # and the app released every record its daemon wrote
        assert rx._ring.ring.released == rx._ring.ring.head >= n * (8 << 17)
        (out,) = [c for c in ma.channels() if c["direction"] == "out"]
        assert out["messages"] == n + 2 and out["acked_messages"] == n + 2


def test_a_full_receiver_ring_falls_back_inline_and_overwrites_nothing(sites: Any) -> None:
    a, b = mesh_of(sites, "aps", "alcf")
    n = 40  # 40 x 512 KiB, five times the receiver's ring
    with meshd.connect(b.home) as mb, meshd.connect(a.home) as ma:
        rx = mb.receiver("held", ring_bytes=4 << 20, via_daemon=True)
        tx = ma.sender("held", to="alcf")
        assert rx._ring is not None and rx._ring.ring.capacity == 4 << 20
        for i in range(n):
            tx.send(_big(i, 1 << 16))
        tx.flush(timeout=30)
        kept = []
        for i in range(n):
            msg = rx.recv(timeout=30)
            assert msg.seq == i
            kept.append(msg)  # the application holds every array
        del msg
        ring_count = sum(_is_ring(m) for m in kept)
        assert 1 <= ring_count <= 8 and _is_ring(kept[0])
        assert n - ring_count >= 32  # the rest came inline: the ring was never overwritten
        for i, m in enumerate(kept):
            assert np.array_equal(m.array, _big(i, 1 << 16)), f"message {i} was overwritten"
        del m
        assert rx._ring.ring.released == 0  # nothing freed yet
        kept.clear()  # every array dies: the records are free again
        assert rx._ring.ring.released == rx._ring.ring.head > 0
        for i in range(n, n + 5):
            tx.send(_big(i, 1 << 16))
        tx.flush(timeout=30)
        for i in range(n, n + 5):
            msg = rx.recv(timeout=30)
            assert msg.seq == i and _is_ring(msg), f"message {i} did not use the freed ring"
            assert np.array_equal(msg.array, _big(i, 1 << 16))


def test_without_rings_big_arrays_go_inline_and_arrive_the_same(sites: Any) -> None:
    a, b = mesh_of(sites, "aps", "alcf")
    n = 12
    with meshd.connect(b.home) as mb, meshd.connect(a.home) as ma:
        rx = mb.receiver("plain", ring_bytes=0, via_daemon=True)
        tx = ma.sender("plain", to="alcf", ring_bytes=0)
        assert tx._ring is None and rx._ring is None
        for i in range(n):
            tx.send(_big(i), meta={"i": i})
        tx.send(b"small")
        tx.flush(timeout=30)
        for i in range(n):
            msg = rx.recv(timeout=30)
            assert msg.seq == i and msg.meta == {"i": i}
            assert isinstance(msg._frame, zmq.Frame)
            assert np.array_equal(msg.array, _big(i))
        assert rx.recv(timeout=30).bytes() == b"small"


def test_a_hostile_application_cannot_hurt_its_daemon(sites: Any) -> None:
    a, b = mesh_of(sites, "aps", "alcf")
    ring = Ring.create(1 << 20)
    assert ring.wait_ready(10)
    ctx = zmq.Context()
    try:
        with meshd.connect(b.home) as mb:
            rx = mb.receiver("evil")
            info = a.client.open_sender("evil", "alcf", None)
            try:
                assert a.client.attach_ring(info["id"], str(ring.path)) == {"ring": True}
            finally:
                ring.unlink()
            with pytest.raises(meshd.LocalError) as err:  # one ring per channel
                a.client.attach_ring(info["id"], str(ring.path))
            assert err.value.reason == "conflict"
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 1000)
            push.connect(info["endpoint"])

            # message 0: a valid record in the ring
            first = [tuple(encode_message(np.arange(20_000, dtype=np.int64)))]
            size = batch.payload_size([(memoryview(h).nbytes, memoryview(b).nbytes)
                                       for h, b in first])
            start = ring.reserve(size)
            assert start == 0
            batch.pack_into(ring.region(start, size), first)
            push.send_multipart([RING_MARK, DESCRIPTOR.pack(start, size)])
            cap = ring.capacity
            hostile = [
                [RING_MARK, DESCRIPTOR.pack(start, size)],  # a replay below the reader's head
                [RING_MARK, DESCRIPTOR.pack(0, cap + 1)],  # longer than the ring
                [RING_MARK, DESCRIPTOR.pack(cap - 8, 100)],  # runs past the end
                [RING_MARK, DESCRIPTOR.pack(size, 0)],  # empty
                [RING_MARK, DESCRIPTOR.pack(2 ** 64 - 1, 2 ** 64 - 1)],
                [RING_MARK, b"short"],
                [RING_MARK, DESCRIPTOR.pack(start, size) + b"x"],
                [b"X", DESCRIPTOR.pack(size, 100)],  # no ring mark
                [b"a", b"b", b"c"],  # three parts
                [RING_MARK, DESCRIPTOR.pack(0, 16), b"extra"],
                [b""],  # an inline batch too short for its count
                [b"\0\0\0\0garbage"],  # a count of 0
                # entries that do not add up: a count of 1 and an 8-byte message in 12 bytes,
                # which used to be sealed and make the far application's recv() raise
                [struct.pack(">IIQ", 1, 0, 8)],
                [struct.pack(">IIQ", 1, 2 ** 31, 2 ** 63) + b"xx"],  # sums that would overflow
            ]
            for parts in hostile:
                push.send_multipart(parts)
            # message 1: a valid inline batch
            push.send(batch.pack([tuple(encode_message(b"still here", {"ok": True}))]))

            a.client.flush_sender(info["id"], 2, timeout=30)
            assert a.proc is not None and a.proc.poll() is None
            assert a.client.status()
            (out,) = [c for c in a.client.channels() if c["direction"] == "out"]
            assert out["messages"] == 2 and out["acked_messages"] == 2
            assert ring.released == start + size  # the daemon sealed and released the record
            m0 = rx.recv(timeout=30)
            assert m0.seq == 0 and np.array_equal(m0.array, np.arange(20_000, dtype=np.int64))
            m1 = rx.recv(timeout=30)
            assert m1.seq == 1 and m1.bytes() == b"still here" and m1.meta == {"ok": True}
            wait_until(lambda: a.client.status()["counters"].get("channel_app_malformed", 0)
                       >= len(hostile), 30, "the daemon to count every malformed message")
            assert a.log().count("dropped a malformed") == 1  # logged once per channel
            push.close()  # the "application" goes away: the daemon closes the channel itself
            wait_until(lambda: not [c for c in a.client.channels() if c["direction"] == "out"],
                       30, "the daemon to close the channel its application left")
            assert a.client.status()["counters"]["channel_orphans_closed"] == 1
    finally:
        ctx.destroy(linger=0)
        ring.close()


async def test_big_arrays_through_rings_with_asyncio(sites: Any) -> None:
    a, b = mesh_of(sites, "aps", "alcf")
    n, group = 30, 10
    async with meshd.aconnect(b.home) as mb, meshd.aconnect(a.home) as ma:
        rx = await mb.receiver("abig", via_daemon=True)
        tx = await ma.sender("abig", to="alcf", via_daemon=True)  # a handed-over one has no ring
        assert tx._ring is None and rx._ring is not None
        await tx.send(_big(-1))  # the first big message makes the sender's ring
        assert tx._ring is not None and tx._ring.wait_ready(10)
        assert np.array_equal((await rx.recv(timeout=30)).array, _big(-1))
        assert not tx._ring.path.exists() and not rx._ring.ring.path.exists()
        for g in range(0, n, group):
            for i in range(g, g + group):
                await tx.send(_big(i), meta={"i": i})
            for i in range(g, g + group):
                msg = await rx.recv(timeout=30)
                assert msg.seq == i + 1 and msg.meta == {"i": i} and _is_ring(msg)
                assert np.array_equal(msg.array, _big(i))
                del msg
        await tx.send(b"tail")
        await tx.flush(timeout=30)
        assert tx._ring.released == tx._ring.head >= n * (8 << 17)
        last = await rx.recv(timeout=30)
        assert last.seq == n + 1 and last.bytes() == b"tail"
