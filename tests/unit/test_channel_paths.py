"""Reachability table rules and the per-channel path race (pure cores, manual clock)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from meshd.channel.paths import (
    DIRECT,
    REVERSED,
    CancelAttempt,
    NoPath,
    Path,
    PathChosen,
    PathKind,
    PathRace,
    RaceConfig,
    StartAttempt,
)
from meshd.channel.reach import (
    Observation,
    Outcome,
    ReachabilityTable,
    ReachConfig,
    Tri,
)
from meshd.errors import LocalError

A, B, C, X, Y, Z = b"A", b"B", b"C", b"X", b"Y", b"Z"
OK, FAILED = Outcome.OK, Outcome.FAILED


def obs(a: bytes, b: bytes, outcome: Outcome = OK, at: float = 0.0, rtt: float | None = 0.01,
        address: str | None = None) -> Observation:
    return Observation(a, b, outcome, at, rtt if outcome is OK else None, address)


def table_of(pairs: dict[tuple[bytes, bytes], Outcome | float], ttl: float = 1e9
             ) -> ReachabilityTable:
    """A table from {(a, b): FAILED | rtt-seconds (meaning OK)}."""
    t = ReachabilityTable(ReachConfig(ttl=ttl, refresh=ttl / 2))
    for (a, b), v in pairs.items():
        t.record(obs(a, b, FAILED) if v is FAILED else obs(a, b, OK, rtt=float(v)))  # type: ignore[arg-type]
    return t


# -- reachability table ----------------------------------------------------------------------


def test_results_expire_after_ttl() -> None:
    t = ReachabilityTable(ReachConfig(ttl=10.0, refresh=5.0))
    t.record(obs(A, B, OK, at=100.0, rtt=0.02))
    t.record(obs(B, A, FAILED, at=100.0))
    assert t.can_dial(A, B, 109.9) is Tri.YES and t.rtt(A, B, 109.9) == 0.02
    assert t.can_dial(B, A, 109.9) is Tri.NO
    assert t.can_dial(A, B, 110.0) is Tri.UNKNOWN and t.rtt(A, B, 110.0) is None
    assert t.can_dial(B, A, 110.0) is Tri.UNKNOWN
    assert t.can_dial(A, C, 100.0) is Tri.UNKNOWN
    t.record(obs(A, C, Outcome.UNKNOWN, at=105.0))
    assert t.can_dial(A, C, 105.0) is Tri.UNKNOWN
    t.prune(110.0)
    assert list(t.observations(110.0)) == [obs(A, C, Outcome.UNKNOWN, at=105.0)]
    assert list(t.observations(110.0, dialer=B)) == []


def test_address_change_invalidates_what_no_longer_holds() -> None:
    t = ReachabilityTable()
    t.addresses_changed(B, ["10.0.0.1:7000"], now=0.0)
    t.record(obs(A, B, OK, at=1.0, address="10.0.0.1:7000"))
    t.record(obs(C, B, FAILED, at=1.0, address="10.0.0.1:7000"))
    t.record(obs(A, C, FAILED, at=1.0))
    t.addresses_changed(B, ["10.0.0.1:7000"], now=2.0)      # same set: nothing happens
    assert t.can_dial(C, B, 2.0) is Tri.NO
    # B adds an address: the failure may no longer hold; the success at a kept address does.
    t.addresses_changed(B, ["10.0.0.1:7000", "192.0.2.9:7000"], now=3.0)
    assert t.can_dial(C, B, 3.0) is Tri.UNKNOWN
    assert t.can_dial(A, B, 3.0) is Tri.YES
    assert t.can_dial(A, C, 3.0) is Tri.NO                  # other targets untouched
    # B drops the address A reached it at.
    t.addresses_changed(B, ["192.0.2.9:7000"], now=4.0)
    assert t.can_dial(A, B, 4.0) is Tri.UNKNOWN
    # Late reports about the old address, or undated-address ones from before the change: ignored.
    assert t.merge(A, [obs(A, B, OK, at=5.0, address="10.0.0.1:7000")], now=5.0) == 0
    assert t.merge(A, [obs(A, B, OK, at=3.5)], now=5.0) == 0
    assert t.merge(A, [obs(A, B, OK, at=4.5)], now=5.0) == 1
    assert t.merge(C, [obs(C, B, FAILED, at=5.0, address="192.0.2.9:7000")], now=5.0) == 1
    assert t.can_dial(A, B, 5.0) is Tri.YES and t.can_dial(C, B, 5.0) is Tri.NO
    t.forget(B)
    assert t.can_dial(A, B, 5.0) is Tri.UNKNOWN and t.can_dial(C, B, 5.0) is Tri.UNKNOWN
    assert t.can_dial(A, C, 5.0) is Tri.NO


def test_a_member_back_from_the_dead_is_checked_again_but_its_addresses_are_kept() -> None:
    t = ReachabilityTable()
    assert not t.note_addresses(B, ["10.0.0.1:7000"], now=1.0)
    t.record(obs(A, B, FAILED, at=1.0))                      # failed while B was frozen
    t.forget_observations(B)
    assert t.can_dial(A, B, 2.0) is Tri.UNKNOWN
    # B's next record with other addresses is still a change (forget() would lose that).
    assert t.note_addresses(B, ["10.0.0.2:7000"], now=3.0)


def test_a_running_site_notes_addresses_and_rechecks_only_on_a_change() -> None:
    t = ReachabilityTable()
    t.record(obs(A, B, OK, at=1.0))                          # observed before B's record is seen
    t.record(obs(B, A, FAILED, at=1.0))
    assert t.note_addresses(B, ["10.0.0.1:7000"], now=2.0) is False   # first sighting: kept
    assert t.note_addresses(A, ["10.0.0.2:7000"], now=2.0) is False
    assert t.can_dial(A, B, 2.0) is Tri.YES and t.can_dial(B, A, 2.0) is Tri.NO
    assert t.note_addresses(B, ["10.0.0.1:7000"], now=3.0) is False   # same set (any order)
    assert t.members_with_addresses() == {A, B}
    assert t.note_addresses(B, ["10.9.9.9:7000"], now=4.0) is True    # B moved
    assert t.can_dial(A, B, 4.0) is Tri.UNKNOWN               # so A asks again
    assert t.can_dial(B, A, 4.0) is Tri.NO                    # dialing A: untouched
    assert t.dial_back_plan(B, [A], now=4.0) == [A]           # B asks A to dial it back
    # we moved ourselves: everyone is asked again
    assert t.note_addresses(A, ["198.51.100.7:7000"], now=5.0) is True
    assert t.can_dial(B, A, 5.0) is Tri.UNKNOWN and t.dial_back_plan(A, [B, C], now=5.0) == [B, C]


def test_reporter_speaks_only_for_its_own_dials() -> None:
    t = ReachabilityTable()
    # C claims that A dialed B, and that B could not dial A: neither is C's to say.
    assert t.merge(C, [obs(A, B, OK, at=1.0), obs(B, A, FAILED, at=1.0)], now=1.0) == 0
    assert t.can_dial(A, B, 1.0) is Tri.UNKNOWN and t.can_dial(B, A, 1.0) is Tri.UNKNOWN
    # C about its own dials: taken.  About dialing itself, or dated far ahead of us: ignored.
    assert t.merge(C, [obs(C, B, OK, at=1.0), obs(C, C, OK, at=1.0),
                       obs(C, A, OK, at=1000.0)], now=1.0) == 1
    assert t.can_dial(C, B, 1.0) is Tri.YES and t.can_dial(C, A, 1.0) is Tri.UNKNOWN


@given(st.permutations([(0.0, OK), (1.0, FAILED), (2.0, OK), (3.0, Outcome.UNKNOWN),
                        (4.0, FAILED)]))
def test_newest_observation_wins_in_any_arrival_order(
        order: list[tuple[float, Outcome]]) -> None:
    t = ReachabilityTable()
    for at, outcome in order:
        t.merge(A, [obs(A, B, outcome, at=at)], now=at)
    held = t.get(A, B, 4.0)
    assert held is not None and (held.at, held.outcome) == (4.0, FAILED)
    assert t.can_dial(A, B, 4.0) is Tri.NO


def test_dial_back_plan_asks_for_unknown_and_stale() -> None:
    t = ReachabilityTable(ReachConfig(ttl=100.0, refresh=50.0))
    t.record(obs(B, A, OK, at=0.0))            # stale at 60
    t.record(obs(C, A, FAILED, at=40.0))       # fresh at 60: do not nag C
    t.record(obs(X, A, Outcome.UNKNOWN, at=40.0))
    t.record(obs(A, Y, OK, at=40.0))           # our dial to Y says nothing about Y dialing us
    plan = t.dial_back_plan(A, [A, B, C, X, Y, Z, Z], now=60.0)
    assert plan == [B, X, Y, Z]
    t.record(obs(B, A, OK, at=60.0))
    assert t.dial_back_plan(A, [B, C], now=60.0) == []
    t.addresses_changed(A, ["198.51.100.7:7000"], now=61.0)      # we moved: ask everyone again
    assert t.dial_back_plan(A, [B, C], now=61.0) == [B, C]
    assert t.dial_back_plan(A, [B, C], now=200.0) == [B, C]   # everything expired


# -- path race: a driver --------------------------------------------------------------------

World = Callable[[Path], "tuple[bool, float] | None"]
"""What the network does with an attempt: (succeeds?, after seconds), or None (black hole)."""


def drive(race: PathRace, world: World, now: float = 0.0, max_rounds: int = 1000
          ) -> tuple[PathChosen | NoPath, list[tuple[float, StartAttempt | CancelAttempt]]]:
    """Run a race against ``world`` on a manual clock until its one outcome.  Returns it and the
    timed log of actions."""
    log: list[tuple[float, StartAttempt | CancelAttempt]] = []
    due: dict[Path, tuple[float, bool]] = {}
    race.start(now)
    for _ in range(max_rounds):
        for act in race.outgoing():
            log.append((now, act))
            if isinstance(act, StartAttempt):
                fate = world(act.path)
                if fate is not None:
                    due[act.path] = (now + fate[1], fate[0])
            else:
                due.pop(act.path, None)
        events = race.events()
        if events:
            assert len(events) == 1 and race.done
            assert race.get_timer() is None
            return events[0], log
        timer = race.get_timer()
        now = min([*([timer] if timer is not None else []), *(t for t, _ in due.values())])
        for path, (t, ok) in sorted(due.items(), key=lambda kv: kv[1][0]):
            if t <= now:
                del due[path]
                if ok:
                    race.attempt_succeeded(path, now, setup_rtt=0.01)
                else:
                    race.attempt_failed(path, now, "refused")
                break
        else:
            race.handle_timer(now)
    raise AssertionError("race did not finish")


# The lab: A reachable, B outbound-only (its firewall drops inbound), C NATed (nothing reaches
# it).  Everyone can dial A; A relays.
LAB_DIAL = {(B, A), (C, A)}
LAB_NODES = (A, B, C)
LAB_RELAYS = (A,)


def lab_world(sender: bytes, receiver: bytes) -> World:
    def can(a: bytes, b: bytes) -> bool:
        return (a, b) in LAB_DIAL

    def fate(path: Path) -> tuple[bool, float] | None:
        if path.kind is PathKind.DIRECT:
            ok = can(sender, receiver)
        elif path.kind is PathKind.REVERSED:
            ok = can(receiver, sender)
        else:
            assert path.relay is not None
            ok = can(sender, path.relay) and can(receiver, path.relay)
        return (True, 0.05) if ok else None          # firewalls and NAT drop: a black hole
    return fate


def lab_table() -> ReachabilityTable:
    return table_of({(a, b): (0.02 if (a, b) in LAB_DIAL else FAILED)
                     for a in LAB_NODES for b in LAB_NODES if a != b})


LAB_CASES = [
    (A, B, REVERSED),          # B is outbound-only: B dials A
    (B, A, DIRECT),
    (B, C, Path.via(A)),
    (C, B, Path.via(A)),
    (C, A, DIRECT),
    (A, C, REVERSED),          # C is NATed: C dials A
]


@pytest.mark.parametrize("sender,receiver,expected", LAB_CASES)
@pytest.mark.parametrize("known", [True, False], ids=["measured", "empty-table"])
def test_lab_firewall_scenarios(sender: bytes, receiver: bytes, expected: Path,
                                known: bool) -> None:
    table = lab_table() if known else ReachabilityTable()
    race = PathRace(sender, receiver, table, relays=LAB_RELAYS)
    outcome, log = drive(race, lab_world(sender, receiver))
    assert isinstance(outcome, PathChosen) and outcome.path == expected
    started = [a.path for _, a in log if isinstance(a, StartAttempt)]
    if known:
        # The table rules out the rest: only the winner is tried, and at once.
        assert started == [expected] and outcome.setup_s == pytest.approx(0.05)
    else:
        # Everything is tried in order until something works; the black holes are cancelled.
        assert started[-1] == expected
        assert {a.path for _, a in log if isinstance(a, CancelAttempt)} == set(started[:-1])
    assert race.chosen == expected


# -- path race: rules -----------------------------------------------------------------------


def starts(race: PathRace) -> list[Path]:
    return [a.path for a in race.outgoing() if isinstance(a, StartAttempt)]


def assert_chosen(race: PathRace, path: Path, setup_s: float, rtt: float | None = None) -> None:
    [ev] = race.events()
    assert isinstance(ev, PathChosen) and (ev.path, ev.rtt) == (path, rtt)
    assert ev.setup_s == pytest.approx(setup_s)


def test_candidate_order_yes_before_unknown_relays_by_rtt() -> None:
    table = table_of({
        (A, B): FAILED,                        # no direct
        (A, X): 0.030, (B, X): 0.030,          # X: yes, 60 ms
        (A, Y): 0.010, (B, Y): 0.010,          # Y: yes, 20 ms
        (A, Z): 0.001,                         # Z: B's leg unknown
        (B, C): FAILED,                        # B cannot dial C: relay C ruled out
    })
    race = PathRace(A, B, table, relays=[Z, X, Y, C, A, B], config=RaceConfig(max_relays=2))
    order, skipped = race.candidates(0.0)
    assert order == [Path.via(Y), Path.via(X), REVERSED]
    assert skipped == {DIRECT: "unreachable", Path.via(C): "unreachable",
                       Path.via(Z): "not-tried"}
    race3 = PathRace(A, B, table, relays=[Z, X, Y], config=RaceConfig(max_relays=3))
    assert race3.candidates(0.0)[0] == [Path.via(Y), Path.via(X), REVERSED, Path.via(Z)]


def test_stagger_is_respected_while_the_earlier_attempt_is_in_flight() -> None:
    race = PathRace(A, B, ReachabilityTable(), relays=[X])
    race.start(10.0)
    assert starts(race) == [DIRECT]
    assert race.get_timer() == pytest.approx(10.15)
    race.handle_timer(10.149)
    assert starts(race) == []
    race.handle_timer(10.15)
    assert starts(race) == [REVERSED]
    assert race.get_timer() == pytest.approx(10.30)
    race.handle_timer(10.30)
    assert starts(race) == [Path.via(X)]
    assert race.get_timer() == pytest.approx(15.0)   # only attempt deadlines remain


def test_an_early_failure_starts_the_next_candidate_at_once() -> None:
    race = PathRace(A, B, ReachabilityTable(), relays=[X])
    race.start(0.0)
    assert starts(race) == [DIRECT]
    race.attempt_failed(DIRECT, 0.02, "refused")
    assert starts(race) == [REVERSED]                # not waiting for +150 ms
    assert race.get_timer() == pytest.approx(0.17)   # the next one is staggered from here
    race.handle_timer(0.17)
    assert starts(race) == [Path.via(X)]


def test_first_success_wins_and_cancels_the_rest() -> None:
    race = PathRace(A, B, ReachabilityTable(), relays=[X, Y])
    race.start(0.0)
    race.handle_timer(0.15)
    race.handle_timer(0.30)
    assert starts(race) == [DIRECT, REVERSED, Path.via(X)]   # X, Y tie: by id
    race.attempt_succeeded(REVERSED, 0.4, setup_rtt=0.03)
    assert race.outgoing() == [CancelAttempt(DIRECT), CancelAttempt(Path.via(X))]
    assert_chosen(race, REVERSED, 0.4, 0.03)
    # Late reports change nothing; Y is never started.
    race.attempt_succeeded(DIRECT, 0.5)
    race.attempt_failed(Path.via(X), 0.5, "refused")
    race.handle_timer(10.0)
    assert race.outgoing() == [] and race.events() == [] and race.get_timer() is None
    with pytest.raises(LocalError) as e:
        race.attempt_succeeded(Path.via(Y), 0.5)
    assert e.value.reason == "unknown-attempt"


def test_all_fail_gives_no_path_with_a_reason_per_path() -> None:
    table = table_of({(A, Z): FAILED})
    race = PathRace(A, B, table, relays=[X, Y, Z],
                    config=RaceConfig(attempt_timeout=2.0, max_relays=1))
    race.start(0.0)
    assert starts(race) == [DIRECT]
    race.attempt_failed(DIRECT, 0.01, "refused")
    assert starts(race) == [REVERSED]
    race.handle_timer(0.16)
    assert starts(race) == [Path.via(X)]
    race.attempt_failed(Path.via(X), 0.5, "relay-refused")
    assert race.events() == []
    race.handle_timer(2.01)                         # reversed times out
    assert race.outgoing() == [CancelAttempt(REVERSED)]
    [no] = race.events()
    assert isinstance(no, NoPath) and race.chosen is None
    assert dict(no.reasons) == {
        DIRECT: "refused", REVERSED: "timeout", Path.via(X): "relay-refused",
        Path.via(Y): "not-tried", Path.via(Z): "unreachable"}


def test_nothing_possible_is_no_path_at_once() -> None:
    race = PathRace(A, B, table_of({(A, B): FAILED, (B, A): FAILED}))
    race.start(0.0)
    assert race.outgoing() == []
    assert race.events() == [NoPath(((DIRECT, "unreachable"), (REVERSED, "unreachable")))]


def test_renegotiation_after_relay_loss_picks_another_relay_then_the_first_again() -> None:
    # Neither end reachable by the other: relays only; X is faster than Y.
    table = table_of({(A, B): FAILED, (B, A): FAILED, (A, X): 0.01, (B, X): 0.01,
                      (A, Y): 0.05, (B, Y): 0.05})
    race = PathRace(A, B, table, relays=[X, Y], config=RaceConfig(exclude_for=30.0))
    outcome, _ = drive(race, lambda p: (True, 0.1))
    assert isinstance(outcome, PathChosen) and outcome.path == Path.via(X)
    with pytest.raises(LocalError):
        race.start(1.0)
    race.renegotiate(100.0, "relay-lost")
    assert starts(race) == [Path.via(Y)]
    race.attempt_succeeded(Path.via(Y), 100.2)
    assert_chosen(race, Path.via(Y), 0.2)
    # Y is lost too, while X is still excluded: with nothing else left, both are tried again
    # (a lost path may have been a passing fault) rather than the channel having no path.
    race.renegotiate(110.0, "relay-lost")
    assert race.events() == []
    assert starts(race) == [Path.via(X)]
    race.attempt_failed(Path.via(X), 110.1, "refused")
    assert starts(race) == [Path.via(Y)]
    race.attempt_failed(Path.via(Y), 110.2, "refused")
    [no] = race.events()
    assert isinstance(no, NoPath)
    assert dict(no.reasons) == {Path.via(X): "refused", Path.via(Y): "refused",
                                DIRECT: "unreachable", REVERSED: "unreachable"}
    # After the exclusion, X is back, and the renegotiation may move to a different relay list.
    race.renegotiate(141.0, "retry", relays=[X, Y, Z])
    assert starts(race) == [Path.via(X)]


def test_renegotiation_after_connection_loss_moves_to_another_path() -> None:
    race = PathRace(A, B, table_of({(A, B): 0.01, (B, A): 0.02}))
    race.start(0.0)
    assert starts(race) == [DIRECT]
    race.attempt_succeeded(DIRECT, 0.03)
    race.events()
    with pytest.raises(LocalError):
        PathRace(A, A, ReachabilityTable())
    race.renegotiate(5.0, "connection-lost")
    assert starts(race) == [REVERSED]
    race.attempt_succeeded(DIRECT, 5.01)            # a late report of the old race: ignored
    assert race.events() == []
    race.attempt_succeeded(REVERSED, 5.05)
    assert_chosen(race, REVERSED, 0.05)


def test_a_recently_lost_path_is_tried_again_once_every_other_path_has_failed() -> None:
    # B -> C in the lab: only a relay works, but "reversed" stays a candidate (unknown).  Losing
    # the relay must not leave the channel without a path for ``exclude_for`` seconds.
    race = PathRace(A, B, table_of({(A, B): FAILED, (A, X): 0.01, (B, X): 0.01}), relays=[X])
    race.start(0.0)
    assert starts(race) == [Path.via(X)]            # relays known good rank before unknowns
    race.attempt_succeeded(Path.via(X), 0.05)
    race.events()
    race.renegotiate(10.0, "relay-lost")
    assert starts(race) == [REVERSED]               # the relay is excluded while reversed remains
    race.attempt_failed(REVERSED, 10.1, "refused")
    assert starts(race) == [Path.via(X)]            # ... and tried again once it has failed
    race.attempt_succeeded(Path.via(X), 10.2)
    assert_chosen(race, Path.via(X), 0.2)


def test_renegotiate_while_racing_is_caller_misuse() -> None:
    race = PathRace(A, B, ReachabilityTable())
    race.start(0.0)
    with pytest.raises(LocalError) as e:
        race.renegotiate(0.1, "connection-lost")
    assert e.value.reason == "not-done"


def test_path_names_its_relay_only_when_relayed() -> None:
    with pytest.raises(LocalError):
        Path(PathKind.RELAY)
    with pytest.raises(LocalError):
        Path(PathKind.DIRECT, A)
    assert str(Path.via(b"\x01\xff")) == "relay via 01ff" and str(DIRECT) == "direct"


# -- property: one outcome, never a ruled-out path -------------------------------------------

NODES = [A, B, X, Y, Z]
PAIRS = [(a, b) for a in NODES for b in NODES if a != b]
entry = st.one_of(st.none(), st.just(FAILED), st.floats(0.001, 0.3))
step = st.tuples(st.sampled_from(["tick", "ok", "fail"]), st.integers(0, 5),
                 st.floats(0.0, 1.0))


def legal(path: Path, t: ReachabilityTable) -> bool:
    legs = {PathKind.DIRECT: [(A, B)], PathKind.REVERSED: [(B, A)]}.get(
        path.kind, [(A, path.relay), (B, path.relay)])
    return all(t.can_dial(a, b, 0.0) is not Tri.NO for a, b in legs)  # type: ignore[arg-type]


def play(race: PathRace, steps: list[tuple[str, int, float]], now: float
         ) -> tuple[list[PathChosen | NoPath], list[tuple[float, StartAttempt | CancelAttempt]],
                    set[float], float]:
    """Drive ``race`` by ``steps``, then by its timers alone.  Returns its events, its timed
    actions, the times at which an attempt failed, and the final time."""
    events: list[PathChosen | NoPath] = []
    actions: list[tuple[float, StartAttempt | CancelAttempt]] = []
    failures: set[float] = set()

    def collect() -> None:
        actions.extend((now, a) for a in race.outgoing())
        events.extend(race.events())

    collect()
    for kind, i, dt in steps:
        now += dt
        running = race.running
        if kind == "tick" or not running:
            race.handle_timer(now)
        elif kind == "ok":
            race.attempt_succeeded(running[i % len(running)], now)
        else:
            failures.add(now)
            race.attempt_failed(running[i % len(running)], now, "refused")
        collect()
    for _ in range(50):                              # let the timers finish it
        timer = race.get_timer()
        if timer is None:
            break
        now = max(now, timer)
        race.handle_timer(now)
        collect()
    return events, actions, failures, now


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({p: entry for p in PAIRS}),
       st.lists(st.sampled_from([X, Y, Z, A]), max_size=4),
       st.lists(step, max_size=25), st.lists(step, max_size=25))
def test_exactly_one_outcome_and_never_a_ruled_out_path(
        entries: dict[tuple[bytes, bytes], Outcome | float | None], relays: list[bytes],
        steps1: list[tuple[str, int, float]], steps2: list[tuple[str, int, float]]) -> None:
    table = table_of({p: v for p, v in entries.items() if v is not None})
    race = PathRace(A, B, table, relays=relays, config=RaceConfig(attempt_timeout=1.0))
    race.start(0.0)
    excluded: Path | None = None
    now = 0.0
    for steps in (steps1, steps2):
        events, timed, failures, now = play(race, steps, now)
        assert len(events) == 1 and race.done and race.get_timer() is None
        started = [a.path for _, a in timed if isinstance(a, StartAttempt)]
        cancelled = [a.path for _, a in timed if isinstance(a, CancelAttempt)]
        # Stagger: a start follows the previous one by >= stagger, unless an attempt failed or
        # timed out (was cancelled) at that very moment.
        failures |= {t for t, a in timed if isinstance(a, CancelAttempt)}
        start_times = [t for t, a in timed if isinstance(a, StartAttempt)]
        for prev, t in itertools.pairwise(start_times):
            assert t - prev >= race.config.stagger - 1e-9 or t in failures
        # direct, reversed, 2 relays, and the relay lost in round one (left out, so two others
        # were ranked in its place) as the last resort
        last_resort = int(excluded is not None and excluded.kind is PathKind.RELAY
                          and started[-1:] == [excluded])
        assert len(started) == len(set(started)) <= 2 + 2 + last_resort
        assert all(legal(p, table) for p in started)
        # A path lost in round one is avoided in round two until everything else has failed.
        assert excluded not in started or started[-1] == excluded
        assert set(cancelled) <= set(started)
        [ev] = events
        event(f"{type(ev).__name__} after {len(started)} starts")
        if isinstance(ev, PathChosen):
            assert ev.path in started and ev.path not in cancelled and race.chosen == ev.path
            assert ev.setup_s >= 0
        else:
            assert race.chosen is None
            reasons = dict(ev.reasons)
            assert len(reasons) == len(ev.reasons) and set(started) <= set(reasons)
            # NoPath only once every candidate was tried: the rest were left out for a reason.
            assert set(reasons) == {DIRECT, REVERSED} | {Path.via(x) for x in relays if x != A}
            assert all(reasons[p] in ("refused", "timeout") for p in started)
            assert all(reasons[p] in ("unreachable", "excluded", "not-tried")
                       for p in set(reasons) - set(started))
        excluded = race.chosen
        race.renegotiate(now, "connection-lost")    # the second round runs with it excluded
