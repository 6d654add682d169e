"""The array codec (meshd.channel.arrays): round trips, hostile headers, zero copy over ipc."""

from __future__ import annotations

import threading
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from meshd.channel.arrays import (
    MAX_DIMS,
    MAX_META,
    ArrayMessage,
    decode_message,
    encode_message,
    recv_array,
    send_array,
)
from meshd.errors import LocalError, ProtocolError

DTYPES = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(),
    hnp.unsigned_integer_dtypes(),
    hnp.floating_dtypes(),
    hnp.complex_number_dtypes(),
    hnp.datetime64_dtypes(),
    hnp.timedelta64_dtypes(),
    hnp.byte_string_dtypes(min_len=1, max_len=8),
    hnp.unicode_string_dtypes(min_len=1, max_len=8),
)
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)
META_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=10,
)
METAS = st.dictionaries(st.text(max_size=10), META_VALUES, max_size=5)


def relayout(arr: np.ndarray[Any, Any], layout: str) -> np.ndarray[Any, Any]:
    """The same values (or a slice of them) in another memory layout."""
    if layout == "F":
        return np.asfortranarray(arr)
    if layout == "T":
        return arr.T
    if layout == "step" and arr.ndim:
        return arr[::2]
    return arr


def wire(frames: list[Any]) -> list[bytes]:
    """What the peer receives: plain bytes, no shared memory with the sender."""
    return [bytes(f) for f in frames]


def assert_same_array(got: np.ndarray[Any, Any], sent: np.ndarray[Any, Any]) -> None:
    assert got.dtype == sent.dtype
    assert got.shape == sent.shape
    assert got.tobytes() == sent.tobytes()  # byte-exact: NaN payloads, -0.0, NaT


# ------------------------------------------------------------------------------ round trips


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), dtype=DTYPES, shape=SHAPES,
       layout=st.sampled_from(["C", "F", "T", "step"]), meta=METAS)
def test_array_round_trip(data: st.DataObject, dtype: np.dtype[Any], shape: tuple[int, ...],
                          layout: str, meta: dict[str, Any]) -> None:
    sent = relayout(data.draw(hnp.arrays(dtype, shape)), layout)
    msg = decode_message(wire(encode_message(sent, meta)))
    assert msg.kind == "array"
    assert msg.meta == meta
    assert_same_array(msg.array, sent)
    assert msg.data.nbytes == sent.nbytes


@given(payload=st.binary(max_size=300), kind=st.sampled_from(["bytes", "bytearray", "mv",
                                                                 "mv-step"]), meta=METAS)
def test_bytes_round_trip(payload: bytes, kind: str, meta: dict[str, Any]) -> None:
    obj: bytes | bytearray | memoryview = {
        "bytes": payload, "bytearray": bytearray(payload), "mv": memoryview(payload),
        "mv-step": memoryview(payload)[::2]}[kind]
    msg = decode_message(wire(encode_message(obj, meta)))
    assert msg.kind == "bytes"
    assert bytes(msg.data) == bytes(obj)
    assert msg.array.dtype == np.uint8 and msg.array.tobytes() == bytes(obj)
    assert msg.meta == meta


def test_scalars_and_structured_dtypes_round_trip() -> None:
    for sent in (np.float64(2.5), np.array(7, dtype=">i8"), np.zeros((0, 3), "<c8"),
                 np.array([(1, b"ab", 2.0)], dtype=[("a", "<i4"), ("b", "S2"), ("c", ">f8")]),
                 np.zeros(3, dtype="V5")):
        msg = decode_message(wire(encode_message(sent)))
        assert_same_array(msg.array, np.asarray(sent))


def test_c_contiguous_is_not_copied_and_other_layouts_are() -> None:
    arr = np.arange(24, dtype="<f8").reshape(4, 6)
    assert np.shares_memory(np.frombuffer(encode_message(arr)[1], np.uint8), arr)
    assert not np.shares_memory(np.frombuffer(encode_message(arr.T)[1], np.uint8), arr)


