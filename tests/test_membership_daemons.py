"""Gossip membership between real daemons: crash detection, pauses, graceful leave, events."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from meshd.client import Client
from meshd.demo import wait_until
from meshd.swim import SwimConfig
from meshd.swim.util import suspicion_timeout

from .conftest import Site
from .test_daemon_mesh import invite


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
    started = time.monotonic()
    e.kill()
    for s in (a, b, c, d):
        wait_until(lambda s=s: _states(s)["ornl"] == "dead", 60, f"{s.name} to declare ornl dead")
    elapsed = time.monotonic() - started
    # Nobody else was declared anything but alive.
    for s in (a, b, c, d):
        states = _states(s)
        assert {n: st for n, st in states.items() if n != "ornl"} == {
            "aps-8id": "alive", "alcf": "alive", "nersc": "alive", "slac": "alive"}
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
    # The pause is the stimulus: shorter than the smallest suspicion timeout for N=5.
    cfg = SwimConfig()
    pause = 0.5 * suspicion_timeout(cfg.suspicion_mult, 5, cfg.probe_interval)
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
