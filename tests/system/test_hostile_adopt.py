"""Attacks on ``adopt``, what a sending application offers a daemon that restarted under it,
from a hostile local process on the daemon's ``handover.sock`` (same uid).  Whatever it sends,
the daemon refuses it with a reason, closes every descriptor that came with it, keeps nothing
of a refused channel, never takes on more channels than it would open, never logs a traceback,
and its other channels go on.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from meshd.local.handover import MessageReader, pack
from meshd.testing.processes import wait_until
from meshd.trust.identity import SiteKey
from tests.helpers import Site, channel_works, mesh_of


def _key(site: Site) -> bytes:
    return SiteKey.load(site.home / "site.key").public


def _offer(site: Site, to: Site, **changes: Any) -> dict[str, Any]:
    """An ``adopt`` of a made-up channel from ``site`` to ``to`` that ``site``'s daemon can take
    on (a member receiver, keys of the right length, a direct path), with ``changes``."""
    return {"t": "adopt", "id": os.urandom(16).hex(), "name": "frames", "live": False,
            "peer": _key(to), "cipher": 1, "sd": 0, "rd": 1, "sk": b"s" * 32, "rk": b"r" * 32,
            "ce": 0, "co": 0, "path": "direct", "relay": None, **changes}


def _answer(site: Site, msg: dict[str, Any], fds: list[int] = ()) -> dict[str, Any] | None:
    """``msg`` sent with ``fds`` on a new connection to ``site``'s hand-over socket: the
    daemon's answer (None: it closed without one)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(site.home / "handover.sock"))
        socket.send_fds(s, [pack(msg)], list(fds))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    msgs = MessageReader().feed(data) if data else []
    return msgs[0] if msgs else None


def _open_to(site: Site, target: Path) -> int:
    """How many of ``site``'s daemon's descriptors are open on ``target``."""
    fd_dir = Path(f"/proc/{site.proc.pid}/fd")
    n = 0
    for fd in os.listdir(fd_dir):
        try:
            n += os.readlink(fd_dir / fd) == str(target)
        except OSError:
            pass
    return n


