"""The synchronous flavour of the application API: :func:`connect`, :class:`Mesh`,
:class:`Sender`, :class:`Receiver` (see :mod:`meshd.app.streams`).

A sender's batching is :class:`~meshd.app.batching.Batcher` under a lock; a thread per sender
ships what is batched once its linger time is up."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import zmq

from meshd.app.batching import RING_BYTES, Batch
from meshd.app.client import Client
from meshd.app.ends import (STALL_CHECK, FlushWait, MeshEnd, ReceiverEnd, SenderEnd,
                            TimeoutLater, open_receiver, start_ring)
from meshd.app.message import Message, encode
from meshd.channel.batch import pack_parts
from meshd.errors import ChannelClosed, LocalError

__all__ = ["Mesh", "Receiver", "Sender", "connect"]

PUMP_EVERY = 0.05
"""Seconds between the sender thread's moves of a handed-over link while the application makes
no call (see :meth:`Sender._linger_loop`)."""


class Mesh(MeshEnd):
    """A connection to the local daemon (see :func:`connect`)."""

    def __init__(self, home: str | os.PathLike[str] | None = None, *,
                 timeout: float = 30.0) -> None:
        client = Client(home, timeout=timeout)
        client.status()  # fail now, with "start the daemon with …", if it is not running
        super().__init__(client, zmq.Context())

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sender(self, name: str, *, to: str, paths: list[str] | None = None,
               linger: float = 0.002, ring_bytes: int = RING_BYTES,
               via_daemon: bool = False) -> Sender:
        """A sender on channel ``name`` to site ``to`` (a name or site id).  ``paths`` limits the
        path kinds (``direct``, ``reversed``, ``relay``) within what the site allows.
        ``ring_bytes``: shared memory for big messages on their way to the daemon (0: none).
        Where the site's ``channel_handover`` allows, this process takes the data connection
        and seals and sends the data itself; ``via_daemon``: let the daemon carry it."""
        info = self.client.open_sender(name, to, paths, handover=not via_daemon)
        tx = Sender(self, info, linger, ring_bytes)
        self._open.append(tx)
        return tx

    def receiver(self, name: str, *, allow: list[str] | None = None,
                 ring_bytes: int = RING_BYTES, via_daemon: bool = False) -> Receiver:
        """The receiver of channel ``name`` (messages from every sender on it, each sender's in
        order).  ``allow``: only these sites may open it.  A newer receiver of the same name
        takes over from an older one.  Where the site's ``channel_handover`` allows, this
        process takes each channel's data connection and opens the frames itself;
        ``via_daemon``: let the daemon carry them.  ``ring_bytes``: shared memory the daemon
        puts big messages in when it carries them (their arrays view it; a record is reused
        once no array views it; 0: none)."""
        info, ring = open_receiver(self.client, name, allow, ring_bytes, not via_daemon)
        rx = Receiver(self, info, ring, allow)
        self._open.append(rx)
        return rx

    def channels(self) -> list[dict[str, Any]]:
        return self.client.channels()

    def close(self, *, flush: bool = True, timeout: float | None = None) -> None:
        """Close every sender (after a flush, unless ``flush`` is False, of at most ``timeout``
        seconds each) and receiver.  LocalError (``timeout``) once all are closed if a flush
        timed out."""
        later = TimeoutLater()
        for item in list(self._open):
            if isinstance(item, Sender):
                with later:
                    item.close(flush=flush, timeout=timeout)
            else:
                item.close()
        self._closed_all(later)


class Sender(SenderEnd):
    """Sends messages on one channel.  Not thread-safe (one sending thread)."""

    def __init__(self, mesh: Mesh, info: dict[str, Any], linger: float,
                 ring_bytes: int = RING_BYTES) -> None:
        super().__init__(mesh, info, linger, ring_bytes)
        self._mutex = threading.RLock()
        """:attr:`_lock`'s own lock: :meth:`send` takes it directly (a C call, where the
        condition's ``with`` is two Python calls per message)."""
        self._lock = threading.Condition(self._mutex)
        self._closed = False
        self._thread = threading.Thread(target=self._linger_loop, daemon=True,
                                        name=f"meshd-tx-{self.name}")
        self._thread.start()

    def send(self, obj: Any, meta: Mapping[str, Any] | None = None) -> None:
        """Queue one numpy array (any dtype but object, any shape) or bytes-like, with an
        optional msgpack-able ``meta`` dict.  Blocks while the channel has no room.  Do not
        modify an array until ``flush`` returns if it is 64 KiB or larger (it is not copied).
        ChannelClosed once the channel ended on its own (revoked, no path for
        ``channel_give_up`` seconds)."""
        head, body = encode(obj, meta)
        with self._mutex:
            if self._closed:
                raise LocalError("the sender is closed", reason="closed")
            if self.ended is not None:
                raise self.ended
            idle = self._core.deadline is None
            link_idle = self._link is None or not self._link.busy
            batches = self._core.add(head, body, time.monotonic())
            if idle and self._core.deadline is not None:
                self._lock.notify()  # the linger thread waits for the new batch's time
            for b in batches:
                self._ship(b)
            self._core.added()
            if link_idle and self._link is not None and self._link.busy:
                self._lock.notify()  # the thread moves the link on while the caller is away

    def _push_locked(self) -> None:
        b = self._core.take()
        if b is not None:
            self._ship(b)

    def _ship(self, b: Batch) -> None:
        if self._link is not None:
            parts, nbytes = pack_parts(b.messages)
            try:
                self._link.send(parts, nbytes, len(b.messages))
            except ChannelClosed as exc:
                raise self._ended(exc) from None
            return
        wanted = self._core.ring_wanted(b)
        if wanted:
            self._core.ring = start_ring(self._mesh.client, self.id, wanted)
        while not self._sock.poll(int(STALL_CHECK * 1000), zmq.POLLOUT):
            self._check_ended()  # a long wait for room: did the channel end?
        self._sock.send_multipart(self._core.frames(b), copy=False)

    def _linger_loop(self) -> None:
        """Ship a batch once its linger time is up; and, for a handed-over channel with work
        left (batches waiting for the first connection, frames not yet acknowledged), move
        the link on every PUMP_EVERY seconds while the application makes no call: take the
        grant, write what waited for it, read the receiver's feedback, run the retransmit
        timer, hand a broken connection back to the daemon."""
        next_pump = 0.0
        with self._lock:
            while not self._closed and self.ended is None:
                now = time.monotonic()
                deadline = self._core.deadline
                link = self._link
                busy = link is not None and link.busy
                wakes = [t for t in (deadline, next_pump if busy else None) if t is not None]
                if not wakes:
                    self._lock.wait()
                    continue
                due = min(wakes) - now
                if due > 0:
                    self._lock.wait(due)
                    continue
                try:
                    if deadline is not None and deadline <= now:
                        self._push_locked()
                    if link is not None and busy and next_pump <= now:
                        next_pump = now + PUMP_EVERY
                        try:
                            link.pump()
                        except ChannelClosed as exc:
                            raise self._ended(exc) from None
                except ChannelClosed:
                    return  # noted in self.ended: the next call raises it

    def flush(self, timeout: float | None = None) -> None:
        """Send what is batched and wait until the receiving daemon has acknowledged every
        message sent so far.  LocalError (reason ``timeout``) after ``timeout`` seconds;
        ChannelClosed if the channel ended on its own."""
        with self._lock:
            if self.ended is not None:
                raise self.ended
            self._push_locked()
            target = self.sent
            if self._link is not None:
                try:
                    self._link.flush(timeout)
                except ChannelClosed as exc:
                    raise self._ended(exc) from None
                return
        wait = FlushWait(timeout, time.monotonic())
        while True:
            try:
                self._mesh.client.flush_sender(self.id, target,
                                               timeout=wait.slice(time.monotonic()))
                return
            except ChannelClosed as exc:
                raise self._ended(exc) from None
            except LocalError as exc:
                if wait.ends(exc, time.monotonic()):
                    raise

    def stats(self) -> dict[str, Any]:
        for ch in self._mesh.client.channels():
            if ch.get("id") == self.id:
                return ch
        raise LocalError("the channel is gone", reason="not-found")

    def close(self, *, flush: bool = True, timeout: float | None = None) -> None:
        """Close the channel: with ``flush`` (the default) once the receiving daemon has every
        message; without, whatever is not acknowledged yet is dropped.  With a ``timeout``
        the flush waits at most that long: then the channel is closed all the same, dropping
        what is unacknowledged, and LocalError (reason ``timeout``) says so.  If the channel
        ended on its own, it is closed and ChannelClosed says why."""
        with self._lock:
            if self._closed:
                return
            if self.ended is None:
                try:
                    self._push_locked()
                except ChannelClosed:
                    pass  # noted: the flush below raises it
        later = TimeoutLater()
        if flush:
            with later:
                self.flush(timeout)
        with self._lock:
            self._closed = True
            self._lock.notify()
            if self._link is not None:
                self._link.close()
        self._release()
        try:
            self._mesh.client.close_sender(self.id)
        except LocalError:
            pass
        self._forget()
        later.raise_kept()

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(flush=exc_type is None)


