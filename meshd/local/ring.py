"""A byte ring in shared memory between an application and its daemon (the big-message fast path).

Big messages (64 KiB and more) cross between an application and its local daemon through a ring
instead of through the ipc socket: a unix socket copies every byte twice in the kernel (into the
socket, out of it), and on the two hops of a channel those four copies cost more CPU than the
encryption and the TCP hop together.  Through a ring the sending application writes its batch
once into shared memory and the daemon seals it straight from there; the receiving daemon writes
the opened payload once into its ring and the application's arrays are views of it.

Only the data crosses through the ring.  The ZeroMQ ipc socket still carries, in order, a small
descriptor ``(start, length)`` for each ring record, so ordering, flow control and the daemon's
credit work exactly as before; and a writer that finds no room simply sends the record inline
over the socket, so a full ring (an application holding on to received arrays, a slow daemon)
never blocks anything and never loses anything.

Layout: a 64-byte header, then ``capacity`` data bytes.  The header holds one counter, written
only by the side that reads records: ``released`` (u64, native endian, aligned), the monotonic
offset up to which every record has been read and may be overwritten.  Offsets are monotonic
byte counts; a record lives at ``start % capacity`` and never wraps (the writer skips the tail of
the ring instead).  The writer keeps its own ``head``; room is ``capacity - (head - released)``.

Trust: the two sides are the same user (the control socket is 0600), who can signal the daemon
anyway; so a ring is not armoured against that user (an application that truncates its ring file
under the daemon's mapping makes the daemon die of SIGBUS; sealed memfds passed over a unix
socket would close that, and are the way to go if rings ever cross users).  The file is created 0600
with ``O_EXCL`` in ``/dev/shm`` (RAM), and attached only if it is a regular file of this user,
not readable by others, of a sane size.  Every descriptor read from the socket is bounds-checked
against the mapping before it is used; a bad one is a :class:`~meshd.errors.ProtocolError`.
"""

from __future__ import annotations

import mmap
import os
import secrets
import stat
import struct
import tempfile
import threading
from collections import deque
from pathlib import Path

import numpy as np

from meshd.errors import LocalError, ProtocolError

__all__ = ["DESCRIPTOR", "HEADER_SIZE", "MAX_CAPACITY", "RING_MARK", "Ring", "ReleaseTracker",
           "ring_dir", "ring_worthy"]

HEADER_SIZE = 64
MAX_CAPACITY = 1 << 31
"""The largest ring a daemon attaches (2 GiB)."""
DESCRIPTOR = struct.Struct("<QQ")
"""``start`` and ``length`` of one record, as sent over the ipc socket."""
RING_MARK = b"R"
"""The frame before a descriptor: ``[R, descriptor]`` app -> daemon, ``[meta, R, descriptor]``
daemon -> app (an inline batch is one frame, an inline delivery two)."""


RING_MIN_BYTES = 64 << 10
RING_MIN_AVERAGE = 16 << 10


def ring_worthy(nbytes: int, count: int) -> bool:
    """Whether a batch of ``nbytes`` holding ``count`` messages should go through a ring: big,
    and of big messages.  A batch of thousands of small messages is cheaper over the socket:
    the Python spent per message on views of the ring costs more than the copies it saves."""
    return nbytes >= RING_MIN_BYTES and nbytes >= count * RING_MIN_AVERAGE


