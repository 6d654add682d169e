"""Direct handler tests of the membership core, with a recording harness (no network)."""

from __future__ import annotations

import itertools
import random

import pytest

from meshd.errors import LocalError, ProtocolError
from meshd.swim import (
    Ack,
    Alive,
    BlobAccepted,
    Dead,
    Gossip,
    Left,
    MemberAlive,
    MemberDead,
    MemberJoined,
    MemberLeft,
    Membership,
    MemberState,
    MemberSuspect,
    MemberUpdated,
    Nack,
    Ping,
    PingReq,
    PushPullRequest,
    PushPullResponse,
    Refuted,
    Status,
    Suspect,
    SwimConfig,
    decode_message,
    encode_message,
    from_bytes,
    to_bytes,
)
from meshd.swim.awareness import Awareness
from meshd.swim.messages import FLAG_WATCH, MAX_ID_LEN
from meshd.swim.messages import MemberState as Row
from meshd.swim.queue import BroadcastQueue
from meshd.swim.suspicion import Suspicion
from meshd.swim.util import (
    push_pull_scale,
    remaining_suspicion_time,
    retransmit_limit,
    suspicion_timeout,
)

ME = b"me"


def ids(n: int) -> list[bytes]:
    return [f"p{i}".encode() for i in range(n)]


class Harness:
    """A core plus recordings of everything it sent and reported."""

    def __init__(self, peers: int = 5, cfg: SwimConfig | None = None, auto_ack: bool = True,
                 **kw: object) -> None:
        self.cfg = cfg or SwimConfig()
        self.now = 0.0
        self.core = Membership(ME, self.cfg, random.Random(7), self.now, **kw)  # type: ignore[arg-type]
        self.peers = ids(peers)
        self.healthy: set[bytes] = set(self.peers) if auto_ack else set()
        """Peers that answer our direct pings at once (a healthy network)."""
        self.core.restore([(p, 0, b"", True) for p in self.peers], self.now)
        self.sent: list[tuple[bytes, object]] = []
        self.ev: list[object] = []
        self.flush()
        self.ev.clear()
        self.sent.clear()

    def flush(self) -> list[tuple[bytes, object]]:
        out = self.core.outgoing()
        self.sent.extend(out)
        self.ev.extend(self.core.events())
        return out

    def recv(self, msg: object, sender: bytes) -> list[tuple[bytes, object]]:
        self.core.receive(msg, sender, self.now)  # type: ignore[arg-type]
        return self.flush()

    def advance(self, to: float) -> list[tuple[bytes, object]]:
        """Fire every timer up to ``to`` in order, as a glue would."""
        out: list[tuple[bytes, object]] = []
        while True:
            t = self.core.get_timer()
            if t is None or t > to:
                break
            self.now = max(self.now, t)
            self.core.handle_timer(self.now)
            got = self.flush()
            out.extend(got)
            for d, m in got:
                if isinstance(m, Ping) and d in self.healthy:
                    self.core.receive(Ack(m.seq), d, self.now)
                    out.extend(self.flush())
        self.now = to
        return out

    def events_of(self, cls: type) -> list[object]:
        return [e for e in self.ev if isinstance(e, cls)]

    def updates_sent(self) -> list[object]:
        return [u for _, m in self.sent for u in getattr(m, "updates", ())]

    def status(self, node: bytes) -> Status | None:
        info = self.core.member(node)
        return None if info is None else info.status


def first_probe(h: Harness) -> tuple[bytes, Ping]:
    """Advance until the core pings someone; return (target, ping)."""
    for _ in range(200):
        out = h.advance(h.now + 0.05)
        pings = [(d, m) for d, m in out if isinstance(m, Ping) and not m.flags]
        if pings:
            return pings[0]  # type: ignore[return-value]
    raise AssertionError("no probe sent")


# ---------------------------------------------------------------- state transitions


