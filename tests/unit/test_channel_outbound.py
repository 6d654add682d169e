"""The sending end's core, driven directly: race actions, keys, frames, back-off, state table."""

from __future__ import annotations

from typing import Any

import pytest

from meshd.channel import outbound
from meshd.channel.events import Acked, ChannelEnded, Feedback, NoPathLeft, PathLost, PathOpen
from meshd.channel.events import SendFrame, Writable
from meshd.channel.frames import KIND_DATA, Opener, Sealer
from meshd.channel.handshake import Initiator, Responder
from meshd.channel.inbound import ReceivingEnd, open_first_frame
from meshd.channel.outbound import RETRY_MAX, RETRY_MIN, SendingEnd
from meshd.channel.paths import DIRECT, REVERSED, CancelAttempt, PathKind, StartAttempt
from meshd.channel.reach import ReachabilityTable
from meshd.channel.events import Probe
from meshd.channel.reliable import WouldBlock, decode_control, encode_control
from meshd.errors import LocalError, ProtocolError
from meshd.trust.identity import SiteKey

A = SiteKey(bytes(range(32)))
B = SiteKey(bytes(range(1, 33)))
CID = b"\x05" * 16
T0 = 1000.0


def keys_pair() -> tuple[Any, Any]:
    init = Initiator(A, B.public, CID, now=1_800_000_000.0)
    accept, rkeys = Responder(B).on_hello(init.hello, now=1_800_000_000.0, peers={A.public})
    return init.on_accept(accept), rkeys


def end(kinds: tuple[PathKind, ...] = (PathKind.DIRECT,), table: ReachabilityTable | None = None,
        window: int = 64 << 20, give_up: float | None = 60.0) -> SendingEnd:
    return SendingEnd("frames", A.public, B.public, table or ReachabilityTable(),
                      relays=lambda: [], kinds=kinds,
                      config=outbound.OutboundConfig(window_bytes=window, give_up_s=give_up))


def fail_races_until(s: SendingEnd, now: float, until: float) -> float:
    """Fail every attempt the core starts, and run its retry timer, until ``until`` or until it
    ends; the time reached."""
    while now < until and not s.ended:
        for a in s.outgoing():
            if isinstance(a, StartAttempt):
                s.attempt_failed(a.path, now, "refused: no")
        timer = s.get_timer()
        if timer is None:
            break
        now = max(now, timer)
        s.handle_timer(now)
    return now


def frames_of(actions: list[Any]) -> list[Any]:
    return [a.frame for a in actions if isinstance(a, SendFrame)]


def opened(kinds: tuple[PathKind, ...] = (PathKind.DIRECT,)) -> tuple[SendingEnd, Any]:
    """A sending end whose first attempt succeeded (its first frame left unread); and the
    receiver's keys."""
    s = end(kinds)
    s.start(T0)
    (start,) = s.outgoing()
    assert isinstance(start, StartAttempt)
    ikeys, rkeys = keys_pair()
    assert s.attempt_succeeded(start.path, T0 + 0.01, 0.01, ikeys)
    return s, rkeys


def test_start_asks_for_an_attempt_and_the_first_success_names_the_channel() -> None:
    s = end()
    s.start(T0)
    assert s.outgoing() == [StartAttempt(DIRECT)] and s.state == "negotiating"
    ikeys, rkeys = keys_pair()
    assert s.attempt_succeeded(DIRECT, T0 + 0.02, 0.02, ikeys)
    (first,) = frames_of(s.outgoing())
    assert open_first_frame(rkeys, first)[1] == "frames"  # CTRL_OPEN + name, sealed
    (ev,) = [e for e in s.events() if isinstance(e, PathOpen)]
    assert ev.path == DIRECT and ev.setup_s == pytest.approx(0.02)
    assert s.state == "open" and s.path == DIRECT and s.connected


def test_a_late_success_is_refused_so_the_glue_closes_its_connection() -> None:
    s = end((PathKind.DIRECT, PathKind.REVERSED))
    s.start(T0)
    s.handle_timer(T0 + 1)  # the stagger starts the second path
    started = [a.path for a in s.outgoing() if isinstance(a, StartAttempt)]
    assert started == [DIRECT, REVERSED]
    ikeys, _ = keys_pair()
    assert s.attempt_succeeded(DIRECT, T0 + 1.1, 0.1, ikeys)
    assert CancelAttempt(REVERSED) in s.outgoing()
    assert not s.attempt_succeeded(REVERSED, T0 + 1.2, 0.1, ikeys)


