"""Members declared dead while alive come back (issue 11, bug 5): the dead are re-probed, refute
their death with a higher incarnation, and channels between them open again."""

from __future__ import annotations

import os
import signal
from typing import Any

import meshd
from meshd.testing.processes import wait_until
from tests.helpers import Site, mesh_of


def _peer(site: Site, name: str) -> dict[str, Any]:
    return {p["name"]: p for p in site.client.peers()}[name]


def _freeze(site: Site) -> None:
    assert site.proc is not None
    os.kill(site.proc.pid, signal.SIGSTOP)


def _thaw(site: Site) -> None:
    assert site.proc is not None
    os.kill(site.proc.pid, signal.SIGCONT)


def _channel_works(frm: Site, to: Site, name: str) -> None:
    with meshd.connect(to.home) as mt:
        rx = mt.receiver(name)
        mf = meshd.connect(frm.home)
        try:
            tx = mf.sender(name, to=to.name)
            tx.send(b"back from the dead")
            tx.flush(timeout=30)
            assert rx.recv(timeout=30).bytes() == b"back from the dead"
        finally:
            mf.close(flush=False)


def test_two_sites_that_declared_each_other_dead_come_back_and_channels_open(
        sites: Any) -> None:
    a, b = mesh_of(sites, "aps", "alcf")
    inc_a, inc_b = _peer(b, "aps")["incarnation"], _peer(a, "alcf")["incarnation"]
    _freeze(b)
    try:
        wait_until(lambda: _peer(a, "alcf")["state"] == "dead", 90, "aps to declare alcf dead")
        # Now the other way round: aps frozen, alcf runs until it declares aps dead.
        _freeze(a)
        _thaw(b)
        wait_until(lambda: _peer(b, "aps")["state"] == "dead", 90, "alcf to declare aps dead")
    finally:
        _thaw(b)
        _thaw(a)
    for s, other in ((a, "alcf"), (b, "aps")):
        wait_until(lambda s=s, other=other: _peer(s, other)["state"] == "alive", 90,
                   f"{s.name} to see {other} alive again")
    # each came back by refuting its death, at a higher incarnation than it was declared at
    assert _peer(a, "alcf")["incarnation"] > inc_b
    assert _peer(b, "aps")["incarnation"] > inc_a
    _channel_works(a, b, "a-to-b")
    _channel_works(b, a, "b-to-a")
