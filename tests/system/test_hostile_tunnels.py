"""Tunnels under attack, between real daemons on loopback: what a consuming site (or any local
user of its listen address) can make an owning site spend, and a tampered tunnel registry.

Every site is a separate ``meshd run`` process; the clients and targets are plain sockets.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshd.channel import link
from meshd.channel.frames import KIND_DATA
from meshd.channel.handshake import Initiator
from meshd.testing.processes import wait_until
from meshd.trust.identity import SiteKey
from meshd.tunnel import TunnelEnd, codec
from tests.helpers import Site, closed_by_peer, meshd, mesh_of, open_fds, rss, set_config
from tests.system.test_hostile_member_data import read_record
from tests.system.test_tunnels_daemons import connect, expose

_RESET = struct.pack("ii", 1, 0)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Site]]:
    """aps (owns services) and alcf (consumes them), one mesh for the module."""
    root = tmp_path_factory.mktemp("hostile-tunnels")
    made: list[Site] = []

    def make(name: str, listen: str | None = "127.0.0.1:0", start: bool = True) -> Site:
        r = meshd("init", "--name", name, "--listen", listen or "127.0.0.1:0", home=root / name)
        assert r.returncode == 0, r.stderr
        site = Site(name, root / name)
        made.append(site)
        return site.start() if start else site

    try:
        yield mesh_of(make, "aps", "alcf")
    finally:
        for site in made:
            if site.proc is not None:
                assert site.stop() == 0, site.log()


def counter(site: Site, name: str) -> int:
    return int(site.client.status().get("counters", {}).get(name, 0))


def hanging_target() -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket whose accept queue is full: connects to it hang (SYNs are dropped)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    fill = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(srv.getsockname())
        except BlockingIOError:
            pass
        fill.append(c)
    return srv, fill


class RawConsumer:
    """A member's own code speaking the tunnel protocol to an owner: a real handshake with the
    member's key, then whatever mux messages it likes."""

    def __init__(self, member: Site, owner: Site, service: str) -> None:
        key = SiteKey.load(member.home / "site.key")
        owner_key = SiteKey.load(owner.home / "site.key").public
        host, _, port = owner.client.status()["listen"].rpartition(":")
        cid = os.urandom(16)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        pre = link.encode_preamble(link.Preamble(
            "direct", cid, key.public, owner_key, "s", b"", int(time.time() * 1000)))
        init = Initiator(key, owner_key, cid, now=time.time())
        self._record(link.PREAMBLE, pre)
        self._record(link.HELLO, init.hello)
        kind, body = read_record(self.sock)
        assert kind == link.ACCEPT
        self.end = TunnelEnd(init.on_accept(body), service)
        self._record(link.FRAME, self.end.first_frame())
        kind, body = read_record(self.sock)
        assert kind == link.FRAME, body  # accepted
        self.seq = 0

    def _record(self, kind: int, body: Any) -> None:
        body = bytes(body)
        self.sock.sendall(link.record_header(kind, len(body)) + body)

    def send(self, *msgs: codec.Message) -> None:
        """One data frame of these mux messages (any, even against the protocol)."""
        payload = b"".join(codec.encode(m) for m in msgs)
        self._record(link.FRAME, self.end._sealer.seal(self.seq, payload, kind=KIND_DATA))
        self.seq += 1


def test_clients_that_reset_at_once_leave_no_target_connects_behind(pair: list[Site]) -> None:
    """Connect, send, reset, hundreds of times, to a tunnel whose target does not answer: each
    reset stream's target connect is dropped with it, so the owner holds no socket (nor the
    bytes sent) per reset stream for the 10 s connect timeout (the stream bound never applied:
    the streams are gone)."""
    aps, alcf = pair
    srv, fill = hanging_target()
    try:
        expose(aps, "slow", f"127.0.0.1:{srv.getsockname()[1]}", "--allow", "alcf")
        where = connect(alcf, "aps/slow")
        before, opened = open_fds(aps), counter(aps, "tunnel_streams")
        n = 400
        for _ in range(n):
            c = socket.create_connection(where)
            c.sendall(b"x" * (64 << 10))
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            c.close()
        wait_until(lambda: counter(aps, "tunnel_streams") >= opened + n, 20,
                   "every stream to reach the owner")
        # Under the connect timeout (10 s), so the connects were dropped, not timed out.
        wait_until(lambda: open_fds(aps) < before + 40, 8,
                   "the owner to drop the target connects of the reset streams")
    finally:
        srv.close()
        for c in fill:
            c.close()



