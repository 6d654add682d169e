"""Handed-over channels between real daemons: the sending application holds the data
connection and the channel keys (``channel_handover = true``), its daemon only negotiates and
resumes.  Delivery stays in order and exactly once across a broken connection, a restart of
the sending daemon and an application that dies mid-stream."""

from __future__ import annotations

import errno
import os
import socket
import signal
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

import meshd
from meshd.testing.processes import wait_until
from tests.helpers import ROOT, mesh_of

HANDOVER = {"aps": "channel_handover = true"}


def _drain(rx: Any, n: int) -> list[int]:
    got = []
    for _ in range(n):
        msg = rx.recv(timeout=60)
        got.append(int(msg.meta["i"]))
        assert np.array_equal(msg.array, np.full(msg.array.shape, msg.meta["i"] % 251,
                                                 dtype=np.uint8))
    return got


def test_a_handed_over_channel_delivers_in_order_exactly_once(sites: Any) -> None:
    a, b = mesh_of(sites, "aps", "alcf", configs=HANDOVER)
    sizes = [10, 70_000, 1 << 20, 300, 3 << 20, 5]
    with meshd.connect(b.home) as mb, meshd.connect(a.home) as ma:
        rx = mb.receiver("frames")
        tx = ma.sender("frames", to="alcf")
        n = 0
        for _ in range(20):
            for size in sizes:
                tx.send(np.full(size, n % 251, dtype=np.uint8), meta={"i": n})
                n += 1
        tx.flush(timeout=60)
        assert _drain(rx, n) == list(range(n))
        (out,) = [c for c in ma.channels() if c["direction"] == "out"]
        assert out["handed_over"] and out["path"] == "direct"
        assert out["messages"] == n and out["acked_messages"] == n
        wait_until(lambda: [c["messages"] for c in mb.channels() if c["direction"] == "in"]
                   == [n], 30, "the receiving application to report its counters")
        (inc,) = [c for c in mb.channels() if c["direction"] == "in"]
        assert inc["messages"] == n
        assert a.client.status()["counters"].get("channel_handovers", 0) >= 1
        tx.close()
        wait_until(lambda: not [c for c in mb.channels() if c["direction"] == "in"], 30,
                   "the receiving daemon to forget the closed channel")


def _send(tx: Any, first: int, n: int, size: int = 200_000) -> int:
    for i in range(first, first + n):
        tx.send(np.full(size, i % 251, dtype=np.uint8), meta={"i": i})
    return first + n


def _break(tx: Any) -> None:
    """Cut the application's data connection (as a failing network would, from its side).
    Under the sender's lock: its thread closes a broken socket under it."""
    with tx._lock:
        link = tx._link
        assert link is not None and link.sock is not None
        link.sock.shutdown(socket.SHUT_RDWR)


def test_a_broken_connection_resumes_through_the_daemon_with_nothing_lost(sites: Any) -> None:
    a, b = mesh_of(sites, "aps", "alcf", configs=HANDOVER)
    with meshd.connect(b.home) as mb, meshd.connect(a.home) as ma:
        rx = mb.receiver("frames")
        tx = ma.sender("frames", to="alcf")
        n = _send(tx, 0, 100)
        for _ in range(3):
            _break(tx)
            n = _send(tx, n, 100)
        tx.flush(timeout=60)
        assert _drain(rx, n) == list(range(n))
        assert a.client.status()["counters"]["channel_handovers"] >= 4
        (out,) = [c for c in ma.channels() if c["direction"] == "out"]
        assert out["renegotiations"] >= 3 and out["acked_messages"] == n
        wait_until(lambda: [c["messages"] for c in mb.channels() if c["direction"] == "in"]
                   == [n], 30, "the receiving application to report its counters")
        (inc,) = [c for c in mb.channels() if c["direction"] == "in"]
        assert inc["duplicates"] >= 0 and inc["messages"] == n


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_the_sending_daemon_killed_and_restarted_mid_stream_loses_and_repeats_nothing(
        sites: Any, how: str) -> None:
    """``kill``: SIGKILL; ``stop``: SIGTERM, a clean stop, which must not end the channels
    that applications hold either."""
    a, b = mesh_of(sites, "aps", "alcf", configs=HANDOVER)
    with meshd.connect(b.home) as mb, meshd.connect(a.home) as ma:
        rx = mb.receiver("frames")
        tx = ma.sender("frames", to="alcf")
        n = _send(tx, 0, 100)
        if how == "kill":
            a.kill()
        else:
            assert a.stop() == 0
        n = _send(tx, n, 100)  # the application's connection does not need its daemon
        tx.flush(timeout=60)
        a.start()
        n = _send(tx, n, 100)

        def listed() -> bool:  # the application offers the channel back while it sends
            nonlocal n
            n = _send(tx, n, 1)
            return any(c["direction"] == "out" and c["acked_messages"] >= 200
                       for c in a.client.channels())

        wait_until(listed, 30, "the restarted daemon to list the channel it took on")
        _break(tx)  # now the restarted daemon must resume it
        n = _send(tx, n, 100)
        tx.flush(timeout=60)
        assert _drain(rx, n) == list(range(n))
        assert a.client.status()["counters"]["channel_adopted"] == 1
        (out,) = [c for c in a.client.channels() if c["direction"] == "out"]
        assert out["acked_messages"] == n or out["messages"] == n
        tx.close()
        wait_until(lambda: not [c for c in b.client.channels() if c["direction"] == "in"], 30,
                   "the receiving daemon to forget the closed channel")


