"""Gossip membership between real daemons: crash detection, pauses, graceful leave, events."""

from __future__ import annotations

import asyncio
import json
import socket
import os
import signal
import threading
import time
from typing import Any

import msgpack
import pytest

from meshd.app.client import Client
from meshd.channel import link
from meshd.daemon.rekeys import ask_rotations
from meshd.errors import ProtocolError
from meshd.trust.identity import SiteKey
from meshd.testing.processes import wait_until
from meshd.swim import SwimConfig
from meshd.swim.util import suspicion_timeout

from tests.helpers import invite, mesh_of, Site


def five_sites(sites: Any) -> list[Site]:
    names = ["aps-8id", "alcf", "nersc", "slac", "ornl"]
    all_sites = [sites(n) for n in names]
    token = invite(all_sites[0], "--uses", "4")
    for s in all_sites[1:]:
        r = s.cli("join", input=token)
        assert r.returncode == 0, r.stderr
    for s in all_sites:
        wait_until(lambda s=s: _states(s) == {n: "alive" for n in names}, 60,
                   f"{s.name} to see all five alive")
    return all_sites


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Decoy:
    """A port that answers every ``rotations`` question with "none" (a stale address of a
    site, or someone on the LAN announcing its key), and drops anything else."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.asked = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        none = msgpack.packb([])
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    first = conn.recv(4096)
                    if first[:1] == bytes([link.PREAMBLE]) and b"rotations" in first:
                        self.asked += 1
                        conn.sendall(link.record_header(link.ROTATIONS, len(none)) + none)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def key_of(site: Site) -> bytes:
    """The site's public key now (from its key file)."""
    return SiteKey.load(site.home / "site.key").public


def _states(site: Site) -> dict[str, str]:
    return {p["name"]: p["state"] for p in site.client.peers()}


class EventLog:
    """Collects a daemon's membership events from its real control socket, in a thread."""

    def __init__(self, site: Site) -> None:
        self.events: list[dict[str, Any]] = []
        self._client = Client(site.home)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self._client.events():
                self.events.append(event)
        except Exception:
            pass

    def of(self, name: str, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["name"] == name and e["type"] == kind]


def test_a_crashed_site_is_declared_dead_by_every_live_site(sites: Any) -> None:
    a, b, c, d, e = five_sites(sites)
    logs = [EventLog(s) for s in (a, b, c, d)]
    wait_until(lambda: all(lg.events for lg in logs), 30, "the event streams to start")
    started = time.monotonic()
    e.kill()
    for s in (a, b, c, d):
        wait_until(lambda s=s: _states(s)["ornl"] == "dead", 60, f"{s.name} to declare ornl dead")
    elapsed = time.monotonic() - started
    # Nobody else was declared dead (a loaded machine may make one briefly suspect).
    for s, lg in zip((a, b, c, d), logs):
        assert [ev for ev in lg.events if ev["type"] == "dead" and ev["name"] != "ornl"] == []
        states = _states(s)
        assert {n: st for n, st in states.items() if n != "ornl"} == {
            n: states[n] for n in ("aps-8id", "alcf", "nersc", "slac")}
        assert all(states[n] in ("alive", "suspect") for n in ("aps-8id", "alcf", "nersc", "slac"))
        peers = {p["name"]: p for p in s.client.peers()}
        assert peers["alcf"]["incarnation"] >= 0 and peers["ornl"]["incarnation"] >= 0
    assert elapsed < 60


def test_a_paused_site_shorter_than_the_suspicion_timeout_is_never_declared_dead(
        sites: Any) -> None:
    all_sites = five_sites(sites)
    paused = all_sites[2]
    logs = [EventLog(s) for s in all_sites if s is not paused]
    wait_until(lambda: all(lg.events for lg in logs), 30, "the event streams to start")
    assert paused.proc is not None
    # The pause is the stimulus: long enough for a probe to fail (a probe interval and its
    # timeout), well short of the smallest suspicion timeout for N=5 (4 s), so that the paused
    # site has time left to refute on a loaded machine.
    cfg = SwimConfig()
    pause = cfg.probe_interval + cfg.probe_timeout
    assert pause <= 0.4 * suspicion_timeout(cfg.suspicion_mult, 5, cfg.probe_interval)
    os.kill(paused.proc.pid, signal.SIGSTOP)
    time.sleep(pause)
    os.kill(paused.proc.pid, signal.SIGCONT)
    resumed = time.time()
    # Every other site hears from it again after the pause...
    for s in all_sites:
        if s is not paused:
            wait_until(lambda s=s: ({p["name"]: p for p in s.client.peers()}["nersc"]["last_seen"]
                                    or 0) > resumed, 30, f"{s.name} to hear from nersc again")
    # ...and none of them ever declared it dead.
    for lg in logs:
        assert lg.of("nersc", "dead") == []
    for s in all_sites:
        assert _states(s)["nersc"] in ("alive", "suspect")


