"""The receiving end's core, driven directly: the first frame, delivery, feedback, close."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from meshd.channel import batch
from meshd.channel.control import CLOSE_PAYLOAD, open_payload
from meshd.channel.events import Feedback, Probe
from meshd.channel.frames import Opener, Sealer
from meshd.channel.handshake import Initiator, Responder
from meshd.channel.inbound import InGrant, ReceivingEnd, open_first_frame
from meshd.channel.reliable import ReceiverConfig, decode_control, encode_control
from meshd.channel.stream import LEASE
from meshd.errors import LocalError, ProtocolError
from meshd.trust.identity import SiteKey

A = SiteKey(bytes(range(32)))
B = SiteKey(bytes(range(1, 33)))
CID = b"\x09" * 16


def keys() -> tuple[Any, Any]:
    init = Initiator(A, B.public, CID, now=1_800_000_000.0)
    accept, rkeys = Responder(B).on_hello(init.hello, now=1_800_000_000.0, peers={A.public})
    return init.on_accept(accept), rkeys


def opened(window: int = 16) -> tuple[ReceivingEnd, Sealer, Opener]:
    """A receiving end after a good first frame; the sender's sealer and opener."""
    ikeys, rkeys = keys()
    tx = Sealer.for_channel(ikeys)
    opener, name = open_first_frame(rkeys, tx.seal_control(open_payload("frames")))
    end = ReceivingEnd(rkeys, opener, name, ReceiverConfig(window_messages=window))
    end.connection_adopted()
    return end, tx, Opener.for_channel(ikeys)


def test_the_first_frame_names_the_channel() -> None:
    end, _, _ = opened()
    assert end.name == "frames" and end.cid == CID and end.sender == A.public
    assert end.state == "open" and end.take_flush()  # credit is due at once


@pytest.mark.parametrize("payload", [b"", bytes([0x11]), bytes([0x10]), bytes([0x10]) + b"\x00bad",
                                     bytes([0x10]) + b"\xff\xfe", encode_control(Probe())])
def test_a_bad_first_frame_is_refused(payload: bytes) -> None:
    ikeys, rkeys = keys()
    with pytest.raises(ProtocolError):
        open_first_frame(rkeys, Sealer.for_channel(ikeys).seal_control(payload))


def test_a_first_frame_under_other_keys_or_a_data_frame_is_refused() -> None:
    ikeys, rkeys = keys()
    other, _ = keys()  # another handshake: other keys
    with pytest.raises(ProtocolError):
        open_first_frame(rkeys, Sealer.for_channel(other).seal_control(open_payload("x")))
    with pytest.raises(ProtocolError):
        open_first_frame(rkeys, Sealer.for_channel(ikeys).seal(0, open_payload("x")))


def test_batches_are_delivered_in_order_with_message_numbers_and_feedback_once() -> None:
    end, tx, rx_of_sender = opened()
    end.take_flush()
    end.take_feedback()
    payloads = [batch.pack([(b"h", b"x")] * n) for n in (2, 3)]
    end.frame_received(tx.seal(1, payloads[1]))  # out of order: held
    assert end.take_flush() and end.pop() is None
    end.frame_received(tx.seal(0, payloads[0]))
    assert not end.take_flush()  # one flush covers both frames
    first, second = end.pop(), end.pop()
    assert first is not None and second is not None and end.pop() is None
    assert (first.count, first.first, second.count, second.first) == (2, 0, 3, 2)
    assert end.messages == 5 and end.bytes == sum(map(len, payloads))
    fb = decode_control(rx_of_sender.open(end.take_feedback()).payload)
    assert isinstance(fb, Feedback) and fb.ack == 2
    assert not end.take_flush()  # the deliveries rode on the flush already due
    end.frame_received(tx.seal_control(encode_control(Probe())))
    assert end.take_flush() and not end.take_flush()  # after a flush, the next input asks again


def test_no_feedback_while_disconnected_and_fresh_feedback_after() -> None:
    end, tx, _ = opened()
    end.connection_lost()
    assert end.state == "waiting"
    end.frame_received(tx.seal(0, batch.pack([(b"h", b"x")])))
    assert end.take_feedback() is None
    end.connection_adopted()
    assert end.take_feedback() is not None


def test_close_by_the_sender_finishes_once_everything_is_delivered() -> None:
    end, tx, _ = opened()
    end.frame_received(tx.seal(0, batch.pack([(b"h", b"x")])))
    end.frame_received(tx.seal_control(CLOSE_PAYLOAD))
    assert end.state == "closed" and not end.finished
    assert end.pop() is not None
    assert end.finished


def test_a_tampered_frame_is_a_protocol_error_and_changes_nothing() -> None:
    end, tx, _ = opened()
    frame = bytearray(tx.seal(0, b"abcd"))
    frame[-1] ^= 1
    with pytest.raises(ProtocolError):
        end.frame_received(frame)
    assert end.pop() is None and end.counters()["held_messages"] == 0


