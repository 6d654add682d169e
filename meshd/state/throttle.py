"""Slowing down repeated failures from one source, and budgets of work per key (pure: ``now``
is passed in).

:class:`Throttle`: after the n-th failure from a source it must wait ``base * 2**(n-1)``
seconds (at most ``cap``) before its next attempt is even looked at.  A success does not reset
the count: a source that guesses wrong secrets gains nothing from one right answer for another
invitation.  Entries that have been quiet for ``cap`` seconds after their last wait ended are
forgotten, so memory stays bounded by the number of sources active in the last ``cap`` seconds
(and by ``max_sources``).

:class:`Budgets`: a token bucket per key (objects a member may send to be verified, signature
checks that rotation chains may cost).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class _Entry:
    failures: int
    blocked_until: float
    last: float


@dataclass(slots=True)
class Throttle:
    base: float = 1.0
    cap: float = 300.0
    max_sources: int = 10_000
    _entries: dict[str, _Entry] = field(default_factory=dict)

    def retry_after(self, source: str, now: float) -> float:
        """Seconds ``source`` must still wait; 0 when it may try now."""
        entry = self._entries.get(source)
        if entry is None:
            return 0.0
        return max(0.0, entry.blocked_until - now)

    def failure(self, source: str, now: float) -> float:
        """Count a failure; returns the wait now imposed on ``source``.  Amortised O(1): the
        entries are kept in the order of their last failure, so the quiet and the oldest are
        found at the front."""
        self._forget_quiet(now)
        entry = self._entries.pop(source, None)  # put back at the end: the latest failure
        if entry is None:
            if len(self._entries) >= self.max_sources:
                del self._entries[next(iter(self._entries))]  # the oldest failure
            entry = _Entry(0, now, now)
        self._entries[source] = entry
        entry.failures += 1
        entry.last = now
        wait = float(min(self.cap, self.base * 2.0 ** min(entry.failures - 1, 30)))
        entry.blocked_until = now + wait
        return wait

    def failures(self, source: str) -> int:
        entry = self._entries.get(source)
        return 0 if entry is None else entry.failures

    def _forget_quiet(self, now: float) -> None:
        """Forget entries quiet for ``cap`` seconds after their wait, from the front (oldest
        failure first) up to the first that is not: one quiet behind a louder one waits for the
        next call, which is fine for memory (it stays bounded by ``max_sources``)."""
        while self._entries:
            source, entry = next(iter(self._entries.items()))
            if now - entry.blocked_until <= self.cap:
                return
            del self._entries[source]


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class Budgets:
    """A token bucket per key (pure: ``now`` is passed in): ``capacity`` at most, refilled at
    ``rate`` per second; at most ``max_keys`` buckets (the one used longest ago forgotten
    first, in O(1): a forgotten bucket comes back full, as one unused that long would be)."""

    def __init__(self, capacity: float, rate: float, max_keys: int = 10_000) -> None:
        self.capacity = capacity
        self.rate = rate
        self.max_keys = max_keys
        self._buckets: dict[bytes, _Bucket] = {}

    def take(self, key: bytes, n: int, now: float) -> float:
        """Spend ``n`` of ``key``'s budget: 0.0 if it had them, else the seconds until it will
        (and nothing is spent).  More than ``capacity`` passes on a full budget."""
        b = self._buckets.pop(key, None)  # back at the end: used last
        if b is None:
            if len(self._buckets) >= self.max_keys:
                del self._buckets[next(iter(self._buckets))]
            b = _Bucket(self.capacity, now)
        self._buckets[key] = b
        b.tokens = min(self.capacity, b.tokens + (now - b.at) * self.rate)
        b.at = now
        cost = min(float(n), self.capacity)
        if cost <= b.tokens:
            b.tokens -= cost
            return 0.0
        return max(0.001, (cost - b.tokens) / self.rate)
