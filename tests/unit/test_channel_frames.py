"""AEAD frames: round trips, tampering, replay/reorder/misdirection, zero-copy inputs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.channel.frames import (
    AES256GCM,
    CHACHA20POLY1305,
    DIR_I2R,
    DIR_R2I,
    EPOCH_BITS,
    FRAME_OVERHEAD,
    HEADER_SIZE,
    KIND_CONTROL,
    MAX_PAYLOAD,
    MAX_SEQ,
    Opener,
    Sealer,
)
from meshd.errors import LocalError, ProtocolError

KEY = bytes(range(32))
CH = b"C" * 16
CIPHER_IDS = [AES256GCM, CHACHA20POLY1305]


def pair(cipher: int = AES256GCM, channel: bytes = CH,
         direction: int = DIR_I2R) -> tuple[Sealer, Opener]:
    return Sealer(cipher, KEY, channel, direction), Opener(cipher, KEY, channel, direction)


def reason_of(opener: Opener, frame: bytes | bytearray, **kw: int) -> str:
    with pytest.raises(ProtocolError) as e:
        opener.open(frame, **kw)
    return e.value.reason


@pytest.mark.parametrize("cipher", CIPHER_IDS)
def test_round_trip(cipher: int) -> None:
    s, o = pair(cipher)
    frame = s.seal(7, b"payload", flags=3)
    assert len(frame) == len(b"payload") + FRAME_OVERHEAD
    f = o.open(frame, expect_seq=7)
    assert (f.kind, f.seq, f.flags, bytes(f.payload)) == (0, 7, 3, b"payload")
    assert bytes(o.open(s.seal(8, b"")).payload) == b""


@pytest.mark.parametrize("cipher", CIPHER_IDS)
def test_opening_in_place_views_the_frame_and_still_authenticates(cipher: int) -> None:
    s, o = pair(cipher)
    payload = np.arange(1 << 16, dtype=np.uint32)
    frame = np.frombuffer(bytes(s.seal(3, payload)), dtype=np.uint8).copy()
    f = o.open(frame.data, expect_seq=3, in_place=True)
    assert np.array_equal(np.frombuffer(f.payload, dtype=np.uint32), payload)
    opened = np.frombuffer(f.payload, dtype=np.uint8)
    assert opened.ctypes.data == frame.ctypes.data + HEADER_SIZE, "a view of the frame"
    bad = np.frombuffer(bytes(s.seal(4, payload)), dtype=np.uint8).copy()
    bad[HEADER_SIZE + 5] ^= 1
    with pytest.raises(ProtocolError):
        o.open(bad.data, in_place=True)


@pytest.mark.parametrize("cipher", CIPHER_IDS)
def test_flipping_any_bit_fails(cipher: int) -> None:
    s, _ = pair(cipher)
    frame = bytes(s.seal(5, b"0123456789abcdef"))
    for i in range(len(frame) * 8):
        bad = bytearray(frame)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(ProtocolError):
            pair(cipher)[1].open(bad)


def test_rewritten_seq_fails_authentication() -> None:
    s, o = pair()
    frame = bytearray(s.seal(5, b"x"))
    frame[HEADER_SIZE - 12 : HEADER_SIZE - 4] = (6).to_bytes(8, "big")
    assert reason_of(o, frame) == "auth-failed"


def test_replayed_or_reordered_frame_is_refused_at_the_expected_seq() -> None:
    s, o = pair()
    f0, f1, f2 = (s.seal(i, bytes([i])) for i in range(3))
    o.open(f0, expect_seq=0)
    assert reason_of(o, f0, expect_seq=1) == "unexpected-seq"  # replay
    assert reason_of(o, f2, expect_seq=1) == "unexpected-seq"  # reorder
    o.open(f1, expect_seq=1)
    o.open(f2, expect_seq=2)


def test_frame_moved_to_another_channel_or_direction_fails() -> None:
    s, _ = pair()
    frame = s.seal(0, b"secret")
    _, other_channel = pair(channel=b"D" * 16)
    assert reason_of(other_channel, frame) == "wrong-channel"
    _, reverse = pair(direction=DIR_R2I)
    assert reason_of(reverse, frame) == "wrong-direction"
    # A relay that also rewrites the header: the tag no longer matches.
    relabelled = bytearray(frame)
    relabelled[4:20] = b"D" * 16
    assert reason_of(other_channel, relabelled) == "auth-failed"
    redirected = bytearray(frame)
    redirected[2] = DIR_R2I
    assert reason_of(reverse, redirected) == "auth-failed"


def test_frame_under_another_key_fails() -> None:
    frame = Sealer(AES256GCM, KEY, CH, DIR_I2R).seal(0, b"x")
    other = Opener(AES256GCM, bytes(32), CH, DIR_I2R)
    assert reason_of(other, frame) == "auth-failed"
    chacha = Opener(CHACHA20POLY1305, KEY, CH, DIR_I2R)
    assert reason_of(chacha, frame) == "auth-failed"


def test_control_frames_have_their_own_increasing_seq() -> None:
    s, o = pair()
    c0 = s.seal_control(b"ack0")
    d0 = s.seal(0, b"data0")  # same seq number, other kind: other nonce
    c1 = s.seal_control(b"ack1")
    assert o.open(c0).kind == KIND_CONTROL and o.open(d0).kind == 0
    assert o.open(c1).seq == 1
    assert reason_of(o, c0) == "replay"
    assert reason_of(o, c1) == "replay"
    kind_flipped = bytearray(d0)
    kind_flipped[1] = KIND_CONTROL
    assert reason_of(pair()[1], kind_flipped) == "auth-failed"


def test_malformed_headers() -> None:
    s, o = pair()
    frame = bytes(s.seal(1, b"abc"))
    assert reason_of(o, frame[: FRAME_OVERHEAD - 1]) == "truncated"
    assert reason_of(o, frame[:-1]) == "length"
    assert reason_of(o, frame + b"\x00") == "length"
    assert reason_of(o, b"\x02" + frame[1:]) == "version"
    assert reason_of(o, frame[:1] + b"\x07" + frame[2:]) == "malformed"
    huge = bytearray(frame)
    huge[HEADER_SIZE - 4 : HEADER_SIZE] = (MAX_PAYLOAD + 1).to_bytes(4, "big")
    assert reason_of(o, huge) == "oversized"


def test_key_epochs_rotate_and_both_sides_follow() -> None:
    s, o = pair()
    edge = 1 << EPOCH_BITS
    frames = {seq: s.seal(seq, seq.to_bytes(8, "big")) for seq in (0, edge - 1, edge, 3 * edge)}
    for seq, frame in reversed(list(frames.items())):  # out of order: caches refill
        assert o.open(frame).seq == seq
    # Same nonce bytes, other epoch key: different ciphertext.
    a = s.seal(0, b"same")[HEADER_SIZE:]
    b = Sealer(AES256GCM, KEY, CH, DIR_I2R).seal(0, b"same")[HEADER_SIZE:]
    c = s.seal(edge, b"same")[HEADER_SIZE:]
    assert a == b and a != c


def test_numpy_and_memoryview_payloads_without_copy() -> None:
    s, o = pair()
    arr = np.arange(1000, dtype=np.float64)
    frame = s.seal(0, arr)
    out = np.frombuffer(o.open(frame).payload, dtype=np.float64)
    assert np.array_equal(out, arr)
    view = arr.view(np.uint8).data[8:80]
    assert bytes(o.open(s.seal(1, view)).payload) == bytes(view)
    with pytest.raises(LocalError) as e:
        s.seal(2, arr[::2])
    assert e.value.reason == "not-contiguous"


def test_local_misuse() -> None:
    s, _ = pair()
    for kwargs, why in (({"seq": -1}, "bad-seq"), ({"seq": MAX_SEQ}, "bad-seq")):
        with pytest.raises(LocalError) as e:
            s.seal(payload=b"", **kwargs)
        assert e.value.reason == why
    with pytest.raises(LocalError):
        Sealer(9, KEY, CH, DIR_I2R)
    with pytest.raises(LocalError):
        Sealer(AES256GCM, KEY[:16], CH, DIR_I2R)
    with pytest.raises(LocalError):
        s.seal(0, b"", flags=256)


@given(payload=st.binary(max_size=4096), seq=st.integers(0, MAX_SEQ - 1),
       flags=st.integers(0, 255), cipher=st.sampled_from(CIPHER_IDS),
       direction=st.sampled_from([DIR_I2R, DIR_R2I]))
@settings(max_examples=300, deadline=None)
def test_round_trip_property(payload: bytes, seq: int, flags: int, cipher: int,
                             direction: int) -> None:
    s, o = pair(cipher, direction=direction)
    f = o.open(s.seal(seq, payload, flags=flags), expect_seq=seq)
    assert (f.seq, f.flags, bytes(f.payload)) == (seq, flags, payload)


@given(payload=st.binary(min_size=1, max_size=256), seq=st.integers(0, MAX_SEQ - 1),
       data=st.data())
@settings(max_examples=200, deadline=None)
def test_any_single_byte_change_fails_property(payload: bytes, seq: int,
                                               data: st.DataObject) -> None:
    s, o = pair()
    frame = bytearray(s.seal(seq, payload))
    i = data.draw(st.integers(0, len(frame) - 1))
    frame[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(ProtocolError):
        o.open(frame)


@given(st.binary(max_size=200))
@settings(max_examples=200, deadline=None)
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        pair()[1].open(data)