def test_alive_of_unknown_member_joins_and_is_gossiped() -> None:
    h = Harness()
    h.recv(Gossip((Alive(b"new", 3, b"m", True),)), b"p0")
    assert h.events_of(MemberJoined) == [MemberJoined(b"new", 3, b"m", True)]
    info = h.core.member(b"new")
    assert info is not None and info.status is Status.ALIVE and info.incarnation == 3
    out = h.recv(Ping(1, ME), b"p1")
    assert Alive(b"new", 3, b"m", True) in out[0][1].updates  # type: ignore[attr-defined]


def test_suspect_then_timeout_declares_dead() -> None:
    h = Harness(peers=2)  # N = 3 < k + 2: no confirmations expected, timeout = min
    h.recv(Gossip((Suspect(b"p0", 0, b"p1"),)), b"p1")
    assert h.status(b"p0") is Status.SUSPECT
    assert h.events_of(MemberSuspect) == [MemberSuspect(b"p0", 0, b"p1")]
    lo = suspicion_timeout(4, 3, 1.0)
    h.advance(lo - 0.01)
    assert h.status(b"p0") is Status.SUSPECT
    # we only heard of it: two direct verification pings (one probe timeout each) come first
    verify = h.advance(lo + 2 * h.cfg.probe_timeout - 0.01)
    checks = [m for d, m in verify if d == b"p0" and isinstance(m, Ping) and m.updates[:1] == (Suspect(b"p0", 0, ME),)]
    assert len(checks) >= 2  # (a regular probe of a suspect carries the suspicion too)
    assert h.status(b"p0") is Status.SUSPECT
    h.advance(lo + 2 * h.cfg.probe_timeout + 0.01)
    assert h.status(b"p0") is Status.DEAD
    assert h.events_of(MemberDead) == [MemberDead(b"p0", 0, ME)]
    h.core.receive(Ping(2, ME), b"p1", h.now)
    assert Dead(b"p0", 0, ME) in h.core.outgoing()[0][1].updates  # type: ignore[attr-defined]


def test_refute_suspicion_of_self_bumps_incarnation_and_health() -> None:
    h = Harness()
    h.recv(Gossip((Suspect(ME, 0, b"p1"),)), b"p1")
    assert h.core.incarnation == 1
    assert h.core.health == 1
    assert h.events_of(Refuted) == [Refuted(1)]
    out = h.recv(Ping(5, ME), b"p2")
    assert Alive(ME, 1, b"", True) in out[0][1].updates  # type: ignore[attr-defined]
    # a dead notice about an older incarnation is stale now
    h.recv(Gossip((Dead(ME, 0, b"p1"),)), b"p1")
    assert h.core.incarnation == 1
    # a dead notice about the current one is refuted again
    h.recv(Gossip((Dead(ME, 1, b"p1"),)), b"p1")
    assert h.core.incarnation == 2


def test_alive_from_an_earlier_life_is_refuted() -> None:
    h = Harness()
    h.recv(PushPullResponse((Row(ME, 5, 0, b"", True),)), b"p0")
    assert h.core.incarnation == 6


def test_refutation_clears_suspicion() -> None:
    h = Harness()
    h.recv(Gossip((Suspect(b"p0", 0, b"p1"),)), b"p1")
    h.recv(Gossip((Alive(b"p0", 1),)), b"p0")
    assert h.status(b"p0") is Status.ALIVE
    assert h.events_of(MemberAlive) == [MemberAlive(b"p0", 1)]
    h.advance(200.0)
    assert not h.events_of(MemberDead)


def test_stale_incarnations_are_ignored() -> None:
    h = Harness()
    h.recv(Gossip((Alive(b"p0", 3),)), b"p0")
    h.ev.clear()
    for u in (Suspect(b"p0", 2, b"p1"), Dead(b"p0", 2, b"p1"), Left(b"p0", 2), Alive(b"p0", 2, b"x")):
        h.recv(Gossip((u,)), b"p1")
    info = h.core.member(b"p0")
    assert info is not None and info.status is Status.ALIVE and info.incarnation == 3 and info.meta == b""
    assert h.ev == []
    h.recv(Gossip((Alive(b"p0", 4, b"x"),)), b"p0")
    assert h.events_of(MemberUpdated) == [MemberUpdated(b"p0", 4, b"x", True)]


