"""Hypothesis properties of the membership codec, queue and core over random schedules."""

from __future__ import annotations

import os
import random
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd.errors import ProtocolError
from meshd.testing.sim import Simulator
from meshd.swim import (
    Ack,
    Alive,
    Dead,
    Gossip,
    Left,
    Membership,
    MemberState,
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
from meshd.swim.messages import MAX_INCARNATION
from meshd.swim.queue import BroadcastQueue
from meshd.swim.state import Action, decide

node_ids = st.binary(min_size=1, max_size=64)
seqs = st.integers(0, 2**63 - 1)
incs = st.integers(0, MAX_INCARNATION)
updates = st.one_of(
    st.builds(Alive, node_ids, incs, st.binary(max_size=64), st.booleans()),
    st.builds(Suspect, node_ids, incs, node_ids),
    st.builds(Dead, node_ids, incs, node_ids),
    st.builds(Left, node_ids, incs),
)
ups = st.lists(updates, max_size=8).map(tuple)
rows = st.lists(st.builds(MemberState, node_ids, incs, st.integers(0, 3), st.binary(max_size=32), st.booleans()),
                max_size=8).map(tuple)
blobs = st.lists(st.binary(max_size=64), max_size=4).map(tuple)
messages = st.one_of(
    st.builds(Ping, seqs, node_ids, ups, st.integers(0, 255)),
    st.builds(PingReq, seqs, node_ids, ups),
    st.builds(Ack, seqs, ups),
    st.builds(Nack, seqs, ups),
    st.builds(Gossip, ups),
    st.builds(PushPullRequest, rows, blobs, st.booleans()),
    st.builds(PushPullResponse, rows, blobs),
)
plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.binary(max_size=70)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=30,
)


@given(messages)
def test_codec_round_trip(msg: Any) -> None:
    assert from_bytes(to_bytes(msg)) == msg
    assert decode_message(encode_message(msg)) == msg


@given(st.binary(max_size=300))
def test_decoding_arbitrary_bytes_raises_only_protocol_error(data: bytes) -> None:
    try:
        msg = from_bytes(data)
    except ProtocolError:
        return
    assert from_bytes(to_bytes(msg)) == msg


@given(plain)
def test_decoding_arbitrary_objects_raises_only_protocol_error(obj: Any) -> None:
    try:
        decode_message(obj)
    except ProtocolError:
        pass


@given(messages, st.data())
def test_mutated_encodings_raise_only_protocol_error(msg: Any, data: st.DataObject) -> None:
    wire = encode_message(msg)
    path: list[Any] = wire
    while isinstance(path, list) and path and data.draw(st.booleans()):
        nxt = path[data.draw(st.integers(0, len(path) - 1))]
        if not isinstance(nxt, list):
            break
        path = nxt
    if isinstance(path, list) and path:
        path[data.draw(st.integers(0, len(path) - 1))] = data.draw(plain)
    raw = msgpack.packb(wire, use_bin_type=True)
    try:
        decoded = from_bytes(raw)
    except ProtocolError:
        return
    assert decode_message(encode_message(decoded)) == decoded


@given(st.lists(st.one_of(
    st.tuples(st.just("push"), st.sampled_from([b"a", b"b", b"c", b"d"]), st.integers(0, 5)),
    st.tuples(st.just("take"), st.integers(0, 200), st.integers(1, 6)),
), max_size=60))
def test_queue_never_exceeds_limit_and_newest_wins(ops: list[tuple[str, Any, int]]) -> None:
    q = BroadcastQueue()
    current: dict[bytes, Alive] = {}
    sent: dict[Alive, int] = {}
    for i, op in enumerate(ops):
        if op[0] == "push":
            u = Alive(op[1], i, bytes([op[2]]))  # every pushed update is distinct
            current[op[1]] = u
            q.push(u, 40)
        else:
            budget, limit = op[1], op[2]
            got = q.take(budget, limit)
            assert len(got) * 40 <= budget
            assert len({u.node for u in got}) == len(got)
            for u in got:
                assert current[u.node] is u  # never an overridden one
                sent[u] = sent.get(u, 0) + 1
                assert sent[u] <= limit


# ---------------------------------------------------------------- random schedules on the simulator