def test_a_flood_of_refused_streams_is_counted_not_logged_line_by_line(pair: list[Site]) -> None:
    """Bug: every OPEN for a service the data connection was not made for logged a WARNING
    line: 5 MiB of OPENs wrote 4 MiB of log in three seconds."""
    aps, alcf = pair
    expose(aps, "--update", "granted", "127.0.0.1:9", "--allow", "alcf")
    raw = RawConsumer(alcf, aps, "granted")
    before = counter(aps, "tunnel_refused_not_allowed")
    n, sid = 0, 0
    for _ in range(10):  # (at most 4096 streams come into being per frame; the rest are busy)
        batch = [codec.Open(sid + i, "other") for i in range(1, 4001)]
        raw.send(*batch)
        sid += len(batch)
        n += len(batch)
    wait_until(lambda: counter(aps, "tunnel_refused_not_allowed") >= before + n, 30,
               "every refusal to be counted")
    assert aps.log().count("refused a tunnel connection to 'other'") <= 2
    raw.sock.close()



def test_a_consumer_that_opens_streams_and_never_reads_is_cut(pair: list[Site]) -> None:
    """Bug: every OPEN beyond the stream bound (or refused) was answered with a RESET queued for
    a consumer that never read: the owner's memory grew by what the consumer sent, without end
    (150 MiB of OPENs: +170 MiB)."""
    aps, alcf = pair
    expose(aps, "--update", "unread", "127.0.0.1:9", "--allow", "alcf")
    raw = RawConsumer(alcf, aps, "unread")
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    before = rss(aps)
    cut, sid = False, 0
    try:
        for _ in range(40):  # 40 x 100,000 OPENs of 10 bytes: 40 MB of RESETs unread
            raw.send(*(codec.Open(sid + i, "o") for i in range(1, 100_001)))
            sid += 100_000
    except OSError:
        cut = True
    wait_until(lambda: cut or closed_by_peer(raw.sock), 30, "the owner to cut the data connection")
    assert rss(aps) - before < 30 << 20, (before, rss(aps))


@pytest.mark.parametrize("edit", [
    {"connected": [{"site": "zz", "name": "x", "host": "127.0.0.1", "port": 0}]},
    {"connected": [{"site": "abcd", "name": "x", "host": "127.0.0.1", "port": 0}]},
    {"exposed": [{"name": "x", "host": "127.0.0.1", "port": 5, "allow": ["not-a-key"]}]},
    {"exposed": [{"name": "a/b", "host": "127.0.0.1", "port": 5, "allow": ["*"]}]},
    {"exposed": {"x": 1}},
    {"connected": [{"site": "ab" * 32, "name": "x", "host": "a\x00b", "port": 0}]},
    {"exposed": [{"name": "x", "host": "caf\u00e9", "port": 5, "allow": ["*"]}]},
    {"exposed": [{"name": "x", "host": "127.0.0.1", "port": 5, "allow": ["*"]},
                 {"name": "x", "host": "127.0.0.1", "port": 6, "allow": ["*"]}]},
    "[" * 100_000 + "]" * 100_000,
], ids=["site-not-hex", "site-short", "allow-not-a-key", "bad-name", "not-a-list", "host-nul",
        "host-not-ascii", "exposed-twice", "nested-deep"])
def test_a_tampered_registry_stops_the_daemon_with_one_clear_line(
        tmp_path: Path, edit: dict[str, Any] | str) -> None:
    """The last four were found by attacking live daemons: a host with a NUL stopped the
    daemon with a traceback, a name exposed twice was silently merged, deep nesting raised
    RecursionError."""
    home = tmp_path / "h"
    assert meshd("init", "--name", "lone", "--no-listen", home=home).returncode == 0
    registry = home / "tunnels.json"
    text = edit if isinstance(edit, str) else json.dumps(
        {"v": 1, "exposed": [], "connected": [], **edit})
    registry.write_text(text)
    r = meshd("run", home=home, timeout=30)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "not a valid tunnel registry" in r.stderr, r.stderr
    assert registry.read_text() == text  # nothing rewritten, nothing lost


