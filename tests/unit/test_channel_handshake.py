"""The channel handshake: signed ephemeral key exchange, replay cache, relay tampering."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.channel import frames
from meshd.channel.handshake import (
    ACCEPT_SIZE,
    HELLO_MAX_SIZE,
    MAX_SKEW,
    ChannelKeys,
    Initiator,
    Responder,
    choose_cipher,
)
from meshd.errors import LocalError, ProtocolError
from meshd.trust.identity import SiteKey

A = SiteKey(bytes(range(32)))
B = SiteKey(bytes(range(1, 33)))
C = SiteKey(bytes(range(2, 34)))
CH = bytes(16)
CH2 = b"\x01" * 16
NOW = 1_800_000_000.0


def rb(seed: int) -> Callable[[int], bytes]:
    """Deterministic bytes for tests (never for real keys)."""
    r = random.Random(seed)
    return r.randbytes


def pair(seed: int = 1, channel_id: bytes = CH, responder: Responder | None = None,
         now: float = NOW) -> tuple[Initiator, Responder]:
    init = Initiator(A, B.public, channel_id, now=now, randbytes=rb(seed))
    return init, responder or Responder(B, randbytes=rb(seed + 1000))


def complete(seed: int = 1) -> tuple[ChannelKeys, ChannelKeys]:
    init, resp = pair(seed)
    accept, rkeys = resp.on_hello(init.hello, now=NOW, peers={A.public})
    return init.on_accept(accept), rkeys


def reason(exc: pytest.ExceptionInfo[ProtocolError]) -> str:
    return exc.value.reason


def test_both_sides_derive_the_same_keys_per_direction() -> None:
    ik, rk = complete()
    assert ik.send_key == rk.recv_key and ik.recv_key == rk.send_key
    assert ik.send_key != ik.recv_key
    assert ik.transcript_hash == rk.transcript_hash
    assert ik.peer == B.public and rk.peer == A.public
    assert ik.channel_id == rk.channel_id == CH
    assert (ik.send_direction, rk.send_direction) == (frames.DIR_I2R, frames.DIR_R2I)
    assert ik.cipher == rk.cipher == frames.AES256GCM
    assert "send_key" not in repr(ik) and ik.send_key.hex() not in repr(ik)


def test_keys_differ_per_handshake_and_work_with_frames() -> None:
    a1, b1 = complete(1)
    a2, _ = complete(2)
    assert a1.send_key != a2.send_key
    frame = frames.Sealer.for_channel(a1).seal(0, b"hello")
    assert bytes(frames.Opener.for_channel(b1).open(frame).payload) == b"hello"
    back = frames.Sealer.for_channel(b1).seal(0, b"back")
    assert bytes(frames.Opener.for_channel(a1).open(back).payload) == b"back"


@given(seed=st.integers(0, 2**32))
@settings(max_examples=25, deadline=None)
def test_handshake_agrees_for_any_randomness(seed: int) -> None:
    ik, rk = complete(seed)
    assert (ik.send_key, ik.recv_key) == (rk.recv_key, rk.send_key)


def test_hello_from_a_site_not_allowed_is_refused() -> None:
    init, resp = pair()
    with pytest.raises(ProtocolError) as e:
        resp.on_hello(init.hello, now=NOW, peers={C.public})
    assert reason(e) == "unknown-peer"


def test_hello_for_another_responder_is_refused() -> None:
    init = Initiator(A, C.public, CH, now=NOW, randbytes=rb(1))
    with pytest.raises(ProtocolError) as e:
        Responder(B).on_hello(init.hello, now=NOW, peers={A.public})
    assert reason(e) == "wrong-responder"


def test_accept_signed_by_the_wrong_site_is_refused() -> None:
    """C answers a Hello meant for B (say, a relay redirected it): A refuses C's Accept."""
    init = Initiator(A, B.public, CH, now=NOW, randbytes=rb(1))
    hello_as_if_for_c = bytearray(init.hello)
    hello_as_if_for_c[2 + 16 + 32 : 2 + 16 + 64] = C.public  # breaks A's signature…
    with pytest.raises(ProtocolError) as e:
        Responder(C).on_hello(bytes(hello_as_if_for_c), now=NOW, peers={A.public})
    assert reason(e) == "bad-signature"  # …so C refuses; and a C that signs anyway:
    other = Initiator(A, C.public, CH, now=NOW, randbytes=rb(9))
    accept_from_c, _ = Responder(C).on_hello(other.hello, now=NOW, peers={A.public})
    with pytest.raises(ProtocolError) as e:
        init.on_accept(accept_from_c)
    assert reason(e) == "bad-signature"