def test_graceful_stop_is_seen_as_left_not_dead(sites: Any) -> None:
    a, b, c, d, e = five_sites(sites)
    assert d.stop() == 0
    for s in (a, b, c, e):
        wait_until(lambda s=s: _states(s)["slac"] == "left", 30, f"{s.name} to see slac leave")
    left_at = {p["name"]: p for p in a.client.peers()}["slac"]["incarnation"]
    # Back again: it must outrank the "left" everyone remembers, so it starts a higher incarnation.
    d.start()
    for s in (a, b, c, e):
        wait_until(lambda s=s: _states(s)["slac"] == "alive", 30, f"{s.name} to see slac back")
    assert {p["name"]: p for p in a.client.peers()}["slac"]["incarnation"] > left_at


def test_a_site_that_only_dials_out_is_kept_alive_and_detected_when_it_dies(sites: Any) -> None:
    a, b = sites("aps-8id"), sites("alcf")
    c = sites("edge-box", listen=None)  # no inbound port at all
    token = invite(a, "--uses", "2")
    assert b.cli("join", input=token).returncode == 0
    assert c.cli("join", input=token).returncode == 0
    names = {"aps-8id", "alcf", "edge-box"}
    for s in (a, b, c):
        wait_until(lambda s=s: _states(s) == {n: "alive" for n in names}, 60,
                   f"{s.name} to see all three alive")
    peers = {p["name"]: p for p in a.client.peers()}
    assert peers["edge-box"]["addrs"] == [] and peers["edge-box"]["reachable"] is False
    assert peers["edge-box"]["reached"] == "inbound"
    # Alive for several suspicion timeouts although nobody can dial it.
    log = EventLog(a)
    cfg = SwimConfig()
    horizon = time.time() + 3 * suspicion_timeout(cfg.suspicion_mult, 3, cfg.probe_interval)
    wait_until(lambda: time.time() > horizon
               and ({p["name"]: p for p in a.client.peers()}["edge-box"]["last_seen"] or 0)
               > horizon - 1, 60, "three suspicion timeouts with edge-box heard from")
    # Never dead; a heartbeat gap on a loaded machine may make it suspect once (refuted).
    assert log.of("edge-box", "dead") == [] and len(log.of("edge-box", "suspect")) <= 1
    c.kill()
    for s in (a, b):
        wait_until(lambda s=s: _states(s)["edge-box"] == "dead", 60,
                   f"{s.name} to declare edge-box dead")


def test_key_rotation_hands_membership_to_the_new_key_and_the_mesh_follows(sites: Any) -> None:
    a, b, c = sites("aps-8id"), sites("alcf"), sites("nersc")
    assert b.cli("join", input=invite(a, "--role", "introducer")).returncode == 0
    assert c.cli("join", input=invite(b)).returncode == 0
    stale_token = invite(b)
    for s in (a, b, c):
        wait_until(lambda s=s: sum(p["verified"] for p in s.client.peers()) == 3, 30,
                   f"{s.name} to know all three")
    old = b.json("status")
    r = b.cli("rotate", "--json")
    assert r.returncode == 0, r.stderr + b.log()
    rotated = json.loads(r.stdout)
    assert rotated["old_site_id"] == old["site_id"] and rotated["site_id"] != old["site_id"]
    assert b.json("status")["site_id"] == rotated["site_id"]
    assert oct((b.home / "site.key").stat().st_mode & 0o777) == "0o600"
    assert not (b.home / "site.key.new").exists()

    def alcf_is_new(s: Site) -> bool:
        peers = {p["name"]: p for p in s.client.peers()}
        p = peers.get("alcf")
        return (p is not None and p["site_id"] == rotated["site_id"] and p["verified"]
                and p["state"] == "alive" and len(peers) == 3)

    for s in (a, b, c):
        wait_until(lambda s=s: alcf_is_new(s), 30, f"{s.name} to follow alcf's new key")
        peers = {p["name"]: p for p in s.client.peers()}
        assert peers["alcf"]["role"] == "introducer"
        assert old["site_id"] not in {p["site_id"] for p in s.client.peers()}
        assert peers["nersc"]["role"] == "member"  # admitted by the old key: still a member
    # The new key works for everything the old one did; the old key's invitation is void.
    d = sites("desy")
    assert d.cli("join", input=invite(b)).returncode == 0
    e = sites("eve")
    r = e.cli("join", input=stale_token)
    assert r.returncode == 1