def _handed_after_two_messages() -> tuple[ReceivingEnd, InGrant]:
    """A daemon's end that delivered two messages, handed over, and the application's state."""
    end, tx, _ = opened()
    end.take_feedback()  # the credit
    for seq in (0, 1):
        end.frame_received(tx.seal(seq, batch.pack([(b"h", b"x")])))
        assert end.pop() is not None
    end.take_feedback()
    return end, end.hand_over()


def _lies(g: InGrant) -> list[InGrant]:
    nxt, pc, pb, adv_seq, adv_bytes = g.rx
    return [replace(g, rx=(0, 0, 0, 0, 0), messages=0, nbytes=0),   # delivered, undelivered
            replace(g, rx=(nxt - 1, pc - 1, pb, adv_seq, adv_bytes)),
            replace(g, rx=(nxt, pc, pb - 1, adv_seq, adv_bytes)),
            replace(g, nbytes=g.nbytes - 1),
            replace(g, rx=(nxt, pc, 2 ** 64 - 1, adv_seq, adv_bytes)),  # Feedback overflows
            replace(g, rx=(nxt, pc, pb, adv_seq, 2 ** 63)),
            replace(g, messages=2 ** 63), replace(g, ctl_open=2 ** 64 - 1),
            replace(g, rx=(nxt, nxt + 1, pb, adv_seq, adv_bytes)),
            replace(g, rx=(nxt, pc, pb, -1, adv_bytes))]


def test_a_state_given_back_that_goes_back_or_overflows_is_refused_and_changes_nothing() -> None:
    for lie in _lies(_handed_after_two_messages()[1]):
        end, honest = _handed_after_two_messages()
        with pytest.raises(LocalError):
            end.taken_back(lie)
        assert end.give_back() == replace(honest, ctl_seal=honest.ctl_seal + LEASE), lie
    end, honest = _handed_after_two_messages()
    end.taken_back(honest)  # the same state (nothing happened meanwhile) is taken
    fb = end.rx.take_feedback()
    assert isinstance(fb, Feedback) and fb.ack == 2


def test_a_later_honest_state_is_taken() -> None:
    end, g = _handed_after_two_messages()
    app = ReceivingEnd.for_application(g, ReceiverConfig(window_messages=16))
    end.taken_back(app.give_back())
    assert end.messages == 2 and end.rx.next_seq == 2


def test_a_restarted_daemon_takes_on_the_applications_end_and_seals_beyond_its_lease() -> None:
    """``ReceivingEnd.adopted``: the end a daemon that restarted runs for a channel its
    application holds.  It goes on from the application's state, opens the sender's frames and
    seals its own Feedback a whole lease beyond the application's (the daemon before it may
    have sealed up to there), so that no control seq is sealed twice."""
    old_daemon, tx, sender_opener = opened()
    old_daemon.take_feedback()  # the credit
    app = ReceivingEnd.for_application(old_daemon.hand_over(), ReceiverConfig(window_messages=16))
    app.connection_adopted()
    for seq in (0, 1):
        app.frame_received(tx.seal(seq, batch.pack([(b"h", b"x")])))
        assert app.pop() is not None
    app_fb = app.take_feedback()  # the application seals within its lease
    assert app_fb is not None and app.ctl_end is not None
    state = app.give_back()
    daemon = ReceivingEnd.adopted(state, app.ctl_end, ReceiverConfig(window_messages=16))
    assert not daemon.connected and daemon.messages == 2 and daemon.rx.next_seq == 2
    assert daemon.give_back() == replace(state, ctl_seal=app.ctl_end + LEASE)
    app.frame_received(tx.seal(2, batch.pack([(b"h", b"y")])))  # the app goes on meanwhile
    assert app.pop() is not None
    daemon.taken_back(app.give_back())  # then gives the channel back: the daemon resumes
    assert daemon.messages == 3
    daemon.connection_adopted()
    fb = daemon.take_feedback()
    assert fb is not None
    first, resumed = (sender_opener.open(f) for f in (app_fb, fb))
    assert first.seq < app.ctl_end and resumed.seq == app.ctl_end + LEASE
    got = decode_control(resumed.payload)
    assert isinstance(got, Feedback) and got.ack == 3 and got.max_seq == 3 + 16


@pytest.mark.parametrize("lie", [
    lambda g, end: (replace(g, messages=2 ** 63), end),
    lambda g, end: (replace(g, ctl_open=2 ** 63), end),
    lambda g, end: (g, g.ctl_seal - 1),                 # the lease ends before its next seq
    lambda g, end: (g, g.ctl_seal + LEASE + 1),         # a lease longer than one
    lambda g, end: (g, 2 ** 63),
    lambda g, end: (replace(g, send_key=b"short"), end),
    lambda g, end: (replace(g, cipher=99), end),
    lambda g, end: (replace(g, rx=(1, 2, 0, 0, 0)), end),  # popped beyond next
])
def test_a_state_a_channel_cannot_have_is_not_taken_on(lie: Any) -> None:
    _, g = _handed_after_two_messages()
    app = ReceivingEnd.for_application(g, ReceiverConfig())
    assert app.ctl_end is not None
    state, ctl_end = lie(app.give_back(), app.ctl_end)
    with pytest.raises(LocalError):
        ReceivingEnd.adopted(state, ctl_end, ReceiverConfig())