def test_decoded_array_views_the_buffer() -> None:
    frames = encode_message(np.arange(10, dtype="<i4"))
    buf = bytearray(frames[1])
    msg = decode_message([frames[0], buf])
    assert msg.array.flags.writeable  # bytearray is writable ...
    buf[0:4] = (99).to_bytes(4, "little")
    assert msg.array[0] == 99  # ... and shared, not copied
    assert not decode_message(wire(frames)).array.flags.writeable  # bytes are read-only


# ------------------------------------------------------------------------------ caller errors


@pytest.mark.parametrize("obj", [
    np.array([object()]),
    np.zeros(2, dtype=[("a", "O")]),
    np.zeros(2, dtype=np.dtype([("a", "<i4"), ("b", "u1")], align=True)),  # padding
    np.zeros(2, dtype=[("a", "<i4", (2,))]),  # sub-array field
    [1, 2, 3],
    "text",
    np.ma.masked_array([1, 2], mask=[0, 1]),
])
def test_unsendable_objects_are_local_errors(obj: object) -> None:
    with pytest.raises(LocalError) as e:
        encode_message(obj)
    assert e.value.reason in ("dtype", "type")


@pytest.mark.parametrize("meta", [
    {"x": object()}, {1: "int key"}, ["not", "a", "dict"], {"big": b"x" * (MAX_META + 1)},
])
def test_bad_meta_is_a_local_error(meta: Any) -> None:
    with pytest.raises(LocalError) as e:
        encode_message(b"payload", meta)
    assert e.value.reason == "meta"


def test_meta_at_the_limit_is_accepted() -> None:
    meta = {"k": b"x" * (MAX_META - 16)}
    assert len(msgpack.packb(meta)) <= MAX_META
    assert decode_message(wire(encode_message(b"", meta))).meta == meta


# ------------------------------------------------------------------------------ hostile peers


def header(**changes: Any) -> dict[str, Any]:
    h: dict[str, Any] = {"v": 1, "kind": "array", "dtype": "<f4", "shape": [2, 3],
                         "order": "C", "meta": {}}
    h.update(changes)
    return h


def frames_of(h: Any, buf: bytes = bytes(24)) -> list[bytes]:
    return [msgpack.packb(h, use_bin_type=True), buf]


@pytest.mark.parametrize(("frames", "reason"), [
    (frames_of(header()) + [b""], "frames"),
    (frames_of(header())[:1], "frames"),
    ([b"\xc1", bytes(24)], "header"),
    ([msgpack.packb(header()) + b"\x00", bytes(24)], "header"),
    (frames_of([1, 2]), "header"),
    (frames_of({k: v for k, v in header().items() if k != "meta"}), "header"),
    (frames_of(header(extra=1)), "header"),
    (frames_of(header(v=2)), "version"),
    (frames_of(header(v=True)), "version"),
    (frames_of(header(v="1")), "version"),
    (frames_of(header(kind="pickle")), "kind"),
    (frames_of(header(kind="bytes")), "kind"),
    (frames_of(header(order="F")), "order"),
    (frames_of(header(meta=[])), "meta"),
    (frames_of(header(dtype="|O")), "dtype"),
    (frames_of(header(dtype="O")), "dtype"),
    (frames_of(header(dtype="<f4,<i4")), "dtype"),
    (frames_of(header(dtype="<f3")), "dtype"),
    (frames_of(header(dtype="|S0")), "dtype"),
    (frames_of(header(dtype="float32")), "dtype"),
    (frames_of(header(dtype=["a", "<f4"])), "dtype"),
    (frames_of(header(dtype=[["a", "|O"]])), "dtype"),
    (frames_of(header(dtype=[["a", "<f4"], ["a", "<f4"]])), "dtype"),
    (frames_of(header(dtype=[["a", [["b", "<f4"]]]])), "dtype"),
    (frames_of(header(dtype=4)), "dtype"),
    (frames_of(header(shape=[2, 2])), "size"),
    (frames_of(header(shape=[])), "size"),
    (frames_of(header(shape=[-2, -3])), "shape"),
    (frames_of(header(shape=[2.0, 3])), "shape"),
    (frames_of(header(shape=[True, 24])), "shape"),
    (frames_of(header(shape="23")), "shape"),
    (frames_of(header(shape=[1] * (MAX_DIMS + 1))), "shape"),
    (frames_of(header(shape=[0, 2**62, 2**62]), b""), "shape"),
    (frames_of(header(shape=[2**64 - 1, 2**64 - 1])), "shape"),
    (frames_of(header(shape=[2**31, 2**31, 2**31, 0]), b""), "shape"),
])
def test_malformed_messages_are_protocol_errors(frames: list[bytes], reason: str) -> None:
    with pytest.raises(ProtocolError) as e:
        decode_message(frames)
    assert e.value.reason == reason


