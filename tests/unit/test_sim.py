"""Simulator tests: real membership cores on a seeded in-memory network (50-200 nodes)."""

from __future__ import annotations

import msgpack

from meshd.testing.sim import Simulator, update_size
from meshd.swim import (
    Ack,
    Alive,
    BlobAccepted,
    Dead,
    Gossip,
    Left,
    MemberDead,
    MemberLeft,
    MemberState,
    Ping,
    PingReq,
    PushPullRequest,
    PushPullResponse,
    Status,
    Suspect,
    encode_message,
    to_bytes,
)
from meshd.swim.messages import encode_update


def known_by_all(sim: Simulator, node: bytes, status: Status = Status.ALIVE) -> bool:
    return all(sim.status(x, node) is status for x in sim.live_ids() if x != node)


def dead_events(sim: Simulator) -> list[tuple[float, bytes, MemberDead]]:
    return [(t, o, e) for t, o, e in sim.events if isinstance(e, MemberDead)]


def test_join_reaches_every_node_quickly() -> None:
    sim = Simulator(seed=1)
    ids = sim.bootstrap(150)
    sim.run_for(3.0)
    t0 = sim.now
    new = sim.add_node(join=ids[:3])
    while not known_by_all(sim, new) and sim.now < t0 + 10:
        sim.run_for(0.1)
    assert sim.now - t0 <= 3.0
    # and the new node learned everybody through the seeds' state
    assert sum(1 for i in ids if sim.status(new, i) is Status.ALIVE) == len(ids)


def test_crash_is_detected_by_every_live_node() -> None:
    sim = Simulator(seed=2)
    ids = sim.bootstrap(100)
    sim.run_for(3.0)
    victim = ids[17]
    sim.crash(victim)
    t0 = sim.now
    cfg = sim.config
    from meshd.swim.util import suspicion_timeout

    bound = suspicion_timeout(cfg.suspicion_mult, 100, cfg.probe_interval) * cfg.suspicion_max_timeout_mult
    while not known_by_all(sim, victim, Status.DEAD) and sim.now < t0 + bound:
        sim.run_for(0.5)
    assert known_by_all(sim, victim, Status.DEAD)
    detection = sim.now - t0
    # min suspicion timeout (8 s at N=100) + a few probe periods, as confirmations arrive
    assert detection <= suspicion_timeout(cfg.suspicion_mult, 100, cfg.probe_interval) + 5 * cfg.probe_interval
    assert {e.node for _, _, e in dead_events(sim)} == {victim}


def test_no_false_deaths_under_loss_and_slow_nodes() -> None:
    sim = Simulator(seed=3, loss=0.10, duplicate=0.02, record_events=True)
    sim.bootstrap(120, slow_fraction=0.10)
    sim.run_for(120.0)
    assert dead_events(sim) == []
    live = sim.live_ids()
    assert all(sim.status(a, b) in (Status.ALIVE, Status.SUSPECT) for a in live for b in live)


def run_scenario(seed: int) -> tuple[list[tuple[float, bytes, object]], dict[bytes, int], int]:
    sim = Simulator(seed=seed, loss=0.05, duplicate=0.05, jitter=0.02)
    ids = sim.bootstrap(60, slow_fraction=0.1)
    sim.call_at(2.0, lambda: sim.crash(ids[5]))
    sim.call_at(4.0, lambda: sim.add_node(join=ids[:2]))
    sim.call_at(6.0, lambda: sim.pause(ids[9]))
    sim.call_at(9.0, lambda: sim.resume(ids[9]))
    sim.run_for(40.0)
    return sim.events, {x: n.bytes_sent for x, n in sim.nodes.items()}, sim.delivered


def test_same_seed_same_result() -> None:
    a = run_scenario(11)
    b = run_scenario(11)
    assert a == b
    c = run_scenario(12)
    assert c != a


def test_partition_heals() -> None:
    sim = Simulator(seed=4)
    ids = sim.bootstrap(60)
    sim.run_for(2.0)
    left, right = ids[:30], ids[30:]
    sim.partition(left, right)
    sim.run_for(90.0)  # longer than the suspicion timeout: each side declares the other dead
    assert sim.status(left[0], right[0]) is Status.DEAD
    assert sim.status(right[0], left[0]) is Status.DEAD
    sim.heal()
    for _ in range(60):
        sim.run_for(5.0)
        if all(sim.status(a, b) is Status.ALIVE for a in ids for b in ids if a != b):
            break
    assert all(sim.status(a, b) is Status.ALIVE for a in ids for b in ids if a != b)


