"""Attacks on the receiving hand-over of real daemons: a hostile local process on the daemon's
``handover.sock`` (same uid: it may open a receiver and take its channels, but whatever it
sends, the daemon refuses it with a log line, keeps running, keeps the other channels and never
logs a traceback), and a hostile member feeding a receiving application bad records.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any


import meshd
from meshd.app import in_link
from meshd.channel import link
from meshd.local.handover import MessageReader, pack
from meshd.testing.processes import wait_until
from tests.helpers import Site, channel_works, closed_by_peer, mesh_of
from tests.system.test_channel_handover import _drain, _send
from tests.system.test_channel_handover_in import streaming


def _rows(site: Site) -> list[dict[str, Any]]:
    return [c for c in site.client.channels() if c["direction"] == "in"]


class HostileLease:
    """A same-uid process that opened a receiver and holds its hand-over lease, speaking the
    lease protocol by hand."""

    def __init__(self, site: Site, name: str, token: str | None = None) -> None:
        info = site.client.open_receiver(name, handover=True)
        self.path, self.token = info["handover"], info["port"]
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(self.path)
        self.reader = MessageReader()
        self.fds: list[int] = []
        self.msgs: list[dict[str, Any]] = []
        self.send({"t": "receive", "port": self.token if token is None else token})

    def send(self, msg: dict[str, Any]) -> None:
        self.sock.sendall(pack(msg))

    def next(self, t: str) -> dict[str, Any]:
        """The next message of type ``t`` from the daemon (others are kept)."""
        while True:
            for m in self.msgs:
                if m["t"] == t:
                    self.msgs.remove(m)
                    return m
            data, fds, _, _ = socket.recv_fds(self.sock, 1 << 16, 4)
            assert data, "the daemon closed the lease"
            self.fds += fds
            self.msgs += self.reader.feed(data)

    def close(self) -> None:
        self.sock.close()
        for fd in self.fds:
            os.close(fd)


def _refused(path: str, raw: bytes) -> dict[str, Any] | None:
    """Send ``raw`` on a new hand-over connection: the daemon's answer (None: it just closed)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(path)
        s.sendall(raw)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except OSError:
            pass
    msgs = MessageReader().feed(data) if data else []
    return msgs[0] if msgs else None