ops = st.lists(
    st.one_of(
        st.tuples(st.just("run"), st.floats(0.1, 60.0)),
        st.tuples(st.just("loss"), st.sampled_from([0.0, 0.1, 0.3, 0.6])),
        st.tuples(st.just("partition"), st.integers(1, 5)),
        st.tuples(st.just("heal"), st.just(0)),
        st.tuples(st.just("pause"), st.integers(0, 9)),
        st.tuples(st.just("resume"), st.integers(0, 9)),
        st.tuples(st.just("join"), st.integers(0, 9)),
        st.tuples(st.just("block"), st.integers(0, 99)),
    ),
    min_size=4,
    max_size=14,
)


@settings(max_examples=int(os.environ.get("SWIM_PROP_EXAMPLES", "40")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32), st.integers(3, 8), ops)
def test_random_schedules_converge_and_incarnations_never_decrease(seed: int, n: int, schedule: list[Any]) -> None:
    seen: dict[tuple[bytes, bytes], int] = {}
    own: dict[bytes, int] = {}

    def on_event(now: float, observer: bytes, e: Any) -> None:
        if isinstance(e, Refuted):
            assert e.incarnation > own.get(observer, -1)
            own[observer] = e.incarnation
        elif hasattr(e, "incarnation") and hasattr(e, "node"):
            key = (observer, e.node)
            assert e.incarnation >= seen.get(key, -1), (observer, e)
            seen[key] = e.incarnation

    sim = Simulator(seed=seed, record_events=False, on_event=on_event, jitter=0.05)
    ids = sim.bootstrap(n, slow_fraction=0.2)
    sim.run_for(5.0)
    for op, arg in schedule:
        if op == "run":
            sim.run_for(arg)
        elif op == "loss":
            sim.loss = arg
        elif op == "partition":
            live = list(sim.nodes)
            sim.partition(live[: arg % len(live)], live[arg % len(live):])
        elif op == "heal":
            sim.heal()
        elif op == "pause":
            sim.pause(list(sim.nodes)[arg % len(sim.nodes)])
        elif op == "resume":
            sim.resume(list(sim.nodes)[arg % len(sim.nodes)])
        elif op == "join":
            sim.add_node(join=[ids[arg % len(ids)]])
        elif op == "block":
            live = list(sim.nodes)
            sim.block(live[arg % len(live)], live[(arg // 7) % len(live)])
        for x, node in sim.nodes.items():
            assert node.core.incarnation >= own.get(x, 0)
    # calm network: everything resumes, no loss, no partition
    sim.heal()
    sim.loss = 0.0
    for x in sim.nodes:
        if sim.nodes[x].paused:
            sim.resume(x)
    live = sim.live_ids()
    for _ in range(40):
        sim.run_for(15.0)
        if all(sim.status(a, b) is Status.ALIVE for a in live for b in live if a != b):
            break
    assert all(sim.status(a, b) is Status.ALIVE for a in live for b in live if a != b)


# ---------------------------------------------------------------- the transition table is the law

_to_status = {
    Status.ALIVE: lambda x, c: [],
    Status.SUSPECT: lambda x, c: [Suspect(x, c, b"acc")],
    Status.DEAD: lambda x, c: [Dead(x, c, b"acc")],
    Status.LEFT: lambda x, c: [Left(x, c)],
}


@given(
    st.sampled_from(list(Status)),
    st.integers(0, 3),
    st.sampled_from(["alive", "suspect", "dead", "left"]),
    st.integers(0, 4),
    st.sampled_from([b"acc", b"other"]),
)
def test_updates_the_table_ignores_change_nothing(status: Status, c: int, kind: str, i: int, src: bytes) -> None:
    core = Membership(b"me", SwimConfig(), random.Random(0), 0.0)
    core.restore([(b"p", 0, b"", True), (b"q", 0, b"", True), (b"r", 0, b"", True)], 0.0)
    x = b"x"
    for u in [Alive(x, c), *_to_status[status](x, c)]:
        core.receive(Gossip((u,)), b"p", 1.0)
    assert core.member(x).status is status  # type: ignore[union-attr]
    core.events()
    before = core.member(x)
    upd = {"alive": Alive(x, i, b"m"), "suspect": Suspect(x, i, src), "dead": Dead(x, i, src), "left": Left(x, i)}[kind]
    action = decide(upd, status, c, False, False)
    core.receive(Gossip((upd,)), b"q", 2.0)
    after = core.member(x)
    if action is Action.IGNORE:
        assert after == before and core.events() == []
    elif action is not Action.CONFIRM:
        assert after != before
