"""Channels between real daemons on loopback: arrays and bytes end to end, paths, flush, policy.

Every site is a separate ``meshd run`` process; the applications use ``meshd.connect()`` over the
daemons' real control sockets and ipc endpoints; the daemons talk over their real peer ports.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pytest

import meshd
from meshd.testing.processes import wait_until
from tests.helpers import mesh_of, set_config



def test_arrays_and_bytes_arrive_in_order_exactly_once_with_meta(sites: Any) -> None:
    a, b = mesh_of(sites, "aps", "alcf")
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((64, 64)).astype(np.float32), np.arange(10, dtype=">i8"),
              rng.integers(0, 255, (3, 5, 7), dtype=np.uint8),
              np.zeros((2, 2), dtype=[("x", "<f8"), ("y", "<i2")]),
              rng.standard_normal(300_000)]  # 2.4 MB: travels alone
    with meshd.connect(b.home) as mb, meshd.connect(a.home) as ma:
        rx = mb.receiver("frames")
        tx = ma.sender("frames", to="alcf")
        for i, arr in enumerate(arrays):
            tx.send(arr, meta={"i": i, "shape": list(arr.shape)})
        tx.send(b"plain bytes", meta={"i": len(arrays)})
        tx.flush(timeout=30)
        got = [rx.recv(timeout=30) for _ in range(len(arrays) + 1)]
        for i, (msg, arr) in enumerate(zip(got, arrays)):
            assert msg.seq == i and msg.meta["i"] == i and msg.sender == "aps"
            assert msg.array.dtype == arr.dtype and msg.array.shape == arr.shape
            assert np.array_equal(msg.array, arr)
        assert got[-1].kind == "bytes" and got[-1].bytes() == b"plain bytes"
        (out,) = [c for c in ma.channels() if c["direction"] == "out"]
        assert out["name"] == "frames" and out["peer"] == "alcf" and out["path"] == "direct"
        assert out["messages"] == len(arrays) + 1 and out["acked_messages"] == len(arrays) + 1
        wait_until(lambda: [c["messages"] for c in mb.channels() if c["direction"] == "in"]
                   == [len(arrays) + 1], 30, "the receiving application to report its counters")
        (inc,) = [c for c in mb.channels() if c["direction"] == "in"]
        assert inc["messages"] == len(arrays) + 1 and inc["peer"] == "aps"


def test_many_small_messages_are_batched_and_counted(sites: Any) -> None:
    a, b = mesh_of(sites, "aps", "alcf")
    n = 20_000
    with meshd.connect(b.home) as mb, meshd.connect(a.home) as ma:
        rx = mb.receiver("small")
        tx = ma.sender("small", to="alcf")
        for i in range(n):
            tx.send(i.to_bytes(8, "big") * 8)
        tx.flush(timeout=60)
        digest = hashlib.sha256()
        for i in range(n):
            msg = rx.recv(timeout=30)
            assert msg.seq == i and msg.bytes() == i.to_bytes(8, "big") * 8
            digest.update(msg.data)
        (out,) = [c for c in ma.channels() if c["direction"] == "out"]
        assert out["messages"] == n


def test_an_outbound_only_receiver_is_reached_by_the_reversed_path(sites: Any) -> None:
    a, b = mesh_of(sites, "aps", "edge", listen={"edge": None})
    with meshd.connect(b.home) as mb, meshd.connect(a.home) as ma:
        rx = mb.receiver("det")
        tx = ma.sender("det", to="edge")
        tx.send(np.arange(1000))
        tx.flush(timeout=30)
        assert np.array_equal(rx.recv(timeout=30).array, np.arange(1000))
        (out,) = [c for c in ma.channels() if c["direction"] == "out"]
        assert out["path"] == "reversed" and out["relay"] is None
    # the Hello rode in the dial request (one round trip saved), checked before dialing back
    assert b.client.status()["counters"].get("channel_hello_in_dial") == 1


def test_a_forced_relay_carries_the_channel_and_sees_only_ciphertext(sites: Any) -> None:
    a, b, r = mesh_of(sites, "aps", "alcf", "relay", configs={"aps": 'paths = ["relay"]'})
    secret = np.frombuffer(b"top secret detector frame " * 4000, dtype=np.uint8)
    with meshd.connect(b.home) as mb, meshd.connect(a.home) as ma:
        rx = mb.receiver("r")
        tx = ma.sender("r", to="alcf")
        tx.send(secret)
        tx.flush(timeout=30)
        assert np.array_equal(rx.recv(timeout=30).array, secret)
        (out,) = [c for c in ma.channels() if c["direction"] == "out"]
        assert out["path"] == "relay" and out["relay"] == "relay"
        relayed = [c for c in r.client.channels() if c["direction"] == "relay"]
        assert relayed and relayed[0]["bytes"] > secret.nbytes


def test_a_receiver_policy_refuses_sites_not_allowed(sites: Any) -> None:
    a, b, c = mesh_of(sites, "aps", "alcf", "nersc")
    with meshd.connect(b.home) as mb, meshd.connect(a.home) as ma, \
            meshd.connect(c.home) as mc:
        rx = mb.receiver("only-nersc", allow=["nersc"])
        tx = ma.sender("only-nersc", to="alcf")
        tx.send(b"from aps")
        with pytest.raises(meshd.LocalError) as err:
            tx.flush(timeout=3)
        assert err.value.reason == "timeout"
        ok = mc.sender("only-nersc", to="alcf")
        ok.send(b"from nersc")
        ok.flush(timeout=30)
        msg = rx.recv(timeout=30)
        assert msg.sender == "nersc" and msg.bytes() == b"from nersc"
        ma.close(flush=False)


def test_a_member_that_moves_is_checked_again(sites: Any) -> None:
    """Reachability is re-checked when a member's advertised addresses change."""
    import socket

    a, b = mesh_of(sites, "aps", "alcf")

    def a_dials_b() -> Any:
        return {p["name"]: p["we_dial"] for p in a.client.peers()}.get("alcf")

    wait_until(lambda: a_dials_b() == "yes", 60, "aps to have dialed alcf back")
    assert not a.client.status()["counters"].get("channel_reach_addresses_changed")
    b.stop()
    with socket.socket() as s:  # a port alcf has not used: its record changes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    set_config(b, f'listen = "127.0.0.1:{port}"')
    b.start()
    wait_until(lambda: a.client.status()["counters"].get("channel_reach_addresses_changed"),
               60, "aps to notice that alcf moved")
    assert any(a_ == f"127.0.0.1:{port}" for p in a.client.peers() if p["name"] == "alcf"
               for a_ in p["addrs"])
    wait_until(lambda: a_dials_b() == "yes", 60, "aps to have dialed alcf at its new address")
    assert "advertises new addresses" in a.log()


