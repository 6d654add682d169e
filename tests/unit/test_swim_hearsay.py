"""Incarnations are bounded: in the codec (the whole message is refused) and in the core (a
claim about someone else moves that member's incarnation by at most ``max_incarnation_step``
per message; only the member itself may move it further).  A forged ``alive`` at a huge
incarnation must not switch off failure detection (issue 11, bug 3)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.errors import ProtocolError
from meshd.swim import (
    Ack,
    Alive,
    Dead,
    Gossip,
    Left,
    MemberDead,
    Membership,
    MemberState,
    Ping,
    PushPullRequest,
    Status,
    Suspect,
    SwimConfig,
    decode_message,
    encode_message,
    from_bytes,
    to_bytes,
)
from meshd.swim.messages import MAX_INCARNATION, MAX_INT
from meshd.swim.util import suspicion_timeout
from meshd.testing.sim import Simulator

K = SwimConfig().max_incarnation_step
HUGE = MAX_INT  # 2**63 - 1: what the attacker sent


def core_with(*peers: bytes, me: bytes = b"me") -> Membership:
    core = Membership(me, SwimConfig(), random.Random(3), 0.0)
    core.restore([(p, 0, b"", True) for p in peers], 0.0)
    core.outgoing(), core.events()
    return core


def inc(core: Membership, node: bytes) -> int:
    info = core.member(node)
    assert info is not None
    return info.incarnation


# ---------------------------------------------------------------- the codec


@pytest.mark.parametrize("update", [
    [0, b"e", MAX_INCARNATION + 1, b"", True], [1, b"e", MAX_INCARNATION + 1, b"h"],
    [2, b"e", MAX_INCARNATION + 1, b"h"], [3, b"e", MAX_INCARNATION + 1], [0, b"e", HUGE, b"", True],
])
def test_codec_refuses_a_message_with_an_incarnation_above_the_bound(update: list[object]) -> None:
    for msg in ([5, [[0, b"ok", 1, b"", True], update]], [1, 7, b"t", 0, [update]], [3, 7, [update]]):
        with pytest.raises(ProtocolError) as exc:
            decode_message(msg)
        assert exc.value.reason == "incarnation"


def test_codec_refuses_a_push_pull_row_above_the_bound() -> None:
    with pytest.raises(ProtocolError) as exc:
        from_bytes(to_bytes(PushPullRequest((MemberState(b"e", MAX_INCARNATION + 1, 0),))))
    assert exc.value.reason == "incarnation"


def test_codec_takes_the_bound_itself() -> None:
    msg = Gossip((Alive(b"e", MAX_INCARNATION), Suspect(b"e", MAX_INCARNATION, b"h"),
                  Dead(b"e", MAX_INCARNATION, b"h"), Left(b"e", MAX_INCARNATION)))
    assert decode_message(encode_message(msg)) == msg


# ---------------------------------------------------------------- the core


def test_hearsay_alive_at_a_huge_incarnation_moves_the_member_by_the_step_only() -> None:
    core = core_with(b"e", b"h")
    core.receive(Gossip((Alive(b"e", HUGE),)), b"h", 1.0)
    assert inc(core, b"e") == K and core.clamped == 1
    # and what the core passes on is the bounded claim, not the liar's
    core.receive(Ping(1, b"me"), b"h", 1.1)
    sent = [u for _, m in core.outgoing() for u in getattr(m, "updates", ())]
    assert Alive(b"e", K) in sent and not [u for u in sent if u.incarnation > K]


def test_the_member_itself_may_raise_its_incarnation_as_far_as_it_likes() -> None:
    core = core_with(b"e", b"h")
    core.receive(Ack(1, (Alive(b"e", 10_000),)), b"e", 1.0)
    core.receive(PushPullRequest((MemberState(b"e", 20_000, 0),)), b"e", 2.0)
    assert inc(core, b"e") == 20_000 and core.clamped == 0


def test_hearsay_steps_do_not_add_up_within_one_message() -> None:
    core = core_with(b"e", b"h")
    steps = tuple(Suspect(b"e", K * (j + 1), b"h") for j in range(500))
    core.receive(Gossip(steps), b"h", 1.0)
    assert inc(core, b"e") == K
    rows = (MemberState(b"e", 3 * K, 1), MemberState(b"x", HUGE // 2, 0))
    core.receive(PushPullRequest(rows), b"h", 2.0)
    assert inc(core, b"e") == 2 * K and inc(core, b"x") == K  # unknown members start from 0


def test_hearsay_accusation_of_ourselves_is_refuted_one_step_above_the_bound() -> None:
    core = core_with(b"h")
    core.receive(Gossip((Dead(b"me", HUGE, b"h"),)), b"h", 1.0)
    assert core.incarnation == K + 1


def test_our_own_probe_still_suspects_and_kills_a_member_at_the_top_incarnation() -> None:
    core = core_with(b"e")
    core.receive(Ack(1, (Alive(b"e", MAX_INCARNATION),)), b"e", 0.5)  # e itself said so
    now, dead = 0.5, False
    while now < 60 and not dead:  # e never answers again
        now = max(now, core.get_timer() or now)
        core.handle_timer(now)
        core.outgoing()
        dead = any(isinstance(ev, MemberDead) for ev in core.events())
        now += 0.01
    assert dead and core.member(b"e").status is Status.DEAD  # type: ignore[union-attr]


def test_a_refutation_never_leaves_the_bound() -> None:
    core = Membership(b"me", SwimConfig(), random.Random(1), 0.0, incarnation=MAX_INCARNATION - 1)
    core.restore([(b"h", 0, b"", True)], 0.0)
    core.receive(Gossip((Suspect(b"me", MAX_INCARNATION - 1, b"h"),)), b"h", 1.0)
    core.receive(Gossip((Suspect(b"me", MAX_INCARNATION, b"h"),)), b"h", 2.0)
    assert core.incarnation == MAX_INCARNATION
    core.set_meta(b"x", True, 3.0)
    assert core.incarnation == MAX_INCARNATION
    for _, m in core.outgoing():
        from_bytes(to_bytes(m))  # everything it says still decodes


_nodes = st.sampled_from([b"me", b"e", b"f", b"h", b"new"])
_incs = st.integers(0, MAX_INCARNATION)
_updates = st.lists(st.one_of(
    st.builds(Alive, _nodes, _incs), st.builds(Suspect, _nodes, _incs, _nodes),
    st.builds(Dead, _nodes, _incs, _nodes), st.builds(Left, _nodes, _incs)), max_size=12).map(tuple)
_rows = st.lists(st.builds(MemberState, _nodes, _incs, st.integers(0, 3)), max_size=6).map(tuple)
_msgs = st.one_of(st.builds(Gossip, _updates), st.builds(Ack, st.just(0), _updates),
                  st.builds(PushPullRequest, _rows))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_msgs, st.sampled_from([b"e", b"f", b"h"])), max_size=12))
def test_hearsay_moves_no_incarnation_more_than_one_step_per_message(script: list) -> None:
    core = core_with(b"e", b"f", b"h")
    for t, (msg, sender) in enumerate(script):
        before = {m.node: m.incarnation for m in core.members()}
        core.receive(msg, sender, 1.0 + t)
        for m in core.members():
            if m.node == sender:
                continue
            allowed = before.get(m.node, 0) + K + (1 if m.node == b"me" else 0)  # +1: our refutation
            assert m.incarnation <= allowed, (m, before.get(m.node))
        for _, out in core.outgoing():
            from_bytes(to_bytes(out))  # nothing the core says leaves the bound


# ---------------------------------------------------------------- many nodes


@pytest.mark.parametrize("claim", [HUGE, 2**40])
def test_a_forged_alive_does_not_keep_a_frozen_member_alive(claim: int) -> None:
    sim = Simulator(seed=11)
    ids = sim.bootstrap(20)
    sim.run_for(5.0)
    hostile, victim = ids[0], ids[1]
    for x in ids:
        if x != hostile:
            sim.inject(hostile, x, Gossip((Alive(victim, claim),)))
    sim.run_for(2.0)
    honest = [x for x in ids if x not in (hostile, victim)]
    assert all(inc(sim.nodes[x].core, victim) <= 2 * K + 1 for x in honest)
    sim.pause(victim)  # SIGSTOP
    cfg = sim.config
    bound = suspicion_timeout(cfg.suspicion_mult, 20, cfg.probe_interval) * cfg.suspicion_max_timeout_mult
    t0 = sim.now
    while not all(sim.status(x, victim) is Status.DEAD for x in honest) and sim.now < t0 + bound + 30:
        sim.run_for(1.0)
    assert all(sim.status(x, victim) is Status.DEAD for x in honest)
    # thawed, it refutes and is alive everywhere again
    sim.resume(victim)
    t1 = sim.now
    while not all(sim.status(x, victim) is Status.ALIVE for x in ids if x != victim) and sim.now < t1 + 120:
        sim.run_for(1.0)
    assert all(sim.status(x, victim) is Status.ALIVE for x in ids if x != victim)


def test_a_newcomer_learns_long_lived_members_through_bounded_hearsay() -> None:
    sim = Simulator(seed=12)
    ids = sim.bootstrap(10)
    sim.run_for(2.0)
    old = ids[3]
    core = sim.nodes[old].core
    for _ in range(3 * K):  # a member that refuted many times
        core.set_meta(b"", True, sim.now)
    sim.run_for(10.0)
    new = sim.add_node(join=ids[5:6])
    sim.run_for(60.0)
    assert all(sim.status(new, x) is Status.ALIVE for x in ids)
    assert all(sim.status(x, new) is Status.ALIVE for x in ids)
