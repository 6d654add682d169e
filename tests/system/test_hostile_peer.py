"""A hostile or careless peer talks to a real daemon over its real CURVE port.

The daemon must refuse garbage, forged and stale records, and requests from non-members; count
each refusal; store nothing it refused; and keep running.
"""

from __future__ import annotations

import os
from typing import Any

import msgpack
import zmq
from nacl.public import PrivateKey

from meshd.trust import records
from meshd.peer import wire
from meshd.testing.processes import wait_until
from meshd.trust.identity import SiteKey, curve_public_of
from meshd.trust.records import SiteRecord

from tests.helpers import invite, Site, state_dump


class RawPeer:
    """A bare DEALER with its own CURVE key, speaking (or abusing) the peer protocol."""

    def __init__(self, server: Site, curve_secret: bytes | None = None) -> None:
        status = server.client.status()
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 10_000)
        secret = PrivateKey(curve_secret) if curve_secret else PrivateKey.generate()
        self.sock.curve_secretkey = bytes(secret)
        self.sock.curve_publickey = bytes(secret.public_key)
        server_key = SiteKey.load(server.home / "site.key").public
        self.sock.curve_serverkey = curve_public_of(server_key)
        self.sock.connect(f"tcp://{status['listen']}")
        self.next_id = 1

    def send_raw(self, data: bytes) -> None:
        self.sock.send(data)

    def ask(self, msg: dict[str, Any]) -> dict[str, Any]:
        msg = {**msg, "id": self.next_id}
        self.next_id += 1
        self.sock.send(wire.encode(msg))
        reply = wire.decode(self.sock.recv())
        assert reply["id"] == msg["id"]
        return reply

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def test_non_member_and_garbage_are_refused_and_the_daemon_keeps_running(sites: Any) -> None:
    a = sites("aps-8id")
    invite(a)  # founds the mesh
    mesh_id = bytes.fromhex(a.json("status")["mesh_id"])
    before = state_dump(a)
    peer = RawPeer(a)
    try:
        for junk in (b"", b"\xc1", b"\x93\x01\x02", os.urandom(200),
                     msgpack.packb({"t": "sync", "id": 1}),  # missing fields
                     msgpack.packb({"t": "sync", "id": True, "mesh": mesh_id, "items": []}),
                     msgpack.packb({"t": "nope", "id": 1})):
            peer.send_raw(junk)
        # Messages on one connection arrive in order: once this is answered, all were handled.
        reply = peer.ask({"t": "sync", "mesh": mesh_id, "items": []})
        assert reply["t"] == "error" and reply["reason"] == "not-member"
        # Something bigger than the daemon accepts: the connection is dropped, not the daemon.
        peer.send_raw(b"\x00" * (wire.MAX_MESSAGE_BYTES + 10))
    finally:
        peer.close()
    peer = RawPeer(a)
    try:
        forged = SiteKey.generate()
        rec = records.sign(SiteRecord(forged.public, mesh_id, "intruder", ("127.0.0.1:1",), True,
                                      1, 1_700_000_000), forged)
        reply = peer.ask({"t": "join", "mesh": mesh_id, "invite": b"\x00" * 8, "proof": b"\x00" * 32,
                          "inviter": SiteKey.load(a.home / "site.key").public,
                          "record": rec.raw})
        assert reply["t"] == "error" and reply["reason"] == "unknown"
    finally:
        peer.close()
    status = a.json("status")
    assert status["counters"]["peer_dropped"] >= 7
    assert status["counters"]["peer_refused_not_member"] == 1
    assert state_dump(a) == before


def test_member_sending_forged_or_stale_records_is_refused(sites: Any) -> None:
    a, b = sites("aps-8id"), sites("alcf")
    assert b.cli("join", input=invite(a, "--role", "introducer")).returncode == 0
    wait_until(lambda: len(a.client.peers()) == 2 and all(p["verified"] for p in a.client.peers()),
               30, "aps-8id to hold alcf's record")
    mesh_id = bytes.fromhex(a.json("status")["mesh_id"])
    b_key = SiteKey.load(b.home / "site.key")
    held = {p["name"]: p for p in a.json("peers")}["alcf"]
    before = state_dump(a)

    # A record claiming to be alcf's, with a newer seq, but signed by another key.
    other = SiteKey.generate()
    good = records.sign(SiteRecord(b_key.public, mesh_id, "alcf", ("10.9.9.9:1",), True,
                                   held["seq"] + 5, 1_700_000_000), b_key)
    envelope = msgpack.unpackb(good.raw)
    envelope[2] = other.sign(records.DOMAIN["site-record"] + envelope[1])
    forged = msgpack.packb(envelope, use_bin_type=True)
    # alcf's genuine signature, but an older sequence than the one aps-8id holds.
    stale = records.sign(SiteRecord(b_key.public, mesh_id, "alcf", ("10.9.9.9:1",), True,
                                    held["seq"] - 1, 1_700_000_000), b_key)

    peer = RawPeer(a, curve_secret=b_key.curve_keypair()[1])  # speaks as alcf, a member
    try:
        reply = peer.ask({"t": "sync", "mesh": mesh_id, "items": [forged, stale.raw, b"junk"]})
    finally:
        peer.close()
    assert reply["t"] == "ok"
    counters = a.json("status")["counters"]
    assert counters["records_refused_signature"] == 1
    assert counters["records_refused_stale"] == 1
    assert counters["records_refused_malformed"] == 1
    assert {p["name"]: p for p in a.json("peers")}["alcf"]["addrs"] == held["addrs"]
    assert state_dump(a)[1] == before[1]  # site_records untouched


def test_revoked_site_is_shut_out_everywhere(sites: Any) -> None:
    a, b, c = sites("aps-8id"), sites("alcf"), sites("nersc")
    assert b.cli("join", input=invite(a, "--role", "introducer")).returncode == 0
    assert c.cli("join", input=invite(b)).returncode == 0
    for s in (a, b, c):
        wait_until(lambda s=s: sum(p["verified"] for p in s.client.peers()) == 3, 30,
                   f"{s.name} to know all three")
    r = a.cli("revoke", "nersc", "--reason", "lost laptop", "--json")
    assert r.returncode == 0, r.stderr
    for s in (a, b):
        wait_until(lambda s=s: [p["name"] for p in s.client.peers(revoked=True)] == ["nersc"],
                   30, f"{s.name} to see nersc revoked")
        assert "nersc" not in {p["name"] for p in s.client.peers()}
    # nersc's requests are now refused by the others.
    c_key = SiteKey.load(c.home / "site.key")
    mesh_id = bytes.fromhex(b.json("status")["mesh_id"])
    peer = RawPeer(b, curve_secret=c_key.curve_keypair()[1])
    try:
        reply = peer.ask({"t": "sync", "mesh": mesh_id, "items": []})
    finally:
        peer.close()
    assert reply["t"] == "error" and reply["reason"] == "not-member"
    # A plain member may not revoke anyone.
    r = c.cli("revoke", "alcf")
    assert r.returncode == 1 and "may revoke" in r.stderr