def test_dead_member_revives_only_with_higher_incarnation() -> None:
    h = Harness()
    h.recv(Gossip((Dead(b"p0", 0, b"p1"),)), b"p1")
    assert h.status(b"p0") is Status.DEAD
    h.recv(Gossip((Alive(b"p0", 0),)), b"p0")
    assert h.status(b"p0") is Status.DEAD
    h.recv(Gossip((Alive(b"p0", 1),)), b"p0")
    assert h.status(b"p0") is Status.ALIVE
    assert MemberJoined(b"p0", 1, b"", True) in h.ev


def test_graceful_leave() -> None:
    h = Harness()
    h.core.leave(h.now)
    assert h.core.leaving and not h.core.leave_done
    out = h.advance(30.0)
    assert not [m for _, m in out if isinstance(m, (Ping, PingReq, PushPullRequest))]
    assert Left(ME, 0) in h.updates_sent()
    assert h.core.leave_done
    # once left, suspicions of ourselves are not refuted
    h.recv(Gossip((Suspect(ME, 0, b"p1"),)), b"p1")
    assert h.core.incarnation == 0


def test_member_leaving_is_reported_and_never_dead() -> None:
    h = Harness()
    h.recv(Gossip((Left(b"p0", 0),)), b"p0")
    assert h.status(b"p0") is Status.LEFT
    assert h.events_of(MemberLeft) == [MemberLeft(b"p0", 0)]
    h.recv(Gossip((Dead(b"p0", 0, b"p1"), Suspect(b"p0", 0, b"p1")),), b"p1")
    assert h.status(b"p0") is Status.LEFT and not h.events_of(MemberDead)
    h.advance(h.cfg.left_retention + 5 * h.cfg.probe_interval + 1)
    assert h.core.member(b"p0") is None  # forgotten after left_retention


# ---------------------------------------------------------------- probing


def test_direct_probe_ack_lowers_health() -> None:
    h = Harness(auto_ack=False)
    h.core._awareness.apply_delta(3)
    target, ping = first_probe(h)
    h.recv(Ack(ping.seq), target)
    h.advance(h.now + 2.0)
    assert h.core.health <= 2
    assert not h.events_of(MemberSuspect)


def test_indirect_probe_path() -> None:
    h = Harness(peers=6, auto_ack=False)
    target, ping = first_probe(h)
    out = h.advance(h.now + h.cfg.probe_timeout + 0.01)
    reqs = [(d, m) for d, m in out if isinstance(m, PingReq)]
    assert len(reqs) == h.cfg.indirect_checks
    assert all(m.target == target and m.seq == ping.seq and d != target for d, m in reqs)
    assert len({d for d, _ in reqs}) == len(reqs)
    assert [m for d, m in out if isinstance(m, Ping) and d == target]  # fallback direct ping
    helper = reqs[0][0]
    h.recv(Ack(ping.seq), helper)  # a helper relays the target's ack
    h.healthy = set(h.peers)
    h.advance(h.now + 3.0)
    assert h.status(target) is Status.ALIVE
    assert not h.events_of(MemberSuspect)


def test_failed_probe_suspects_and_missing_nacks_raise_health() -> None:
    h = Harness(peers=6, auto_ack=False)
    target, ping = first_probe(h)
    out = h.advance(h.now + h.cfg.probe_timeout + 0.01)
    helpers = [d for d, m in out if isinstance(m, PingReq)]
    h.recv(Nack(ping.seq), helpers[0])  # one helper answered: we are probably fine
    h.recv(Nack(ping.seq), helpers[0])  # a duplicate counts once
    h.recv(Nack(ping.seq), b"stranger")  # not a helper we asked
    h.advance(h.now + h.cfg.probe_interval)
    assert h.status(target) is Status.SUSPECT
    assert MemberSuspect(target, 0, ME) in h.ev
    assert h.core.health == 2  # 3 nacks expected, 1 arrived