@pytest.mark.parametrize("offset", [2 + 16 + 64, 2 + 16 + 64 + 31])  # first/last eph byte
def test_tampered_initiator_eph_key_is_refused(offset: int) -> None:
    init, resp = pair()
    bad = bytearray(init.hello)
    bad[offset] ^= 1
    with pytest.raises(ProtocolError) as e:
        resp.on_hello(bytes(bad), now=NOW, peers={A.public})
    assert reason(e) == "bad-signature"


def test_tampered_responder_eph_key_or_cipher_is_refused() -> None:
    init, resp = pair()
    accept, _ = resp.on_hello(init.hello, now=NOW, peers={A.public})
    for offset in (18, 18 + 31, 18 + 32):  # eph key bytes, then the cipher byte
        bad = bytearray(accept)
        bad[offset] ^= 3
        with pytest.raises(ProtocolError) as e:
            init.on_accept(bytes(bad))
        assert reason(e) == "bad-signature"
    init.on_accept(accept)  # the forgeries did not spoil the real one


def test_every_bit_of_the_hello_and_accept_is_covered() -> None:
    init, resp = pair()
    for i in range(len(init.hello) * 8):
        bad = bytearray(init.hello)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(ProtocolError):
            Responder(B).on_hello(bytes(bad), now=NOW, peers={A.public})
    accept, _ = resp.on_hello(init.hello, now=NOW, peers={A.public})
    for i in range(len(accept) * 8):
        bad = bytearray(accept)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(ProtocolError):
            init.on_accept(bytes(bad))


def test_bad_signature_bytes() -> None:
    init, resp = pair()
    bad = init.hello[:-64] + bytes(64)
    with pytest.raises(ProtocolError) as e:
        resp.on_hello(bad, now=NOW, peers={A.public})
    assert reason(e) == "bad-signature"


def test_replayed_hello_is_refused() -> None:
    init, resp = pair()
    resp.on_hello(init.hello, now=NOW, peers={A.public})
    with pytest.raises(ProtocolError) as e:
        resp.on_hello(init.hello, now=NOW + 5, peers={A.public})
    assert reason(e) == "replay"


def test_replay_cache_forgets_only_what_the_time_window_refuses() -> None:
    init, resp = pair()
    resp.on_hello(init.hello, now=NOW, peers={A.public})
    # Just inside the window: still remembered, still refused as a replay.
    with pytest.raises(ProtocolError) as e:
        resp.on_hello(init.hello, now=NOW + MAX_SKEW, peers={A.public})
    assert reason(e) == "replay"
    # Just past it: refused as stale (and the cache entry may go).
    with pytest.raises(ProtocolError) as e:
        resp.on_hello(init.hello, now=NOW + MAX_SKEW + 0.0015, peers={A.public})
    assert reason(e) == "stale"
    fresh = Initiator(A, B.public, CH2, now=NOW + 2 * MAX_SKEW, randbytes=rb(5))
    resp.on_hello(fresh.hello, now=NOW + 2 * MAX_SKEW, peers={A.public})
    assert resp.remembered == 1


def test_hello_from_before_a_restart_is_refused() -> None:
    """The replay cache is in memory: a restarted responder refuses Hellos made before it
    started, so one accepted before the restart cannot be replayed after it."""
    init, before = pair()
    before.on_hello(init.hello, now=NOW, peers={A.public})
    after = Responder(B, not_before=NOW + 1)
    with pytest.raises(ProtocolError) as e:
        after.on_hello(init.hello, now=NOW + 2, peers={A.public})
    assert reason(e) == "stale"
    fresh = Initiator(A, B.public, CH, now=NOW + 2, randbytes=rb(3))
    after.on_hello(fresh.hello, now=NOW + 2, peers={A.public})


def test_hello_from_the_future_is_refused() -> None:
    init, resp = pair(now=NOW + MAX_SKEW + 1)
    with pytest.raises(ProtocolError) as e:
        resp.on_hello(init.hello, now=NOW, peers={A.public})
    assert reason(e) == "future"


