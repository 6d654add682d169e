"""The sending end run by the application (channel/stream.py) against a real receiving end, in
memory: hand-over from the daemon's core, resume after a broken connection, the control-seq
lease, reused frame buffers; and the pieces it uses (seal_into, RecordReader, pack_parts)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from meshd.channel import batch, frames, link
from meshd.channel.events import SendFrame
from meshd.channel.frames import Opener, Sealer
from meshd.channel.inbound import ReceivingEnd, open_first_frame
from meshd.channel.paths import StartAttempt
from meshd.channel.reliable import WouldBlock
from meshd.channel.stream import LEASE, Grant, StreamSender
from meshd.errors import ProtocolError
from tests.unit.test_channel_outbound import T0, opened


def records(bufs: list[Any]) -> list[tuple[int, bytearray]]:
    r = link.RecordReader()
    for b in bufs:
        r.feed(memoryview(b).cast("B"))
    return r.records()


class Pair:
    """A daemon's sending core handed over to a StreamSender, and the receiving end."""

    def __init__(self) -> None:
        self.daemon, rkeys = opened()
        (first,) = [a.frame for a in self.daemon.outgoing() if isinstance(a, SendFrame)]
        opener, name = open_first_frame(rkeys, first)
        self.rkeys = rkeys
        self.rx = ReceivingEnd(rkeys, opener, name)
        self.rx.connection_adopted()
        self.daemon.frame_received(self.rx.take_feedback(), T0 + 0.02)  # the first credit
        self.app = StreamSender(self.grant(), T0 + 0.03)
        self.delivered: list[bytes] = []

    def grant(self, leftover: bytes = b"") -> Grant:
        core = self.daemon
        keys = core.keys
        assert keys is not None
        cs, co, fb = core.hand_over()
        ms, mb = core.sender.credit
        return Grant(keys.channel_id, keys.cipher, keys.send_key, keys.recv_key,
                     keys.send_direction, keys.recv_direction, cs, co, ms, mb, fb, "direct",
                     leftover)

    def carry(self, now: float, drop: bool = False) -> None:
        """Deliver what the app wrote (unless dropped), pop everything, feed back."""
        for kind, body in records(self.app.take_writes()):
            assert kind == link.FRAME
            if not drop:
                self.rx.frame_received(body)
        while (d := self.rx.pop()) is not None:
            self.delivered.append(bytes(d.payload))
        fb = self.rx.take_feedback()
        if fb is not None:
            self.app.data_received(link.record_header(link.FRAME, len(fb)) + bytes(fb), now)


def payload(i: int, n: int = 100) -> list[Any]:
    return [batch.pack([(b"h", bytes([i % 251]) * n)])]


def test_the_application_sends_what_the_receiver_delivers_in_order() -> None:
    p = Pair()
    for i in range(50):
        parts = payload(i)
        p.app.send_batch(parts, len(parts[0]), 1, T0 + 1)
        p.carry(T0 + 1)
    assert p.delivered == [bytes(payload(i)[0]) for i in range(50)]
    assert p.app.all_acked and p.app.acked_messages == 50 and p.app.messages == 50


def test_a_broken_connection_resumes_through_the_daemon_with_nothing_lost_or_twice() -> None:
    p = Pair()
    for i in range(10):
        parts = payload(i)
        p.app.send_batch(parts, len(parts[0]), 1, T0 + 1)
        p.carry(T0 + 1, drop=5 <= i)  # the connection breaks after the fifth
    cs, co = p.app.lost()
    p.rx.connection_lost()
    # the daemon races again and resumes: Probe -> Feedback on the new connection
    p.daemon.taken_back(co, T0 + 2)
    (start,) = [a for a in p.daemon.outgoing() if isinstance(a, StartAttempt)]
    probe = p.daemon.probe_frame()
    assert Opener.for_channel(p.daemon.keys).next_control_seq == 0  # type: ignore[arg-type]
    p.rx.connection_adopted()
    p.rx.frame_received(probe)
    fb_frame = p.rx.take_feedback()
    assert fb_frame is not None
    fb = p.daemon.feedback_in(fb_frame)
    assert fb is not None and fb.ack == 5
    assert p.daemon.attempt_succeeded(start.path, T0 + 3, 0.01, p.daemon.keys, fb)  # type: ignore[arg-type]
    g = p.grant()
    assert g.feedback == fb and g.ctl_seal >= cs
    p.app.resume(g, T0 + 3)
    p.carry(T0 + 3)
    assert p.delivered == [bytes(payload(i)[0]) for i in range(10)]
    assert p.rx.rx.duplicates == 0 and p.app.all_acked


