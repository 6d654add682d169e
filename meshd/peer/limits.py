"""Bounds on what strangers may hold open at the peer port, and quiet reporting of refusals.

:class:`SourceLimit` counts open things (connections in the sniff phase, ZeroMQ splices, data
connections not yet authenticated) per source address and in total, and refuses one more when
either bound is reached.  :class:`RateLimitedLog` turns a flood of refusals into one log line a
minute with the count, so that a port scan or a connection flood cannot fill the log.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

log = logging.getLogger("meshd.peer.limits")

FD_RESERVE = 512
"""File descriptors kept back for the daemon's own files, sockets and ZeroMQ."""


class SourceLimit:
    """At most ``per_source`` open per source address and ``total`` in all."""

    __slots__ = ("per_source", "total", "_open", "_count")

    def __init__(self, *, total: int, per_source: int) -> None:
        self.total = total
        self.per_source = per_source
        self._open: dict[str, int] = {}
        self._count = 0

    def admit(self, source: str) -> str | None:
        """Take a slot for ``source``; None if taken, else why not (``total`` or ``source``)."""
        if self._count >= self.total:
            return "total"
        held = self._open.get(source, 0)
        if held >= self.per_source:
            return "source"
        self._open[source] = held + 1
        self._count += 1
        return None

    def release(self, source: str) -> None:
        """Give back a slot ``admit`` gave (once per admitted thing)."""
        held = self._open.get(source, 0)
        if held <= 0:
            return
        self._count -= 1
        if held == 1:
            del self._open[source]
        else:
            self._open[source] = held - 1

    def __len__(self) -> int:
        return self._count

    @property
    def sources(self) -> int:
        return len(self._open)


class RateLimitedLog:
    """Logs the first event at once, then at most one line per ``interval`` with the count of
    events since the last line."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self._log = logger
        self._interval = interval
        self._last = -interval
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self._interval:
            self._suppressed += 1
            return
        suffix = f" (and {self._suppressed} more like it since the last report)" \
            if self._suppressed else ""
        self._suppressed = 0
        self._last = now
        self._log.warning(message + suffix, *args)


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit where allowed; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.debug("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft


def fd_budget(per_item: int, cap: int) -> int:
    """How many things costing ``per_item`` descriptors fit under the soft open-file limit, after
    :data:`FD_RESERVE`, and at most ``cap``."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return cap
    return max(16, min(cap, (soft - FD_RESERVE) // per_item))


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """When accepting fails for want of resources (EMFILE, ENOBUFS), asyncio reports each
    failure with a traceback; make that one WARNING line a minute instead.  Everything else
    goes to the loop's default handler."""
    lines = RateLimitedLog(log)

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if "accept" in str(context.get("message", "")) and isinstance(
                context.get("exception"), OSError):
            lines.warning("cannot accept connections: %s (the open-file limit is %d)",
                          context["exception"], resource.getrlimit(resource.RLIMIT_NOFILE)[0])
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