def test_short_partition_causes_no_death() -> None:
    sim = Simulator(seed=5)
    ids = sim.bootstrap(50)
    sim.run_for(2.0)
    sim.partition(ids[:25], ids[25:])
    sim.run_for(3.0)
    sim.heal()
    sim.run_for(60.0)
    assert dead_events(sim) == []
    assert all(sim.status(a, b) is Status.ALIVE for a in ids for b in ids if a != b)


def test_outbound_only_node_lives_and_dies_by_its_own_messages() -> None:
    sim = Simulator(seed=6, loss=0.05)
    ids = sim.bootstrap(50)
    out = sim.add_node(reachable=False, join=ids[:2])
    sim.run_for(60.0)
    assert known_by_all(sim, out)
    assert not [e for _, _, e in dead_events(sim)]
    # nobody could ever dial it: only answers on its own connections reached it
    assert sim.nodes[out].core.member(ids[0]) is not None
    sim.crash(out)
    t0 = sim.now
    while not known_by_all(sim, out, Status.DEAD) and sim.now < t0 + 120:
        sim.run_for(1.0)
    assert known_by_all(sim, out, Status.DEAD)


def test_graceful_leave_is_not_a_death() -> None:
    sim = Simulator(seed=7)
    ids = sim.bootstrap(80)
    sim.run_for(2.0)
    sim.leave(ids[3])
    sim.run_for(5.0)
    assert sim.nodes[ids[3]].core.leave_done
    sim.crash(ids[3])  # the process exits once its notice went out
    sim.run_for(30.0)
    assert known_by_all(sim, ids[3], Status.LEFT)
    assert dead_events(sim) == []
    assert len([e for _, _, e in sim.events if isinstance(e, MemberLeft)]) == 79


def test_codec_check_and_byte_counts_are_exact() -> None:
    sim = Simulator(seed=8, codec_check=True, loss=0.1)
    ids = sim.bootstrap(20)
    sim.add_node(join=ids[:1])
    sim.run_for(20.0)
    assert known_by_all(sim, sim.make_id(20))
    updates = [Alive(b"a" * 32, 300, b"m" * 300, False), Suspect(b"b" * 32, 2**40, b"c"), Dead(b"d", 0, b"e"),
               Left(b"f" * 32, 70000)]
    for u in updates:
        assert update_size(u) == len(msgpack.packb(encode_update(u), use_bin_type=True))
    rows = tuple(MemberState(bytes([i]) * 32, i * 1000, i % 4, b"x" * i, True) for i in range(40))
    for m in (Ping(2**33, b"t" * 32, tuple(updates) * 5, 1), PingReq(70000, b"t"), Ack(1, tuple(updates)),
              Gossip(tuple(updates) * 20), PushPullRequest(rows, (b"b" * 300,), True), PushPullResponse(rows)):
        assert sim.message_size(m) == len(to_bytes(m)) == len(msgpack.packb(encode_message(m)))


def test_blobs_spread_by_push_pull() -> None:
    def verify(blob: bytes) -> bytes | None:
        return blob[:8] if blob.startswith(b"signed:") else None

    sim = Simulator(seed=9, verify_blob=verify)
    from meshd.swim import SwimConfig

    sim.config = SwimConfig(push_pull_interval=2.0)
    first = sim.add_node()
    sim.nodes[first].core.publish_blob(b"signed:hello")
    ids = [first] + [sim.add_node(join=[first]) for _ in range(9)]
    sim.run_for(60.0)
    assert all(sim.nodes[x].core.blobs() == {b"signed:h": b"signed:hello"} for x in ids)
    accepted = [o for _, o, e in sim.events if isinstance(e, BlobAccepted)]
    assert sorted(accepted) == sorted(ids[1:])


def test_outbound_only_sites_under_loss() -> None:
    sim = Simulator(seed=10, loss=0.10)
    ids = sim.bootstrap(100, unreachable_fraction=0.10)
    sim.run_for(30.0)
    reachable = [x for x in ids if sim.nodes[x].reachable]
    t0 = sim.now
    new = sim.add_node(join=reachable[:3])
    while not known_by_all(sim, new) and sim.now < t0 + 10:
        sim.run_for(0.1)
    assert sim.now - t0 <= 5.0  # outbound-only sites hear it from their anchors
    sim.run_for(60.0)
    assert dead_events(sim) == []