def test_health_scales_probe_interval() -> None:
    h = Harness(peers=6, auto_ack=False)
    target, ping = first_probe(h)
    h.core._awareness.apply_delta(4)
    h.recv(Ack(ping.seq), target)  # success: health 4 -> 3
    assert h.core.health == 3
    seqs: dict[int, float] = {}
    for _ in range(400):
        out = h.advance(h.now + 0.05)
        for d, m in out:
            if isinstance(m, Ping) and not m.flags and m.seq not in seqs:
                seqs[m.seq] = h.now
                h.recv(Ack(m.seq), d)
        if len(seqs) >= 2:
            break
    t1, t2 = sorted(seqs.values())
    # the next probe comes (health + 1) probe intervals after the last one started
    assert t2 - t1 == pytest.approx(4 * h.cfg.probe_interval, abs=0.06)


def test_helper_relays_ack_or_sends_nack() -> None:
    h = Harness()
    out = h.recv(PingReq(77, b"p2"), b"p1")
    (dst, ping), = out
    assert dst == b"p2" and isinstance(ping, Ping) and ping.target == b"p2"
    out = h.recv(Ack(ping.seq), b"p2")
    assert [(d, type(m), m.seq) for d, m in out] == [(b"p1", Ack, 77)]  # type: ignore[attr-defined]
    # second request: no ack -> nack after probe_timeout
    out = h.recv(PingReq(78, b"p3"), b"p1")
    out = h.advance(h.now + h.cfg.probe_timeout + 0.001)
    assert (b"p1", Nack) in [(d, type(m)) for d, m in out]
    assert [m.seq for d, m in out if isinstance(m, Nack)] == [78]


def test_ping_for_someone_else_is_not_acked() -> None:
    h = Harness()
    assert h.recv(Ping(1, b"other"), b"p1") == []


def test_buddy_system_tells_suspect_first() -> None:
    h = Harness(peers=2, auto_ack=False)
    for p in h.peers:
        h.recv(Gossip((Suspect(p, 0, b"x"),)), b"x")
    target, ping = first_probe(h)
    assert ping.updates[0] == Suspect(target, 0, ME)


# ---------------------------------------------------------------- Lifeguard suspicion


def test_suspicion_timeout_shrinks_with_independent_confirmations() -> None:
    lo, hi = 12.0, 72.0
    s = Suspicion(b"a", 2, lo, hi, now=100.0)
    assert s.deadline == 100.0 + hi
    assert not s.confirm(b"a")  # the accuser does not confirm itself
    assert s.confirm(b"b")
    mid = s.deadline
    assert 100.0 + lo < mid < 100.0 + hi
    assert not s.confirm(b"b")
    assert s.deadline == mid
    assert s.confirm(b"c")
    assert s.deadline == 100.0 + lo
    assert not s.confirm(b"d")  # k reached
    assert remaining_suspicion_time(1, 2, 0.0, lo, hi) == pytest.approx(hi - 0.6309 * (hi - lo), abs=0.01)


def test_core_suspicion_confirmations_shorten_and_rebroadcast() -> None:
    h = Harness(peers=20)  # N = 21: k = 2, min = 4 * log10(21) s
    n = 21
    lo = suspicion_timeout(4, n, 1.0)
    h.recv(Gossip((Suspect(b"p0", 0, b"p1"),)), b"p1")
    h.recv(Gossip((Suspect(b"p0", 0, b"p2"),)), b"p2")
    h.recv(Gossip((Suspect(b"p0", 0, b"p3"),)), b"p3")
    out = h.recv(Ping(9, ME), b"p4")
    assert Suspect(b"p0", 0, b"p3") in out[0][1].updates  # type: ignore[attr-defined]  # new confirmation re-gossiped
    h.advance(lo - 0.01)
    assert h.status(b"p0") is Status.SUSPECT
    h.advance(lo + 2 * h.cfg.probe_timeout + 0.01)  # after the verification pings
    assert h.status(b"p0") is Status.DEAD


