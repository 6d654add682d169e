"""Path negotiation for one channel: a staggered race of direct, reversed and relayed (pure).

Theory of operation
-------------------
A channel from *sender* S to *receiver* R can run over

- **direct**: S dials R (needs ``can_dial(S, R)``);
- **reversed**: R dials S (needs ``can_dial(R, S)``);
- **relay via X**: S and R both dial member X, which forwards ciphertext (needs ``can_dial(S, X)``
  and ``can_dial(R, X)``, and X has relaying enabled).  The relay needs no inbound path to
  either end: it only has to be reachable *from* both.

Candidates: every path whose legs the :class:`~.reach.ReachabilityTable` does not rule out
(no leg is ``NO``) and that is not excluded after a recent loss.  Ordered by: all legs ``YES``
before any ``UNKNOWN``; then direct, reversed, relay; relays by measured
``rtt(S, X) + rtt(R, X)`` (unknown last, then by id for determinism).  At most
``max_relays`` relays are tried.

The race (Happy Eyeballs, RFC 8305): the first candidate starts at once; each next one starts
``stagger`` seconds after the previous start, *or at once when an attempt fails or times out*
(a failure frees its slot; we do not sit idle waiting for the stagger).  Each attempt has
``attempt_timeout``.  The first attempt to complete the end-to-end handshake wins; every other
running attempt is cancelled and nothing more is started.  When every candidate has failed,
:class:`NoPath` carries one reason per path, including the paths that were never tried.

A path lost by ``renegotiate`` is excluded for ``exclude_for`` seconds, but only while another
candidate remains: when there is none, or when every other candidate of the race has failed, the
excluded paths are tried after all (the loss may have been a passing fault).

Candidates are fixed when a race begins; a table change mid-race affects the next race only.
Reports name a path, not an attempt: a late report from an earlier race about a path that the
current race has started again is taken as the current attempt's (harmless: both were over the
same path).

Transitions (race)::

    state     input                       condition              -> result
    IDLE      start                       candidates             -> RACING, start first
              start                       none                   -> DONE, NoPath
    RACING    timer: attempt deadline     running                -> attempt TIMEOUT, Cancel,
                                                                    start next at once
              timer: next start due       pending                -> start next
              attempt_failed(p)           p running              -> p FAILED, start next at once
              attempt_succeeded(p)        p running              -> DONE, PathChosen(p),
                                                                    Cancel all other running
              attempt_*(p)                p cancelled/timed out,
                                          or from an earlier race -> ignored (late report)
              (after any failure)         none running, none
                                          pending                -> DONE, NoPath(reasons)
    DONE      attempt_*                                          -> ignored
              renegotiate(reason)                                -> exclude the chosen path for
                                                                    ``exclude_for``, RACING again
                                                                    (as ``start``)
    any       attempt_*(p)                p never started        -> LocalError (caller misuse)
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from meshd.errors import LocalError

from .reach import NodeId, ReachabilityTable, Tri

__all__ = [
    "DIRECT",
    "REVERSED",
    "CancelAttempt",
    "NoPath",
    "Path",
    "PathChosen",
    "PathKind",
    "PathRace",
    "RaceConfig",
    "StartAttempt",
]


class PathKind(enum.Enum):
    DIRECT = "direct"
    REVERSED = "reversed"
    RELAY = "relay"


@dataclass(frozen=True, slots=True)
class Path:
    """How a channel's bytes travel; ``relay`` is the relay's id for RELAY, else None."""

    kind: PathKind
    relay: NodeId | None = None

    def __post_init__(self) -> None:
        if (self.kind is PathKind.RELAY) != (self.relay is not None):
            raise LocalError("a relay path names its relay, and only a relay path does",
                             reason="bad-path")

    @classmethod
    def via(cls, relay: NodeId) -> Path:
        return cls(PathKind.RELAY, relay)

    def __str__(self) -> str:
        if self.relay is None:
            return self.kind.value
        return f"relay via {self.relay.hex()}"


DIRECT = Path(PathKind.DIRECT)
REVERSED = Path(PathKind.REVERSED)

# -- outgoing actions and events (frozen, slotted) -------------------------------------------


@dataclass(frozen=True, slots=True)
class StartAttempt:
    """Begin connecting over ``path`` and run the end-to-end handshake; report the outcome."""

    path: Path


@dataclass(frozen=True, slots=True)
class CancelAttempt:
    """Abandon the attempt over ``path`` (another won, or it timed out)."""

    path: Path


@dataclass(frozen=True, slots=True)
class PathChosen:
    """The race is won: ``setup_s`` from the race's start to the completed handshake."""

    path: Path
    setup_s: float
    rtt: float | None = None
    """The handshake RTT the winning attempt measured, if reported."""


@dataclass(frozen=True, slots=True)
class NoPath:
    """Every path failed or was ruled out; one ``(path, reason)`` per path considered.

    Reasons: ``disabled`` (the channel may not use this kind), ``unreachable`` (the table says a leg cannot be dialed), ``excluded`` (lost
    recently), ``not-tried`` (beyond ``max_relays``), ``timeout``, or what the attempt reported."""

    reasons: tuple[tuple[Path, str], ...]


