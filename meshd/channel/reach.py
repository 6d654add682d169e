"""Pairwise reachability (layer 4): who has been seen to dial whom (pure).

Theory of operation
-------------------
Reachability is a property of an *ordered pair*: "a dialed b" may work while "b dialed a" or
"c dialed b" does not (a facility firewall admits one partner and not another).  The table keeps,
per ordered pair ``(a, b)``, the newest :class:`Observation` of "a dialed b (at address X)":
``OK`` (with the connect RTT), ``FAILED`` or ``UNKNOWN`` (inconclusive), with the time it was
made.  Nothing here dials; the owner records its own dials and merges what others report.

Rules::

    record / merge   newer ``at`` than the held entry             -> replaces it (newest wins)
                     older or equal                               -> ignored
    merge            reporter != observation.dialer               -> ignored (a member speaks
                                                                     only for dials it made)
                     dialer == target, or ``at`` > now+max_future -> ignored
                     address not among target's current addrs     -> ignored (stale address)
                     no address, ``at`` before target's last
                     address change                               -> ignored
    addresses_changed(b)  set differs  -> drop every (x, b) entry except OK at a still-advertised
                                          address (a new address may admit a dial that failed)
    forget(m)                          -> drop every pair involving m (it left or died)
    can_dial(a, b, now)   fresh OK -> YES; fresh FAILED -> NO; missing/UNKNOWN/expired -> UNKNOWN

An entry is *fresh* for ``ttl`` seconds after ``at`` and *stale* (worth re-checking, see
:meth:`ReachabilityTable.dial_back_plan`) after ``refresh``.  Times of merged observations are the
reporter's clock: the ``max_future`` bound keeps a fast clock from pinning an entry forever.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

__all__ = [
    "NodeId",
    "Observation",
    "Outcome",
    "ReachConfig",
    "ReachabilityTable",
    "Tri",
]

NodeId = bytes
"""An opaque member id."""


class Tri(enum.Enum):
    """A three-valued answer."""

    YES = "yes"
    NO = "no"
    UNKNOWN = "unknown"


class Outcome(enum.Enum):
    """What one dial attempt showed."""

    OK = "ok"
    FAILED = "failed"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Observation:
    """``dialer`` dialed ``target`` (at ``address``, if known) at time ``at`` with ``outcome``."""

    dialer: NodeId
    target: NodeId
    outcome: Outcome
    at: float
    rtt: float | None = None
    """Connect round-trip time in seconds, for ``OK`` only."""
    address: str | None = None


@dataclass(frozen=True, slots=True)
class ReachConfig:
    ttl: float = 600.0
    """Seconds an observation counts; after that the pair is UNKNOWN again."""
    refresh: float = 300.0
    """Seconds after which an observation is stale and worth re-checking (ttl / 2)."""
    max_future: float = 60.0
    """Merged observations dated more than this ahead of our clock are ignored."""


class ReachabilityTable:
    """Newest observation per ordered pair, with expiry and invalidation on address change."""

    def __init__(self, config: ReachConfig | None = None) -> None:
        self.config = config or ReachConfig()
        self._entries: dict[tuple[NodeId, NodeId], Observation] = {}
        self._addresses: dict[NodeId, frozenset[str]] = {}
        self._changed_at: dict[NodeId, float] = {}

    # -- input ------------------------------------------------------------------------------

    def record(self, obs: Observation) -> bool:
        """Record a dial we made (or otherwise trust).  Returns whether the entry changed."""
        if obs.dialer == obs.target:
            return False
        addrs = self._addresses.get(obs.target)
        if obs.address is not None and addrs is not None and obs.address not in addrs:
            return False
        if obs.address is None and obs.at < self._changed_at.get(obs.target, float("-inf")):
            return False
        key = (obs.dialer, obs.target)
        held = self._entries.get(key)
        if held is not None and held.at >= obs.at:
            return False
        self._entries[key] = obs
        return True

    def merge(self, reporter: NodeId, observations: Iterable[Observation], now: float) -> int:
        """Merge a report from ``reporter``; returns how many observations were taken.

        Only observations of dials the reporter made itself count."""
        taken = 0
        for obs in observations:
            if obs.dialer != reporter or obs.at > now + self.config.max_future:
                continue
            taken += self.record(obs)
        return taken

    def addresses_changed(self, member: NodeId, addresses: Iterable[str], now: float) -> None:
        """``member`` now advertises ``addresses``: forget what no longer holds about dialing it."""
        new = frozenset(addresses)
        if self._addresses.get(member) == new:
            return
        self._addresses[member] = new
        self._changed_at[member] = now
        for key, obs in list(self._entries.items()):
            if key[1] != member:
                continue
            if obs.outcome is Outcome.OK and obs.address is not None and obs.address in new:
                continue
            del self._entries[key]

    def note_addresses(self, member: NodeId, addresses: Iterable[str], now: float) -> bool:
        """What a running site calls whenever it learns ``member``'s advertised addresses: the
        first sighting is only remembered (what was observed before it stays), a different set
        later is :meth:`addresses_changed`.  True if observations were invalidated."""
        new = frozenset(addresses)
        old = self._addresses.get(member)
        if old is None:
            self._addresses[member] = new
            return False
        if old == new:
            return False
        self.addresses_changed(member, new, now)
        return True

    def members_with_addresses(self) -> frozenset[NodeId]:
        return frozenset(self._addresses)

    def forget_observations(self, member: NodeId) -> None:
        """Drop what was observed of dialing ``member`` or being dialed by it, but remember its
        addresses (it came back: what failed while it was down says nothing now, and a later
        record with other addresses is still a change)."""
        for key in [k for k in self._entries if member in k]:
            del self._entries[key]

    def forget(self, member: NodeId) -> None:
        """Drop everything about ``member`` (it left or was declared dead)."""
        self.forget_observations(member)
        self._addresses.pop(member, None)
        self._changed_at.pop(member, None)

    def prune(self, now: float) -> None:
        """Drop expired entries (queries ignore them anyway; this bounds memory)."""
        for key in [k for k, o in self._entries.items() if not self._fresh(o, now)]:
            del self._entries[key]

    # -- queries ----------------------------------------------------------------------------

    def can_dial(self, a: NodeId, b: NodeId, now: float) -> Tri:
        """Whether ``a`` can open a connection to ``b``, as last observed."""
        obs = self.get(a, b, now)
        if obs is None or obs.outcome is Outcome.UNKNOWN:
            return Tri.UNKNOWN
        return Tri.YES if obs.outcome is Outcome.OK else Tri.NO

    def rtt(self, a: NodeId, b: NodeId, now: float | None = None) -> float | None:
        """The RTT of ``a``'s last successful dial to ``b`` (only if fresh, when ``now`` given)."""
        obs = self._entries.get((a, b))
        if obs is None or obs.outcome is not Outcome.OK:
            return None
        if now is not None and not self._fresh(obs, now):
            return None
        return obs.rtt

    def get(self, a: NodeId, b: NodeId, now: float) -> Observation | None:
        """The fresh observation of ``a`` dialing ``b``, if any."""
        obs = self._entries.get((a, b))
        return obs if obs is not None and self._fresh(obs, now) else None

    def dial_back_plan(self, self_id: NodeId, members: Iterable[NodeId],
                       now: float) -> list[NodeId]:
        """Members to ask to dial us back: no fresh conclusive result, or a stale one.

        In the order given; ``self_id`` is skipped."""
        plan = []
        for m in members:
            if m == self_id or m in plan:
                continue
            obs = self.get(m, self_id, now)
            if (obs is None or obs.outcome is Outcome.UNKNOWN
                    or now - obs.at >= self.config.refresh):
                plan.append(m)
        return plan

    def observations(self, now: float, dialer: NodeId | None = None) -> Iterator[Observation]:
        """Fresh observations (only ``dialer``'s, if given): what we gossip about our dials."""
        for (a, _), obs in self._entries.items():
            if (dialer is None or a == dialer) and self._fresh(obs, now):
                yield obs

    def _fresh(self, obs: Observation, now: float) -> bool:
        return now - obs.at < self.config.ttl
