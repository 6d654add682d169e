"""Messages as an application sends and receives them (:mod:`meshd.app.message`): the cached
header of :func:`encode` and the one-decode path of a uniform batch give what the general
path gives, and fall back to it whenever a batch is not uniform."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.app.message import UNIFORM_FROM, Message, batch_messages, encode
from meshd.channel import batch
from meshd.channel.arrays import decode_message
from meshd.errors import ProtocolError

CID = b"c" * 16


def receive(objs: list[Any], metas: list[dict[str, Any] | None] | None = None,
            first: int = 7) -> list[Message]:
    """What a receiver makes of one batch of ``objs`` (sent with ``metas``)."""
    metas = metas or [None] * len(objs)
    payload = batch.pack([encode(o, m) for o, m in zip(objs, metas)])
    whole = np.frombuffer(payload, dtype=np.uint8)
    return batch_messages(whole.data, whole, payload, first, "site-a", "id-a", "ch", CID)


def same(msg: Message, obj: Any) -> None:
    if isinstance(obj, (bytes, bytearray)):
        assert msg.kind == "bytes" and msg.bytes() == bytes(obj)
        return
    assert msg.kind == "array"
    assert msg.array.dtype == obj.dtype and msg.array.shape == obj.shape
    assert np.array_equal(msg.array, obj)
    assert msg.bytes() == np.ascontiguousarray(obj).tobytes()


@pytest.mark.unit
@pytest.mark.parametrize("make", [
    lambda i: np.full(16, i, dtype=np.float32),
    lambda i: np.arange(12, dtype=np.int16).reshape(3, 4) + i,
    lambda i: bytes([i % 256]) * 64,
    lambda i: np.full(5, i, dtype=">f8"),
])
def test_a_uniform_batch_reads_back_what_was_sent(make: Any) -> None:
    objs = [make(i) for i in range(UNIFORM_FROM * 4)]
    got = receive(objs)
    assert [m.seq for m in got] == list(range(7, 7 + len(objs)))
    for m, o in zip(got, objs):
        same(m, o)
        assert (m.sender, m.sender_id, m.channel, m._cid, m.meta) == ("site-a", "id-a", "ch",
                                                                     CID, {})
    got[0].meta["x"] = 1
    assert got[1].meta == {}, "each message has a dict of its own"


@pytest.mark.unit
def test_same_sizes_but_other_headers_are_not_taken_as_uniform() -> None:
    """float32 and int32 arrays of one shape have headers and bodies of the same sizes: only
    the header bytes tell them apart."""
    objs = [np.full(8, i, dtype=np.float32 if i % 3 else np.int32) for i in range(32)]
    for m, o in zip(receive(objs), objs):
        same(m, o)


@pytest.mark.unit
def test_mixed_sizes_and_meta_go_the_general_way() -> None:
    objs: list[Any] = [np.arange(i + 1, dtype=np.uint16) for i in range(20)] + [b"xy", b"z"]
    for m, o in zip(receive(objs), objs):
        same(m, o)
    metas = [{"i": i} for i in range(20)]
    objs = [np.zeros(4) for _ in range(20)]
    got = receive(objs, metas)  # one dtype, shape and meta size, but the meta differ
    assert [m.meta for m in got] == metas


@pytest.mark.unit
def test_a_short_batch_and_a_zero_length_body() -> None:
    for objs in ([np.ones(3)] * (UNIFORM_FROM - 1), [b""] * 20, [np.float64(2.5)] * 20):
        got = receive(list(objs))
        assert len(got) == len(objs)
        for m, o in zip(got, objs):
            if isinstance(o, np.generic):  # a 0-d array comes back as one
                assert m.array.shape == () and m.array == o
            else:
                same(m, o)


@pytest.mark.unit
def test_a_malformed_uniform_batch_is_refused() -> None:
    payload = bytearray(batch.pack([encode(np.ones(4), None)] * 16))
    with pytest.raises(ProtocolError):
        batch.uniform(bytes(payload[:-1]))
    with pytest.raises(ProtocolError):
        batch.uniform(bytes(payload) + b"\0")
    assert batch.uniform(bytes(payload)) == (16, len(encode(np.ones(4), None)[0]), 32)
    mixed = batch.pack([encode(np.ones(4), None), encode(np.ones(5), None)])
    assert batch.uniform(mixed) is None


@pytest.mark.unit
def test_the_cached_header_serves_strided_and_reused_arrays() -> None:
    base = np.arange(64, dtype=np.float32).reshape(8, 8)
    encode(base[:, :4].copy(), None)  # caches the header of float32 (8, 4)
    strided = base[:, :4]  # the same dtype and shape, not contiguous
    head, body = encode(strided, None)
    assert decode_message([head, body]).array.tolist() == strided.tolist()
    big = np.arange(1 << 16, dtype=np.float32)[::2]  # 128 KiB, viewed when contiguous
    encode(big.copy(), None)
    head, body = encode(big, None)
    assert np.array_equal(decode_message([head, body]).array, big)
    stamps = np.arange(1 << 14).astype("datetime64[ns]")  # numpy exports no buffer of it
    for _ in range(2):
        head, body = encode(stamps, None)
        assert np.array_equal(decode_message([head, body]).array, stamps)
    small = np.arange(4, dtype=np.int64)
    encode(small.copy(), None)
    head, body = encode(small, None)  # from the cache: a small body is copied at once
    small[:] = 0
    assert decode_message([head, body]).array.tolist() == [0, 1, 2, 3]


def general(payload: bytes, first: int = 0) -> list[tuple[Any, ...]]:
    """What the general (per-message) path makes of ``payload``."""
    whole = np.frombuffer(payload, dtype=np.uint8)
    out = []
    for i, (ho, hn, bo, bn) in enumerate(batch.offsets(payload)):
        msg = decode_message([payload[ho:ho + hn], payload[bo:bo + bn]])
        out.append((first + i, msg.kind, msg.array.dtype, msg.array.shape,
                    whole[bo:bo + bn].tobytes(), msg.meta))
    return out


@pytest.mark.unit
@settings(max_examples=200, deadline=None)
@given(count=st.integers(1, 40), length=st.integers(0, 24), dtype=st.sampled_from(
    ["u1", "<f4", ">i2", "<c8"]), odd=st.one_of(st.none(), st.integers(0, 39)))
def test_the_uniform_path_agrees_with_the_general_one(count: int, length: int, dtype: str,
                                                      odd: int | None) -> None:
    """Batches of one dtype and length, some with one message that differs (another dtype of
    the same size, or other contents): message by message, the same as the general path."""
    objs: list[Any] = [np.full(length, i, dtype=dtype) for i in range(count)]
    if odd is not None and odd < count:
        objs[odd] = objs[odd].view(">u" + dtype[-1]) if dtype[-1] in "248" else b"x" * length
    payload = batch.pack([encode(o, None) for o in objs])
    got = receive(objs, first=0)
    expected = general(payload)
    assert [(m.seq, m.kind, m.array.dtype, m.array.shape, m.bytes(), m.meta) for m in got] \
        == expected


@pytest.mark.unit
@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400), count=st.integers(1, 20))
def test_arbitrary_batches_are_refused_cleanly(data: bytes, count: int) -> None:
    """Whatever an authentic sender packs, the receiver gets messages or a ProtocolError."""
    half = len(data) // (2 * count)  # entries that may add up: header and body halves
    head = count.to_bytes(4, "big") + (half.to_bytes(4, "big") + half.to_bytes(8, "big")) * count
    for payload in (head + data, data, head[:7] + data):
        whole = np.frombuffer(payload, dtype=np.uint8)
        try:
            batch_messages(whole.data, whole, payload, 0, "s", "i", "c", CID)
        except ProtocolError:
            pass
