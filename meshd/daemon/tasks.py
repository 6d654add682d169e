"""Background tasks of one owner, and the one timer of a pure core: the two pieces of asyncio
plumbing every service of the daemon uses."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("meshd.daemon")


class TaskSet:
    """Tasks started by one owner: kept referenced while they run, a failure logged (not lost),
    and all cancelled and awaited by :meth:`close`."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"{self.owner}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        """Cancel every task and wait until each has finished."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class CoreTimer:
    """The one loop timer of a pure core whose clock is ``time.monotonic()``.

    :meth:`arm` takes the core's ``get_timer()`` (a monotonic deadline, or None) and replaces
    whatever was armed before; when it fires, ``on_fire(now)`` runs with the current time."""

    def __init__(self, on_fire: Callable[[float], None]) -> None:
        self._on_fire = on_fire
        self._handle: asyncio.TimerHandle | None = None
        self.when: float | None = None

    @staticmethod
    def now() -> float:
        return time.monotonic()

    def arm(self, when: float | None) -> None:
        self.cancel()
        if when is None:
            return
        loop = asyncio.get_running_loop()
        self.when = when
        self._handle = loop.call_at(loop.time() + max(0.0, when - self.now()), self._fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.when = None

    def _fire(self) -> None:
        self._handle = None
        self.when = None
        self._on_fire(self.now())