_DYING_APP = """
import os, sys, numpy as np, meshd
mesh = meshd.connect(sys.argv[1])
rx = mesh.receiver("left-behind")
tx = mesh.sender("orphan", to="alcf")
for i in range(20):
    tx.send(np.full(100_000, i, dtype=np.int32))
tx.flush(timeout=30)  # (ZeroMQ would drop what its io thread still holds at a hard exit)
print("sent", flush=True)
os._exit(0)  # dies without closing its sender or receiver
"""


def test_an_application_that_dies_leaves_nothing_behind(sites: Any) -> None:
    """The daemon notices (the ipc connections drop) and closes its sender and receiver."""
    import subprocess
    import sys

    a, b = mesh_of(sites, "aps", "alcf")
    with meshd.connect(b.home) as mb:
        rx = mb.receiver("orphan")
        app = subprocess.run([sys.executable, "-c", _DYING_APP, str(a.home)],
                             capture_output=True, text=True, timeout=60)
        assert app.returncode == 0 and "sent" in app.stdout, app.stderr
        got = [rx.recv(timeout=30) for _ in range(20)]
        assert [m.seq for m in got] == list(range(20))
        assert all(np.all(m.array == i) for i, m in enumerate(got))
    wait_until(lambda: a.client.status()["counters"].get("channel_orphans_closed") == 2, 30,
               "aps to close the dead application's sender and receiver")
    assert not [c for c in a.client.channels() if c["direction"] == "out"]
    assert "the application is gone" in a.log()


def test_close_with_a_timeout_gives_up_on_a_receiver_that_is_gone(sites: Any) -> None:
    a, b = mesh_of(sites, "aps", "alcf")
    assert b.stop() == 0
    with meshd.connect(a.home) as ma:
        tx = ma.sender("nowhere", to="alcf")
        tx.send(b"never acknowledged")
        with pytest.raises(meshd.LocalError) as err:
            tx.close(timeout=1.0)  # without a timeout this would wait for alcf forever
        assert err.value.reason == "timeout"
        assert not [c for c in ma.channels() if c["direction"] == "out"]  # closed all the same
        tx2 = ma.sender("nowhere-2", to="alcf")
        tx2.send(b"also never acknowledged")
        with pytest.raises(meshd.LocalError) as err:
            ma.close(timeout=1.0)  # the context manager's exit would have waited too
        assert err.value.reason == "timeout"
    assert not [c for c in a.client.channels() if c["direction"] == "out"]


def test_a_channel_to_a_site_that_rotated_its_key_opens_and_delivers(sites: Any) -> None:
    """The receiving daemon answers Hellos with the key it has now, not the one it started with."""
    a, b = mesh_of(sites, "aps", "alcf")
    r = b.cli("rotate", "--json")
    assert r.returncode == 0, r.stderr + b.log()
    new_id = json.loads(r.stdout)["site_id"]
    wait_until(lambda: [(p["site_id"], p["state"]) for p in a.client.peers()
                        if p["name"] == "alcf"] == [(new_id, "alive")], 30,
               "aps to follow alcf's new key")
    with meshd.connect(b.home) as mb, meshd.connect(a.home) as ma:
        rx = mb.receiver("after-rotation")
        # by name: its retired key has the same name (before: "'alcf' matches 2 sites")
        tx = ma.sender("after-rotation", to="alcf", paths=["direct"])
        assert tx.peer == "alcf"
        tx.send(np.arange(100))
        tx.flush(timeout=30)
        assert np.array_equal(rx.recv(timeout=30).array, np.arange(100))
    assert b.client.status()["counters"].get("channel_accepted", 0) >= 1