@pytest.mark.parametrize("listens", [True, False], ids=["listening", "dial-out-only"])
def test_a_member_that_missed_a_rotation_learns_it_from_the_rotated_site_itself(
        sites: Any, listens: bool) -> None:
    """Before: with no third member to relay the rotation, the member that missed it refused
    the rotated site's new key for good (and the old key was gone), so each saw the other dead
    forever.  Here aps is frozen through two rotations of alcf; alcf then presents the chain of
    rotations from the key aps knows, which aps checks and takes.  Sync rounds are off (once a
    day): alcf does so as soon as aps refuses its membership messages, not a round later."""
    rare = "sync_interval = 86400"
    a, b = mesh_of(sites, "aps", "alcf", listen={"alcf": "127.0.0.1:0" if listens else None},
                   configs={"aps": rare, "alcf": rare})
    first = b.json("status")["site_id"]
    assert a.proc is not None
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        for _ in range(2):
            r = b.cli("rotate", "--json")
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout)["told"] == 0
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    now = b.json("status")["site_id"]
    assert now != first

    def follows() -> bool:
        peers = {p["name"]: p for p in a.client.peers()}
        alcf = peers.get("alcf")
        if alcf is None:
            return False
        return bool(alcf["site_id"] == now and alcf["verified"] and alcf["state"] == "alive")

    wait_until(follows, 60, "aps to take alcf's new key from alcf")
    wait_until(lambda: _states(b) == {"aps": "alive", "alcf": "alive"}, 60,
               "alcf to see aps alive again")
    assert first not in {p["site_id"] for p in a.client.peers()}
    assert a.client.status()["counters"]["rekeys_taken"] == 1
    assert b.client.status()["counters"]["rekeys_sent"] >= 1  # one per exchange refused
    assert "took the new key of alcf from the site itself" in a.log()
    assert "Traceback" not in a.log() + b.log()


def test_a_member_that_only_dials_out_asks_the_rotated_site_for_its_new_key(
        sites: Any) -> None:
    """Before: aps, which only dials out, was stopped while alcf rotated its key; alcf could
    not reach it, and once back aps dialed the old key, which alcf's port no longer answers:
    each saw the other dead for good.  Now aps, finding alcf silent, asks alcf's port on a
    plain data connection for the rotations of the key it knows, checks and keeps them, and
    dials the new key.  Sync rounds are off (once a day), so only this path can do it."""
    rare = "sync_interval = 86400"
    decoy = Decoy()  # alcf's first address: something else answers there, "no rotations"
    port = free_port()
    b, a = mesh_of(sites, "alcf", "aps", listen={"aps": None, "alcf": f"127.0.0.1:{port}"},
                   configs={"aps": rare, "alcf": rare + "\nadvertise = [\"127.0.0.1:"
                            f"{decoy.port}\", \"127.0.0.1:{port}\"]"})
    first, first_key, aps_key = b.json("status")["site_id"], key_of(b), key_of(a)
    assert a.stop() == 0
    for _ in range(2):
        r = b.cli("rotate", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["told"] == 0
    now = b.json("status")["site_id"]
    assert now != first
    a.launch().wait_up()

    def follows() -> bool:
        alcf = {p["name"]: p for p in a.client.peers()}.get("alcf")
        return bool(alcf is not None and alcf["site_id"] == now and alcf["verified"]
                    and alcf["state"] == "alive")

    wait_until(follows, 60, "aps to take alcf's new key from alcf's port")
    wait_until(lambda: _states(b) == {"aps": "alive", "alcf": "alive"}, 60,
               "alcf to see aps alive again")
    assert first not in {p["site_id"] for p in a.client.peers()}
    assert a.client.status()["counters"]["rotations_taken"] == 1
    assert b.client.status()["counters"]["channel_rotations_answered"] >= 1
    assert f"took the new key of alcf from its port at 127.0.0.1:{port}" in a.log()
    assert decoy.asked >= 1  # asked first, and its answer did not end the search
    decoy.close()
    # Anybody may ask; the port answers only about its own past keys.
    real = f"127.0.0.1:{port}"
    chain = asyncio.run(ask_rotations(real, bytes(32), first_key, timeout=10))
    assert len(chain) == 3  # two rotations, then alcf's record
    with pytest.raises(ProtocolError, match="unknown-key"):
        asyncio.run(ask_rotations(real, bytes(32), aps_key, timeout=10))
    assert "Traceback" not in a.log() + b.log()


def test_two_sites_that_each_rotated_while_the_other_was_away_find_each_other(
        sites: Any) -> None:
    """aps (dial-out only) rotates while alcf is down, then alcf rotates while aps is down:
    neither knows the other's key.  aps asks alcf's port for alcf's rotations, and when alcf
    then refuses aps's new key as a stranger's, aps presents its own (``rekey``)."""
    rare = "sync_interval = 86400"
    b, a = mesh_of(sites, "alcf", "aps", listen={"aps": None},
                   configs={"aps": rare, "alcf": rare})
    assert b.stop() == 0
    r = a.cli("rotate", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["told"] == 0, r.stderr
    assert a.stop() == 0
    b.launch().wait_up()
    r = b.cli("rotate", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["told"] == 0, r.stderr
    a.launch().wait_up()
    ids = {s.name: s.json("status")["site_id"] for s in (a, b)}

    def knows(s: Site, other: str) -> bool:
        p = {p["name"]: p for p in s.client.peers()}.get(other)
        return bool(p is not None and p["site_id"] == ids[other] and p["state"] == "alive")

    wait_until(lambda: knows(a, "alcf"), 60, "aps to take alcf's new key")
    wait_until(lambda: knows(b, "aps"), 60, "alcf to take aps's new key")
    assert a.client.status()["counters"]["rotations_taken"] == 1
    assert b.client.status()["counters"]["rekeys_taken"] == 1
    assert "Traceback" not in a.log() + b.log()
