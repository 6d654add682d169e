"""The tunnel core, driven directly: the codec under hostile input, the multiplexer's streams,
half-close and per-stream credit, and the sealed ends over an in-memory pipe."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.channel.control import tunnel_payload
from meshd.channel.frames import Sealer
from meshd.channel.handshake import Initiator, Responder
from meshd.channel.inbound import open_first
from meshd.channel.control import CTRL_TUNNEL
from meshd.errors import LocalError, ProtocolError
from meshd.trust.identity import SiteKey
from meshd.tunnel import codec
from meshd.tunnel.codec import HEADER, Credit, Data, Fin, Open, Reset
from meshd.tunnel.control import (
    ServicesQuery,
    ServicesReport,
    decode,
    parse_address,
    peer_message,
    split_ref,
)
from meshd.tunnel.events import Ended, Finished, Received, StreamOpened, StreamReset, Writable
from meshd.tunnel.mux import CONSUMER, GROWTH_BUDGET, OWNER, WINDOW, Mux
from meshd.tunnel.sealed import TunnelEnd

A = SiteKey(bytes(range(32)))
B = SiteKey(bytes(range(1, 33)))
CID = b"\x07" * 16


def keys() -> tuple[Any, Any]:
    init = Initiator(A, B.public, CID, now=1_800_000_000.0)
    accept, rkeys = Responder(B).on_hello(init.hello, now=1_800_000_000.0, peers={A.public})
    return init.on_accept(accept), rkeys


def pump(src: Mux, dst: Mux) -> list[Any]:
    for payload in src.take_payloads():
        dst.receive(payload)
    return dst.events()


def pair(**kw: Any) -> tuple[Mux, Mux]:
    return Mux(CONSUMER, **kw), Mux(OWNER, **kw)


# -- codec -----------------------------------------------------------------------------------

MESSAGES = [Open(1, "detector"), Data(7, b"x" * 100), Fin(3), Reset(2, "not-allowed"),
            Credit(9, 65536)]


@pytest.mark.parametrize("msg", MESSAGES)
def test_every_message_round_trips(msg: Any) -> None:
    (back,) = codec.decode(codec.encode(msg))
    if isinstance(msg, Data):
        assert back.stream == msg.stream and bytes(back.data) == msg.data
    else:
        assert back == msg


def test_several_messages_share_a_frame() -> None:
    payload = b"".join(codec.encode(m) for m in MESSAGES)
    assert len(codec.decode(payload)) == len(MESSAGES)


@pytest.mark.parametrize("payload,reason", [
    (b"", "truncated"),
    (b"\x02\x00\x00\x00\x01", "truncated"),                                 # header cut short
    (HEADER.pack(2, 1, 10) + b"abc", "truncated"),                           # body cut short
    (HEADER.pack(9, 1, 0), "type"),                                          # unknown type
    (HEADER.pack(2, 0, 1) + b"x", "malformed"),                              # stream 0
    (HEADER.pack(2, 1, codec.MAX_DATA + 1), "oversized"),                    # DATA too big
    (HEADER.pack(1, 1, codec.MAX_NAME + 1), "oversized"),                    # name too long
    (HEADER.pack(1, 1, 2) + b"\xff\xfe", "malformed"),                       # not UTF-8
    (HEADER.pack(1, 1, 3) + b"a/b", "malformed"),                            # '/' in a name
    (HEADER.pack(1, 1, 0), "malformed"),                                     # empty name
    (HEADER.pack(2, 1, 0), "malformed"),                                     # empty DATA
    (HEADER.pack(3, 1, 1) + b"x", "malformed"),                              # FIN with a body
    (HEADER.pack(4, 1, 1) + b"\x63", "malformed"),                           # unknown reason
    (HEADER.pack(4, 1, 1) + b"\x07", "malformed"),                           # "lost" never sent
    (HEADER.pack(5, 1, 2) + b"xx", "malformed"),                             # CREDIT size
    (HEADER.pack(5, 1, 4) + b"\x00" * 4, "malformed"),                       # zero credit
    (HEADER.pack(5, 1, 4) + (codec.MAX_WINDOW + 1).to_bytes(4, "big"), "malformed"),
])
def test_hostile_payloads_are_refused_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        codec.decode(payload)
    assert exc.value.reason == reason


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_the_decoder_never_fails_otherwise(data: bytes) -> None:
    try:
        codec.decode(data)
    except ProtocolError:
        pass


# -- the multiplexer -------------------------------------------------------------------------

def test_a_stream_carries_bytes_both_ways_and_half_closes_each_way() -> None:
    c, o = pair()
    sid = c.open_stream("det")
    assert c.send(sid, b"hello")
    c.finish(sid)
    ev = pump(c, o)
    assert ev[0] == StreamOpened(sid, "det")
    assert isinstance(ev[1], Received) and bytes(ev[1].data) == b"hello"
    assert ev[2] == Ended(sid)
    assert o.send(sid, b"world")  # the other direction is still open
    o.finish(sid)
    ev = pump(o, c)
    assert bytes(ev[0].data) == b"world" and ev[1:] == [Ended(sid), Finished(sid)]
    assert pump(c, o) == [Finished(sid)] and sid not in o.streams  # forgot it as it sent its FIN
    assert not c.streams


def test_a_slow_reader_stops_only_its_own_writer() -> None:
    c, o = pair()
    slow, fast = c.open_stream("s"), c.open_stream("s")
    assert not c.send(slow, b"a" * (WINDOW + 1000))  # more than the window: reading pauses
    assert c.send(fast, b"b" * 1000)
    got = {slow: 0, fast: 0}
    for ev in pump(c, o):
        if isinstance(ev, Received):
            got[ev.stream] += len(ev.data)
    assert got == {slow: WINDOW, fast: 1000}
    # the fast stream's reader consumes; it can go on while the slow one stays stuck
    o.consumed(fast, 1000)
    pump(o, c)
    # all of its credit goes at once; with none left reading pauses until Writable
    assert not c.send(fast, b"b" * (WINDOW - 1000))
    assert c.streams[fast].pending_bytes == 0 and c.streams[slow].pending_bytes == 1000
    assert c.sendable(fast) == 0 and c.sendable(slow) == 0
    # the slow reader takes a quarter window: credit comes back, the rest goes, reading resumes
    o.consumed(slow, WINDOW // 4)
    assert Writable(slow) in pump(o, c)
    assert sum(len(e.data) for e in pump(c, o) if isinstance(e, Received) and e.stream == slow) == 1000
    o.consumed(fast, WINDOW - 1000, drained=False)
    assert Writable(fast) in pump(o, c) and c.sendable(fast) == WINDOW


def test_credit_is_returned_only_per_quarter_window() -> None:
    c, o = pair()
    sid = c.open_stream("s")
    c.send(sid, b"x" * 1000)
    pump(c, o)
    o.consumed(sid, 1000)
    assert o.take_payloads() == []  # too little to be worth a message
    o.consumed(sid, WINDOW // 4)
    (payload,) = o.take_payloads()
    assert codec.decode(payload) == [Credit(sid, WINDOW // 4 + 1000)]


def test_a_window_grows_only_while_its_reader_keeps_up_and_within_the_budget() -> None:
    from meshd.tunnel.mux import MAX_STREAM_WINDOW

    c, o = pair()
    fast, slow = c.open_stream("s"), c.open_stream("s")
    for _ in range(40):
        for sid, drained in ((fast, True), (slow, False)):
            c.send(sid, b"x" * WINDOW)
            n = sum(len(e.data) for e in pump(c, o) if isinstance(e, Received) and e.stream == sid)
            o.consumed(sid, n, drained=drained)
        pump(o, c)
    assert o.streams[fast].window == MAX_STREAM_WINDOW and o.streams[slow].window == WINDOW
    assert o.grown == MAX_STREAM_WINDOW - WINDOW
    o.reset(fast, "reset")  # its growth is free again
    assert o.grown == 0
    tight = Mux(OWNER)
    tight.grown = GROWTH_BUDGET
    c2 = Mux(CONSUMER)
    sid = c2.open_stream("s")
    c2.send(sid, b"x" * WINDOW)
    for p in c2.take_payloads():
        tight.receive(p)
    tight.consumed(sid, WINDOW, drained=True)  # no budget left: credit only for what was taken
    assert codec.decode(tight.take_payloads()[0]) == [Credit(sid, WINDOW)]


def test_more_data_than_granted_is_a_protocol_error() -> None:
    c, o = pair()
    sid = c.open_stream("s")
    pump(c, o)
    overrun = codec.encode(Data(sid, b"x" * codec.MAX_DATA))
    o.receive(overrun)
    with pytest.raises(ProtocolError) as exc:
        o.receive(overrun + codec.encode(Data(sid, b"x")))
    assert exc.value.reason == "credit-exceeded"


@pytest.mark.parametrize("msg,reason", [
    (Data(5, b"x"), "unknown-stream"),
    (Credit(5, 10), "unknown-stream"),
    (Open(1, "again"), "duplicate-stream"),
])
def test_messages_for_streams_never_opened_or_reopened_are_refused(msg: Any, reason: str) -> None:
    c, o = pair()
    c.open_stream("s")
    pump(c, o)
    with pytest.raises(ProtocolError) as exc:
        o.receive(codec.encode(msg))
    assert exc.value.reason == reason


def test_the_consumer_refuses_an_open_and_data_after_fin_is_refused() -> None:
    c, o = pair()
    with pytest.raises(ProtocolError, match="OPEN"):
        c.receive(codec.encode(Open(1, "x")))
    sid = c.open_stream("s")
    c.finish(sid)
    pump(c, o)
    with pytest.raises(ProtocolError) as exc:
        o.receive(codec.encode(Data(sid, b"late")))
    assert exc.value.reason == "after-fin"


def test_credit_beyond_the_largest_window_is_refused() -> None:
    c, o = pair()
    sid = c.open_stream("s")
    with pytest.raises(ProtocolError) as exc:
        c.receive(codec.encode(Credit(sid, codec.MAX_WINDOW)))
    assert exc.value.reason == "credit-overflow"


def test_a_reset_reaches_the_other_side_and_late_messages_are_dropped() -> None:
    c, o = pair()
    sid = c.open_stream("s")
    c.send(sid, b"x" * 10)
    pump(c, o)
    o.reset(sid, "refused")
    o.send(sid, b"ignored")
    assert pump(o, c) == [StreamReset(sid, "refused")]
    c.send(sid, b"dropped")  # the stream is gone: nothing is sent
    assert c.take_payloads() == []
    o.receive(codec.encode(Data(sid, b"in flight")))  # in flight when it went: dropped
    assert o.events() == []


def test_losing_the_connection_resets_every_stream() -> None:
    c, _ = pair()
    sids = [c.open_stream("s") for _ in range(3)]
    c.lost()
    assert c.events() == [StreamReset(s, "lost") for s in sids]
    with pytest.raises(LocalError):
        c.open_stream("s")


def test_the_owner_resets_streams_beyond_its_bound_as_busy() -> None:
    c, o = Mux(CONSUMER), Mux(OWNER, max_streams=2)
    sids = [c.open_stream("s") for _ in range(3)]
    assert [type(e) for e in pump(c, o)] == [StreamOpened, StreamOpened]
    assert pump(o, c) == [StreamReset(sids[2], "busy")]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 40))
def test_random_writes_and_reads_keep_every_streams_bytes_in_order(seed: int, n: int) -> None:
    rng = random.Random(seed)
    c, o = pair(window=4096)
    sids = [c.open_stream("s") for _ in range(3)]
    sent = {s: hashlib.sha256() for s in sids}
    got = {s: hashlib.sha256() for s in sids}
    unconsumed = {s: 0 for s in sids}
    for _ in range(n):
        s = rng.choice(sids)
        data = rng.randbytes(rng.randint(1, 9000))
        sent[s].update(data)
        c.send(s, data)
        for ev in pump(c, o):
            if isinstance(ev, Received):
                got[ev.stream].update(bytes(ev.data))
                unconsumed[ev.stream] += len(ev.data)
        r = rng.choice(sids)  # a reader that drains now and then
        o.consumed(r, unconsumed[r])
        unconsumed[r] = 0
        pump(o, c)
    for _ in range(100):  # drain everything
        for s in sids:
            o.consumed(s, unconsumed[s])
            unconsumed[s] = 0
        pump(o, c)
        for ev in pump(c, o):
            if isinstance(ev, Received):
                got[ev.stream].update(bytes(ev.data))
                unconsumed[ev.stream] += len(ev.data)
    assert {s: h.digest() for s, h in got.items()} == {s: h.digest() for s, h in sent.items()}


# -- sealed ends -----------------------------------------------------------------------------

def ends() -> tuple[TunnelEnd, TunnelEnd]:
    ikeys, rkeys = keys()
    consumer = TunnelEnd(ikeys, "det")
    opener, kind, name = open_first(rkeys, consumer.first_frame())
    assert (kind, name) == (CTRL_TUNNEL, "det")
    owner = TunnelEnd(rkeys, name, opener=opener)
    consumer.frame_received(owner.first_frame())
    assert consumer.accepted
    return consumer, owner


def test_sealed_ends_carry_streams_and_the_bytes_are_encrypted() -> None:
    consumer, owner = ends()
    sid = consumer.mux.open_stream("det")
    consumer.mux.send(sid, b"secret bytes")
    frames = consumer.frames()
    assert all(b"secret" not in bytes(f) for f in frames)
    for f in frames:
        owner.frame_received(f)
    ev = owner.mux.events()
    assert ev[0] == StreamOpened(sid, "det") and bytes(ev[1].data) == b"secret bytes"


def test_sealed_frames_out_of_order_replayed_or_tampered_are_refused() -> None:
    consumer, owner = ends()
    sid = consumer.mux.open_stream("det")
    f1 = consumer.frames()[0]
    consumer.mux.send(sid, b"x")
    f2 = consumer.frames()[0]
    with pytest.raises(ProtocolError) as exc:
        owner.frame_received(f2)  # skipped one
    assert exc.value.reason == "unexpected-seq"
    bad = bytearray(f1)
    bad[-1] ^= 1
    with pytest.raises(ProtocolError) as exc:
        owner.frame_received(bad)
    assert exc.value.reason == "auth-failed"
    owner.frame_received(f1)
    with pytest.raises(ProtocolError) as exc:
        owner.frame_received(f1)  # replayed
    assert exc.value.reason == "unexpected-seq"


def test_data_before_acceptance_and_a_second_acceptance_are_refused() -> None:
    ikeys, rkeys = keys()
    consumer = TunnelEnd(ikeys, "det")
    owner_sealer = Sealer.for_channel(rkeys)
    with pytest.raises(ProtocolError):
        consumer.frame_received(owner_sealer.seal(0, b"\x00" * 20))
    consumer.frame_received(owner_sealer.seal_control(tunnel_payload("det")))
    with pytest.raises(ProtocolError):
        consumer.frame_received(owner_sealer.seal_control(tunnel_payload("det")))


# -- control messages and text forms ---------------------------------------------------------

def test_services_messages_round_trip_and_garbage_is_refused() -> None:
    for msg in (ServicesQuery(b"q" * 8), ServicesReport(b"q" * 8, ("a", "b"))):
        m = peer_message(msg)
        assert decode(m["op"], m["b"]) == msg
    for op, body in (("svc", b"\xc1"), ("svc?", b"\x80"), ("nope", peer_message(ServicesQuery(b"q" * 8))["b"])):
        with pytest.raises(ProtocolError):
            decode(op, body)


@pytest.mark.parametrize("text,out", [
    ("10.0.0.5:5555", ("10.0.0.5", 5555)), ("host-a.example.org:80", ("host-a.example.org", 80)),
    ("[::1]:22", ("::1", 22)),
])
def test_addresses_parse(text: str, out: tuple[str, int]) -> None:
    assert parse_address(text) == out


@pytest.mark.parametrize("text", [
    "10.0.0.5", "10.0.0.5:0", "10.0.0.5:70000", ":80", "a b:1", "[nope]:1", "::1:22",
    "host:port",
    # Found by attacking live daemons: names the resolver refuses (a reset stream that never
    # came, and a traceback per stream), and digits int() reads but a person would not.
    "a..b:80", ".:80", "x.:80", "a" * 64 + ".org:80", "a\x00b:80", "\uff11\uff12\uff17.0.0.1:80",
    "127.0.0.1:\u00b2", "127.0.0.1:\u0668\u0660", "caf\u00e9.org:80", "10.0.0.5:000080",
])
def test_bad_addresses_are_refused(text: str) -> None:
    with pytest.raises(LocalError) as exc:
        parse_address(text)
    assert exc.value.reason == "bad-address"


def test_listen_forms_and_site_name_refs() -> None:
    assert parse_address("6000", default_host="127.0.0.1") == ("127.0.0.1", 6000)
    assert parse_address("127.0.0.1:0", allow_port_zero=True) == ("127.0.0.1", 0)
    with pytest.raises(LocalError):
        parse_address("\u00b2", default_host="127.0.0.1")  # isdigit(), but not int()
    assert split_ref("alcf/detector") == ("alcf", "detector")
    for bad in ("alcf", "/x", "alcf/"):
        with pytest.raises(LocalError):
            split_ref(bad)


def test_borrowed_bytes_that_wait_for_credit_are_copied() -> None:
    c, o = pair()
    sid = c.open_stream("s")
    buf = bytearray(b"a" * (WINDOW + 500))
    assert not c.send(sid, memoryview(buf), borrowed=True)  # 500 wait for credit
    parts = c.take_parts()
    assert sum(len(p) for frame in parts for p in frame) > WINDOW  # views of buf went out
    for payload in [b"".join(p) for p in parts]:
        o.receive(payload)
    assert sum(len(e.data) for e in o.events() if isinstance(e, Received)) == WINDOW
    buf[:] = b"z" * len(buf)  # the read buffer is reused: what waits must not change
    o.consumed(sid, WINDOW, drained=False)
    pump(o, c)
    got = [e for e in pump(c, o) if isinstance(e, Received)]
    assert b"".join(bytes(e.data) for e in got) == b"a" * 500


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 700_000), min_size=1, max_size=6), room=st.sampled_from([0, 5]))
def test_big_frames_sealed_from_parts_open_in_a_reused_buffer(sizes: list[int], room: int) -> None:
    consumer, owner = ends()
    rng = random.Random(sum(sizes))
    sent: dict[int, bytes] = {}
    for n in sizes:
        sid = consumer.mux.open_stream("det")
        sent[sid] = rng.randbytes(n)
        consumer.mux.send(sid, sent[sid])  # (what exceeds the window waits; it is not checked)
    got: dict[int, bytes] = {}
    for frame in consumer.frames(room=room):
        assert len(frame) - room <= codec.MAX_FRAME_PAYLOAD + (codec.MAX_DATA + 64) * 2
        owner.frame_received(memoryview(frame)[room:], reuse=True)
        for ev in owner.mux.events():  # taken before the next frame overwrites the buffer
            if isinstance(ev, Received):
                got[ev.stream] = got.get(ev.stream, b"") + bytes(ev.data)
    assert got == {sid: data[:WINDOW] for sid, data in sent.items()}


def test_take_payloads_joins_what_take_parts_gives() -> None:
    c, o = pair()
    for _ in range(3):
        sid = c.open_stream("s")
        c.send(sid, bytes(range(256)) * 1000)
    twin = pair()[0]
    for _ in range(3):
        sid = twin.open_stream("s")
        twin.send(sid, bytes(range(256)) * 1000)
    assert [b"".join(p) for p in c.take_parts()] == twin.take_payloads()
