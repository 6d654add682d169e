"""The receiver's way back to a daemon that restarted (:class:`meshd.app.lease_in.Rejoin`),
driven with a real unix socket standing for the daemon's hand-over socket and the receiver's
links reduced to what it reads of them."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from meshd.app.handover import REJOIN_EVERY, REJOIN_FOR
from meshd.app.in_link import Cut
from meshd.app.lease_in import Rejoin
from meshd.channel.frames import AES256GCM, DIR_I2R, DIR_R2I
from meshd.channel.inbound import InGrant, ReceivingEnd
from meshd.channel.reliable import ReceiverConfig
from meshd.errors import DaemonNotRunning, LocalError
from meshd.local.handover import MessageReader, decode_adopt_in


def _link(n: int) -> Any:
    cid = bytes([n]) * 16
    g = InGrant(cid, AES256GCM, b"s" * 32, b"r" * 32, DIR_R2I, DIR_I2R, 10, 3, (4, 4, 400, 20, 500), 4,
                400, False, "frames", b"k" * 32)
    a, b = socket.socketpair()
    b.close()
    return SimpleNamespace(cid=cid, core=ReceivingEnd.for_application(g, ReceiverConfig()),
                           sender_name="aps", path="direct", sock=a, relay=None)


class Links:
    """What :class:`Rejoin` uses of a receiver's links."""

    def __init__(self, live: int) -> None:
        self.channel = "frames"
        self.lock = threading.Lock()
        self.links = {ln.cid: ln for ln in map(_link, range(1, live + 1))}
        self.lease: socket.socket | None = None
        self.deferred: dict[bytes, dict[str, Any]] = {}
        self.sent: list[dict[str, Any]] = []
        self.cuts: list[Cut] = []

    def send(self, msg: dict[str, Any]) -> None:
        assert self.lease is not None
        self.sent.append(msg)

    def send_when_taken(self, cid: bytes, msg: dict[str, Any]) -> None:
        self.send(msg)

    def cut_here(self, cid: bytes, cut: Cut) -> None:
        self.cuts.append(cut)


class Daemon:
    """The control API's answers, counted; a listening hand-over socket once started."""

    def __init__(self, tmp: Path) -> None:
        self.path = str(tmp / "handover.sock")
        self.opened = 0
        self.answer: Exception | None = DaemonNotRunning("not yet", reason="not-running")
        self.listener: socket.socket | None = None

    def reopen(self) -> dict[str, Any]:
        self.opened += 1
        if self.answer is not None:
            raise self.answer
        return {"handover": self.path, "port": "t0", "endpoint": "ipc:///new"}

    def listen(self) -> None:
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        self.listener.listen(1)

    def messages(self, n: int) -> tuple[list[dict[str, Any]], list[int]]:
        """The first ``n`` messages on the next connection, and the descriptors with them."""
        assert self.listener is not None
        conn, _ = self.listener.accept()
        reader, msgs, fds = MessageReader(), [], []
        with conn:
            conn.settimeout(10)
            while len(msgs) < n:
                data, got, _, _ = socket.recv_fds(conn, 1 << 16, 4)
                assert data, "the lease closed"
                fds += got
                msgs += reader.feed(data)
        return msgs, fds

    def first_message(self) -> dict[str, Any]:
        return self.messages(1)[0][0]


def test_it_offers_every_channel_to_the_daemon_that_comes_back(tmp_path: Path) -> None:
    links, daemon = Links(live=2), Daemon(tmp_path)
    rejoin = Rejoin(daemon.reopen, "frames")
    rejoin.lost(links, 100.0)
    orphan = _link(9)
    assert rejoin.orphan(orphan, "reset") is None  # kept for the daemon
    assert rejoin.wait(100.0) == 0.0
    assert not rejoin.step(links, 100.0)  # not back: nothing changes
    assert daemon.opened == 1 and rejoin.wait(100.0) == pytest.approx(REJOIN_EVERY)
    assert not rejoin.step(links, 100.0 + REJOIN_EVERY / 2) and daemon.opened == 1
    daemon.answer = None
    daemon.listen()
    assert rejoin.step(links, 100.0 + REJOIN_EVERY)
    (first, *live_offers), fds = daemon.messages(3)
    assert first == {"t": "receive", "port": "t0"}
    assert len(fds) == 2  # each live channel's socket goes with its offer: the daemon cuts it
    for fd in fds:
        os.close(fd)
    assert rejoin.gone_since is None and rejoin.wait(200.0) is None
    assert rejoin.endpoint == "ipc:///new" and links.lease is not None
    offers = {bytes.fromhex(m["id"]): decode_adopt_in(m) for m in [*live_offers, *links.sent]}
    assert set(offers) == {bytes([1]) * 16, bytes([2]) * 16, orphan.cid}
    for cid, (info, ctl_end, live) in offers.items():
        assert live is (cid != orphan.cid) and ctl_end == 10 + (1 << 32)
        assert info.grant.messages == 4 and info.sender_name == "aps"
    assert not links.cuts and not rejoin.orphans
    links.lease.close()


