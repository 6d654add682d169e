"""Lifeguard local health awareness (memberlist ``awareness.go``).

A score in ``0 .. max_multiplier - 1``: raised when this node misses acks or nacks it expected or
has to refute a suspicion of itself, lowered by every successful probe.  Timeouts and the probe
interval are multiplied by ``score + 1``, so a struggling node slows down instead of accusing
healthy peers.
"""

from __future__ import annotations


class Awareness:
    """The health score of the local node; 0 is healthy."""

    __slots__ = ("_max", "_score")

    def __init__(self, max_multiplier: int) -> None:
        self._max = max_multiplier
        self._score = 0

    @property
    def score(self) -> int:
        """Current score, ``0 .. max_multiplier - 1``."""
        return self._score

    def apply_delta(self, delta: int) -> None:
        """Add ``delta`` and clamp into ``0 .. max_multiplier - 1``."""
        score = self._score + delta
        if score < 0:
            score = 0
        elif score > self._max - 1:
            score = self._max - 1
        self._score = score

    def scale(self, timeout: float) -> float:
        """``timeout * (score + 1)``."""
        return timeout * (self._score + 1)
