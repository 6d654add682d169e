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


def test_the_daemon_reads_what_the_application_packs(tmp_path: Path) -> None:
    """``batch_frames`` (app) and ``read_batch`` (daemon) agree, inline and through a ring."""
    msgs = [encode(np.arange(40_000, dtype=np.float64), {"i": i}) for i in range(3)]
    inline = ipc.batch_frames(msgs, 3 * 320_000, None)
    body, release = ipc.read_batch(frames(*inline), None)
    assert bytes(body) == batch.pack(msgs) and release is None
    ring = Ring.create(1 << 22, tmp_path, background=False)
    shipped = ipc.batch_frames(msgs, 3 * 320_000, ring)
    assert shipped[0] == RING_MARK
    daemon_view = Ring.attach(str(ring.path))
    body, release = ipc.read_batch(frames(*shipped), daemon_view)
    assert bytes(body) == batch.pack(msgs) and release == len(body)
    with pytest.raises(ProtocolError):
        ipc.read_batch(frames(*shipped), None)  # a descriptor without a ring is refused


def test_the_application_reads_what_the_daemon_delivers(tmp_path: Path) -> None:
    """``delivery_frames`` (daemon) and ``read_delivery`` (app) agree, inline and in a ring."""
    payload = batch.pack([encode(np.ones(300_000), None)])
    meta = ipc.pack_meta(b"c", SENDER, 0, "aps")
    got = ipc.read_delivery(frames(*ipc.delivery_frames(None, meta, payload, 1)), None)
    assert bytes(got.payload) == payload and got.ring_start is None
    ring = Ring.create(1 << 23, tmp_path, background=False)
    parts = ipc.delivery_frames(ring, meta, payload, 1)
    assert parts[1] == RING_MARK
    got = ipc.read_delivery(frames(*parts), Ring.attach(str(ring.path)))
    assert bytes(got.payload) == payload and got.ring_start == 0 and got.meta == meta