def test_unconfirmed_suspicion_waits_max_timeout() -> None:
    h = Harness(peers=20)  # p0 still answers our own probes, so we never confirm
    lo = suspicion_timeout(4, 21, 1.0)
    h.recv(Gossip((Suspect(b"p0", 0, b"p1"),)), b"p1")
    h.advance(lo * 6 - 0.1)
    assert h.status(b"p0") is Status.SUSPECT
    h.advance(lo * 6 + 2 * h.cfg.probe_timeout + 0.1)
    assert h.status(b"p0") is Status.DEAD


def test_awareness_clamps() -> None:
    a = Awareness(8)
    a.apply_delta(-3)
    assert a.score == 0
    a.apply_delta(100)
    assert a.score == 7 and a.scale(0.5) == 4.0


# ---------------------------------------------------------------- dissemination


def test_formulas() -> None:
    assert retransmit_limit(4, 1000) == 16
    assert retransmit_limit(4, 999) == 12
    assert retransmit_limit(4, 99) == 8
    assert retransmit_limit(4, 9) == 8  # floored: small meshes get memberlist's N=10..99 limit
    assert suspicion_timeout(4, 1000, 1.0) == pytest.approx(12.0)
    assert suspicion_timeout(4, 1, 1.0) == 4.0
    assert push_pull_scale(30.0, 32) == 30.0
    assert push_pull_scale(30.0, 1000) == 180.0


def test_queue_transmit_limit_priority_and_override() -> None:
    q = BroadcastQueue()
    a0, b0 = Alive(b"a", 0), Alive(b"b", 0)
    q.push(a0, 40)
    q.push(b0, 40)
    assert q.take(1400, 3) == [b0, a0]  # newest first
    q.push(Alive(b"c", 0), 40)
    assert q.take(50, 3) == [Alive(b"c", 0)]  # fewest transmits first, budget respected
    a1 = Alive(b"a", 1)
    q.push(a1, 40)  # newer overrides older about the same node
    got = []
    for _ in range(10):
        got += q.take(1400, 3)
    assert got.count(a1) == 3 and a0 not in got
    assert got.count(b0) == 2 and got.count(Alive(b"c", 0)) == 2
    assert len(q) == 0 and not q.pending(b"a")


def test_piggyback_respects_limit_in_core() -> None:
    h = Harness(peers=8)  # N = 9 -> limit 4
    h.recv(Gossip((Alive(b"x", 0),)), b"p0")
    n = 0
    for i in range(10):
        out = h.recv(Ping(i, ME), b"p1")
        n += out[0][1].updates.count(Alive(b"x", 0))  # type: ignore[attr-defined]
    assert n == retransmit_limit(4, 10)


def test_gossip_fanout_only_when_there_is_news() -> None:
    h = Harness(peers=8)
    h.advance(1.0)
    while h.core._queue.take(1400, 100):
        pass
    out = h.advance(h.now + 0.2)
    assert not [m for _, m in out if isinstance(m, Gossip)]
    h.recv(Gossip((Alive(b"x", 0),)), b"p0")
    out = h.advance(h.now + 0.2)
    g = [(d, m) for d, m in out if isinstance(m, Gossip)]
    assert 1 <= len(g) <= h.cfg.gossip_nodes
    assert all(Alive(b"x", 0) in m.updates for _, m in g)


# ---------------------------------------------------------------- push-pull and blobs


