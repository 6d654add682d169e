"""The receive blocks of a handed-over receiver (:mod:`meshd.app.blocks`): a block is used again
only once nothing views it, however the views were made, and the idle ones are bounded."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from meshd.app import blocks
from meshd.app.message import batch_messages, encode
from meshd.channel import batch

pytestmark = pytest.mark.unit

N = 3 * blocks.GRAIN + 100


def address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def test_a_block_comes_back_only_when_its_last_view_is_gone() -> None:
    gc.collect()
    first = blocks.take(N)
    where = address(first)
    part = first[32:N - 16]
    whole = np.frombuffer(part, dtype=np.uint8)
    row = whole[:4096].reshape(16, 256)[3]
    data = memoryview(row).cast("B")
    del first, part, whole, row
    other = blocks.take(N)
    assert address(other) != where, "handed out again while a view of it lives"
    del data
    again = blocks.take(N)
    assert address(again) == where, "not used again once nothing viewed it"
    del other, again


def test_messages_received_into_a_block_keep_it_until_they_are_dropped() -> None:
    arrays = [np.full(1000, i, dtype=np.float64) for i in range(40)]
    payload = batch.pack([encode(a, None) for a in arrays])
    block = blocks.take(len(payload))
    block[:] = payload
    where = address(block)
    whole = np.frombuffer(block, dtype=np.uint8)
    msgs = batch_messages(whole.data, whole, block, 0, "s", "i", "c", b"c" * 16)
    kept = msgs[17]
    del block, whole, msgs
    for _ in range(4):  # blocks of that size taken while the message lives: all others
        other = blocks.take(len(payload))
        assert address(other) != where
        other[:] = b"\xff" * len(payload)
        del other
    assert np.array_equal(kept.array, arrays[17]) and kept.bytes() == arrays[17].tobytes()


def test_idle_blocks_are_bounded() -> None:
    size = blocks.MAX_IDLE_BYTES // 2
    held = [blocks.take(size) for _ in range(4)]
    del held
    gc.collect()
    assert blocks.idle_bytes() <= blocks.MAX_IDLE_BYTES
