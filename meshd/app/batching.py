"""Batching of a sender's outgoing messages (sans-IO: the sync and the asyncio sender share it).

Small messages are batched (up to :data:`~meshd.channel.batch.MAX_BATCH_BYTES` or
:data:`~meshd.channel.batch.MAX_BATCH_MESSAGES`, and for at most ``linger`` seconds) so that the
daemons pay their per-frame cost once per batch; a message of :data:`ALONE` bytes or more goes
at once, in a batch of its own, after what was batched before it.  The :class:`Batcher` is fed
encoded messages and the time, and says which batches to ship and when its linger timer is due;
the caller ships them (:meth:`Batcher.frames`) and keeps the timer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshd.channel import batch
from meshd.local import ipc
from meshd.local.ring import Ring, ring_worthy

__all__ = ["ALONE", "BIG", "RING_BYTES", "Batch", "Batcher"]

BIG = 64 << 10
"""A message body this big is not copied when it is batched (the caller leaves it alone until
``flush``); a smaller one is copied, since the caller may reuse its buffer at once."""
ALONE = batch.MAX_BATCH_BYTES
"""A message this big is sent at once, in a batch of its own."""
RING_BYTES = 48 << 20
"""Default size of the shared-memory ring between an application and its daemon, per sender
and per receiver (room for two 16 MiB messages in flight); ``ring_bytes=0`` goes without."""
ENTRY_BYTES = 12
"""What a message adds to a batch besides its header and body (its sizes in the batch)."""


@dataclass(frozen=True, slots=True)
class Batch:
    """Messages to hand to the daemon together."""

    messages: list[tuple[Any, Any]]
    """Header and body of each message."""
    nbytes: int
    """About the packed size (the body alone for a message that goes alone)."""


class Batcher:
    """The batching of one sender.  Not thread-safe: the caller holds its lock around it."""

    def __init__(self, linger: float, ring_bytes: int = RING_BYTES) -> None:
        self.linger = linger
        self.sent = 0
        """Messages shipped or batched so far: what ``flush`` waits for."""
        self.ring: Ring | None = None
        """The sender's ring, once the caller has made one (:meth:`ring_wanted`)."""
        self._ring_bytes = ring_bytes  # 0 once a ring was asked for
        self._messages: list[tuple[Any, Any]] = []
        self._nbytes = 0
        self._deadline: float | None = None

    @property
    def deadline(self) -> float | None:
        """When what is batched must go (its first message's time plus ``linger``); None if
        nothing is batched."""
        return self._deadline

    def add(self, head: Any, body: Any, now: float) -> list[Batch]:
        """Take one encoded message; the batches to ship now, in order (none, what was batched,
        this message alone, or both).  Call :meth:`added` once they are shipped."""
        nbody = len(body) if type(body) is bytes else memoryview(body).nbytes
        if nbody >= ALONE:
            return [b for b in (self.take(), Batch([(head, body)], nbody)) if b is not None]
        if not self._messages:
            self._deadline = now + self.linger
        self._messages.append((head, body if type(body) is bytes or nbody >= BIG
                               else bytes(body)))
        self._nbytes += nbody + len(head) + ENTRY_BYTES
        if self._nbytes >= batch.MAX_BATCH_BYTES or len(self._messages) >= batch.MAX_BATCH_MESSAGES:
            return [self.take()]  # type: ignore[list-item]
        return []

    def added(self) -> None:
        """The message given to :meth:`add` is shipped or batched: count it (a message whose
        shipping failed is not waited for)."""
        self.sent += 1

    def take(self) -> Batch | None:
        """What is batched, to ship now (``flush``, ``close``, or the linger timer); None if
        nothing is."""
        self._deadline = None
        if not self._messages:
            return None
        out = Batch(self._messages, self._nbytes)
        self._messages = []
        self._nbytes = 0
        return out

    def ring_wanted(self, b: Batch) -> int:
        """The bytes of ring to make before shipping ``b`` (0: none).  A ring is asked for once,
        on the first batch that would go through one: a channel of small messages never pays
        for one."""
        if self._ring_bytes and ring_worthy(b.nbytes, len(b.messages)):
            wanted, self._ring_bytes = self._ring_bytes, 0
            return wanted
        return 0

    def frames(self, b: Batch) -> list[Any]:
        """The frames that ship ``b`` (:func:`meshd.local.ipc.batch_frames`)."""
        return ipc.batch_frames(b.messages, b.nbytes, self.ring)
