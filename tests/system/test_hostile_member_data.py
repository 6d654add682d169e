"""A member misuses its data connections to a real daemon.

A member holds a real key, so it can complete the channel handshake and send whole frames.
What it must not do is hold the receiver's memory by stopping in the middle of a frame.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import ExitStack
from typing import Any

from meshd.channel import link
from meshd.channel.handshake import Initiator
from meshd.testing.processes import wait_until
from meshd.trust.identity import SiteKey
from tests.helpers import closed_by_peer, mesh_of

MiB = 1 << 20


def read_record(s: socket.socket) -> tuple[int, bytes]:
    head = b""
    while len(head) < link.RECORD_HEADER.size:
        chunk = s.recv(link.RECORD_HEADER.size - len(head))
        assert chunk, "closed before a record"
        head += chunk
    kind, n = link.RECORD_HEADER.unpack(head)
    body = b""
    while len(body) < n:
        chunk = s.recv(n - len(body))
        assert chunk, "closed in a record"
        body += chunk
    return kind, body


def test_frames_that_stall_halfway_are_cut_and_their_memory_freed(sites: Any) -> None:
    """Bug: 20 member connections stalled mid-frame held 335 MB for 90 s (never timed out)."""
    a, b = mesh_of(sites, "aps", "alcf")
    member = SiteKey.load(b.home / "site.key")  # b's key: the attacker is a real member
    receiver = SiteKey.load(a.home / "site.key").public
    host, _, port = a.client.status()["listen"].rpartition(":")
    with ExitStack() as stack:
        conns = []
        for _ in range(20):
            cid = os.urandom(16)
            s = stack.enter_context(socket.create_connection((host, int(port)), timeout=10))
            pre = link.encode_preamble(link.Preamble(
                "direct", cid, member.public, receiver, "s", b"", int(time.time() * 1000)))
            init = Initiator(member, receiver, cid, now=time.time())
            s.sendall(link.record_header(link.PREAMBLE, len(pre)) + pre
                      + link.record_header(link.HELLO, len(init.hello)) + init.hello)
            kind, body = read_record(s)
            assert kind == link.ACCEPT
            init.on_accept(body)  # the handshake is real: the connection is trusted now
            # A 16 MiB frame announced, 8 MiB of it sent, then nothing.
            s.sendall(link.record_header(link.FRAME, 16 * MiB) + os.urandom(MiB) * 8)
            conns.append(s)
        # (the timeout is 15 s without a byte; the deadline leaves room for a loaded machine)
        wait_until(lambda: all(closed_by_peer(s) for s in conns), 60,
                   "the receiver to cut every stalled connection")
    assert a.client.status()["pid"]
    assert "stalled in the middle of a 16" in a.log()