def test_huge_but_empty_shape_within_limits_is_fine() -> None:
    msg = decode_message(frames_of(header(shape=[0, 2**30, 2**30]), b""))
    assert msg.array.shape == (0, 2**30, 2**30)


ANY_WIRE_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=12) | st.binary(max_size=12)
    | st.sampled_from(["<f4", "|u1", "|O", "<M8[ns]", "|V0", "|S0", "<U0", "array", "bytes",
                       "C", "F", 1, 0, -1, 2**62]),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=5),
    max_leaves=12,
)


@settings(max_examples=500, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(["v", "kind", "dtype", "shape", "order", "meta",
                                                "x"]), ANY_WIRE_VALUE, max_size=3),
       drop=st.sets(st.sampled_from(["v", "kind", "dtype", "shape", "order", "meta"]),
                    max_size=2),
       buf=st.binary(max_size=64))
def test_fuzzed_headers_raise_only_protocol_error(changes: dict[str, Any], drop: set[str],
                                                  buf: bytes) -> None:
    h = header(**changes)
    for k in drop:
        h.pop(k, None)
    try:
        msg = decode_message(frames_of(h, buf))
    except ProtocolError:
        return
    assert isinstance(msg, ArrayMessage)
    assert msg.array.nbytes == len(buf)
    assert not msg.array.dtype.hasobject


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(st.binary(max_size=200), max_size=4))
def test_random_frames_raise_only_protocol_error(frames: list[bytes]) -> None:
    try:
        msg = decode_message(frames)
    except ProtocolError:
        return
    assert msg.array.nbytes == len(frames[1])


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_bit_flipped_headers_raise_only_protocol_error(data: st.DataObject) -> None:
    frames = wire(encode_message(np.zeros((2, 3), "<f8"), {"shot": 17}))
    head = bytearray(frames[0])
    for i in data.draw(st.lists(st.integers(0, len(head) - 1), min_size=1, max_size=4)):
        head[i] ^= data.draw(st.integers(1, 255))
    try:
        msg = decode_message([bytes(head), frames[1]])
    except ProtocolError:
        return
    assert msg.array.nbytes == len(frames[1])


# ------------------------------------------------------------------------------ over ipc