def _connected_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a loopback TCP connection (what a live channel's socket looks like)."""
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        c = socket.create_connection(lsock.getsockname())
        s, _ = lsock.accept()
    return c, s


def test_binary_fields_given_as_huge_numbers_are_refused_without_allocating_them(
        sites: Any) -> None:
    """``bytes(n)`` of an integer once made a daemon allocate what a one-line ``adopt`` asked."""
    a, b = mesh_of(sites, "aps", "alcf")
    for field in ("peer", "sk", "rk", "relay"):
        answer = _answer(b, _offer(b, a, **{field: 10 ** 11}))
        assert answer is not None and answer["reason"] == "malformed", (field, answer)
    channel_works(a, b, "after")
    log = b.log()
    assert "Traceback" not in log and log.count("refused to adopt a channel") == 4


def test_numbers_that_are_not_integers_are_refused_and_what_came_with_them_closed(
        sites: Any, tmp_path: Path) -> None:
    """Bug: ``inf`` in a number field raised OverflowError past the refusal, logged a
    traceback, left the connection unanswered and kept every descriptor sent with it (a
    hostile process could fill the daemon's descriptor table 16 at a time)."""
    a, b = mesh_of(sites, "aps", "alcf")
    marker = tmp_path / "marker"
    marker.write_bytes(b"")
    for field in ("cipher", "sd", "rd", "ce", "co"):
        for bad in (float("inf"), float("nan"), 2.5, -1, True, "7"):
            fds = [os.open(marker, os.O_RDONLY) for _ in range(4)]
            try:
                answer = _answer(a, _offer(a, b, **{field: bad}), fds)
            finally:
                for fd in fds:
                    os.close(fd)
            assert answer is not None and answer["reason"] == "malformed", (field, bad, answer)
    wait_until(lambda: _open_to(a, marker) == 0, 10, "the daemon to close what came with them")
    assert "channel_adopted" not in a.client.status()["counters"]
    channel_works(a, b, "after")
    assert "Traceback" not in a.log()


def test_refused_keys_leave_nothing_of_the_channel_behind(sites: Any) -> None:
    """Bug: keys the daemon could not use were refused only after the channel's ipc socket
    was made: each refusal left a ``tx-*`` file, and was counted and logged as taken on."""
    a, b = mesh_of(sites, "aps", "alcf")
    for changes, reason in (({"cipher": 99}, "bad-cipher"), ({"sk": b"short"}, None),
                            ({"sd": 5}, None), ({"id": "00"}, None)):
        for _ in range(5):
            answer = _answer(a, _offer(a, b, **changes))
            assert answer is not None and answer["t"] == "ended", (changes, answer)
            assert reason is None or answer["reason"] == reason, (changes, answer)
    assert list(a.home.rglob("tx-*")) == []
    assert "channel_adopted" not in a.client.status()["counters"]
    assert "taken on from its application" not in a.log()
    assert [c for c in a.client.channels() if c["direction"] == "out"] == []
    assert "Traceback" not in a.log()


def test_a_malformed_lost_ends_only_that_lease_in_one_line(sites: Any) -> None:
    """Bug: ``{"t": "lost", "co": "abc"}`` on a lease killed its task with a traceback."""
    a, b = mesh_of(sites, "aps", "alcf")
    c, s = _connected_pair()
    with c, s:
        for bad in ("abc", float("inf"), [1]):
            with socket.socket(socket.AF_UNIX) as lease:
                lease.settimeout(30)
                lease.connect(str(a.home / "handover.sock"))
                socket.send_fds(lease, [pack(_offer(a, b, live=True))], [c.fileno()])
                lease.sendall(pack({"t": "lost", "co": bad}))
                try:
                    while lease.recv(65536):  # the daemon ends the lease: end of file
                        pass
                except ConnectionResetError:  # (or a reset: it closed with the lost unread)
                    pass
        wait_until(lambda: "a malformed message" in a.log(), 10, "the malformed lost logged")
    channel_works(a, b, "after")
    assert "Traceback" not in a.log()


def test_adoptions_count_against_the_sites_channel_limit(sites: Any) -> None:
    """Bug: ``adopt`` had no limit: 4990 live adoptions took a daemon to 19,993 descriptors
    and 1.69 GB, and the site could open no channel of its own.  They count against the
    channels a site may open (256), and beyond are refused ``busy``."""
    a, b = mesh_of(sites, "aps", "alcf")
    with socket.create_server(("127.0.0.1", 0), backlog=512) as lsock:
        held: list[socket.socket] = []
        try:
            taken = 0
            while True:
                c = socket.create_connection(lsock.getsockname())
                s, _ = lsock.accept()
                lease = socket.socket(socket.AF_UNIX)
                held += [c, s, lease]
                lease.settimeout(30)
                lease.connect(str(a.home / "handover.sock"))
                socket.send_fds(lease, [pack(_offer(a, b, live=True, name=f"f{taken}"))],
                                [c.fileno()])
                wait_until(lambda: a.client.status()["counters"].get("channel_adopted", 0)
                           > taken or a.client.status()["counters"].get(
                               "channel_refused_senders"), 30, "the daemon to answer")
                if a.client.status()["counters"].get("channel_refused_senders"):
                    answer = MessageReader().feed(lease.recv(65536))[0]
                    assert answer["reason"] == "busy", answer
                    break
                taken += 1
                assert taken <= 256, "more channels taken on than a site may open"
            assert taken == 256
            assert len([r for r in a.client.channels() if r["direction"] == "out"]) == 256
        finally:
            for sock in held:
                sock.close()
    assert "Traceback" not in a.log()


def test_an_adoption_that_lies_about_its_path_or_socket_is_refused(sites: Any) -> None:
    """A live ``adopt`` must bring the channel's connected TCP socket (the daemon keeps it to
    cut it when the receiver or the relay is revoked), and a relay only on a relayed path: a
    member other than the two ends."""
    a, b, r = mesh_of(sites, "aps", "alcf", "relay")
    with socket.socket(socket.AF_UNIX) as unix, socket.socket() as unconnected:
        cases = [
            ({"live": True}, [], "usage"),  # no socket
            ({"live": True}, [unix.fileno()], "usage"),  # not TCP
            ({"live": True}, [unconnected.fileno()], "usage"),  # not connected
            ({"path": "relay"}, [], "bad-path"),  # a relay path without its relay
            ({"relay": _key(r)}, [], "bad-path"),  # a relay on a direct path
            ({"path": "relay", "relay": os.urandom(32)}, [], "bad-path"),  # no member
            ({"path": "relay", "relay": _key(a)}, [], "bad-path"),  # one of the ends
            ({"path": "relay", "relay": _key(b)}, [], "bad-path"),
            ({"path": "sideways"}, [], "bad-path"),
        ]
        for changes, fds, reason in cases:
            answer = _answer(b, _offer(b, a, **changes), fds)
            assert answer is not None and answer["reason"] == reason, (changes, answer)
    assert "channel_adopted" not in b.client.status()["counters"]
    with socket.socket(socket.AF_UNIX) as s:  # relayed through a member: taken on
        s.connect(str(b.home / "handover.sock"))
        s.sendall(pack(_offer(b, a, path="relay", relay=_key(r))))
        wait_until(lambda: b.client.status()["counters"].get("channel_adopted") == 1, 30,
                   "the daemon to take on the relayed channel")
    assert "Traceback" not in b.log()