_ESTABLISHED = 1  # TCP_ESTABLISHED in linux/tcp_states.h


def _cut(sock: socket.socket) -> bool:
    """Whether the application's data connection is cut: it left ESTABLISHED, or the
    library's sender thread already let go of it (a closed socket object answers EBADF; the
    library closes it only when a read fails or its daemon ends or moves the channel)."""
    try:
        return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != _ESTABLISHED)
    except OSError as exc:
        if exc.errno == errno.EBADF:
            return True
        raise


def test_a_relayed_channel_taken_on_after_a_restart_is_cut_when_its_relay_is_revoked(
        sites: Any) -> None:
    """Bug: a sending daemon that took on a relayed channel from its application after a
    restart forgot the relay (and held no copy of the socket), so revoking the relay left the
    application streaming through it.  The relay is frozen here, so only alcf's own daemon can
    cut the application's connection."""
    aps, alcf, dcs = mesh_of(sites, "aps", "alcf", "dcs")
    with meshd.connect(aps.home) as ma, meshd.connect(alcf.home) as ml:
        rx = ma.receiver("relayed")
        tx = ml.sender("relayed", to="aps", paths=["relay"])  # through dcs
        n = _send(tx, 0, 20)
        tx.flush(timeout=60)
        assert tx._link is not None and tx._link.sock is not None  # handed over
        alcf.kill()
        alcf.start()

        def taken_on() -> bool:  # the application offers the channel back while it sends
            nonlocal n
            n = _send(tx, n, 1)
            return any(c["direction"] == "out" and c["handed_over"] and c["relay"] == "dcs"
                       for c in alcf.client.channels())

        wait_until(taken_on, 30, "the restarted daemon to take on the relayed channel")
        assert alcf.client.status()["counters"]["channel_adopted"] == 1
        held = tx._link.sock
        os.kill(dcs.proc.pid, signal.SIGSTOP)
        try:
            aps.client.revoke("dcs", "stolen key")  # the founder; alcf hears it by gossip

            # The daemon's copy of the socket is shut: the application's socket leaves
            # ESTABLISHED (tcp_info's first byte) without the application doing anything.
            # (Sending here would block against the frozen relay until the socket's own 15 s
            # send timeout broke it, which would hide a daemon that cannot cut.)
            wait_until(lambda: _cut(held), 10,
                       "alcf's daemon to cut the connection through the revoked relay")
        finally:
            os.kill(dcs.proc.pid, signal.SIGCONT)
        assert [int(rx.recv(timeout=60).meta["i"]) for _ in range(20)] == list(range(20))
        ml.close(flush=False)


APP = textwrap.dedent("""
    import sys, numpy as np, meshd
    mesh = meshd.connect(sys.argv[1])
    tx = mesh.sender("frames", to="alcf")
    i = 0
    while True:
        tx.send(np.full(100_000, i % 251, dtype=np.uint8), meta={"i": i})
        if i == 50:
            tx.flush(timeout=60)
            print("flushed", flush=True)
        i += 1
""")


def test_an_application_that_dies_mid_stream_leaves_no_channel_open(sites: Any) -> None:
    a, b = mesh_of(sites, "aps", "alcf", configs=HANDOVER)
    with meshd.connect(b.home) as mb:
        rx = mb.receiver("frames")
        app = subprocess.Popen([sys.executable, "-c", APP, str(a.home)], stdout=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            assert app.stdout is not None and app.stdout.readline() == b"flushed\n"
            got = _drain(rx, 51)
        finally:
            app.send_signal(signal.SIGKILL)
            app.wait(20)
        assert got == list(range(51))
        wait_until(lambda: not a.client.channels(), 30,
                   "the sending daemon to close the dead application's channel")
        more = []
        while True:  # whatever else arrived is in order, once each, then the channel ended
            try:
                more.append(int(rx.recv(timeout=30).meta["i"]))
            except meshd.ChannelClosed:
                break
        wait_until(lambda: not [c for c in b.client.channels() if c["direction"] == "in"], 30,
                   "the receiving daemon to forget the channel")
        assert more == list(range(51, 51 + len(more)))
        assert a.client.status()["counters"]["channel_orphans_closed"] == 1


def test_what_is_sent_without_a_flush_arrives_while_the_application_waits(sites: Any) -> None:
    """Regression: a handed-over sender kept the batches sent before its first connection
    until the application's next call, so ``send`` and then waiting for the receiver (no
    flush) delivered nothing; the sender's thread now moves the link on meanwhile."""
    a, b = mesh_of(sites, "aps", "alcf", configs=HANDOVER)
    with meshd.connect(b.home) as mb, meshd.connect(a.home) as ma:
        rx = mb.receiver("unflushed")
        tx = ma.sender("unflushed", to="alcf", linger=0)
        for i in range(3):
            tx.send(np.full(1000, i, dtype=np.uint8), meta={"i": i})
        assert [int(rx.recv(timeout=30).meta["i"]) for _ in range(3)] == [0, 1, 2]
        wait_until(lambda: [c["acked_messages"] for c in ma.channels()
                            if c["id"] == tx.id] == [3], 30,
                   "the acknowledgement to reach the sender without a call")
        (row,) = [c for c in ma.channels() if c["id"] == tx.id]
        assert row["handed_over"]