def test_push_pull_merge_and_reply() -> None:
    h = Harness(peers=3)
    states = (
        Row(b"new", 2, 0, b"m", True),
        Row(b"p0", 0, 1, b"", True),  # remote suspect -> we suspect
        Row(b"p1", 0, 2, b"", True),  # remote dead -> only suspect here
        Row(b"p2", 0, 3, b"", True),  # left
        Row(b"ghost", 0, 2, b"", True),  # unknown and dead: ignored
    )
    out = h.recv(PushPullRequest(states, (), True), b"p0")
    assert h.status(b"new") is Status.ALIVE
    assert h.status(b"p0") is Status.SUSPECT and h.status(b"p1") is Status.SUSPECT
    assert h.status(b"p2") is Status.LEFT and h.core.member(b"ghost") is None
    (dst, resp), = out
    assert dst == b"p0" and isinstance(resp, PushPullResponse)
    rows = {r.node: r for r in resp.states}
    assert rows[b"new"].incarnation == 2 and rows[ME].status == 0 and rows[b"p1"].status == 1


def test_push_pull_runs_periodically() -> None:
    h = Harness(peers=3)
    out = h.advance(h.cfg.push_pull_interval + 0.01)
    assert len([m for _, m in out if isinstance(m, PushPullRequest)]) == 1


def test_join_sends_push_pull_to_seeds() -> None:
    core = Membership(ME, SwimConfig(), random.Random(1), 0.0)
    core.join([b"s1", b"s2", ME], 0.0)
    out = core.outgoing()
    assert [d for d, _ in out] == [b"s1", b"s2"]
    assert all(isinstance(m, PushPullRequest) and m.join for _, m in out)


def verify(blob: bytes) -> bytes | None:
    calls.append(blob)
    return blob[:4] if blob.startswith(b"ok") else None


calls: list[bytes] = []


def test_blobs_verified_kept_and_forwarded_only_when_valid() -> None:
    calls.clear()
    h = Harness(peers=3, verify_blob=verify)
    h.recv(PushPullResponse((), (b"ok1-a", b"bad", b"ok2-b", b"ok1-dup-key")), b"p0")
    assert h.core.blobs() == {b"ok1-": b"ok1-a", b"ok2-": b"ok2-b"}
    assert [e for e in h.ev if isinstance(e, BlobAccepted)] == [
        BlobAccepted(b"ok1-", b"ok1-a"), BlobAccepted(b"ok2-", b"ok2-b")]
    n = len(calls)
    h.recv(PushPullResponse((), (b"bad", b"ok1-a")), b"p1")
    assert len(calls) == n  # neither re-verified
    out = h.recv(PushPullRequest((), ()), b"p2")
    assert set(out[0][1].blobs) == {b"ok1-a", b"ok2-b"}  # type: ignore[attr-defined]
    with pytest.raises(LocalError):
        h.core.publish_blob(b"nope")
    assert h.core.publish_blob(b"ok3-x") == b"ok3-"
    h.core.remove_blob(b"ok1-")
    out = h.recv(PushPullRequest((), ()), b"p2")
    assert set(out[0][1].blobs) == {b"ok2-b", b"ok3-x"}  # type: ignore[attr-defined]


def test_without_verifier_no_blob_is_accepted() -> None:
    h = Harness()
    h.recv(PushPullResponse((), (b"anything",)), b"p0")
    assert h.core.blobs() == {}


# ---------------------------------------------------------------- outbound-only members


def test_outbound_only_member_never_probed_nor_declared_dead_by_prober() -> None:
    h = Harness(peers=3)
    h.recv(Gossip((Alive(b"out", 1, b"", False),)), b"p0")
    h.advance(60.0)
    assert not [m for d, m in h.sent if d == b"out"]
    assert h.status(b"out") is Status.ALIVE


def test_outbound_only_member_watched_by_anchor() -> None:
    h = Harness(peers=3)
    h.recv(Gossip((Alive(b"out", 1, b"", False),)), b"p0")
    limit = h.cfg.outbound_watch_mult * h.cfg.probe_interval
    out = h.recv(Ping(1, ME, (), FLAG_WATCH), b"out")
    assert isinstance(out[0][1], Ack)  # answered over its connection
    # any message from it is proof of life
    for _ in range(10):
        h.advance(h.now + limit / 2)
        h.recv(Gossip(()), b"out")
    assert h.status(b"out") is Status.ALIVE and not h.events_of(MemberSuspect)
    # silence -> suspicion from us, the anchor
    h.advance(h.now + limit + 2 * h.cfg.probe_interval)
    assert MemberSuspect(b"out", 1, ME) in h.ev