def test_push_pull_over_ipc_is_zero_copy_on_receive(tmp_path: Any) -> None:
    addr = f"ipc://{tmp_path}/arrays.ipc"
    sent = np.random.default_rng(7).standard_normal((512, 256))  # 1 MiB: above COPY_THRESHOLD
    small = np.arange(5, dtype="<u2")
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(addr)
    errors: list[BaseException] = []

    def sender() -> None:
        push = ctx.socket(zmq.PUSH)
        try:
            push.connect(addr)
            send_array(push, sent, meta={"shot": 17})
            send_array(push, small)
            send_array(push, b"raw bytes", meta={"n": 1}, copy=True)
        except BaseException as e:  # noqa: BLE001 - asserted empty below
            errors.append(e)
        finally:
            push.close(linger=5000)

    t = threading.Thread(target=sender)
    t.start()
    try:
        pull.rcvtimeo = 10_000
        big = recv_array(pull)
        assert_same_array(big.array, sent)
        assert big.meta == {"shot": 17}
        # The array views the zmq.Frame's buffer: its base chain ends at the frame.
        base: Any = big.array
        while not isinstance(base, memoryview):
            base = base.base
        frame = base.obj
        assert isinstance(frame, zmq.Frame)
        assert np.shares_memory(big.array, np.frombuffer(frame.buffer, np.uint8))
        assert_same_array(recv_array(pull).array, small)
        raw = recv_array(pull, copy=True)
        assert raw.kind == "bytes" and bytes(raw.data) == b"raw bytes" and raw.meta == {"n": 1}
    finally:
        t.join(10)
        pull.close(linger=0)
        ctx.term()
    assert not t.is_alive()
    assert not errors


def test_recv_array_reports_malformed_messages(tmp_path: Any) -> None:
    addr = f"ipc://{tmp_path}/bad.ipc"
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    try:
        pull.bind(addr)
        push.connect(addr)
        push.send_multipart([msgpack.packb(header(dtype="|O")), bytes(24)])
        pull.rcvtimeo = 10_000
        with pytest.raises(ProtocolError):
            recv_array(pull)
    finally:
        push.close(linger=0)
        pull.close(linger=0)
        ctx.term()


def test_batch_check_accepts_exactly_what_pack_builds() -> None:
    import struct

    from meshd.channel import batch
    from meshd.errors import ProtocolError

    msgs = [(b"h" * 7, b"x" * 64), (b"", b""), (b"head", bytes(range(256)) * 10)]
    payload = batch.pack(msgs)
    assert batch.check(payload) == 3 == len(batch.offsets(payload))
    assert batch.check(batch.pack([(b"a", b"b")] * batch.MAX_BATCH_MESSAGES)) \
        == batch.MAX_BATCH_MESSAGES
    bad = [
        b"", b"\0\0\0", struct.pack(">I", 0),                     # too short; no message
        payload + b"!", payload[:-1],                               # a byte too many or few
        struct.pack(">I", batch.MAX_BATCH_MESSAGES + 1) + bytes(12 * 9000),
        struct.pack(">IIQ", 1, 0, batch.MAX_MESSAGE_BYTES + 1),     # a message too big
        struct.pack(">IIQIQ", 2, 0, 2 ** 63, 0, 2 ** 63),            # sums that wrap to 0
        struct.pack(">IIQ", 1, 2 ** 32 - 1, 0),                     # a header too big
    ]
    for payload in bad:
        with pytest.raises(ProtocolError) as err:
            batch.check(payload)
        assert err.value.reason == "batch"


def test_a_malformed_delivery_is_skipped_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    import struct

    import msgpack
    import zmq

    from meshd.channel import batch
    from meshd.channel.arrays import encode_message
    from meshd.app.message import checked_messages

    meta = zmq.Frame(msgpack.packb([b"\x01" * 16, b"\x02" * 32, 7, "aps"]))
    good = zmq.Frame(batch.pack([tuple(encode_message(np.arange(5)))]))
    (msg,) = checked_messages([meta, good], "c", None)
    assert msg.seq == 7 and msg.sender == "aps" and np.array_equal(msg.array, np.arange(5))
    with caplog.at_level("WARNING", logger="meshd.app.streams"):
        assert checked_messages([meta, zmq.Frame(struct.pack(">IIQ", 1, 0, 8))], "c", None) == []
        assert checked_messages([meta], "c", None) == []
        assert checked_messages([zmq.Frame(b"\xc1"), good], "c", None) == []
    assert caplog.text.count("skipped a malformed delivery") == 3