def test_bytes_for_targets_being_connected_are_bounded(pair: list[Site]) -> None:
    """A member opens 2000 streams to a target that does not answer and sends each a full
    window (256 KiB): the owner holds at most MAX_HELD (64 MiB) of them, not 500 MiB, and
    resets the rest ``busy``; a second data connection for the service replaces the first, so
    more connections do not multiply the bound."""
    aps, alcf = pair
    srv, fill = hanging_target()
    try:
        expose(aps, "--update", "held", f"127.0.0.1:{srv.getsockname()[1]}", "--allow", "alcf")
        first = RawConsumer(alcf, aps, "held")
        second = RawConsumer(alcf, aps, "held")
        wait_until(lambda: closed_by_peer(first.sock), 10, "the older data connection to close")
        before, opened = rss(aps), counter(aps, "tunnel_streams")
        window = os.urandom((256 << 10) - codec.HEADER_SIZE * 2 - 16)
        n = 2000
        for sid in range(1, n + 1):
            second.send(codec.Open(sid, "held"), codec.Data(sid, window))
        wait_until(lambda: counter(aps, "tunnel_streams") >= opened + n, 30,
                   "every stream to reach the owner")
        assert rss(aps) - before < 160 << 20, (before, rss(aps))
        second.sock.close()
    finally:
        srv.close()
        for c in fill:
            c.close()


def test_an_unreadable_registry_stops_the_daemon_with_one_clear_line(tmp_path: Path) -> None:
    home = tmp_path / "h"
    assert meshd("init", "--name", "lone", "--no-listen", home=home).returncode == 0
    (home / "tunnels.json").mkdir()
    r = meshd("run", home=home, timeout=30)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "cannot read the tunnel registry" in r.stderr, r.stderr


# These two restart aps with changed settings: they come last in the module.

def test_one_member_cannot_hold_more_target_connections_than_its_share(pair: list[Site]) -> None:
    """Found by attacking live daemons: streams were bounded per data connection only, and a
    member holds one per service exposed to it, so 5 services x 4096 streams to targets that
    never accept took all 20,000 open files of the owner (its control socket stopped
    answering, other members' tunnels were reset).  Now one member's streams, over all the
    services, are bounded (``tunnel_streams_per_site``, here 8); beyond, each is reset
    ``busy``, and the daemon serves everyone else."""
    aps, alcf = pair
    srv, fill = hanging_target()
    port = srv.getsockname()[1]
    try:
        assert aps.stop() == 0
        set_config(aps, "tunnel_streams_per_site = 8")
        aps.launch().wait_up()
        wait_until(lambda: {p["name"]: p["state"] for p in alcf.client.peers()}.get("aps")
                   == "alive", 30, "alcf to see aps again")
        for name in ("share-a", "share-b"):
            expose(aps, "--update", name, f"127.0.0.1:{port}", "--allow", "alcf")
        first, second = RawConsumer(alcf, aps, "share-a"), RawConsumer(alcf, aps, "share-b")
        busy, opened = counter(aps, "tunnel_refused_busy"), counter(aps, "tunnel_streams")
        first.send(*(codec.Open(sid, "share-a") for sid in range(1, 6)))
        second.send(*(codec.Open(sid, "share-b") for sid in range(1, 7)))
        wait_until(lambda: counter(aps, "tunnel_refused_busy") - busy == 3, 10,
                   "three streams past the share to be refused")
        assert counter(aps, "tunnel_streams") - opened == 8
        assert aps.client.status()["name"] == "aps"  # the control socket answers
    finally:
        srv.close()
        for c in fill:
            c.close()


def test_a_target_the_resolver_refuses_resets_its_stream(pair: list[Site]) -> None:
    """Found by attacking live daemons: a target host the resolver refuses (``a..b``, from a
    registry edited by hand; ``meshd expose`` refuses it now) raised UnicodeError where only
    OSError was caught, so each stream stayed open for ever, with a traceback in the log."""
    aps, alcf = pair
    assert aps.stop() == 0
    registry = aps.home / "tunnels.json"
    data = json.loads(registry.read_text()) if registry.exists() else {
        "v": 1, "exposed": [], "connected": []}
    data["exposed"].append({"name": "dots", "host": "a..b", "port": 80, "allow": ["*"]})
    registry.write_text(json.dumps(data))
    aps.launch().wait_up()
    wait_until(lambda: {p["name"]: p["state"] for p in alcf.client.peers()}.get("aps")
               == "alive", 30, "alcf to see aps again")
    refused = counter(aps, "tunnel_target_refused")
    raw = RawConsumer(alcf, aps, "dots")
    raw.send(*(codec.Open(sid, "dots") for sid in range(1, 4)))
    wait_until(lambda: counter(aps, "tunnel_target_refused") - refused == 3, 10,
               "the three streams to be refused")
    wait_until(lambda: {s["name"]: s["connections"] for s in aps.json("services")}["dots"] == 0,
               10, "no stream to stay open")
    assert "Traceback" not in aps.log()