def test_full_replay_cache_refuses_rather_than_forgets() -> None:
    resp = Responder(B, max_remembered=2)
    for i in range(2):
        init = Initiator(A, B.public, bytes([i]) * 16, now=NOW, randbytes=rb(i))
        resp.on_hello(init.hello, now=NOW, peers={A.public})
    third = Initiator(A, B.public, CH2 + b"", now=NOW, randbytes=rb(77))
    with pytest.raises(ProtocolError) as e:
        resp.on_hello(third.hello, now=NOW, peers={A.public})
    assert reason(e) == "busy"
    later = NOW + MAX_SKEW + 1  # the first two can no longer be replayed: room again
    fourth = Initiator(A, B.public, CH2, now=later, randbytes=rb(78))
    resp.on_hello(fourth.hello, now=later, peers={A.public})
    assert resp.remembered == 1


def test_relay_swapping_accepts_between_two_channels_is_detected() -> None:
    resp = Responder(B, randbytes=rb(50))
    i1 = Initiator(A, B.public, CH, now=NOW, randbytes=rb(1))
    i2 = Initiator(A, B.public, CH2, now=NOW, randbytes=rb(2))
    a1, _ = resp.on_hello(i1.hello, now=NOW, peers={A.public})
    a2, _ = resp.on_hello(i2.hello, now=NOW, peers={A.public})
    with pytest.raises(ProtocolError) as e:
        i1.on_accept(a2)
    assert reason(e) == "wrong-channel"
    relabelled = a2[:2] + CH + a2[18:]  # the relay also rewrites the channel id
    with pytest.raises(ProtocolError) as e:
        i1.on_accept(relabelled)
    assert reason(e) == "bad-signature"
    assert i1.on_accept(a1).channel_id == CH and i2.on_accept(a2).channel_id == CH2


def test_relay_swapping_hellos_between_channels_is_detected() -> None:
    """Channel ids are signed: a Hello relabelled with another channel's id fails."""
    init, resp = pair()
    relabelled = init.hello[:2] + CH2 + init.hello[18:]
    with pytest.raises(ProtocolError) as e:
        resp.on_hello(relabelled, now=NOW, peers={A.public})
    assert reason(e) == "bad-signature"


def test_accept_after_completion_is_refused() -> None:
    init, resp = pair()
    accept, _ = resp.on_hello(init.hello, now=NOW, peers={A.public})
    init.on_accept(accept)
    with pytest.raises(ProtocolError) as e:
        init.on_accept(accept)
    assert reason(e) == "done"


@pytest.mark.parametrize("cut", [0, 1, 50, 200])
def test_truncated_hello(cut: int) -> None:
    init, resp = pair()
    with pytest.raises(ProtocolError) as e:
        resp.on_hello(init.hello[:cut], now=NOW, peers={A.public})
    assert reason(e) == "truncated"


def test_truncated_and_oversized_messages() -> None:
    init, resp = pair()
    with pytest.raises(ProtocolError) as e:
        resp.on_hello(init.hello[:-1], now=NOW, peers={A.public})
    assert reason(e) == "truncated"  # one cipher byte fewer than n says
    with pytest.raises(ProtocolError) as e:
        resp.on_hello(init.hello + b"\x00", now=NOW, peers={A.public})
    assert reason(e) == "oversized"
    with pytest.raises(ProtocolError) as e:
        resp.on_hello(init.hello + bytes(HELLO_MAX_SIZE), now=NOW, peers={A.public})
    assert reason(e) == "oversized"
    accept, _ = resp.on_hello(init.hello, now=NOW, peers={A.public})
    assert len(accept) == ACCEPT_SIZE
    for data, why in ((accept[:-1], "truncated"), (accept + b"\x00", "oversized"),
                      (b"", "truncated")):
        with pytest.raises(ProtocolError) as e:
            init.on_accept(data)
        assert reason(e) == why


