"""When to re-probe members we hold dead (pure: takes ``now`` and ``rng``).

A member declared dead is not probed by the round-robin any more; if every other member holds
it dead too (two sites that each declared the other dead, or a site cut off for longer than the
gossip to the dead lasts), nothing would ever tell it, and it would stay split off for good.  So
every dead member (not one that left, not one the owner forgot) is sent a *rejoin probe*: the
core pings it carrying our accusation, so a live one refutes at once and its ack brings its new
alive back (see :meth:`meshd.swim.core.Membership.handle_timer`).

Schedule::

    track(node, now)      the member became dead     -> first probe at now + first * U(1, 1+j)
    due(now)              each member whose time came -> returned; its next probe is the
                                                        interval doubled (at most ``cap``), jittered
    hint(node, now)       a message came from a dead member -> probed now, unless probed less
                                                        than ``first`` ago
    drop(node)            alive again, left, forgotten -> no more probes

With the defaults a member dead for a long time is probed every 30 s (``cap``): one ping, so
that even a mesh with many long-dead members spends little on it.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass


@dataclass(slots=True)
class _Entry:
    due: float
    interval: float
    last: float | None = None


class RejoinSchedule:
    """Back-off schedule of the rejoin probes of dead members (see the module docstring)."""

    def __init__(self, first: float, cap: float, rng: random.Random, jitter: float = 0.25) -> None:
        if not 0 < first <= cap:
            raise ValueError("rejoin intervals must satisfy 0 < first <= cap")
        self.first = first
        self.cap = cap
        self.jitter = jitter
        self._rng = rng
        self._entries: dict[bytes, _Entry] = {}
        self._heap: list[tuple[float, bytes]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, node: object) -> bool:
        return node in self._entries

    def _jittered(self, interval: float) -> float:
        return interval * (1.0 + self._rng.random() * self.jitter)

    def _push(self, node: bytes, e: _Entry) -> None:
        heapq.heappush(self._heap, (e.due, node))

    def track(self, node: bytes, now: float) -> None:
        """``node`` became dead: start probing it, from the shortest interval."""
        e = _Entry(now + self._jittered(self.first), self.first)
        self._entries[node] = e
        self._push(node, e)

    def drop(self, node: bytes) -> None:
        """Stop probing ``node`` (alive again, left, or forgotten)."""
        self._entries.pop(node, None)

    def hint(self, node: bytes, now: float) -> None:
        """A message came from dead ``node``: probe it now, unless it was probed very recently."""
        e = self._entries.get(node)
        if e is None or e.due <= now or (e.last is not None and now - e.last < self.first):
            return
        e.due = now
        self._push(node, e)

    def next_due(self) -> float | None:
        """When :meth:`due` next has a member to return."""
        heap, entries = self._heap, self._entries
        while heap:
            when, node = heap[0]
            e = entries.get(node)
            if e is not None and e.due == when:
                return when
            heapq.heappop(heap)  # stale: dropped, or rescheduled
        return None

    def due(self, now: float) -> list[bytes]:
        """The members to probe now; each is rescheduled with a doubled (capped) interval."""
        out: list[bytes] = []
        heap, entries = self._heap, self._entries
        while heap and heap[0][0] <= now:
            when, node = heapq.heappop(heap)
            e = entries.get(node)
            if e is None or e.due != when:
                continue
            out.append(node)
            e.last = now
            e.interval = min(2 * e.interval, self.cap)
            e.due = now + self._jittered(e.interval)
            self._push(node, e)
        return out
