"""Tunnels under attack, between real daemons on loopback: what a consuming site (or any local
user of its listen address) can make an owning site spend, and a tampered tunnel registry.

Every site is a separate ``meshd run`` process; the clients and targets are plain sockets.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshd.testing.processes import wait_until
from tests.helpers import Site, meshd, mesh_of, open_fds
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
        wait_until(lambda: open_fds(aps) < before + 40, 4,
                   "the owner to drop the target connects of the reset streams")
    finally:
        srv.close()
        for c in fill:
            c.close()


@pytest.mark.parametrize("edit", [
    {"connected": [{"site": "zz", "name": "x", "host": "127.0.0.1", "port": 0}]},
    {"connected": [{"site": "abcd", "name": "x", "host": "127.0.0.1", "port": 0}]},
    {"exposed": [{"name": "x", "host": "127.0.0.1", "port": 5, "allow": ["not-a-key"]}]},
    {"exposed": [{"name": "a/b", "host": "127.0.0.1", "port": 5, "allow": ["*"]}]},
    {"exposed": {"x": 1}},
], ids=["site-not-hex", "site-short", "allow-not-a-key", "bad-name", "not-a-list"])
def test_a_tampered_registry_stops_the_daemon_with_one_clear_line(
        tmp_path: Path, edit: dict[str, Any]) -> None:
    home = tmp_path / "h"
    assert meshd("init", "--name", "lone", "--no-listen", home=home).returncode == 0
    registry = home / "tunnels.json"
    text = json.dumps({"v": 1, "exposed": [], "connected": [], **edit})
    registry.write_text(text)
    r = meshd("run", home=home, timeout=30)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "not a valid tunnel registry" in r.stderr, r.stderr
    assert registry.read_text() == text  # nothing rewritten, nothing lost
