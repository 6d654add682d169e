"""The daemon's counters (``meshd status``, ``/v1/metrics``): one table, written by every service."""

from __future__ import annotations


class Counters:
    """Named event counts; :meth:`scoped` gives a service its own prefix in the same table."""

    def __init__(self, table: dict[str, int] | None = None, prefix: str = "") -> None:
        self.table: dict[str, int] = {} if table is None else table
        self.prefix = prefix

    def count(self, name: str, n: int = 1) -> None:
        key = self.prefix + name
        self.table[key] = self.table.get(key, 0) + n

    def scoped(self, prefix: str) -> Counters:
        return Counters(self.table, self.prefix + prefix)

    def get(self, name: str) -> int:
        return self.table.get(self.prefix + name, 0)

    def snapshot(self) -> dict[str, int]:
        return dict(self.table)