def test_outbound_only_node_heartbeats_anchors_and_probes_only_reachable() -> None:
    cfg = SwimConfig()
    core = Membership(ME, cfg, random.Random(3), 0.0, reachable=False)
    core.restore([(b"r1", 0, b"", True), (b"r2", 0, b"", True), (b"r3", 0, b"", True),
                  (b"r4", 0, b"", True), (b"u1", 0, b"", False)], 0.0)
    sent: list[tuple[bytes, object]] = []
    now = 0.0
    while now < 10.0:
        now = max(now, core.get_timer() or now)
        core.handle_timer(now)
        out = core.outgoing()
        sent += out
        for d, m in out:  # healthy reachable members answer
            if isinstance(m, Ping):
                core.receive(Ack(m.seq), d, now)
        sent += core.outgoing()
        now += 0.001
    assert not [d for d, _ in sent if d == b"u1"]
    watch = [d for d, m in sent if isinstance(m, Ping) and m.flags & FLAG_WATCH]
    anchors = set(watch)
    assert len(anchors) == cfg.outbound_anchors and len(watch) >= 8 * cfg.outbound_anchors


# ---------------------------------------------------------------- codec


MESSAGES = [
    Ping(1, b"t", (Alive(b"a", 1, b"meta", False), Suspect(b"b", 2, b"c"), Dead(b"d", 3, b"e"), Left(b"f", 4)), 1),
    PingReq(2**40, b"t"),
    Ack(0),
    Nack(5, (Left(b"x", 0),)),
    Gossip(),
    PushPullRequest((MemberState(b"n", 1, 2, b"", True),), (b"blob",), True),
    PushPullResponse((), ()),
]


@pytest.mark.parametrize("msg", MESSAGES)
def test_codec_round_trip(msg: object) -> None:
    assert from_bytes(to_bytes(msg)) == msg  # type: ignore[arg-type]
    assert decode_message(encode_message(msg)) == msg  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [
    [], [99], [1, 1, b"t", 0], [1, -1, b"t", 0, []], [1, 1, "t", 0, []], [1, True, b"t", 0, []],
    [1, 1, b"", 0, []], [1, 1, b"x" * (MAX_ID_LEN + 1), 0, []], [3, 1, [[0, b"a", 1, b"", 1]]],
    [3, 1, [[9, b"a", 1]]], [3, 1, [[0, b"a", 2**63, b"", True]]], [6, 1, [], []], [7, [[b"a", 1, 4, b"", True]], []],
    [5, [[]]], {"a": 1}, None, 1.5,
])
def test_decode_rejects_malformed(bad: object) -> None:
    with pytest.raises(ProtocolError) as exc:
        decode_message(bad)
    assert exc.value.reason == "malformed"


def test_from_bytes_rejects_garbage() -> None:
    for data in (b"", b"\xc1", b"\x92\x01", b"\xff" * 10, to_bytes(Ack(1)) + b"x"):
        with pytest.raises(ProtocolError):
            from_bytes(data)


def test_config_validation() -> None:
    with pytest.raises(LocalError):
        SwimConfig(probe_timeout=2.0, probe_interval=1.0)
    with pytest.raises(LocalError):
        SwimConfig(indirect_checks=0)


def test_ack_to_a_member_we_hold_suspect_or_dead_tells_it_first() -> None:
    h = Harness()
    h.recv(Gossip((Suspect(b"p0", 0, b"p1"), Dead(b"p2", 0, b"p1")),), b"p1")
    out = h.recv(Ping(3, ME), b"p0")
    assert out[0][1].updates[0] == Suspect(b"p0", 0, ME)  # type: ignore[attr-defined]
    out = h.recv(Ping(4, ME), b"p2")
    assert out[0][1].updates[0] == Dead(b"p2", 0, ME)  # type: ignore[attr-defined]


