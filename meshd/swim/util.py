"""Pure formulas of the membership protocol (memberlist ``util.go``).

Each function is a contract on numbers; none holds state, reads a clock or draws randomness.
"""

from __future__ import annotations

import math

PUSH_PULL_SCALE_THRESHOLD = 32
"""Cluster size up to which the push-pull interval is not scaled (memberlist: 32)."""


def suspicion_timeout(suspicion_mult: int, n: int, interval: float) -> float:
    """Minimum suspicion timeout: ``suspicion_mult * max(1, log10(max(1, n))) * interval``."""
    node_scale = max(1.0, math.log10(max(1.0, float(n))))
    return suspicion_mult * node_scale * interval


MIN_RETRANSMIT_FACTOR = 2
"""Floor of the log factor below: memberlist's formula gives a mesh of up to 9 sites only
``retransmit_mult`` transmits per update, so a join missed one site in about one join of ten
(bench/gossip.py --sites 10) until the next push-pull; twice that costs little at that size."""


def retransmit_limit(retransmit_mult: int, n: int) -> int:
    """How many times one update is piggybacked:
    ``retransmit_mult * max(2, ceil(log10(n + 1)))`` (memberlist's, with a floor for small meshes)."""
    return retransmit_mult * max(MIN_RETRANSMIT_FACTOR, math.ceil(math.log10(n + 1)))


def push_pull_scale(interval: float, n: int) -> float:
    """Push-pull interval for ``n`` members: unchanged up to 32, then
    ``(ceil(log2(n) - log2(32)) + 1) * interval`` so the total exchange rate stays bounded."""
    if n <= PUSH_PULL_SCALE_THRESHOLD:
        return interval
    multiplier = math.ceil(math.log2(n) - math.log2(PUSH_PULL_SCALE_THRESHOLD)) + 1.0
    return multiplier * interval


def remaining_suspicion_time(
    confirmations: int, k: int, elapsed: float, min_timeout: float, max_timeout: float
) -> float:
    """Lifeguard's shrinking suspicion timeout (memberlist ``remainingSuspicionTime``).

    With ``n`` independent confirmations out of ``k`` expected, the total timeout is
    ``max - log(n + 1) / log(k + 1) * (max - min)``, floored to the millisecond and never below
    ``min``; the result is that total minus ``elapsed`` (negative when already overdue).
    """
    if k < 1:
        frac = 1.0 if confirmations > 0 else 0.0
    else:
        frac = math.log(confirmations + 1.0) / math.log(k + 1.0)
    raw = max_timeout - frac * (max_timeout - min_timeout)
    timeout = math.floor(1000.0 * raw) / 1000.0
    timeout = max(timeout, min_timeout)
    return timeout - elapsed
