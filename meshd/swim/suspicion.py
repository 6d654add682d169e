"""One suspicion of one member, with Lifeguard confirmations (memberlist ``suspicion.go``).

The timer starts at ``max_timeout``; each *independent* confirmation (a suspect message from a
member not heard before) shrinks the total toward ``min_timeout``, reached after ``k``
confirmations.  With ``k == 0`` (too few members to expect confirmations) it is ``min_timeout``.
Pure: the owner asks for :meth:`deadline` and fires it itself.
"""

from __future__ import annotations

from .util import remaining_suspicion_time


class Suspicion:
    """Suspicion state: start time, confirmations, current deadline."""

    __slots__ = ("_confirmers", "confirmations", "deadline", "k", "max_timeout", "min_timeout", "probed", "start",
                 "verifications")

    def __init__(self, source: bytes, k: int, min_timeout: float, max_timeout: float, now: float) -> None:
        self.start = now
        self.k = k
        self.min_timeout = min_timeout
        self.max_timeout = max_timeout
        self._confirmers: dict[bytes, None] = {source: None}
        self.confirmations = 0
        """Independent confirmations beyond the first accuser."""
        self.deadline = now + (max_timeout if k >= 1 else min_timeout)
        """When the suspected member is to be declared dead."""
        self.probed = False
        """The owner's own probe (or watch) of the member failed, not only gossip said so."""
        self.verifications = 0
        """Direct verification pings sent since the timer ran out."""

    def has(self, source: bytes) -> bool:
        """True if ``source`` already accused or confirmed."""
        return source in self._confirmers

    def confirm(self, source: bytes) -> bool:
        """Count a suspect message from ``source``; True if it was new and moved the deadline."""
        if self.confirmations >= self.k or source in self._confirmers:
            return False
        self._confirmers[source] = None
        self.confirmations += 1
        remaining = remaining_suspicion_time(
            self.confirmations, self.k, 0.0, self.min_timeout, self.max_timeout
        )
        self.deadline = self.start + remaining
        return True