def test_batches_are_sealed_sent_and_acked_in_messages() -> None:
    s, rkeys = opened()
    s.outgoing()
    s.events()
    seq = s.send_batch(b"x" * 100, 3, T0 + 1)
    (frame,) = frames_of(s.outgoing())
    assert Opener.for_channel(rkeys).open(frame).seq == seq
    assert s.messages == 3 and s.bytes == 100
    rx_sealer = Sealer.for_channel(rkeys)
    fb = Feedback(ack=seq + 1, max_seq=100, max_bytes=1 << 20, gap=False)
    s.frame_received(rx_sealer.seal_control(encode_control(fb)), T0 + 2)
    assert Acked(3) in s.events() and s.acked_messages == 3


def test_no_credit_blocks_until_feedback_says_writable() -> None:
    s, rkeys = opened()
    s.send_batch(b"a", 1, T0 + 1)  # the first message is free
    with pytest.raises(WouldBlock):
        s.send_batch(b"b", 1, T0 + 1)
    fb = Feedback(ack=1, max_seq=10, max_bytes=1 << 20, gap=False)
    s.frame_received(Sealer.for_channel(rkeys).seal_control(encode_control(fb)), T0 + 2)
    assert any(isinstance(e, Writable) for e in s.events())
    s.send_batch(b"b", 1, T0 + 2)


def test_a_data_frame_from_the_receiver_or_a_frame_before_keys_is_a_protocol_error() -> None:
    s, rkeys = opened()
    with pytest.raises(ProtocolError):
        s.frame_received(Sealer.for_channel(rkeys).seal(0, b"data"), T0)
    with pytest.raises(ProtocolError):
        end().frame_received(bytearray(64), T0)
    with pytest.raises(LocalError):
        end().send_batch(b"x", 1, T0)


def test_no_path_backs_off_doubling_to_the_maximum_and_resets_once_open() -> None:
    table = ReachabilityTable()
    s = end(table=table)
    s.start(T0)
    now = T0
    waits = []
    for _ in range(8):
        (start,) = [a for a in s.outgoing() if isinstance(a, StartAttempt)]
        s.attempt_failed(start.path, now, "refused: no")
        (ev,) = [e for e in s.events() if isinstance(e, NoPathLeft)]
        assert s.state == "no-path" and "refused" in ev.error
        waits.append(ev.retry_in)
        assert s.get_timer() == pytest.approx(now + ev.retry_in)
        s.handle_timer(now + ev.retry_in - 0.001)  # not yet
        assert s.state == "no-path"
        now += ev.retry_in
        s.handle_timer(now)
        assert s.state == "negotiating"
    assert waits == [RETRY_MIN, 1.0, 2.0, 4.0, 8.0, RETRY_MAX, RETRY_MAX, RETRY_MAX]
    assert s.renegotiations == 8
    (start,) = [a for a in s.outgoing() if isinstance(a, StartAttempt)]
    ikeys, _ = keys_pair()
    s.attempt_succeeded(start.path, now, 0.01, ikeys)
    assert s.state == "open" and s.retry_s == RETRY_MIN


def test_a_lost_connection_races_again_and_resumes_with_the_same_keys() -> None:
    s, rkeys = opened()
    s.send_batch(b"m", 1, T0 + 1)
    s.outgoing()
    s.events()
    s.connection_lost(T0 + 2)
    assert s.state == "negotiating" and not s.connected and PathLost() in s.events()
    assert s.renegotiations == 1
    (start,) = [a for a in s.outgoing() if isinstance(a, StartAttempt)]
    probe = Opener.for_channel(rkeys).open(s.probe_frame())
    assert isinstance(decode_control(probe.payload), Probe)
    fb = Feedback(ack=0, max_seq=10, max_bytes=1 << 20, gap=False)
    assert s.feedback_in(Sealer.for_channel(rkeys).seal_control(encode_control(fb))) == fb
    ikeys, _ = keys_pair()  # ignored on a resume: the channel keeps its first keys
    assert s.attempt_succeeded(start.path, T0 + 3, 0.01, ikeys, fb)
    opener = Opener.for_channel(rkeys)
    sent = [opener.open(f) for f in frames_of(s.outgoing())]
    assert [(f.seq, bytes(f.payload)) for f in sent if f.kind == KIND_DATA] == [(0, b"m")]
    assert s.state == "open"


