"""What this site saw of its exchanges with each member (``meshd peers`` shows the last error)."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(slots=True)
class Contact:
    """What this site saw of its exchanges with one member."""

    last_ok: float | None = None
    last_fail: float | None = None
    error: str | None = None


class Contacts:
    """The latest exchange with each member, success or failure, by key."""

    def __init__(self) -> None:
        self._by_key: dict[bytes, Contact] = {}

    def ok(self, key: bytes) -> None:
        c = self._by_key.setdefault(key, Contact())
        c.last_ok, c.error = time.time(), None

    def failed(self, key: bytes, error: str) -> None:
        c = self._by_key.setdefault(key, Contact())
        c.last_fail, c.error = time.time(), error

    def get(self, key: bytes) -> Contact | None:
        return self._by_key.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def clear(self) -> None:
        """Forget every exchange (the site key changed: old exchanges say nothing of the new)."""
        self._by_key.clear()
