"""Dead members are re-probed and rejoin (issue 11, bug 5): the rejoin schedule and the core."""

from __future__ import annotations

import random
from dataclasses import replace

from meshd.swim import SwimConfig
from meshd.swim.events import Status
from meshd.swim.rejoin import RejoinSchedule
from meshd.testing.sim import Simulator


def _split_until_mutually_dead(sim: Simulator, a: bytes, b: bytes, hold: float) -> None:
    sim.partition([a], [b])
    for _ in range(600):
        sim.run_for(1.0)
        if sim.status(a, b) is Status.DEAD and sim.status(b, a) is Status.DEAD:
            break
    assert sim.status(a, b) is Status.DEAD and sim.status(b, a) is Status.DEAD
    sim.run_for(hold)


def _both_alive_within(sim: Simulator, a: bytes, b: bytes, bound: float) -> float:
    start = sim.now
    while sim.now - start < bound:
        sim.run_for(0.5)
        if sim.status(a, b) is Status.ALIVE and sim.status(b, a) is Status.ALIVE:
            return sim.now - start
    raise AssertionError(f"still {sim.status(a, b)} / {sim.status(b, a)} {bound} s after the heal")


def test_two_sites_that_declared_each_other_dead_come_back_after_a_long_split() -> None:
    # Two hours apart: longer than the gossip to the dead, and than the old one-hour retention
    # after which a dead member was forgotten and so never probed again.
    cfg = SwimConfig()
    bound = 2.5 * cfg.rejoin_max_interval
    for seed in range(5):
        sim = Simulator(seed=seed)
        a, b = sim.bootstrap(2)
        sim.run_for(5.0)
        _split_until_mutually_dead(sim, a, b, hold=2 * 3600.0)
        sim.heal()
        _both_alive_within(sim, a, b, bound)
        # each refuted its death with a higher incarnation
        assert sim.nodes[a].core.member(a).incarnation > 0  # type: ignore[union-attr]
        assert sim.nodes[b].core.member(b).incarnation > 0  # type: ignore[union-attr]


def test_rejoin_probes_alone_heal_a_mutual_death() -> None:
    # Without the push-pull to the dead (reconnect), the rejoin pings alone bring both back.
    cfg = replace(SwimConfig(), reconnect_interval=1e9, gossip_to_the_dead_time=0.0)
    for seed in range(5):
        sim = Simulator(seed=seed, config=cfg)
        a, b = sim.bootstrap(2)
        sim.run_for(5.0)
        _split_until_mutually_dead(sim, a, b, hold=600.0)
        sim.heal()
        _both_alive_within(sim, a, b, 2.5 * cfg.rejoin_max_interval)


def test_a_crashed_member_is_probed_with_back_off_and_stays_dead() -> None:
    sim = Simulator(seed=3)
    a, b, c = sim.bootstrap(3)
    sim.run_for(5.0)
    sim.crash(c)
    sim.run_for(60.0)
    assert sim.status(a, c) is Status.DEAD
    sent_before = sim.nodes[a].msgs_sent
    sim.run_for(3600.0)
    assert sim.status(a, c) is Status.DEAD and sim.status(a, b) is Status.ALIVE
    # an hour of probing one dead member costs about 3600 / rejoin_max_interval pings, on top
    # of the probes, gossip and push-pulls with b
    assert sim.nodes[a].msgs_sent - sent_before < 3 * 3600


def test_schedule_backs_off_to_the_cap_and_hint_probes_at_once() -> None:
    s = RejoinSchedule(2.0, 30.0, random.Random(1), jitter=0.0)
    s.track(b"x", 0.0)
    assert s.next_due() == 2.0 and s.due(1.9) == []
    times = []
    now = 0.0
    for _ in range(8):
        now = s.next_due()  # type: ignore[assignment]
        assert s.due(now) == [b"x"]
        times.append(now)
    gaps = [round(b - a, 6) for a, b in zip(times, times[1:])]
    assert gaps == [4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    s.hint(b"x", now + 1.0)  # probed one second ago: not again yet
    assert s.next_due() == now + 30.0
    s.hint(b"x", now + 5.0)
    assert s.due(now + 5.0) == [b"x"]
    s.drop(b"x")
    assert s.next_due() is None and s.due(now + 1000.0) == [] and len(s) == 0


def test_a_message_from_a_member_held_dead_triggers_a_rejoin_probe_at_once() -> None:
    cfg = replace(SwimConfig(), reconnect_interval=1e9, gossip_to_the_dead_time=0.0,
                  rejoin_interval=1000.0, rejoin_max_interval=1000.0)
    sim = Simulator(seed=9, config=cfg)
    a, b = sim.bootstrap(2)
    sim.run_for(5.0)
    _split_until_mutually_dead(sim, a, b, hold=60.0)
    sim.heal()
    sim.nodes[b].core.join([a], sim.now)  # b speaks to a (its seed) once
    sim._after(sim.nodes[b])
    _both_alive_within(sim, a, b, 10.0)