def ring_dir() -> Path:
    """Where rings are created: ``/dev/shm`` (memory) if usable, else the temp directory."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return Path(tempfile.gettempdir())


class Ring:
    """One mapping of a ring file.  The writer calls :meth:`reserve` and :meth:`region`; the
    reader calls :meth:`record` (bounds-checked) and :meth:`release`."""

    def __init__(self, path: Path, fd: int, capacity: int, *, ready: bool = True) -> None:
        self.path = path
        self.capacity = capacity
        self._mm = mmap.mmap(fd, HEADER_SIZE + capacity)
        self._fd: int | None = fd
        self._ready = threading.Event()
        if ready:
            self._ready.set()
            self._close_fd()
        self._view = memoryview(self._mm)
        self.data = self._view[HEADER_SIZE:]
        self._released = np.frombuffer(self._mm, dtype=np.uint64, count=1)  # aligned u64
        self.head = 0
        """Writer side: the monotonic offset where the next record goes."""

    @classmethod
    def create(cls, capacity: int, directory: Path | None = None, *,
               background: bool = True) -> Ring:
        """A new ring file of ``capacity`` data bytes, mode 0600.  With ``background`` it is not
        :attr:`ready` yet: its memory is allocated by a thread (about 12 ms for 48 MiB here,
        which would otherwise delay every channel's setup), and the writer goes inline until
        then; without, it is allocated before this returns (OSError if there is no room).

        Allocated before use, not on first touch: a tmpfs that runs out of room under a mapping
        kills the process with SIGBUS; here the ring just never becomes ready."""
        if not 0 < capacity <= MAX_CAPACITY:
            raise LocalError(f"a ring holds 1..{MAX_CAPACITY} bytes", reason="usage")
        path = (directory or ring_dir()) / f"meshd-ring-{secrets.token_hex(12)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, HEADER_SIZE + capacity)
            ring = cls(path, fd, capacity, ready=False)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        if background:
            threading.Thread(target=ring._allocate_quietly, name="meshd-ring-alloc",
                             daemon=True).start()
            return ring
        try:
            ring._allocate()
        except OSError:
            ring.unlink()
            ring.close()
            raise
        return ring

    def _allocate(self) -> None:
        """Allocate the file's memory and make the ring :attr:`ready`; OSError if ``/dev/shm``
        has no room (the ring then stays unused)."""
        fd = self._fd
        if fd is None:
            return
        try:
            os.posix_fallocate(fd, 0, HEADER_SIZE + self.capacity)
        finally:
            self._close_fd()
        self._ready.set()

    def _allocate_quietly(self) -> None:
        try:
            self._allocate()
        except OSError:
            pass  # never ready: the writer keeps sending inline

    @property
    def ready(self) -> bool:
        """Whether the writer may use the ring: its memory is allocated (see :meth:`create`)."""
        return self._ready.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    @classmethod
    def attach(cls, path: str) -> Ring:
        """Map a ring another process created; LocalError if the file is not one we trust."""
        if not isinstance(path, str) or "\0" in path or not os.path.isabs(path):
            raise LocalError("a ring is an absolute file path", reason="usage")
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as exc:
            raise LocalError(f"cannot open ring {path}: {exc.strerror}", reason="ring") from None
        st = os.fstat(fd)
        why = None
        if not stat.S_ISREG(st.st_mode):
            why = "not a regular file"
        elif st.st_uid != os.geteuid():
            why = "owned by another user"
        elif st.st_mode & 0o077:
            why = "readable or writable by others"
        elif not HEADER_SIZE < st.st_size <= HEADER_SIZE + MAX_CAPACITY:
            why = f"size {st.st_size} out of range"
        if why is not None:
            os.close(fd)
            raise LocalError(f"refused ring {path}: {why}", reason="ring")
        return cls(Path(path), fd, st.st_size - HEADER_SIZE)

    def unlink(self) -> None:
        """Remove the file name (both mappings stay valid)."""
        try:
            self.path.unlink()
        except OSError:
            pass

    # -- the writing side --------------------------------------------------------------------------

    @property
    def released(self) -> int:
        return int(self._released[0])

    def reserve(self, n: int) -> int | None:
        """Room for a record of ``n`` bytes: its start offset, or None if the ring is full
        (or not ready)."""
        if not 0 < n <= self.capacity // 2 or not self.ready:
            return None
        start = self.head
        pos = start % self.capacity
        if pos + n > self.capacity:  # records never wrap: skip the tail
            start += self.capacity - pos
        released = self.released
        if released > self.head:  # only a broken reader does this; trust nothing then
            return None
        if start + n - released > self.capacity:
            return None
        self.head = start + n
        return start

    def region(self, start: int, n: int) -> memoryview:
        pos = start % self.capacity
        return self.data[pos:pos + n]

    # -- the reading side --------------------------------------------------------------------------

    def record(self, descriptor: bytes | memoryview) -> tuple[int, memoryview]:
        """The start and bytes of the record a descriptor names; ProtocolError if it is not
        inside the ring."""
        if len(descriptor) != DESCRIPTOR.size:
            raise ProtocolError("a ring descriptor is 16 bytes", reason="ring")
        start, n = DESCRIPTOR.unpack(descriptor)
        pos = start % self.capacity
        # An honest writer's next record starts at most one lap (a skipped tail) past the last.
        lap = 2 * self.capacity
        if n == 0 or pos + n > self.capacity or not self.head <= start < self.head + lap:
            raise ProtocolError(f"ring record {start}+{n} is outside the ring", reason="ring")
        self.head = start + n  # the reader's head: records come in order
        return start, self.data[pos:pos + n]

    def release(self, upto: int) -> None:
        """Every record before offset ``upto`` may be overwritten."""
        self._released[0] = upto

    def close(self) -> None:
        """Unmap if nothing still views the mapping (else the views keep it alive)."""
        self._released = np.zeros(1, dtype=np.uint64)
        try:
            self.data.release()
            self._view.release()
            self._mm.close()
        except BufferError:
            pass  # arrays handed to the application still view it; it goes with them


class ReleaseTracker:
    """The receiving application's side: records are freed out of order (when the last array
    viewing one is garbage collected, in any thread) and released in order."""

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self._order: deque[tuple[int, int]] = deque()
        self._freed: deque[int] = deque()  # appended from finalizers: deque is thread-safe
        self._done: set[int] = set()
        self._lock = threading.Lock()

    def track(self, start: int, end: int) -> None:
        self._order.append((start, end))

    def freed(self, start: int) -> None:
        """A finalizer: record ``start`` is no longer viewed."""
        self._freed.append(start)
        self.collect()

    def collect(self) -> None:
        if not self._lock.acquire(blocking=False):
            return  # whoever holds the lock collects; a later call picks this one up
        try:
            while self._freed:
                self._done.add(self._freed.popleft())
            upto = None
            while self._order and self._order[0][0] in self._done:
                start, upto = self._order.popleft()
                self._done.discard(start)
            if upto is not None:
                self.ring.release(upto)
        finally:
            self._lock.release()
