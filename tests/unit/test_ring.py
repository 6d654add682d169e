"""The shared-memory ring between an application and its daemon (:mod:`meshd.local.ring`): unit tests.

First the ring alone (layout, room, bounds checks, what ``attach`` trusts), the release
tracker, and ``batch.pack_into``; then big messages through rings between real daemons: in
order and intact, a full ring falling back to inline delivery without overwriting arrays the
application still holds, ``ring_bytes=0``, a hostile local application, and the asyncio API.
"""

from __future__ import annotations

import os
import random
import stat
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from meshd.channel import batch
from meshd.channel.arrays import encode_message
from meshd.errors import LocalError, ProtocolError
from meshd.local.ring import (DESCRIPTOR, HEADER_SIZE, MAX_CAPACITY, ReleaseTracker,
                           Ring)


# ================================================================================ the ring alone


@pytest.fixture
def made(tmp_path: Path) -> Any:
    """``made(capacity)``: a ring in ``tmp_path``; every mapping is closed after the test."""
    rings: list[Ring] = []

    def make(capacity: int) -> Ring:
        ring = Ring.create(capacity, tmp_path)
        rings.append(ring)
        assert ring.wait_ready(10)  # allocated by a background thread
        return ring

    yield make
    for ring in rings:
        ring.close()