Action = StartAttempt | CancelAttempt
Event = PathChosen | NoPath


@dataclass(frozen=True, slots=True)
class RaceConfig:
    stagger: float = 0.150
    """Seconds between starting one candidate and the next (0, 150, 300 ms for three)."""
    attempt_timeout: float = 5.0
    """Seconds an attempt may take to complete the end-to-end handshake."""
    max_relays: int = 2
    """Most relays tried in one race (the best-ranked ones)."""
    exclude_for: float = 30.0
    """Seconds a path lost by ``renegotiate`` is left out of later races."""


class _A(enum.Enum):
    RUNNING = "running"
    WON = "won"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


class _R(enum.Enum):
    IDLE = "idle"
    RACING = "racing"
    DONE = "done"


class PathRace:
    """The negotiation state machine of one channel (see the module docstring)."""

    def __init__(self, sender: NodeId, receiver: NodeId, table: ReachabilityTable,
                 relays: Iterable[NodeId] = (), config: RaceConfig | None = None, *,
                 kinds: Iterable[PathKind] = tuple(PathKind)) -> None:
        """``kinds``: the path kinds this channel may use (the others are left out as
        ``disabled``)."""
        if sender == receiver:
            raise LocalError("a channel needs two different ends", reason="same-node")
        self.sender = sender
        self.receiver = receiver
        self.table = table
        self.relays = tuple(relays)
        self.config = config or RaceConfig()
        self.kinds = frozenset(kinds)
        self.chosen: Path | None = None
        self._state = _R.IDLE
        self._excluded: dict[Path, float] = {}
        self._ever: set[Path] = set()
        self._reset()

    def _reset(self) -> None:
        self._started_at = 0.0
        self._pending: list[Path] = []
        self._attempts: dict[Path, tuple[_A, float]] = {}  # state, deadline
        self._reasons: dict[Path, str] = {}
        self._next_start: float | None = None
        self._second_wave = False
        self._actions: list[Action] = []
        self._events: list[Event] = []

    # -- candidates ------------------------------------------------------------------------

    def candidates(self, now: float) -> tuple[list[Path], dict[Path, str]]:
        """The ordered paths to try, and the reason for each path left out.  Paths lost
        recently are left out only while another candidate remains: a channel with a single
        usable path (say, one relay) goes back to it rather than having none."""
        paths, skipped = self._candidates(now, exclude=True)
        if not paths and "excluded" in skipped.values():
            paths, skipped = self._candidates(now, exclude=False)
        return paths, skipped

    def _candidates(self, now: float, *, exclude: bool) -> tuple[list[Path], dict[Path, str]]:
        s, r, t = self.sender, self.receiver, self.table
        ranked: list[tuple[int, int, float, bytes, Path]] = []
        skipped: dict[Path, str] = {}
        relays: list[tuple[int, float, bytes, Path]] = []

        def legs(*pairs: tuple[NodeId, NodeId]) -> Tri:
            answers = [t.can_dial(a, b, now) for a, b in pairs]
            if Tri.NO in answers:
                return Tri.NO
            return Tri.YES if all(x is Tri.YES for x in answers) else Tri.UNKNOWN

        def consider(path: Path, tri: Tri) -> bool:
            if path.kind not in self.kinds:
                skipped[path] = "disabled"
            elif tri is Tri.NO:
                skipped[path] = "unreachable"
            elif exclude and self._excluded.get(path, float("-inf")) > now:
                skipped[path] = "excluded"
            else:
                return True
            return False

        for order, path, tri in ((0, DIRECT, legs((s, r))), (1, REVERSED, legs((r, s)))):
            if consider(path, tri):
                ranked.append((tri is not Tri.YES, order, 0.0, b"", path))
        for x in dict.fromkeys(self.relays):
            if x in (s, r):
                continue
            path = Path.via(x)
            tri = legs((s, x), (r, x))
            if consider(path, tri):
                rtt_s = _rtt(t, s, x, now)
                rtt_r = _rtt(t, r, x, now)
                cost = float("inf") if rtt_s is None or rtt_r is None else rtt_s + rtt_r
                relays.append((tri is not Tri.YES, cost, x, path))
        relays.sort(key=lambda e: (e[0], e[1], e[2]))
        for *_, path in relays[self.config.max_relays:]:
            skipped[path] = "not-tried"
        for unknown, cost, x, path in relays[:self.config.max_relays]:
            ranked.append((unknown, 2, cost, x, path))
        ranked.sort(key=lambda e: e[:4])
        return [e[4] for e in ranked], skipped

    # -- inputs ----------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Begin the race."""
        if self._state is not _R.IDLE:
            raise LocalError("the race has already started", reason="already-started")
        self._begin(now)

    def renegotiate(self, now: float, reason: str, *,
                    relays: Iterable[NodeId] | None = None) -> None:
        """The chosen path was lost (``reason``, e.g. ``connection-lost``, ``relay-lost``):
        leave it out for ``exclude_for`` seconds and race again (also after a NoPath)."""
        if self._state is not _R.DONE:
            raise LocalError("renegotiate only after the race has ended", reason="not-done")
        if self.chosen is not None:
            self._excluded[self.chosen] = now + self.config.exclude_for
        if relays is not None:
            self.relays = tuple(relays)
        actions, events = self._actions, self._events
        self._reset()
        self._actions, self._events = actions, events
        self._begin(now)

    def handle_timer(self, now: float) -> None:
        """Time out overdue attempts and start candidates whose turn has come."""
        if self._state is not _R.RACING:
            return
        for path, (st, deadline) in list(self._attempts.items()):
            if st is _A.RUNNING and deadline <= now and self._state is _R.RACING:
                self._attempts[path] = (_A.TIMEOUT, deadline)
                self._reasons[path] = "timeout"
                self._actions.append(CancelAttempt(path))
                self._after_failure(now)
        if (self._state is _R.RACING and self._next_start is not None
                and self._next_start <= now):
            self._start_next(now)

    def get_timer(self) -> float | None:
        """When ``handle_timer`` should next be called, or None."""
        if self._state is not _R.RACING:
            return None
        times = [d for st, d in self._attempts.values() if st is _A.RUNNING]
        if self._next_start is not None:
            times.append(self._next_start)
        return min(times, default=None)

    def attempt_succeeded(self, path: Path, now: float, setup_rtt: float | None = None) -> None:
        """The attempt over ``path`` completed the end-to-end handshake."""
        if self._late(path):
            return
        self._state = _R.DONE
        self.chosen = path
        self._attempts[path] = (_A.WON, 0.0)
        for other, (st, _) in self._attempts.items():
            if st is _A.RUNNING:
                self._attempts[other] = (_A.CANCELLED, 0.0)
                self._actions.append(CancelAttempt(other))
        self._pending.clear()
        self._next_start = None
        self._events.append(PathChosen(path, now - self._started_at, setup_rtt))

    def attempt_failed(self, path: Path, now: float, reason: str) -> None:
        """The attempt over ``path`` failed (``reason``: e.g. ``refused``, ``handshake``)."""
        if self._late(path):
            return
        self._attempts[path] = (_A.FAILED, 0.0)
        self._reasons[path] = reason
        self._after_failure(now)

    # -- outputs ---------------------------------------------------------------------------

    def outgoing(self) -> list[Action]:
        """Actions for the owner to carry out, oldest first (and forget them)."""
        out, self._actions = self._actions, []
        return out

    def events(self) -> list[Event]:
        """Events for the owner, oldest first (and forget them)."""
        out, self._events = self._events, []
        return out

    @property
    def done(self) -> bool:
        return self._state is _R.DONE

    @property
    def started(self) -> bool:
        return self._state is not _R.IDLE

    @property
    def running(self) -> list[Path]:
        """Paths with an attempt in flight."""
        return [p for p, (st, _) in self._attempts.items() if st is _A.RUNNING]

    # -- internals -------------------------------------------------------------------------

    def _begin(self, now: float) -> None:
        self._state = _R.RACING
        self.chosen = None
        self._started_at = now
        self._pending, self._reasons = self.candidates(now)
        if self._pending:
            self._start_next(now)
        else:
            self._finish_no_path()

    def _start_next(self, now: float) -> None:
        path = self._pending.pop(0)
        self._attempts[path] = (_A.RUNNING, now + self.config.attempt_timeout)
        self._ever.add(path)
        self._actions.append(StartAttempt(path))
        self._next_start = now + self.config.stagger if self._pending else None

    def _after_failure(self, now: float) -> None:
        if not self._pending and not self.running and not self._second_wave:
            # everything tried has failed: the paths lost recently get another chance now
            self._second_wave = True
            self._pending = [p for p in self._candidates(now, exclude=False)[0]
                             if p not in self._attempts]
        if self._pending:
            self._start_next(now)
        elif not self.running:
            self._finish_no_path()

    def _finish_no_path(self) -> None:
        self._state = _R.DONE
        self._next_start = None
        self._events.append(NoPath(tuple(self._reasons.items())))

    def _late(self, path: Path) -> bool:
        """True if a report about ``path`` is to be ignored; raises if it was never started."""
        st = self._attempts.get(path)
        if st is None:
            if path in self._ever:  # from an earlier race of this channel
                return True
            raise LocalError(f"no attempt over {path} was started", reason="unknown-attempt")
        return self._state is not _R.RACING or st[0] is not _A.RUNNING


def _rtt(table: ReachabilityTable, a: NodeId, b: NodeId, now: float) -> float | None:
    """Measured RTT between ``a`` and ``b``: a's dial to b, else b's dial to a."""
    rtt = table.rtt(a, b, now)
    return rtt if rtt is not None else table.rtt(b, a, now)
