"""Transmit-limited broadcast queue (memberlist ``queue.go``).

Every accepted membership update is queued once per subject node: a newer update about the same
node replaces the older one (and starts again at zero transmits).  Updates are handed out
fewest-transmits first, newest first among equals, until a byte budget is filled; an update is
dropped after ``limit`` transmits (``retransmit_limit``, which the caller computes from the
cluster size).

Items sit in buckets indexed by transmit count; each bucket is an insertion-ordered dict, so
"newest first" is reverse iteration and every operation is O(items handed out).
"""

from __future__ import annotations

from .messages import Update

_MIN_ITEM = 24
"""Stop filling once fewer bytes than this remain (no real update is smaller)."""


class BroadcastQueue:
    """Pending updates keyed by subject node."""

    __slots__ = ("_buckets", "_where")

    def __init__(self) -> None:
        self._where: dict[bytes, int] = {}
        self._buckets: list[dict[bytes, tuple[Update, int]]] = [{}]

    def __len__(self) -> int:
        return len(self._where)

    def pending(self, node: bytes) -> bool:
        """True while an update about ``node`` still waits to be transmitted."""
        return node in self._where

    def push(self, update: Update, size: int) -> None:
        """Queue ``update`` (encoded size ``size`` bytes), replacing any older one about its node."""
        node = update.node
        old = self._where.get(node)
        if old is not None:
            del self._buckets[old][node]
        self._where[node] = 0
        self._buckets[0][node] = (update, size)

    def take(self, budget: int, limit: int) -> list[Update]:
        """Updates that fit into ``budget`` bytes, counting one transmit for each."""
        out: list[Update] = []
        moved: list[tuple[bytes, int, tuple[Update, int]]] = []
        buckets = self._buckets
        if len(buckets) > limit:
            self.prune(limit)
        for transmits, bucket in enumerate(buckets):
            if not bucket:
                continue
            for node, item in reversed(bucket.items()):
                size = item[1]
                if size > budget:
                    continue
                budget -= size
                out.append(item[0])
                moved.append((node, transmits, item))
                if budget < _MIN_ITEM:
                    break
            if budget < _MIN_ITEM:
                break
        if not moved:
            return out
        where = self._where
        for node, transmits, item in moved:
            del buckets[transmits][node]
            nxt = transmits + 1
            if nxt >= limit:
                del where[node]
                continue
            if nxt == len(buckets):
                buckets.append({})
            buckets[nxt][node] = item
            where[node] = nxt
        return out

    def prune(self, limit: int) -> None:
        """Drop every update already sent ``limit`` times or more (after the cluster shrank)."""
        for transmits in range(limit, len(self._buckets)):
            for node in self._buckets[transmits]:
                del self._where[node]
        del self._buckets[max(1, limit):]