class Receiver(ReceiverEnd):
    """Receives the messages of one channel name."""

    def recv(self, timeout: float | None = None) -> Message:
        """The next message; TimeoutError after ``timeout`` seconds; ChannelClosed once the
        channels feeding this receiver ended and everything they sent was handed out (reason
        ``closed``: the sender closed it; ``revoked``: it was cut).  A malformed delivery is
        logged and skipped (its messages' sequence numbers are then missing)."""
        deadline: float | None = None
        while True:
            msg = self._next()
            if msg is not None:
                return msg
            self._collect()
            if self._links is None:
                if timeout is not None and not self._sock.poll(int(timeout * 1000)):
                    raise self._timed_out(timeout)
                self._take(self._sock.recv_multipart(copy=False))
                continue
            if deadline is None and timeout is not None:
                deadline = time.monotonic() + timeout
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            self._ready_now(False)  # what the links took meanwhile
            if self._ready:
                continue
            poller = zmq.Poller()
            for item in self._watched():
                poller.register(item, zmq.POLLIN)
            events = dict(poller.poll(None if wait is None else int(wait * 1000)))
            self._ready_now(self._sock in events)
            # Checked whether or not something woke it: a link that wakes the call with
            # nothing it may hand out yet must not hold it past its timeout.
            if not self._ready and deadline is not None and time.monotonic() >= deadline:
                raise self._timed_out(timeout)

    def __iter__(self) -> Iterator[Message]:
        """Every message until the channels feeding this receiver end."""
        while True:
            try:
                msg = self.recv()
            except ChannelClosed:
                return
            yield msg

    def close(self) -> None:
        if not self._release():
            return
        try:
            self._mesh.client.close_receiver(self.name)
        except LocalError:
            pass
        self._forget()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(home: str | os.PathLike[str] | None = None) -> Mesh:
    """The local daemon's mesh (``home``, else ``$MESHD_HOME``, else the default home).
    Raises DaemonNotRunning if no daemon runs there."""
    return Mesh(home)