def test_malformed_fields() -> None:
    init, resp = pair()
    h = init.hello
    cases = {
        "version": b"\x02" + h[1:],
        "malformed": h[:1] + b"\x02" + h[2:],  # an Accept's type
    }
    for why, data in cases.items():
        with pytest.raises(ProtocolError) as e:
            resp.on_hello(data, now=NOW, peers={A.public})
        assert reason(e) == why
    body_len = len(h) - 64
    n_at = body_len - 3  # the two cipher ids follow the count
    unknown = h[:n_at + 1] + b"\x09" + h[n_at + 2 :]
    repeated = h[:n_at + 1] + b"\x01\x01" + h[n_at + 3 :]
    for data in (unknown, repeated):
        with pytest.raises(ProtocolError) as e:
            resp.on_hello(data, now=NOW, peers={A.public})
        assert reason(e) == "malformed"
    accept, _ = resp.on_hello(h, now=NOW, peers={A.public})
    with pytest.raises(ProtocolError) as e:
        init.on_accept(b"\x07" + accept[1:])
    assert reason(e) == "version"
    with pytest.raises(ProtocolError) as e:
        init.on_accept(accept[:1] + b"\x01" + accept[2:])
    assert reason(e) == "malformed"


@given(st.binary(max_size=HELLO_MAX_SIZE + 8))
@settings(max_examples=200, deadline=None)
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    init, resp = pair()
    with pytest.raises(ProtocolError):
        resp.on_hello(data, now=NOW, peers={A.public})
    with pytest.raises(ProtocolError):
        init.on_accept(data)


def test_low_order_eph_key_is_refused() -> None:
    """A (malicious) initiator signs a zero ephemeral key: the kx refuses it."""
    import struct

    from meshd.channel.handshake import HELLO_DOMAIN

    body = struct.pack(">BB16s32s32s32s16sQB", 1, 1, CH, A.public, B.public, bytes(32),
                       bytes(16), int(NOW * 1000), 1) + b"\x01"
    with pytest.raises(ProtocolError) as e:
        Responder(B).on_hello(body + A.sign(HELLO_DOMAIN + body), now=NOW, peers={A.public})
    assert reason(e) == "bad-eph-key"


def test_cipher_choice() -> None:
    aes, cha = frames.AES256GCM, frames.CHACHA20POLY1305
    assert choose_cipher((aes, cha), (aes, cha)) == aes
    assert choose_cipher((cha, aes), (aes, cha)) == cha  # one side lacks fast AES
    assert choose_cipher((aes, cha), (cha, aes)) == cha
    assert choose_cipher((aes,), (cha, aes)) == aes
    assert choose_cipher((aes,), (cha,)) is None
    init = Initiator(A, B.public, CH, now=NOW, ciphers=(cha, aes))
    accept, rk = Responder(B).on_hello(init.hello, now=NOW, peers={A.public})
    assert init.on_accept(accept).cipher == rk.cipher == cha
    only_aes = Initiator(A, B.public, CH2, now=NOW, ciphers=(aes,))
    with pytest.raises(ProtocolError) as e:
        Responder(B, ciphers=(cha,)).on_hello(only_aes.hello, now=NOW, peers={A.public})
    assert reason(e) == "no-common-cipher"


def test_local_misuse_is_a_local_error() -> None:
    with pytest.raises(LocalError):
        Initiator(A, B.public, b"short", now=NOW)
    with pytest.raises(LocalError):
        Initiator(A, A.public, CH, now=NOW)
    with pytest.raises(LocalError):
        Initiator(A, B.public, CH, now=NOW, ciphers=(5,))
    with pytest.raises(LocalError):
        Responder(B, max_remembered=0)


def test_a_responder_reads_its_key_at_each_hello_and_keeps_its_replay_cache_over_a_rotation(
) -> None:
    current = [B]
    resp = Responder(lambda: current[0], randbytes=rb(77))
    first = Initiator(A, B.public, CH, now=NOW, randbytes=rb(1))
    accept, _ = resp.on_hello(first.hello, now=NOW, peers={A.public})
    first.on_accept(accept)
    current[0] = C  # the site rotated its key
    to_new = Initiator(A, C.public, CH2, now=NOW, randbytes=rb(2))
    accept, keys = resp.on_hello(to_new.hello, now=NOW, peers={A.public})
    assert to_new.on_accept(accept).send_key == keys.recv_key  # signed by the new key
    with pytest.raises(ProtocolError) as exc:  # a Hello for the old key is now for another site
        resp.on_hello(Initiator(A, B.public, CH, now=NOW, randbytes=rb(3)).hello, now=NOW,
                      peers={A.public})
    assert reason(exc) == "wrong-responder"
    current[0] = B  # and the replay cache survived the rotations
    with pytest.raises(ProtocolError) as exc:
        resp.on_hello(first.hello, now=NOW, peers={A.public})
    assert reason(exc) == "replay"
