"""The sans-IO batching of a sender (:mod:`meshd.app.batching`): messages in, batches out."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from meshd.app.batching import ALONE, BIG, ENTRY_BYTES, Batch, Batcher
from meshd.app.message import encode
from meshd.channel import batch
from meshd.local.ring import DESCRIPTOR, RING_MARK, Ring

HEAD = b"h" * 10


def small(i: int, n: int = 100) -> tuple[bytes, bytes]:
    return HEAD, bytes([i % 256]) * n


def feed(core: Batcher, messages: list[tuple[bytes, bytes]], now: float = 0.0) -> list[Batch]:
    shipped = []
    for head, body in messages:
        shipped += core.add(head, body, now)
        core.added()
    return shipped


def test_small_messages_wait_for_the_linger_time_of_the_first() -> None:
    core = Batcher(linger=0.5)
    assert core.deadline is None
    assert core.add(*small(0), now=10.0) == []
    assert core.deadline == 10.5
    assert core.add(*small(1), now=10.3) == []
    assert core.deadline == 10.5  # the first message's time counts
    b = core.take()
    assert b is not None and b.messages == [small(0), small(1)]
    assert b.nbytes == 2 * (100 + len(HEAD) + ENTRY_BYTES)
    assert core.deadline is None and core.take() is None


def test_a_batch_ships_when_it_holds_max_messages() -> None:
    core = Batcher(linger=1.0)
    shipped = feed(core, [small(i, 1) for i in range(batch.MAX_BATCH_MESSAGES + 5)])
    assert [len(b.messages) for b in shipped] == [batch.MAX_BATCH_MESSAGES]
    assert core.deadline == 1.0  # the five after it started a new batch
    rest = core.take()
    assert rest is not None and len(rest.messages) == 5


def test_a_batch_ships_when_it_holds_max_bytes() -> None:
    core = Batcher(linger=1.0)
    size = 60 << 10
    per = size + len(HEAD) + ENTRY_BYTES
    full = -(-batch.MAX_BATCH_BYTES // per)  # the message that reaches the limit ships it
    shipped = feed(core, [small(i, size) for i in range(full + 1)])
    assert [len(b.messages) for b in shipped] == [full]
    assert shipped[0].nbytes == full * per >= batch.MAX_BATCH_BYTES
    assert core.deadline is not None


def test_a_big_message_goes_alone_after_what_was_batched() -> None:
    core = Batcher(linger=1.0)
    feed(core, [small(0), small(1)])
    big = np.zeros(ALONE, dtype=np.uint8)
    head, body = encode(big, None)
    first, alone = core.add(head, body, 0.0)
    assert first.messages == [small(0), small(1)]
    assert alone == Batch([(head, body)], ALONE)  # the body alone counts for a lone message
    assert alone.messages[0][1] is body  # not copied
    assert core.deadline is None
    assert core.add(head, body, 0.0) == [Batch([(head, body)], ALONE)]  # nothing batched before


def test_small_bodies_are_copied_big_ones_are_not() -> None:
    core = Batcher(linger=1.0)
    reused = bytearray(100)
    big = memoryview(bytearray(BIG))
    raw = b"x" * 100
    for body in (memoryview(reused), big, raw):
        core.add(HEAD, body, 0.0)
    reused[0] = 1  # the caller reuses its buffer at once
    b = core.take()
    assert b is not None
    (_, copied), (_, kept), (_, as_is) = b.messages
    assert copied == bytes(100) and isinstance(copied, bytes)
    assert kept is big and as_is is raw


def test_sent_counts_what_was_shipped_or_batched() -> None:
    core = Batcher(linger=1.0)
    core.add(*small(0), now=0.0)
    assert core.sent == 0  # not before the caller has shipped what add said
    core.added()
    feed(core, [small(1), small(2)])
    assert core.sent == 3
    core.take()
    assert core.sent == 3


def test_a_ring_is_wanted_once_for_the_first_ring_worthy_batch() -> None:
    core = Batcher(linger=1.0, ring_bytes=1 << 20)
    assert core.ring_wanted(Batch([small(0)], 112)) == 0  # small: never pays for a ring
    big = Batch([small(0, 100_000)], 100_000)
    assert core.ring_wanted(big) == 1 << 20
    assert core.ring_wanted(big) == 0  # asked for once, made or not
    assert Batcher(linger=1.0, ring_bytes=0).ring_wanted(big) == 0
    many_small = Batch([small(i, 1000) for i in range(100)], 100 * 1022)
    assert Batcher(linger=1.0).ring_wanted(many_small) == 0  # big, but of small messages


def test_frames_inline_without_a_ring() -> None:
    core = Batcher(linger=1.0)
    b = Batch([small(0, 100_000), small(1, 100_000)], 200_044)
    assert core.frames(b) == [batch.pack(b.messages)]


def test_frames_in_the_ring_when_worth_it_and_there_is_room(tmp_path: Path) -> None:
    ring = Ring.create(1 << 20, tmp_path, background=False)
    reader = Ring.attach(str(ring.path))
    core = Batcher(linger=1.0)
    core.ring = ring
    b = Batch([small(0, 100_000), small(1, 100_000)], 200_044)
    mark, desc = core.frames(b)
    assert mark == RING_MARK
    start, view = reader.record(desc)
    assert DESCRIPTOR.unpack(desc) == (start, view.nbytes)
    assert bytes(view) == batch.pack(b.messages)  # byte-identical to the inline batch
    few = Batch([small(0)], 112)
    assert core.frames(few) == [batch.pack(few.messages)]  # not worth the ring
    # 200,048 bytes a record: five fill the ring (nothing is released), the sixth goes inline
    assert [core.frames(b)[0] == RING_MARK for _ in range(5)] == [True] * 4 + [False]
    reader.close()
    ring.close()
