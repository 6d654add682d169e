"""The application's side of the ipc frames (:mod:`meshd.local.ipc`) and the decoding of
deliveries into messages (:mod:`meshd.app.message`)."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from meshd.app.message import encode, messages
from meshd.channel import batch
from meshd.errors import ProtocolError
from meshd.local import ipc
from meshd.local.ring import DESCRIPTOR, RING_MARK, ReleaseTracker, Ring
from meshd.trust.identity import site_id_of

SENDER = b"\x02" * 32


@given(st.binary(max_size=40), st.binary(max_size=40), st.integers(0, 2 ** 63),
       st.text(max_size=40))
def test_meta_round_trips(cid: bytes, sender: bytes, first: int, name: str) -> None:
    assert ipc.unpack_meta(ipc.pack_meta(cid, sender, first, name)) == (cid, sender, first, name)


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x93\x01\x02\x03", b"\x94\x01\x02\x03\x04\x05"])
def test_a_bad_meta_is_malformed(data: bytes) -> None:
    with pytest.raises(ProtocolError) as err:
        ipc.unpack_meta(data)
    assert err.value.reason == "malformed"


def frames(*parts: bytes) -> list[zmq.Frame]:
    return [zmq.Frame(p) for p in parts]


def test_read_delivery_inline_and_wrong_frame_counts(tmp_path: Path) -> None:
    meta = ipc.pack_meta(b"c", SENDER, 3, "aps")
    got = ipc.read_delivery(frames(meta, b"payload"), None)
    assert got.meta == meta and bytes(got.payload) == b"payload" and got.ring_start is None
    for parts in ([meta], [meta, RING_MARK, b"x" * 16], [meta, b"a", b"b", b"c"]):
        with pytest.raises(ProtocolError) as err:
            ipc.read_delivery(frames(*parts), None)  # no ring: a ring delivery is 3 frames too many
        assert err.value.reason == "frames"


def test_messages_of_a_ring_delivery_view_the_ring_until_collected(tmp_path: Path) -> None:
    writer = Ring.create(1 << 20, tmp_path, background=False)
    tracker = ReleaseTracker(Ring.attach(str(writer.path)))
    arrays = [np.arange(20_000, dtype=np.float64), np.ones((30, 40), dtype=np.int32)]
    payload = batch.pack([encode(a, {"i": i}) for i, a in enumerate(arrays)])
    start = writer.reserve(len(payload))
    assert start is not None
    writer.region(start, len(payload))[:] = payload
    meta = ipc.pack_meta(b"c", SENDER, 7, "aps")
    got = messages(frames(meta, RING_MARK, DESCRIPTOR.pack(start, len(payload))), "ch", tracker)
    sid = site_id_of(SENDER)
    assert [(m.seq, m.sender, m.sender_id, m.channel, m.meta) for m in got] == [
        (7, "aps", sid, "ch", {"i": 0}), (8, "aps", sid, "ch", {"i": 1})]
    for m, a in zip(got, arrays):
        assert np.array_equal(m.array, a)
    assert writer.released == 0  # the arrays still view the record
    del got, m
    gc.collect()
    tracker.collect()
    assert writer.released == start + len(payload)


def test_a_bad_meta_after_a_ring_record_still_releases_it(tmp_path: Path) -> None:
    writer = Ring.create(1 << 20, tmp_path, background=False)
    tracker = ReleaseTracker(Ring.attach(str(writer.path)))
    payload = batch.pack([encode(np.arange(10), None)])
    start = writer.reserve(len(payload))
    assert start is not None
    writer.region(start, len(payload))[:] = payload
    with pytest.raises(ProtocolError):
        messages(frames(b"\xc1", RING_MARK, DESCRIPTOR.pack(start, len(payload))), "ch", tracker)
    gc.collect()
    tracker.collect()
    assert writer.released == start + len(payload)