def test_create_and_attach_map_the_same_bytes_and_the_file_is_private(made: Any) -> None:
    writer = made(1 << 16)
    assert writer.capacity == 1 << 16 and writer.head == 0 and writer.released == 0
    st = os.stat(writer.path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == HEADER_SIZE + (1 << 16)
    reader = Ring.attach(str(writer.path))
    try:
        assert reader.capacity == writer.capacity
        start = writer.reserve(1000)
        assert start == 0
        writer.region(start, 1000)[:] = bytes(range(250)) * 4
        got_start, view = reader.record(DESCRIPTOR.pack(start, 1000))
        assert got_start == 0 and bytes(view) == bytes(range(250)) * 4
        reader.release(1000)  # the reader's counter is what the writer sees
        assert writer.released == 1000
        reader.data[5000:5003] = b"abc"  # and the other way round
        assert bytes(writer.data[5000:5003]) == b"abc"
        writer.unlink()
        assert not writer.path.exists()
        writer.region(2000, 3)[:] = b"xyz"  # both mappings outlive the name
        assert bytes(reader.data[2000:2003]) == b"xyz"
    finally:
        reader.close()


def test_create_refuses_a_capacity_out_of_range(tmp_path: Path) -> None:
    for capacity in (0, -1, MAX_CAPACITY + 1):
        with pytest.raises(LocalError) as err:
            Ring.create(capacity, tmp_path)
        assert err.value.reason == "usage"
    assert list(tmp_path.iterdir()) == []


def test_reserve_never_wraps_a_record_and_release_makes_room(made: Any) -> None:
    ring = made(1000)
    assert ring.reserve(400) == 0
    assert ring.reserve(400) == 400
    # 300 bytes do not fit at offset 800: the record would start at 1000 (the tail skipped),
    # and 1000 + 300 - released(0) > 1000: no room, and the head does not move
    assert ring.reserve(300) is None
    assert ring.head == 800
    ring.release(400)
    start = ring.reserve(300)
    assert start == 1000 and start % ring.capacity == 0 and ring.head == 1300
    ring.region(start, 300)[:] = b"\x07" * 300
    assert bytes(ring.data[:300]) == b"\x07" * 300  # at the front of the data, not the tail
    assert ring.reserve(200) is None  # 1300 + 200 - 400 > 1000
    ring.release(800)
    assert ring.reserve(200) == 1300
    assert ring.reserve(400) is None  # 1500 + 400 - 800 > 1000
    assert ring.reserve(300) == 1500  # exactly full: 1800 - 800 == 1000
    assert ring.reserve(1) is None
    ring.release(1800)  # everything read: the whole ring is free
    assert ring.reserve(500) == 2000  # 1800 % 1000 = 800: a 500-byte record skips to 2000
    assert ring.head == 2500


def test_reserve_refuses_sizes_out_of_range_and_a_reader_ahead_of_the_writer(made: Any) -> None:
    ring = made(1000)
    for n in (0, -1, 501, 1000, 10**6):
        assert ring.reserve(n) is None
    assert ring.head == 0
    assert ring.reserve(500) == 0  # capacity // 2 is the largest record
    ring.release(10_000)  # a broken reader claims to have read what was never written
    assert ring.reserve(10) is None
    ring.release(500)
    assert ring.reserve(10) == 500


def test_record_bounds_checks_every_descriptor(made: Any) -> None:
    ring = made(1000)
    bad = [b"", b"\0" * 15, b"\0" * 17, DESCRIPTOR.pack(0, 0), DESCRIPTOR.pack(990, 11),
           DESCRIPTOR.pack(0, 1001), DESCRIPTOR.pack(2 ** 64 - 1, 2 ** 64 - 1),
           DESCRIPTOR.pack(1999, 2),
           # far beyond where an honest writer can be (a writer skips at most one tail): such a
           # start would move the reader's head out of reach, or overflow ``released``
           DESCRIPTOR.pack(2 ** 64 - 8, 8), DESCRIPTOR.pack(2000, 10)]
    for desc in bad:
        with pytest.raises(ProtocolError) as err:
            ring.record(desc)
        assert err.value.reason == "ring"
    assert ring.head == 0  # a refused descriptor does not move the reader
    start, view = ring.record(memoryview(DESCRIPTOR.pack(100, 50)))
    assert start == 100 and view.nbytes == 50 and ring.head == 150
    for desc in (DESCRIPTOR.pack(100, 50), DESCRIPTOR.pack(149, 1), DESCRIPTOR.pack(0, 10)):
        with pytest.raises(ProtocolError) as err:  # below the reader's head: a replay
            ring.record(desc)
        assert err.value.reason == "ring"
    start, view = ring.record(DESCRIPTOR.pack(1000, 1000))  # a whole lap later, at the front
    assert start == 1000 and view.nbytes == 1000 and ring.head == 2000


def test_attach_refuses_files_it_cannot_trust(made: Any, tmp_path: Path) -> None:
    good = made(4096)

    def refused(path: str, reason: str = "ring") -> None:
        with pytest.raises(LocalError) as err:
            Ring.attach(path)
        assert err.value.reason == reason, (path, err.value)

    shared = made(4096)
    os.chmod(shared.path, 0o644)
    refused(str(shared.path))
    os.chmod(shared.path, 0o660)
    refused(str(shared.path))
    os.chmod(shared.path, 0o600)
    Ring.attach(str(shared.path)).close()  # the same file, private again, is fine

    link = tmp_path / "link"
    link.symlink_to(good.path)
    refused(str(link))
    refused(str(tmp_path))  # a directory
    refused("/dev/null")  # not a regular file
    refused(str(tmp_path / "missing"))
    refused(os.path.relpath(good.path), reason="usage")
    refused("meshd-ring", reason="usage")
    refused(str(good.path) + "\0", reason="usage")
    for size in (0, 10, HEADER_SIZE):  # no data bytes at all
        small = tmp_path / f"small-{size}"
        fd = os.open(small, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, size)
        os.close(fd)
        refused(str(small))
    Ring.attach(str(good.path)).close()


def test_pack_into_writes_exactly_what_pack_returns() -> None:
    rng = np.random.default_rng(7)
    cases = [
        [tuple(encode_message(b"hello"))],
        [tuple(encode_message(rng.standard_normal((3, 4)), {"k": 1})),
         tuple(encode_message(b"")),
         tuple(encode_message(np.arange(1000, dtype=">u2")))],
        [(b"h" * 5, b"b" * n) for n in range(20)],
        [tuple(encode_message(rng.integers(0, 255, 70_000, dtype=np.uint8)))],
    ]
    for messages in cases:
        want = batch.pack(messages)
        size = batch.payload_size([(memoryview(h).nbytes, memoryview(b).nbytes)
                                   for h, b in messages])
        assert size == len(want)
        target = bytearray(b"\xee" * size)
        batch.pack_into(memoryview(target), messages)
        assert bytes(target) == want
        assert [(bytes(h), bytes(b)) for h, b in batch.split(target)] \
            == [(bytes(h), bytes(b)) for h, b in messages]
        for wrong in (size - 1, size + 1):
            with pytest.raises(ValueError):
                batch.pack_into(memoryview(bytearray(wrong)), messages)
    with pytest.raises(ValueError):
        batch.pack_into(memoryview(bytearray(4)), [])


def test_pack_into_a_ring_region(made: Any) -> None:
    ring = made(1 << 20)
    messages = [tuple(encode_message(np.arange(5000, dtype=np.float64)))]
    want = batch.pack(messages)
    assert ring.reserve(510_000) == 0 and ring.reserve(510_000) == 510_000
    ring.release(1_020_000)
    start = ring.reserve(len(want))  # does not fit at 1_020_000: skips to the next lap
    assert start == 1 << 20
    batch.pack_into(ring.region(start, len(want)), messages)
    reader = Ring.attach(str(ring.path))
    try:
        reader.record(DESCRIPTOR.pack(0, 510_000))
        reader.record(DESCRIPTOR.pack(510_000, 510_000))
        _, view = reader.record(DESCRIPTOR.pack(start, len(want)))
        assert bytes(view) == want and bytes(reader.data[:len(want)]) == want
        (head, body), = batch.split(view)
        assert np.array_equal(np.frombuffer(body, dtype=np.float64), np.arange(5000))
    finally:
        reader.close()


# ======================================================================== the release tracker


def test_records_freed_out_of_order_are_released_in_order(made: Any) -> None:
    ring = made(1000)
    tracker = ReleaseTracker(ring)
    records = [(0, 100), (100, 250), (250, 400), (400, 900), (1000, 1300)]  # 900..1000 skipped
    for start, end in records:
        tracker.track(start, end)
    # freeing 100 completes the prefix up to 900, and 1000 (freed early) follows the gap
    for start, released in [(250, 0), (1000, 0), (0, 100), (400, 100), (100, 1300)]:
        tracker.freed(start)
        assert ring.released == released, (start, ring.released)
    tracker.track(1300, 1400)
    tracker.collect()  # nothing freed: nothing moves
    assert ring.released == 1300
    tracker.freed(1300)
    assert ring.released == 1400


def test_records_freed_from_other_threads_are_released(made: Any) -> None:
    ring = made(1 << 20)
    tracker = ReleaseTracker(ring)
    starts = list(range(0, 64_000, 1000))
    for s in starts:
        tracker.track(s, s + 1000)
    order = starts[:]
    random.Random(3).shuffle(order)
    barrier = threading.Barrier(8)

    def free(part: list[int]) -> None:
        barrier.wait()
        for s in part:
            tracker.freed(s)

    threads = [threading.Thread(target=free, args=(order[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    tracker.collect()  # picks up whatever a thread left while another held the lock
    assert ring.released == 64_000

    # the real path: the last array viewing a record dies in another thread
    start = 64_000
    whole = np.frombuffer(ring.region(start, 5000), dtype=np.uint8)
    tracker.track(start, start + 5000)
    weakref.finalize(whole, tracker.freed, start)
    view = whole[10:20].view(np.int16)
    del whole
    assert ring.released == 64_000  # ``view`` still holds the record
    box = [view]
    del view
    t = threading.Thread(target=box.clear)
    t.start()
    t.join(30)
    assert ring.released == start + 5000


def test_a_ring_is_not_used_before_its_memory_is_allocated(tmp_path: Path) -> None:
    path = tmp_path / "ring"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, HEADER_SIZE + 4096)
    ring = Ring(path, fd, 4096, ready=False)
    try:
        assert ring.reserve(100) is None and ring.head == 0  # the writer goes inline meanwhile
        ring._allocate()
        assert ring.ready and ring.reserve(100) == 0
        assert os.stat(path).st_blocks * 512 >= HEADER_SIZE + 4096  # really allocated
    finally:
        ring.close()
