"""Handed-over channels between real daemons: the sending application holds the data
connection and the channel keys (``channel_handover = true``), its daemon only negotiates and
resumes.  Delivery stays in order and exactly once across a broken connection, a restart of
the sending daemon and an application that dies mid-stream."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np

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
        (inc,) = [c for c in mb.channels() if c["direction"] == "in"]
        assert inc["messages"] == n
        assert a.client.status()["counters"].get("channel_handovers", 0) >= 1
        tx.close()
        wait_until(lambda: not [c for c in mb.channels() if c["direction"] == "in"], 30,
                   "the receiving daemon to forget the closed channel")