def test_a_lease_that_cannot_be_dialed_is_dialed_again_without_opening_again(
        tmp_path: Path) -> None:
    """Opening the receiver again would find its name taken by the receiver opened at the
    last try, and the rejoining receiver would give up."""
    links, daemon = Links(live=1), Daemon(tmp_path)
    daemon.answer = None  # the control API answers, the hand-over socket is not there yet
    rejoin = Rejoin(daemon.reopen, "frames")
    rejoin.lost(links, 0.0)
    assert not rejoin.step(links, 0.0) and daemon.opened == 1
    daemon.listen()
    assert rejoin.step(links, REJOIN_EVERY) and daemon.opened == 1
    (first, offer), fds = daemon.messages(2)
    assert first["port"] == "t0" and offer["t"] == "adopt-in" and len(fds) == 1
    os.close(fds[0])
    assert links.lease is not None
    links.lease.close()


def test_another_receiver_of_the_name_ends_every_channel_held_and_the_tries(
        tmp_path: Path) -> None:
    """Replaced, or the name opened while the daemon was away: no daemon would cut what this
    receiver holds (its sender revoked), so all of it ends, live links too."""
    links, daemon = Links(live=1), Daemon(tmp_path)
    daemon.answer = LocalError("open already", reason="conflict")
    rejoin = Rejoin(daemon.reopen, "frames")
    rejoin.lost(links, 0.0)
    rejoin.orphan(_link(7), "reset")
    assert rejoin.step(links, 0.0)
    assert rejoin.gone_since is None and rejoin.wait(1.0) is None and links.lease is None
    assert {c.cid for c in links.cuts} == {bytes([7]) * 16, bytes([1]) * 16}
    assert all(c.tell and c.reason == "failed" and "another receiver" in c.message
               for c in links.cuts)
    assert rejoin.orphan(_link(8), "reset") == Cut(bytes([8]) * 16, "aps", "failed",
                                                   "the connection broke (reset) while the"
                                                   " daemon was away", True)


def test_orphans_end_when_no_daemon_is_back_in_time_and_the_tries_go_on(tmp_path: Path) -> None:
    links, daemon = Links(live=1), Daemon(tmp_path)
    rejoin = Rejoin(daemon.reopen, "frames")
    rejoin.lost(links, 0.0)
    rejoin.orphan(_link(7), "reset")
    assert not rejoin.step(links, REJOIN_FOR - 1) and not links.cuts
    assert rejoin.step(links, REJOIN_FOR + 1)
    assert [c.cid for c in links.cuts] == [bytes([7]) * 16] and not rejoin.orphans
    assert rejoin.wait(REJOIN_FOR + 1) is not None  # the live link still waits for a daemon


def test_a_channel_the_daemon_had_back_ends_and_one_still_to_give_back_is_offered(
        tmp_path: Path) -> None:
    """Given back (``lost`` sent), the daemon may have gone on with the channel before it
    went away: an offer of the older state would stall it, so it ends.  A ``lost`` still
    queued here (the receiving call was behind) never reached it: that channel is offered."""
    links, daemon = Links(live=0), Daemon(tmp_path)
    rejoin = Rejoin(daemon.reopen, "frames")
    had, queued = _link(1), _link(2)
    rejoin.gave(had)
    rejoin.gave(queued)
    links.deferred[queued.cid] = {"t": "lost"}
    rejoin.lost(links, 0.0)
    (cut,) = links.cuts
    assert cut.cid == had.cid and cut.tell and "went away while it held" in cut.message
    assert set(rejoin.orphans) == {queued.cid} and not links.deferred and not rejoin.given
    daemon.answer = None
    daemon.listen()
    assert rejoin.step(links, 0.0)
    ((info, _, live),) = [decode_adopt_in(m) for m in links.sent]
    assert info.grant.cid == queued.cid and live is False
    assert links.lease is not None
    links.lease.close()


def test_without_a_way_back_nothing_is_tried_and_a_broken_link_ends() -> None:
    rejoin = Rejoin(None, "frames")
    rejoin.lost(Links(live=0), 0.0)
    assert rejoin.wait(0.0) is None and not rejoin.step(Links(live=1), 0.0)
    assert rejoin.orphan(_link(3), "reset") is not None