def test_close_sends_the_last_frame_once_and_stops_every_timer() -> None:
    s, rkeys = opened()
    (first,) = frames_of(s.outgoing())
    s.close()
    (last,) = frames_of(s.outgoing())
    opener, name = open_first_frame(rkeys, first)
    rx = ReceivingEnd(rkeys, opener, name)
    rx.frame_received(last)
    assert rx.closed_by_sender
    assert s.state == "closed" and s.get_timer() is None and ChannelEnded("closed") in s.events()
    s.close()
    s.connection_lost(T0 + 5)
    assert s.outgoing() == [] and s.state == "closed" and s.renegotiations == 0


@pytest.mark.parametrize("state, what, after", [
    ("negotiating", "path-chosen", "open"),
    ("negotiating", "no-path", "no-path"),
    ("open", "connection-lost", "negotiating"),
    ("no-path", "retry", "negotiating"),
    ("open", "fail", "failed"),
    ("failed", "close", "closed"),
    ("no-path", "close", "closed"),
    ("open", "path-chosen", "open"),          # not in the table: unchanged
    ("negotiating", "connection-lost", "negotiating"),
    ("closed", "retry", "closed"),
    ("closed", "fail", "closed"),
    ("no-path", "give-up", "failed"),
    ("negotiating", "give-up", "negotiating"),
])
def test_the_state_table(state: str, what: str, after: str) -> None:
    s = end()
    s.state = state
    s._go(what)
    assert s.state == after


def test_fail_keeps_the_reason_and_close_still_works() -> None:
    s, _ = opened()
    s.fail("internal error: boom")
    assert s.state == "failed" and s.error == "internal error: boom"
    s.close()
    assert s.state == "closed"


def test_a_channel_without_a_connection_for_the_give_up_time_fails_with_no_path() -> None:
    """Bug: with no path, a channel retried for ever and its application heard nothing."""
    s = end(give_up=60.0)
    s.start(T0)
    now = fail_races_until(s, T0, T0 + 59.0)
    assert s.state in ("no-path", "negotiating") and s.end_reason is None
    fail_races_until(s, now, T0 + 200.0)
    assert s.state == "failed" and s.end_reason == "no-path" and s.ended
    assert s.error is not None and s.error.startswith("no path for 6")  # 60-70 s, each race a step
    assert "refused: no" in s.error
    (ended,) = [e for e in s.events() if isinstance(e, ChannelEnded)]
    assert ended.reason == "no-path" and s.get_timer() is None
    s.close()  # the application closes it: no last frame, no second event
    assert s.state == "closed" and frames_of(s.outgoing()) == [] and s.events() == []


def test_the_give_up_clock_starts_when_the_connection_is_lost_not_when_the_channel_opened() -> None:
    s, _ = opened()
    s.outgoing()
    s.connection_lost(T0 + 1000.0)
    fail_races_until(s, T0 + 1000.0, T0 + 1055.0)
    assert not s.ended
    fail_races_until(s, T0 + 1055.0, T0 + 1200.0)
    assert s.end_reason == "no-path"


def test_without_a_give_up_time_a_channel_retries_for_ever() -> None:
    s = end(give_up=None)
    s.start(T0)
    fail_races_until(s, T0, T0 + 10_000.0)
    assert not s.ended and s.state in ("no-path", "negotiating")


def test_a_cut_channel_fails_at_once_without_a_last_frame_and_cancels_its_attempts() -> None:
    s = end((PathKind.DIRECT, PathKind.REVERSED))
    s.start(T0)
    s.handle_timer(T0 + 1)
    assert len([a for a in s.outgoing() if isinstance(a, StartAttempt)]) == 2
    s.cut("revoked", "the receiver was revoked")
    out = s.outgoing()
    assert {a.path for a in out if isinstance(a, CancelAttempt)} == {DIRECT, REVERSED}
    assert frames_of(out) == []
    assert s.state == "failed" and s.end_reason == "revoked" and s.get_timer() is None
    assert ChannelEnded("revoked", "the receiver was revoked") in s.events()
    ikeys, _ = keys_pair()
    assert not s.attempt_succeeded(DIRECT, T0 + 2, 0.01, ikeys)  # too late: refused


def test_an_open_channel_cut_sends_nothing_more() -> None:
    s, _ = opened()
    s.outgoing()
    s.cut("revoked", "gone")
    with pytest.raises(LocalError):
        s.send_batch(b"x", 1, T0 + 2)
    assert frames_of(s.outgoing()) == [] and not s.connected