def test_anchor_gossips_to_the_outbound_member_it_watches() -> None:
    h = Harness(peers=8)
    h.recv(Gossip((Alive(b"out", 1, b"", False),)), b"p0")
    h.recv(Ping(1, ME, (), FLAG_WATCH), b"out")
    h.recv(Gossip((Alive(b"news", 0),)), b"p1")
    out = h.advance(h.now + 0.2)
    assert [m for d, m in out if d == b"out" and isinstance(m, Gossip) and Alive(b"news", 0) in m.updates]


def test_verification_ping_catches_a_missed_refutation() -> None:
    h = Harness(peers=2)  # p0 acks our pings but we never got its refutation
    h.recv(Gossip((Suspect(b"p0", 0, b"p1"),)), b"p1")
    lo = suspicion_timeout(4, 3, 1.0)
    out = h.advance(lo + 0.01)
    ping = [m for d, m in out if d == b"p0" and isinstance(m, Ping) and m.updates[:1] == (Suspect(b"p0", 0, ME),)][-1]
    # p0 had refuted long ago (we missed it); it answers the accusation with its alive
    h.recv(Ack(ping.seq, (Alive(b"p0", 1),)), b"p0")
    h.advance(lo + 5.0)
    assert h.status(b"p0") is Status.ALIVE and not h.events_of(MemberDead)


def test_own_failed_probe_declares_without_verification() -> None:
    h = Harness(peers=2, auto_ack=False)
    target, _ = first_probe(h)
    h.advance(h.now + h.cfg.probe_interval + 0.01)
    assert h.status(target) is Status.SUSPECT
    start = h.core.member(target).since  # type: ignore[union-attr]
    lo = suspicion_timeout(4, 3, 1.0)
    h.advance(start + lo + 0.01)
    assert h.status(target) is Status.DEAD


def test_accused_member_answers_even_a_stale_accusation_with_its_alive() -> None:
    h = Harness()
    h.recv(Gossip((Suspect(ME, 0, b"p1"),)), b"p1")  # refuted: now incarnation 1
    h.core._queue.take(10_000, 1)  # its own alive already went out
    out = h.recv(Ping(8, ME, (Suspect(ME, 0, b"p2"),)), b"p2")
    assert out[0][1].updates[0] == Alive(ME, 1, b"", True)  # type: ignore[attr-defined]
    assert h.core.incarnation == 1


def test_outbound_heartbeats_are_not_slowed_by_poor_health() -> None:
    cfg = SwimConfig()
    core = Membership(ME, cfg, random.Random(4), 0.0, reachable=False)
    core.restore([(f"r{i}".encode(), 0, b"", True) for i in range(6)], 0.0)
    core._awareness.apply_delta(5)  # probes every 6 s now
    beats: dict[bytes, list[float]] = {}
    now = 0.0
    while now < 20.0:
        now = max(now, core.get_timer() or now)
        core.handle_timer(now)
        for d, m in core.outgoing():
            if isinstance(m, Ping):
                core.receive(Ack(m.seq), d, now)
                if m.flags & FLAG_WATCH:
                    beats.setdefault(d, []).append(now)
        core.outgoing()
        now += 0.001
    for times in beats.values():
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert gaps and max(gaps) <= cfg.probe_interval + 0.01


def test_forget_drops_a_member_without_gossip() -> None:
    core = Membership(b"a", SwimConfig(), random.Random(1), 0.0)
    core.restore([(b"b", 0, b"", True), (b"c", 0, b"", True)], 0.0)
    core.outgoing(), core.events()
    core.forget(b"b")
    assert core.member(b"b") is None and core.num_live == 2
    assert core.events() == []
    for t in range(1, 40):  # probing goes on over the others only
        core.handle_timer(t * 0.5)
        assert all(dest != b"b" for dest, _ in core.outgoing())
