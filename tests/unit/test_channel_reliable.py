"""Reliable delivery: direct handler tests, then an in-memory network with a seeded chaos router."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.channel import frames
from meshd.channel.events import AllAcked, Feedback, Message, Probe, Transmit, Writable
from meshd.channel.reliable import (
    Receiver,
    ReceiverConfig,
    Sender,
    SenderConfig,
    WouldBlock,
    decode_control,
    encode_control,
)
from meshd.channel.handshake import ChannelKeys, Initiator, Responder
from meshd.errors import LocalError, ProtocolError
from meshd.trust.identity import SiteKey

_T = TypeVar("_T")
SCFG = SenderConfig(max_buffer_bytes=4000, max_message_bytes=1000, rto=1.0, max_rto=8.0)
RCFG = ReceiverConfig(window_messages=4, window_bytes=2000)


def connected(scfg: SenderConfig = SCFG,
              rcfg: ReceiverConfig = RCFG) -> tuple[Sender, Receiver]:
    s, r = Sender(scfg), Receiver(rcfg)
    fb = r.take_feedback()
    assert fb is not None
    s.on_feedback(fb, now=0)
    return s, r


def transmits(s: Sender) -> list[Transmit]:
    return [m for m in s.take_outgoing() if isinstance(m, Transmit)]


# -- direct handler tests -----------------------------------------------------------------------

def test_no_credit_before_the_first_feedback() -> None:
    s = Sender(SCFG)
    with pytest.raises(WouldBlock) as e:
        s.send(b"x", now=0)
    assert e.value.reason == "no-credit"
    assert s.get_timer() == 1.0  # it will probe
    s.handle_timer(1.0)
    assert s.take_outgoing() == [Probe()]
    s.on_feedback(Feedback(0, 4, 2000, False), now=1.5)
    assert s.events() == [Writable()]
    assert s.send(b"x", now=1.5) == 0


def test_in_order_delivery_and_acks_free_the_buffer() -> None:
    s, r = connected()
    for i in range(3):
        s.send(bytes([i]) * 100, now=0)
    assert s.buffered_bytes == 300 and not s.all_acked
    for t in transmits(s):
        r.on_data(t.seq, t.frame)
    assert [m.seq for m in iter(r.pop, None)] == [0, 1, 2]
    fb = r.take_feedback()
    assert fb is not None and fb.ack == 3
    s.on_feedback(fb, now=0.1)
    assert s.buffered_bytes == 0 and s.all_acked
    assert AllAcked(3) in s.events()
    assert s.get_timer() is None


def test_duplicates_are_dropped_and_reacked() -> None:
    s, r = connected()
    s.send(b"a", now=0)
    (t,) = transmits(s)
    r.on_data(t.seq, t.frame)
    r.take_feedback()
    r.on_data(t.seq, t.frame)
    assert r.duplicates == 1 and r.pop() == Message(0, b"a") and r.pop() is None
    fb = r.take_feedback()
    assert fb is not None and fb.ack == 1


def test_out_of_order_is_buffered_and_asks_for_a_fast_resend() -> None:
    s, r = connected()
    for i in range(3):
        s.send(bytes([i]), now=0)
    t0, t1, t2 = transmits(s)
    r.on_data(t2.seq, t2.frame)
    r.on_data(t1.seq, t1.frame)
    assert r.pop() is None and r.held_messages == 2
    fb = r.take_feedback()
    assert fb == Feedback(0, 4, 2000, True)
    s.on_feedback(fb, now=0.1)
    assert s.take_outgoing() == [Transmit(0, t0.frame, True)]
    s.on_feedback(fb, now=0.2)  # the same gap again: resent once only
    assert s.take_outgoing() == []
    r.on_data(t0.seq, t0.frame)
    assert [m.payload for m in iter(r.pop, None)] == [b"\x00", b"\x01", b"\x02"]


def test_the_first_message_may_go_before_any_feedback_and_the_receiver_takes_it() -> None:
    import dataclasses
    s = Sender(dataclasses.replace(SCFG, first_message_free=True))
    r = Receiver(RCFG)  # window_bytes (2000) >= max_message_bytes (1000): the invariant
    assert s.send(b"y" * 1000, now=0) == 0      # one largest message, no credit granted yet
    with pytest.raises(WouldBlock) as e:
        s.send(b"x", now=0)
    assert e.value.reason == "no-credit"
    [t] = transmits(s)
    r.on_data(t.seq, b"y" * 1000)               # within the receiver's credit: accepted
    assert r.pop() is not None and r.take_feedback() is not None


def test_sender_never_exceeds_credit_in_messages_or_bytes() -> None:
    s, _ = connected()
    for _ in range(4):
        s.send(b"x", now=0)
    with pytest.raises(WouldBlock) as e:
        s.send(b"x", now=0)
    assert e.value.reason == "no-credit"
    s2, _ = connected()
    s2.send(bytes(1000), now=0)
    s2.send(bytes(1000), now=0)
    assert not s2.can_send(1)


def test_buffer_bound_blocks_send() -> None:
    cfg = SenderConfig(max_buffer_bytes=1500, max_message_bytes=1000)
    s, _ = connected(cfg, ReceiverConfig(window_messages=100, window_bytes=10_000))
    s.send(bytes(1000), now=0)
    with pytest.raises(WouldBlock) as e:
        s.send(bytes(600), now=0)
    assert e.value.reason == "buffer-full"
    s.send(bytes(500), now=0)
    assert s.buffered_bytes == 1500


def test_receiver_refuses_frames_beyond_its_credit() -> None:
    r = Receiver(RCFG)
    with pytest.raises(ProtocolError) as e:
        r.on_data(1, b"x")  # no credit granted yet beyond the free first message
    assert e.value.reason == "credit-exceeded"
    r.take_feedback()
    with pytest.raises(ProtocolError) as e:
        r.on_data(4, b"x")
    assert e.value.reason == "credit-exceeded"
    r.on_data(1, bytes(1500))
    with pytest.raises(ProtocolError) as e:
        r.on_data(2, bytes(501))
    assert e.value.reason == "credit-exceeded"
    assert r.held_bytes == 1500


def test_ack_of_unsent_seq_is_a_protocol_error() -> None:
    s, _ = connected()
    with pytest.raises(ProtocolError) as e:
        s.on_feedback(Feedback(1, 4, 2000, False), now=0)
    assert e.value.reason == "ack-unsent"


def test_stale_feedback_is_ignored() -> None:
    s, _ = connected()
    s.send(b"a", now=0)
    s.on_feedback(Feedback(1, 10, 5000, False), now=0)
    s.on_feedback(Feedback(0, 4, 2000, False), now=0)  # older, reordered
    assert s.all_acked and s.can_send(3000)


def test_reconnect_resends_from_the_first_unacked() -> None:
    s, r = connected()
    for i in range(4):
        s.send(bytes([i]), now=0)
    sent = transmits(s)
    r.on_data(0, sent[0].frame)
    r.on_data(1, sent[1].frame)
    fb = r.take_feedback()
    assert fb is not None
    s.on_feedback(fb, now=0.1)
    s.on_reconnect(now=5)
    out = s.take_outgoing()
    assert [(m.seq, m.resend) for m in out if isinstance(m, Transmit)] == [(2, True), (3, True)]
    assert out[-1] == Probe()
    assert [t.frame for t in out[:2] if isinstance(t, Transmit)] == [sent[2].frame,
                                                                     sent[3].frame]


def test_retransmit_timer_backs_off_and_resets_on_progress() -> None:
    s, _ = connected()
    s.send(b"a", now=0)
    transmits(s)
    assert s.get_timer() == 1.0
    s.handle_timer(0.5)
    assert s.take_outgoing() == []
    s.handle_timer(1.0)
    assert [m.seq for m in transmits(s)] == [0]
    assert s.get_timer() == 3.0
    s.handle_timer(3.0)
    s.handle_timer(7.0)
    s.handle_timer(15.0)
    assert s.get_timer() == 23.0  # capped at max_rto 8
    s.on_feedback(Feedback(1, 5, 2000, False), now=16)
    assert s.get_timer() is None


def test_control_codec() -> None:
    for msg in (Probe(), Feedback(0, 0, 0, False), Feedback(3, 2**64 - 1, 2**64 - 1, True)):
        assert decode_control(encode_control(msg)) == msg
    good = encode_control(Feedback(1, 2, 3, True))
    for bad in (b"", b"\x03", good[:-1], good + b"\x00", b"\x01\x02" + good[2:],
                encode_control(Feedback(5, 2, 3, False))):
        with pytest.raises(ProtocolError):
            decode_control(bad)


def test_config_is_checked() -> None:
    with pytest.raises(LocalError):
        SenderConfig(max_buffer_bytes=10, max_message_bytes=100)
    with pytest.raises(LocalError):
        Sender(SenderConfig(max_buffer_bytes=100, max_message_bytes=100), overhead=48)
    with pytest.raises(LocalError):
        ReceiverConfig(window_messages=0)
    s, _ = connected()
    with pytest.raises(LocalError) as e:
        s.send(bytes(1001), now=0)
    assert e.value.reason == "too-large"


# -- the in-memory network with a chaos router --------------------------------------------------

@dataclass
class Chaos:
    drop: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    disconnect: float = 0.0
    stall: float = 0.0
    """Chance per step that the application does not read."""


@dataclass
class Net:
    """A sender and a receiver core joined by a chaos router; optionally through real frames."""

    seed: int
    chaos: Chaos
    sealed: bool = False
    scfg: SenderConfig = SCFG
    rcfg: ReceiverConfig = RCFG
    now: float = 0.0
    to_rx: list[tuple[str, bytes | bytearray]] = field(default_factory=list)
    to_tx: list[bytes | bytearray] = field(default_factory=list)
    delivered: list[Message] = field(default_factory=list)
    max_buffered: int = 0
    max_held: int = 0

    keys: tuple[ChannelKeys, ChannelKeys] | None = None
    """(initiator's, responder's) keys from a real handshake; default: fixed test keys."""

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        if self.keys is None:
            key_f, key_b, ch = b"f" * 32, b"b" * 32, b"c" * 16
            self.seal_f = frames.Sealer(frames.AES256GCM, key_f, ch, frames.DIR_I2R)
            self.open_f = frames.Opener(frames.AES256GCM, key_f, ch, frames.DIR_I2R)
            self.seal_b = frames.Sealer(frames.AES256GCM, key_b, ch, frames.DIR_R2I)
            self.open_b = frames.Opener(frames.AES256GCM, key_b, ch, frames.DIR_R2I)
        else:
            ik, rk = self.keys
            self.seal_f, self.open_f = frames.Sealer.for_channel(ik), frames.Opener.for_channel(rk)
            self.seal_b, self.open_b = frames.Sealer.for_channel(rk), frames.Opener.for_channel(ik)
        if self.sealed:
            self.tx = Sender(self.scfg, seal=self.seal_f.seal, overhead=frames.FRAME_OVERHEAD)
        else:
            self.tx = Sender(self.scfg)
        self.rx = Receiver(self.rcfg)

    # the owner's glue: drain cores into the wire
    def pump(self) -> None:
        for m in self.tx.take_outgoing():
            if isinstance(m, Transmit):
                self.to_rx.append(("data", m.frame))
            else:
                ctl = encode_control(m)
                self.to_rx.append(("ctl", self.seal_f.seal_control(ctl) if self.sealed else ctl))
        fb = self.rx.take_feedback()
        if fb is not None:
            ctl = encode_control(fb)
            self.to_tx.append(self.seal_b.seal_control(ctl) if self.sealed else ctl)
        self.max_buffered = max(self.max_buffered, self.tx.buffered_bytes)
        self.max_held = max(self.max_held, self.rx.held_bytes)
        assert self.tx.buffered_bytes <= self.scfg.max_buffer_bytes
        assert self.rx.held_bytes <= self.rcfg.window_bytes
        assert self.rx.held_messages <= self.rcfg.window_messages

    def _take(self, queue: list[_T]) -> _T | None:
        """The router: which packet arrives next (or None: it was dropped)."""
        c = self.chaos
        i = self.rng.randrange(len(queue)) if self.rng.random() < c.reorder else 0
        pkt = queue[i] if self.rng.random() < c.dup else queue.pop(i)
        return None if self.rng.random() < c.drop else pkt

    def deliver_to_rx(self) -> None:
        pkt = self._take(self.to_rx)
        if pkt is None:
            return
        kind, data = pkt
        if kind == "data":
            if self.sealed:
                f = self.open_f.open(data)
                self.rx.on_data(f.seq, f.payload)
            else:
                # unsealed test mode: the payload carries its seq in its first 8 bytes
                self.rx.on_data(int.from_bytes(data[:8], "big"), data)
            return
        if self.sealed:
            try:
                data = self.open_f.open(data).payload
            except ProtocolError as e:  # an older control frame after a newer one
                assert e.reason == "replay"
                return
        assert isinstance(decode_control(data), Probe)
        self.rx.on_probe()

    def deliver_to_tx(self) -> None:
        data = self._take(self.to_tx)
        if data is None:
            return
        if self.sealed:
            try:
                data = self.open_b.open(data).payload
            except ProtocolError as e:
                assert e.reason == "replay"
                return
        fb = decode_control(data)
        assert isinstance(fb, Feedback)
        self.tx.on_feedback(fb, now=self.now)

    def run(self, payloads: list[bytes], max_steps: int = 60_000) -> int:
        """Send every payload; return the steps taken.  Fails if not done within max_steps."""
        pending = list(payloads)
        c = self.chaos
        for step in range(max_steps):
            self.pump()
            if not pending and len(self.delivered) == len(payloads) and self.tx.all_acked:
                return step
            roll = self.rng.random()
            if roll < c.disconnect:
                self.to_rx.clear()
                self.to_tx.clear()
                self.tx.on_reconnect(now=self.now)
                self.rx.on_reconnect()
            elif roll < 0.25 and pending:
                try:
                    self.tx.send(pending[0], now=self.now)
                    pending.pop(0)
                except WouldBlock:
                    pass
                self.tx.events()
            elif roll < 0.4 and self.rng.random() >= c.stall:
                msg = self.rx.pop()
                if msg is not None:
                    self.delivered.append(msg)
            elif roll < 0.7 and self.to_rx:
                self.deliver_to_rx()
            elif roll < 0.95 and self.to_tx:
                self.deliver_to_tx()
            else:
                self.now += 0.1
                timer = self.tx.get_timer()
                if not self.to_rx and not self.to_tx and timer is not None:
                    self.now = max(self.now, timer)  # nothing in flight: jump to the timer
                self.tx.handle_timer(self.now)
        raise AssertionError(f"not done in {max_steps} steps: {len(self.delivered)}"
                             f"/{len(payloads)} delivered, {len(pending)} unsent")


def make_payloads(rng: random.Random, n: int, max_size: int = 1000) -> list[bytes]:
    """Distinct payloads starting with their index (the unsealed mode reads the seq there)."""
    return [i.to_bytes(8, "big") + rng.randbytes(rng.randrange(0, max_size - 8))
            for i in range(n)]


def check_exactly_once_in_order(net: Net, payloads: list[bytes]) -> None:
    assert [m.seq for m in net.delivered] == list(range(len(payloads)))
    assert [bytes(m.payload) for m in net.delivered] == payloads
    assert net.tx.buffered_bytes == 0 and net.rx.held_bytes == 0


def test_clean_network_delivers_everything() -> None:
    net = Net(1, Chaos())
    payloads = make_payloads(random.Random(1), 200)
    net.run(payloads)
    check_exactly_once_in_order(net, payloads)
    assert net.rx.duplicates == 0


@pytest.mark.parametrize("sealed", [False, True])
def test_terrible_network_delivers_exactly_once_in_order(sealed: bool) -> None:
    chaos = Chaos(drop=0.2, dup=0.2, reorder=0.3, disconnect=0.01, stall=0.3)
    net = Net(7, chaos, sealed=sealed)
    payloads = make_payloads(random.Random(7), 150)
    net.run(payloads)
    check_exactly_once_in_order(net, payloads)
    assert net.rx.duplicates > 0


@given(seed=st.integers(0, 2**32), n=st.integers(1, 60),
       drop=st.sampled_from([0.0, 0.05, 0.3]), dup=st.sampled_from([0.0, 0.1, 0.4]),
       reorder=st.sampled_from([0.0, 0.2, 0.8]), disconnect=st.sampled_from([0.0, 0.005, 0.05]),
       stall=st.sampled_from([0.0, 0.5, 0.9]), sealed=st.booleans())
@settings(max_examples=200, deadline=None)
def test_chaos_property(seed: int, n: int, drop: float, dup: float, reorder: float,
                        disconnect: float, stall: float, sealed: bool) -> None:
    net = Net(seed, Chaos(drop, dup, reorder, disconnect, stall), sealed=sealed)
    payloads = make_payloads(random.Random(seed), n)
    net.run(payloads)
    check_exactly_once_in_order(net, payloads)
    assert net.max_buffered <= SCFG.max_buffer_bytes
    assert net.max_held <= RCFG.window_bytes


def test_stalled_receiver_stops_the_sender_and_memory_stays_bounded() -> None:
    net = Net(3, Chaos(drop=0.1, dup=0.1, reorder=0.2), sealed=True)
    payloads = make_payloads(random.Random(3), 100)
    sent = 0
    for _ in range(3000):  # the application never reads
        net.pump()
        roll = net.rng.random()
        if roll < 0.3 and sent < len(payloads):
            try:
                net.tx.send(payloads[sent], now=net.now)
                sent += 1
            except WouldBlock as e:
                assert e.reason in ("no-credit", "buffer-full")
        elif roll < 0.6 and net.to_rx:
            net.deliver_to_rx()
        elif roll < 0.9 and net.to_tx:
            net.deliver_to_tx()
        else:
            net.now += 1.0
            net.tx.handle_timer(net.now)
    assert sent <= RCFG.window_messages  # credit stopped it
    assert net.rx.held_messages <= RCFG.window_messages
    assert net.rx.held_bytes <= RCFG.window_bytes
    assert net.tx.buffered_bytes <= SCFG.max_buffer_bytes
    assert not net.tx.can_send(len(payloads[sent]))  # blocked by credit, not by choice
    assert net.tx.get_timer() is not None  # still probing, with backoff
    # The application wakes up: everything flows, exactly once.
    assert net.delivered == []
    assert _finish(net, payloads[sent:], len(payloads))
    check_exactly_once_in_order(net, payloads)


def _finish(net: Net, remaining: list[bytes], total: int) -> bool:
    for _ in range(50_000):
        net.pump()
        if not remaining and len(net.delivered) == total and net.tx.all_acked:
            return True
        if remaining and net.tx.can_send(len(remaining[0])):
            net.tx.send(remaining.pop(0), now=net.now)
        msg = net.rx.pop()
        if msg is not None:
            net.delivered.append(msg)
        if net.to_rx:
            net.deliver_to_rx()
        if net.to_tx:
            net.deliver_to_tx()
        if not net.to_rx and not net.to_tx:
            timer = net.tx.get_timer()
            if timer is not None:
                net.now = max(net.now, timer)
                net.tx.handle_timer(net.now)
    return False


def test_flush_notion_all_acked_event() -> None:
    net = Net(5, Chaos(drop=0.2))
    payloads = make_payloads(random.Random(5), 20)
    seen_all_acked = False
    remaining = list(payloads)
    for _ in range(20_000):
        net.pump()
        for ev in net.tx.events():
            if isinstance(ev, AllAcked) and not remaining and ev.next_seq == 20:
                seen_all_acked = True
        if seen_all_acked:
            break
        if remaining and net.tx.can_send(len(remaining[0])):
            net.tx.send(remaining.pop(0), now=net.now)
        msg = net.rx.pop()
        if msg is not None:
            net.delivered.append(msg)
        if net.to_rx:
            net.deliver_to_rx()
        elif net.to_tx:
            net.deliver_to_tx()
        else:
            net.now += 1
            net.tx.handle_timer(net.now)
    assert seen_all_acked and net.tx.all_acked and net.tx.buffered_bytes == 0


@pytest.mark.parametrize("cipher", [frames.AES256GCM, frames.CHACHA20POLY1305])
def test_whole_stack_over_a_terrible_relay(cipher: int) -> None:
    """Handshake through the relay, then sealed, reliable traffic through the same relay."""
    a, b = SiteKey(b"a" * 32), SiteKey(b"b" * 32)
    prefs = (cipher,) + tuple(c for c in (frames.AES256GCM, frames.CHACHA20POLY1305)
                              if c != cipher)
    init = Initiator(a, b.public, b"\x42" * 16, now=100.0, ciphers=prefs)
    accept, rkeys = Responder(b, ciphers=prefs).on_hello(init.hello, now=100.5,
                                                         peers={a.public})
    ikeys = init.on_accept(accept)
    assert ikeys.cipher == rkeys.cipher == cipher
    net = Net(11, Chaos(drop=0.15, dup=0.15, reorder=0.3, disconnect=0.01, stall=0.2),
              sealed=True, keys=(ikeys, rkeys))
    payloads = make_payloads(random.Random(11), 120)
    net.run(payloads)
    check_exactly_once_in_order(net, payloads)