def test_hostile_messages_on_the_hand_over_socket_are_refused(sites: Any) -> None:
    a, b = mesh_of(sites, "aps", "alcf")
    lease = HostileLease(b, "good")
    path, token = lease.path, lease.token
    for bad in ["", "00" * 16, "x" * 60_000, "é" * 16, "\0" * 32]:
        answer = _refused(path, pack({"t": "receive", "port": bad}))
        assert answer is not None and answer["reason"] == "not-found", (bad[:20], answer)
    for bad_port in [5, None, [token], {"a": 1}, token.encode()]:
        answer = _refused(path, pack({"t": "receive", "port": bad_port}))  # type: ignore[dict-item]
        assert answer is not None and answer["reason"] == "not-found", answer
    assert _refused(path, pack({"t": "receive", "port": token}))["reason"] == "taken"  # type: ignore[index]
    assert _refused(path, struct.pack(">I", 1 << 20) + b"\0" * 1000) is None
    assert _refused(path, struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1") is None
    assert _refused(path, os.urandom(4096)) is None
    assert _refused(path, pack({"t": 5})) is None  # type: ignore[dict-item]
    # The lease that holds the port: nonsense that names no channel of it is ignored.
    for msg in [{"t": "lost"}, {"t": "lost", "id": "zz"}, {"t": "count", "id": "00" * 16,
                                                          "m": 2 ** 64 - 1},
                {"t": "finished", "id": os.urandom(16).hex()}, {"t": "what"}]:
        try:
            lease.send(msg)
        except OSError:
            break
    lease.close()
    channel_works(a, b, "after")
    log = b.log()
    assert "Traceback" not in log, log


def test_a_flood_and_a_huge_message_on_a_lease_end_only_that_lease(sites: Any) -> None:
    a, b = mesh_of(sites, "aps", "alcf")
    lease = HostileLease(b, "flood")
    count = pack({"t": "count", "id": "00" * 16, "m": 1})
    lease.sock.sendall(count * 20_000)
    lease.sock.sendall(struct.pack(">I", (64 << 10) + 1) + b"\0" * 100)
    wait_until(lambda: closed_by_peer(lease.sock), 30, "the daemon to drop the lease")
    lease.close()
    channel_works(a, b, "after")
    assert "Traceback" not in b.log()


def _fresh(msg: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """``msg`` as another channel's (a new id), with ``changes``."""
    cid = os.urandom(16)
    return {**msg, "id": cid.hex(), "cid": cid, **changes}


ADOPTIONS: list[tuple[str, Any, str]] = [
    ("the channel open here", lambda m: m, "has that channel open"),
    ("another receiver's name", lambda m: _fresh(m, name="other"), "not one of this receiver"),
    ("an id its state does not have", lambda m: {**m, "id": os.urandom(16).hex()},
     "not one of this receiver"),
    ("a sender that is no member", lambda m: _fresh(m, sender=os.urandom(32)), "no member"),
    ("a short key", lambda m: _fresh(m, sk=b"short"), "32 bytes"),
    ("an unknown cipher", lambda m: _fresh(m, cipher=99), "cipher"),
    ("messages at 2**63", lambda m: _fresh(m, m=1 << 63), "2**63"),
    ("a lease that ends before its next seq", lambda m: _fresh(m, ce=m["cs"] - 1), "lease"),
    ("a lease end that is a string", lambda m: _fresh(m, ce="1"), "malformed"),
    ("no live flag", lambda m: {k: v for k, v in _fresh(m).items() if k != "live"},
     "malformed"),
    ("no state", lambda m: {"t": "adopt-in", "id": os.urandom(16).hex()}, "malformed"),
    ("a key that is a huge number", lambda m: _fresh(m, sk=10 ** 11), "malformed"),
    ("a relay on a direct path", lambda m: _fresh(m, relay=m["sender"]), "relay"),
    ("a relay that is no member", lambda m: _fresh(m, path="relay", relay=os.urandom(32)),
     "relay"),
    ("its sender as its relay", lambda m: _fresh(m, path="relay", relay=m["sender"]), "relay"),
]


def test_hostile_adoptions_are_refused_with_their_reason_and_the_daemon_goes_on(
        sites: Any) -> None:
    """``adopt-in`` on a lease: what a receiving application offers a daemon that restarted
    under it.  Each bad offer is refused back to it with the reason (``cut`` with ``tell``); a
    well-formed one for a new id is taken on (the process holds whatever it offers: nothing
    more) and ends with the lease."""
    a, b = mesh_of(sites, "aps", "alcf")
    lease = HostileLease(b, "frames")
    with meshd.connect(a.home) as ma:
        tx = ma.sender("frames", to="alcf")
        _send(tx, 0, 3)
        grant = lease.next("grant-in")
        offer = {**grant, "t": "adopt-in", "ce": grant["cs"] + 1, "live": False}
        for label, make, why in ADOPTIONS:
            msg = make(offer)
            lease.send(msg)
            cut = lease.next("cut")
            assert cut["id"] == msg["id"] and cut["tell"] is True, label
            assert cut["reason"] == "failed" and why in cut["message"], (label, cut)
        # A live channel must come with its socket (the daemon keeps it to cut it), and it must
        # be a stream socket.
        naked = _fresh(offer, live=True)
        lease.send(naked)
        assert "without its socket" in lease.next("cut")["message"]
        r, w = os.pipe()
        not_a_socket = _fresh(offer, live=True)
        socket.send_fds(lease.sock, [pack(not_a_socket)], [r])
        assert "not a socket" in lease.next("cut")["message"]
        os.close(r)
        os.close(w)
        assert b.client.status()["counters"]["channel_adopt_in_refused"] == len(ADOPTIONS) + 2
        pair = socket.socketpair()  # a stream socket, but not a connection to a sender
        socket.send_fds(lease.sock, [pack(_fresh(offer, live=True))], [pair[1].fileno()])
        assert "not a connected TCP socket" in lease.next("cut")["message"]
        for s in pair:
            s.close()
        server = socket.create_server(("127.0.0.1", 0))
        mine = socket.create_connection(server.getsockname())
        theirs, _ = server.accept()
        server.close()
        taken = _fresh(offer, live=True)
        socket.send_fds(lease.sock, [pack(taken)], [theirs.fileno()])
        theirs.close()
        wait_until(lambda: any(r["id"] == taken["id"] and r["handed_over"] for r in _rows(b)),
                   30, "the daemon to take the offered channel on")
        lease.close()  # the application goes away: the daemon ends it and cuts its socket
        wait_until(lambda: not any(r["id"] == taken["id"] for r in _rows(b)), 30,
                   "the channel of the closed lease to end")
        mine.settimeout(30)
        assert mine.recv(1) == b""  # shut down by the daemon's copy
        mine.close()
        tx.close(flush=False)
    channel_works(a, b, "after")
    log = b.log()
    assert "Traceback" not in log
    assert log.count("refused to take on channel") == len(ADOPTIONS) + 3


LIES: list[tuple[str, Any]] = [
    ("delivered messages undelivered", lambda s: {**s, "rx": [0, 0, 0, 0, 0], "m": 0, "b": 0}),
    ("fewer messages", lambda s: {**s, "m": 0}),
    ("popped bytes at 2**64-1", lambda s: {**s, "rx": [*s["rx"][:2], 2 ** 64 - 1, *s["rx"][3:]]}),
    ("popped beyond next", lambda s: {**s, "rx": [s["rx"][0], s["rx"][0] + 1, *s["rx"][2:]]}),
    ("a negative seq", lambda s: {**s, "rx": [-1, *s["rx"][1:]]}),
    ("a bool and a string", lambda s: {**s, "rx": [True, "1", *s["rx"][2:]]}),
    ("no closed flag", lambda s: {k: v for k, v in s.items() if k != "closed"}),
    ("messages at 2**64-1", lambda s: {**s, "m": 2 ** 64 - 1}),
    ("a list for the count", lambda s: {**s, "m": [1]}),
]


def test_a_lying_lost_ends_only_that_channel_and_repeats_nothing(sites: Any,
                                                                  monkeypatch: Any) -> None:
    from meshd.app import direct_in
    from meshd.local.handover import encode_state
    from tests.system.test_channel_handover_in import _cut_at_receiver

    a, b = mesh_of(sites, "aps", "alcf")
    target: list[bytes] = []

    def lying(g: Any) -> dict[str, Any]:
        state = encode_state(g)
        return LIES[len(target) - 1][1](state) if target and g.cid == target[-1] else state

    monkeypatch.setattr(direct_in, "encode_state", lying)
    with meshd.connect(b.home) as mb, meshd.connect(a.home) as ma:
        other_rx = mb.receiver("other")
        other_tx = ma.sender("other", to="alcf")
        m = _send(other_tx, 0, 5)
        for i, (what, _) in enumerate(LIES):
            rx = mb.receiver(f"lie{i}")
            tx = ma.sender(f"lie{i}", to="alcf")
            n = _send(tx, 0, 10)
            got = _drain(rx, 10)
            _cut_at_receiver(rx)  # an honest give-back first: the daemon's state moves on
            n = _send(tx, n, 10)
            tx.flush(timeout=60)
            wait_until(lambda: rx._links.links, 30, "the resumed connection to be handed over")
            got += _drain(rx, 10)
            with rx._links.lock:
                (cid,) = rx._links.links
            target.append(cid)
            _cut_at_receiver(rx)  # the lie
            try:
                extra = rx.recv(timeout=30)
                raise AssertionError(f"{what}: a message after the lie: {extra.meta}")
            except meshd.ChannelClosed as exc:
                assert exc.reason == "failed", (what, exc)
            assert got == list(range(n)), what
            wait_until(lambda: not [r for r in _rows(b) if r["name"] == f"lie{i}"], 30,
                       f"{what}: the channel to end at the receiving daemon")
            tx.close(flush=False)
            rx.close()
            m = _send(other_tx, m, 5)
        other_tx.flush(timeout=60)
        assert _drain(other_rx, m) == list(range(m))
    log = b.log()
    assert "Traceback" not in log, log
    assert log.count("gave back a state the channel cannot take") == len(LIES)


def _inject(tx: Any, raw: bytes) -> None:
    """Write ``raw`` on an idle sending application's data connection: what a hostile member
    that holds the channel's keys could send the receiving application."""
    with tx._lock:
        tx._link.sock.sendall(raw)


def test_a_sender_that_stalls_in_the_middle_of_a_big_record_is_given_back(
        sites: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(link, "STALL_TIMEOUT", 1.0)  # the receiving application is this process
    with streaming(sites) as (a, b, mb, ma, rx, tx):
        n = _send(tx, 0, 5)
        tx.flush(timeout=60)
        wait_until(lambda: rx._links.links, 30, "the connection to be handed over")
        _inject(tx, link.record_header(link.FRAME, link.MAX_RECORD) + b"\0" * 1000)
        wait_until(lambda: "stalled in the middle of a" in b.log(), 30,
                   "the receiving application to give the stalled connection back")
        n = _send(tx, n, 5)
        tx.flush(timeout=60)
        assert _drain(rx, n) == list(range(n))
    assert "Traceback" not in b.log()


def test_bad_records_from_the_sender_are_given_back_and_the_channel_goes_on(
        sites: Any) -> None:
    a, b = mesh_of(sites, "aps", "alcf")
    bad = [link.record_header(9, 10) + b"\0" * 10,
           link.record_header(link.REFUSE, 5) + b"nope!",
           link.record_header(link.FRAME, 100) + os.urandom(100),
           link.record_header(link.FRAME, 48) + bytes([1, 0, 0, 0]) + b"\x07" * 44,
           link.record_header(link.HELLO, 4000) + b"\0" * 4000]
    with meshd.connect(b.home) as mb, meshd.connect(a.home) as ma:
        rx = mb.receiver("frames")
        tx = ma.sender("frames", to="alcf")
        n = _send(tx, 0, 3)
        for i, raw in enumerate(bad):
            tx.flush(timeout=60)
            wait_until(lambda: rx._links.links, 30, "the connection to be handed over")
            _inject(tx, raw)
            wait_until(lambda: b.log().count("came back from the application") > i, 30,
                       f"bad record {i} to make the receiving application give the channel back")
            n = _send(tx, n, 3)
        tx.flush(timeout=60)
        assert _drain(rx, n) == list(range(n))
    assert "Traceback" not in b.log()


def _held(rx: Any) -> int:
    """Payload bytes the receiving application holds of its channels (taken ahead, given back
    and not yet handed out, or in a core)."""
    links = rx._links
    with links.lock:
        every = [*links.draining, *links.links.values()]
        return sum(sum(len(d.payload) for d in ln.pending) + ln.core.rx.held_bytes
                   for ln in every)


def test_a_receiver_that_does_not_receive_stays_bounded_across_broken_connections(
        sites: Any) -> None:
    from tests.system.test_channel_handover_in import _cut_at_receiver

    MiB = 1 << 20
    bound = in_link.AHEAD_BYTES + (64 << 20) + 2 * MiB  # taken ahead + the window in the core
    a, b = mesh_of(sites, "aps", "alcf")
    total = 400
    with meshd.connect(b.home) as mb, meshd.connect(a.home) as ma:
        rx = mb.receiver("frames")
        tx = ma.sender("frames", to="alcf")
        sending = __import__("threading").Thread(
            target=lambda: _send(tx, 0, total, MiB), daemon=True)
        sending.start()

        def filled() -> bool:
            core = tx._link.core if tx._link is not None else None
            return (bool(rx._links.links) and core is not None and core.all_acked
                    and not core.sender.can_send(MiB + 4096))

        wait_until(filled, 60, "the sender to fill what the receiver may take")
        _cut_at_receiver(rx)  # a flaky network, or a hostile sender breaking it at will
        # The application does not receive: the channel must not get a window more.
        wait_until(lambda: _held(rx) > bound or rx._links.deferred, 60,
                   "the receiver to hold the channel back, or to hold too much")
        peak = _held(rx)
        got = _drain(rx, total)
        sending.join(60)
        assert got == list(range(total))
        assert peak <= bound, f"the receiving application held {peak / MiB:.0f} MiB"