def test_control_seqs_are_leased_so_the_daemon_and_the_app_never_share_one() -> None:
    p = Pair()
    opener = Opener.for_channel(p.rkeys)
    app_close = opener.open(p.app.close_frame()[1])
    daemon_probe = opener.open(p.daemon.probe_frame())
    assert daemon_probe.seq >= app_close.seq + LEASE


def test_feedback_the_daemon_reads_before_the_hand_over_goes_with_the_grant() -> None:
    p = Pair()
    p.app.lost()
    p.daemon.taken_back(0, T0 + 1)
    (start,) = [a for a in p.daemon.outgoing() if isinstance(a, StartAttempt)]
    p.rx.frame_received(p.daemon.probe_frame())
    fb = p.daemon.feedback_in(p.rx.take_feedback())  # type: ignore[arg-type]
    p.daemon.attempt_succeeded(start.path, T0 + 2, 0.01, p.daemon.keys, fb)  # type: ignore[arg-type]
    p.rx.rx.on_probe()
    later = p.rx.take_feedback()
    assert later is not None
    p.daemon.frame_received(later, T0 + 2.5)  # no ack-unsent: kept for the application
    assert p.grant().feedback is not None


def test_without_credit_send_blocks_and_acked_frame_buffers_are_reused() -> None:
    p = Pair()
    big = np.zeros(1 << 20, dtype=np.uint8)
    parts, n = batch.pack_parts([(b"h", big)])
    p.app.send_batch(parts, n, 1, T0 + 1)
    writes = p.app.take_writes()
    first_frame = writes[1]
    for kind, body in records(writes):
        p.rx.frame_received(body)
    while p.rx.pop() is not None:
        pass
    fb = p.rx.take_feedback()
    assert fb is not None
    p.app.data_received(link.record_header(link.FRAME, len(fb)) + bytes(fb), T0 + 1)
    p.app.send_batch(parts, n, 1, T0 + 2)
    assert p.app.take_writes()[1] is first_frame  # the acked buffer, sealed again
    tight = StreamSender(dataclasses.replace(p.grant(), max_seq=1), T0)
    tight.send_batch(parts, n, 1, T0)  # seq 0 needs no credit; seq 1 does
    with pytest.raises(WouldBlock):
        tight.send_batch(parts, n, 1, T0)


def test_inauthentic_bytes_from_the_receiver_break_the_connection() -> None:
    p = Pair()
    with pytest.raises(ProtocolError):
        p.app.data_received(link.record_header(link.FRAME, 80) + bytes(80), T0)
    with pytest.raises(ProtocolError):
        StreamSender(p.grant(), T0).data_received(link.record_header(link.REFUSE, 2) + b"no", T0)


@pytest.mark.parametrize("cipher", [frames.AES256GCM, frames.CHACHA20POLY1305])
def test_seal_into_from_parts_equals_seal_of_the_joined_payload(cipher: int) -> None:
    s = Sealer(cipher, bytes(32), b"\x01" * 16, frames.DIR_I2R)
    parts = [b"abc", np.arange(50_000, dtype=np.float32), b"", b"z"]
    joined = b"".join(memoryview(x).cast("B").tobytes() for x in parts)
    out = bytearray(frames.frame_size(len(joined)))
    assert bytes(s.seal_into(7, parts, out)) == bytes(s.seal(7, joined))


def test_pack_parts_is_pack_without_copying_big_bodies() -> None:
    body = np.arange(100_000, dtype=np.uint8)
    msgs = [(b"h1", b"small"), (b"h2", body), (b"h3", b"tail")]
    parts, n = batch.pack_parts(msgs)
    assert b"".join(memoryview(x).cast("B").tobytes() for x in parts) == batch.pack(msgs)
    assert n == len(batch.pack(msgs)) and any(x is body or getattr(x, "obj", None) is body
                                              for x in parts)


def test_record_reader_takes_records_byte_by_byte_and_refuses_oversized_ones() -> None:
    data = link.record_header(link.FRAME, 3) + b"abc" + link.record_header(link.REFUSE, 1) + b"x"
    r = link.RecordReader(16)
    got = []
    for i in range(len(data)):
        r.feed(data[i:i + 1])
        got += r.records()
    assert got == [(link.FRAME, bytearray(b"abc")), (link.REFUSE, bytearray(b"x"))]
    r.feed(link.record_header(link.FRAME, 17))
    with pytest.raises(ProtocolError):
        r.records()
