"""The application API: stream numpy arrays and bytes over channels (sync and asyncio).

::

    import meshd
    with meshd.connect() as mesh:                  # the local daemon (home or $MESHD_HOME)
        tx = mesh.sender("frames", to="alcf")      # a channel; the daemons negotiate its path
        tx.send(frame, meta={"shot": 17})          # blocks while the receiver has no room
        tx.flush()                                 # returns when the far daemon has it all
    with meshd.connect() as mesh:                  # at the other site
        for msg in mesh.receiver("frames"):        # msg.array (a zero-copy view), .meta, .seq,
            ...                                    # .sender (site name), .sender_id

The client asks the daemon over the control socket for a channel and gets an ipc endpoint; the
data then flows app -> daemon over ZeroMQ ipc, never through the control socket.  Small
messages are batched here (up to :data:`~meshd.channel.batch.MAX_BATCH_BYTES`, and for at most
``linger`` seconds) so that the daemons pay their per-frame cost once per batch; a message of
64 KiB or more goes at once.  ``flush`` sends what is batched and waits for the receiving
daemon's acknowledgement of every message sent so far.

Guarantee: messages reach the receiving daemon in order and exactly once while the sending
daemon runs (across lost connections and relays).  A receiving application gets them in order;
a receiving application that dies loses what was in its ipc queue (at most a few batches).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import zmq
import zmq.asyncio

from meshd.channel import batch
from meshd.channel.arrays import decode_message, encode_message
from meshd.app.client import Client
from meshd.errors import LocalError, ProtocolError
from meshd.trust.identity import site_id_of
from meshd.local.ring import DESCRIPTOR, RING_MARK, ReleaseTracker, Ring, ring_worthy

__all__ = ["AsyncMesh", "Mesh", "Message", "aconnect", "connect"]

log = logging.getLogger(__name__)

_BIG = 64 << 10
"""A message body this big is not copied when it is batched (the caller leaves it alone until
``flush``); a smaller one is copied, since the caller may reuse its buffer at once."""
_ALONE = batch.MAX_BATCH_BYTES
"""A message this big is sent at once, in a batch of its own."""
_FLUSH_SLICE = 20.0
RING_BYTES = 48 << 20
"""Default size of the shared-memory ring between an application and its daemon, per sender
and per receiver (room for two 16 MiB messages in flight); ``ring_bytes=0`` goes without."""


@dataclass(slots=True)
class Message:
    """One received message.  ``array`` is a numpy view of the received buffer (no copy);
    for a bytes message it is the uint8 view and ``data`` the same bytes as a memoryview."""

    array: np.ndarray[Any, Any]
    data: memoryview
    meta: dict[str, Any]
    seq: int
    sender: str
    """The sending site's name."""
    sender_id: str
    channel: str
    kind: str = "array"
    _frame: Any = field(default=None, repr=False)

    def bytes(self) -> bytes:
        return bytes(self.data)


# -- encoding with a small cache of headers ----------------------------------------------------

_HEADERS: dict[tuple[Any, ...], bytes] = {}
_U8 = np.dtype(np.uint8)
_DECODED: dict[bytes, tuple[str, np.dtype[Any], tuple[int, ...], int]] = {}
"""Header bytes (without meta) -> kind, dtype, shape and body size: the receive path of small
messages spends most of its time decoding headers, and a stream repeats one header."""


def _encode(obj: Any, meta: Mapping[str, Any] | None) -> tuple[Any, Any]:
    if not meta:
        if isinstance(obj, (bytes, bytearray)):
            key: tuple[Any, ...] = ("b", len(obj))
            head = _HEADERS.get(key)
            if head is not None:
                return head, obj
        elif isinstance(obj, np.ndarray) and obj.flags.c_contiguous and obj.dtype.fields is None \
                and obj.dtype.kind != "O":
            key = ("a", obj.dtype.str, obj.shape)
            head = _HEADERS.get(key)
            if head is not None:
                return head, obj.reshape(-1).view(np.uint8).data
        else:
            key = ()
        head_v, body = encode_message(obj, meta)
        if key and len(_HEADERS) < 1024:
            _HEADERS[key] = bytes(head_v)
        return head_v, body
    head_v, body = encode_message(obj, meta)
    return head_v, body


def _decode(head: memoryview, body: memoryview, raw: np.ndarray[Any, Any]
            ) -> tuple[str, np.ndarray[Any, Any], dict[str, Any]]:
    """``raw``: the body as uint8 numpy (a slice of the whole delivery: cheaper than a new
    ``np.frombuffer`` per message)."""
    if head.nbytes <= 256:
        key = bytes(head)
        hit = _DECODED.get(key)
        if hit is not None:
            kind, dt, shape, nbytes = hit
            if nbytes == body.nbytes:
                array = raw if dt == _U8 else raw.view(dt)
                return kind, array if len(shape) == 1 else array.reshape(shape), {}
        msg = decode_message([head, body])
        if not msg.meta and len(_DECODED) < 1024:
            _DECODED[key] = (msg.kind, msg.array.dtype, msg.array.shape, msg.array.nbytes)
        return msg.kind, msg.array, msg.meta
    msg = decode_message([head, body])
    return msg.kind, msg.array, msg.meta


def _messages(parts: list[Any], channel: str, ring: ReleaseTracker | None) -> list[Message]:
    """The messages of one delivery from the daemon: ``[meta, batch]``, or ``[meta, R,
    descriptor]`` for a batch in the receiver's ring (its arrays then view the ring, and the
    record is released once the last of them is garbage collected)."""
    if len(parts) == 3 and ring is not None and parts[1].bytes == RING_MARK:
        start, view = ring.ring.record(parts[2].bytes)
        whole = np.frombuffer(view, dtype=np.uint8)
        ring.track(start, start + view.nbytes)
        weakref.finalize(whole, ring.freed, start)
        keep: Any = whole
    elif len(parts) == 2:
        keep = parts[1]
        view = memoryview(keep.buffer).cast("B")
        whole = np.frombuffer(view, dtype=np.uint8)
    else:
        raise ProtocolError(f"delivery of {len(parts)} frames", reason="frames")
    try:
        cid, sender, first, name = msgpack.unpackb(parts[0].bytes, raw=False)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise ProtocolError("bad delivery header", reason="malformed") from None
    sid = site_id_of(sender)
    out = []
    for i, (ho, hn, bo, bn) in enumerate(batch.offsets(view)):
        raw = whole[bo:bo + bn]
        # a ring's views must hold ``whole`` (its finalizer frees the record); a frame's need not
        body = memoryview(raw) if keep is whole else view[bo:bo + bn]  # type: ignore[arg-type]
        kind, array, meta = _decode(view[ho:ho + hn], body, raw)
        out.append(Message(array, body, meta, first + i, name, sid, channel, kind, keep))
    return out


def _checked_messages(parts: list[Any], channel: str, ring: ReleaseTracker | None
                      ) -> list[Message]:
    """:func:`_messages`, or none (logged) for a malformed delivery: one bad batch from a far
    sender must not end the application's receive loop."""
    try:
        return _messages(parts, channel, ring)
    except ProtocolError as exc:
        log.warning("channel %r: skipped a malformed delivery: %s", channel, exc)
        return []


def _new_ring(ring_bytes: int) -> Ring | None:
    """A ring for a sender, or None (disabled, or no room in /dev/shm: inline then)."""
    if not ring_bytes:
        return None
    try:
        return Ring.create(ring_bytes)
    except (OSError, LocalError):
        return None


def _batch_frames(ring: Ring | None, messages: list[tuple[Any, Any]], nbytes: int) -> list[Any]:
    """The frames that hand a batch to the daemon: a descriptor of the batch written into the
    sender's ring when its messages are big (``nbytes``: about the batch's size) and the ring
    has room, else the packed batch inline (for many small messages ``bytes.join`` beats
    writing each one into the ring from Python)."""
    if ring is not None and ring_worthy(nbytes, len(messages)):
        sizes = [(memoryview(h).nbytes, memoryview(b).nbytes) for h, b in messages]
        size = batch.payload_size(sizes)
        if max(b for _, b in sizes) <= batch.MAX_MESSAGE_BYTES:
            start = ring.reserve(size)
            if start is not None:
                batch.pack_into(ring.region(start, size), messages)
                return [RING_MARK, DESCRIPTOR.pack(start, size)]
    return [batch.pack(messages)]  # raises the errors a bad batch deserves


def _start_ring(client: Client, channel_id: str, ring_bytes: int) -> Ring | None:
    """A sender's ring, made on its first big batch (a channel of small messages never pays
    for one, and its setup is not slowed) and handed to the daemon; None if that fails.  Its
    memory is allocated in the background: the batches until then go inline."""
    ring = _new_ring(ring_bytes)
    if ring is None:
        return None
    try:
        taken = client.attach_ring(channel_id, str(ring.path)).get("ring")
    except LocalError:
        taken = False
    finally:
        ring.unlink()  # the daemon has mapped it (or refused it); no name is left behind
    if not taken:
        ring.close()
        return None
    return ring


def _open_receiver(client: Client, name: str, allow: list[str] | None,
                   ring_bytes: int) -> tuple[dict[str, Any], ReleaseTracker | None]:
    info = client.open_receiver(name, allow, ring_bytes)
    if not info.get("ring"):
        return info, None
    try:
        ring = Ring.attach(info["ring"])
    except LocalError:  # cannot map the daemon's ring: ask for a receiver without one
        return client.open_receiver(name, allow, 0), None
    ring.unlink()
    return info, ReleaseTracker(ring)


# ================================================================================== synchronous


class Mesh:
    """A connection to the local daemon (see :func:`connect`)."""

    def __init__(self, home: str | os.PathLike[str] | None = None, *,
                 timeout: float = 30.0) -> None:
        self.client = Client(home, timeout=timeout)
        self.client.status()  # fail now, with "start the daemon with …", if it is not running
        self._ctx = zmq.Context()
        self._open: list[Sender | Receiver] = []

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sender(self, name: str, *, to: str, paths: list[str] | None = None,
               linger: float = 0.002, ring_bytes: int = RING_BYTES) -> Sender:
        """A sender on channel ``name`` to site ``to`` (a name or site id).  ``paths`` limits the
        path kinds (``direct``, ``reversed``, ``relay``) within what the site allows.
        ``ring_bytes``: shared memory for big messages on their way to the daemon (0: none)."""
        info = self.client.open_sender(name, to, paths)
        tx = Sender(self, info, linger, ring_bytes)
        self._open.append(tx)
        return tx

    def receiver(self, name: str, *, allow: list[str] | None = None,
                 ring_bytes: int = RING_BYTES) -> Receiver:
        """The receiver of channel ``name`` (messages from every sender on it, each sender's in
        order).  ``allow``: only these sites may open it.  A newer receiver of the same name
        takes over from an older one.  ``ring_bytes``: shared memory the daemon puts big
        messages in (their arrays view it; a record is reused once no array views it; 0: none)."""
        info, ring = _open_receiver(self.client, name, allow, ring_bytes)
        rx = Receiver(self, info, ring)
        self._open.append(rx)
        return rx

    def channels(self) -> list[dict[str, Any]]:
        return self.client.channels()

    def close(self, *, flush: bool = True, timeout: float | None = None) -> None:
        """Close every sender (after a flush, unless ``flush`` is False, of at most ``timeout``
        seconds each) and receiver.  LocalError (``timeout``) once all are closed if a flush
        timed out."""
        timed_out: LocalError | None = None
        for item in list(self._open):
            if isinstance(item, Sender):
                try:
                    item.close(flush=flush, timeout=timeout)
                except LocalError as exc:
                    if exc.reason != "timeout":
                        raise
                    timed_out = exc
            else:
                item.close()
        self._ctx.destroy(linger=1000)
        if timed_out is not None:
            raise timed_out


class Sender:
    """Sends messages on one channel.  Not thread-safe (one sending thread)."""

    def __init__(self, mesh: Mesh, info: dict[str, Any], linger: float,
                 ring_bytes: int = RING_BYTES) -> None:
        self._mesh = mesh
        self._ring: Ring | None = None
        self._ring_bytes = ring_bytes  # 0 once a ring was made or tried
        self.id: str = info["id"]
        self.name: str = info["name"]
        self.peer: str = info["peer"]
        self.sent = 0
        """Messages handed to the daemon (or batched) so far."""
        self._linger = linger
        self._sock = mesh._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, 8)
        self._sock.setsockopt(zmq.LINGER, -1)
        self._sock.connect(info["endpoint"])
        self._lock = threading.Condition()
        self._batch: list[tuple[Any, Any]] = []
        self._batch_bytes = 0
        self._batch_since = 0.0
        self._closed = False
        self._thread = threading.Thread(target=self._linger_loop, daemon=True,
                                        name=f"meshd-tx-{self.name}")
        self._thread.start()

    def send(self, obj: Any, meta: Mapping[str, Any] | None = None) -> None:
        """Queue one numpy array (any dtype but object, any shape) or bytes-like, with an
        optional msgpack-able ``meta`` dict.  Blocks while the channel has no room.  Do not
        modify an array until ``flush`` returns if it is 64 KiB or larger (it is not copied)."""
        head, body = _encode(obj, meta)
        nbody = memoryview(body).nbytes
        with self._lock:
            if self._closed:
                raise LocalError("the sender is closed", reason="closed")
            if nbody >= _ALONE:
                self._push_locked()
                self._sock.send_multipart(self._frames([(head, body)], nbody), copy=False)
            else:
                if not self._batch:
                    self._batch_since = time.monotonic()
                    self._lock.notify()
                self._batch.append((head, body if isinstance(body, bytes) or nbody >= _BIG
                                    else bytes(body)))
                self._batch_bytes += nbody + len(head) + 12
                if (self._batch_bytes >= batch.MAX_BATCH_BYTES
                        or len(self._batch) >= batch.MAX_BATCH_MESSAGES):
                    self._push_locked()
            self.sent += 1

    def _push_locked(self) -> None:
        if self._batch:
            frames = self._frames(self._batch, self._batch_bytes)
            self._batch = []
            self._batch_bytes = 0
            self._sock.send_multipart(frames, copy=False)

    def _frames(self, messages: list[tuple[Any, Any]], nbytes: int) -> list[Any]:
        if self._ring_bytes and ring_worthy(nbytes, len(messages)):
            self._ring = _start_ring(self._mesh.client, self.id, self._ring_bytes)
            self._ring_bytes = 0
        return _batch_frames(self._ring, messages, nbytes)

    def _linger_loop(self) -> None:
        with self._lock:
            while not self._closed:
                if not self._batch:
                    self._lock.wait()
                    continue
                due = self._batch_since + self._linger - time.monotonic()
                if due > 0:
                    self._lock.wait(due)
                    continue
                self._push_locked()

    def flush(self, timeout: float | None = None) -> None:
        """Send what is batched and wait until the receiving daemon has acknowledged every
        message sent so far.  LocalError (reason ``timeout``) after ``timeout`` seconds."""
        with self._lock:
            self._push_locked()
            target = self.sent
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            slice_s = _FLUSH_SLICE
            if deadline is not None:
                slice_s = min(slice_s, max(0.0, deadline - time.monotonic()))
            try:
                self._mesh.client.flush_sender(self.id, target, timeout=slice_s)
                return
            except LocalError as exc:
                if exc.reason != "timeout" or (deadline is not None
                                               and time.monotonic() >= deadline):
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
        what is unacknowledged, and LocalError (reason ``timeout``) says so."""
        with self._lock:
            if self._closed:
                return
            self._push_locked()
        timed_out: LocalError | None = None
        if flush:
            try:
                self.flush(timeout)
            except LocalError as exc:
                if exc.reason != "timeout":
                    raise
                timed_out = exc
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._sock.close(linger=2000)
        if self._ring is not None:
            self._ring.close()
        try:
            self._mesh.client.close_sender(self.id)
        except LocalError:
            pass
        if self in self._mesh._open:
            self._mesh._open.remove(self)
        if timed_out is not None:
            raise timed_out

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(flush=exc_type is None)


class Receiver:
    """Receives the messages of one channel name."""

    def __init__(self, mesh: Mesh, info: dict[str, Any],
                 ring: ReleaseTracker | None = None) -> None:
        self._mesh = mesh
        self._ring = ring
        self.name: str = info["name"]
        self._sock = mesh._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, 4)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(info["endpoint"])
        self._ready: deque[Message] = deque()

    def recv(self, timeout: float | None = None) -> Message:
        """The next message; TimeoutError after ``timeout`` seconds.  A malformed delivery is
        logged and skipped (its messages' sequence numbers are then missing)."""
        while not self._ready:
            if self._ring is not None:
                self._ring.collect()
            if timeout is not None and not self._sock.poll(int(timeout * 1000)):
                raise TimeoutError(f"no message on {self.name!r} within {timeout} s")
            parts = self._sock.recv_multipart(copy=False)
            self._ready.extend(_checked_messages(parts, self.name, self._ring))
        return self._ready.popleft()

    def __iter__(self) -> Iterator[Message]:
        while True:
            yield self.recv()

    def close(self) -> None:
        if self._sock.closed:
            return
        self._sock.close(0)
        if self._ring is not None:
            self._ring.ring.close()
        try:
            self._mesh.client.close_receiver(self.name)
        except LocalError:
            pass
        if self in self._mesh._open:
            self._mesh._open.remove(self)

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(home: str | os.PathLike[str] | None = None) -> Mesh:
    """The local daemon's mesh (``home``, else ``$MESHD_HOME``, else the default home).
    Raises DaemonNotRunning if no daemon runs there."""
    return Mesh(home)


# ====================================================================================== asyncio


class AsyncMesh:
    """The asyncio flavour of :class:`Mesh` (see :func:`aconnect`)."""

    def __init__(self, home: str | os.PathLike[str] | None = None) -> None:
        self.client = Client(home)
        self._ctx = zmq.asyncio.Context()
        self._open: list[AsyncSender | AsyncReceiver] = []

    async def __aenter__(self) -> AsyncMesh:
        await asyncio.to_thread(self.client.status)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def sender(self, name: str, *, to: str, paths: list[str] | None = None,
                     linger: float = 0.002, ring_bytes: int = RING_BYTES) -> AsyncSender:
        info = await asyncio.to_thread(self.client.open_sender, name, to, paths)
        tx = AsyncSender(self, info, linger, ring_bytes)
        self._open.append(tx)
        return tx

    async def receiver(self, name: str, *, allow: list[str] | None = None,
                       ring_bytes: int = RING_BYTES) -> AsyncReceiver:
        info, ring = await asyncio.to_thread(_open_receiver, self.client, name, allow, ring_bytes)
        rx = AsyncReceiver(self, info, ring)
        self._open.append(rx)
        return rx

    async def channels(self) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.client.channels)

    async def close(self, *, flush: bool = True, timeout: float | None = None) -> None:
        """As :meth:`Mesh.close`."""
        timed_out: LocalError | None = None
        for item in list(self._open):
            if isinstance(item, AsyncSender):
                try:
                    await item.close(flush=flush, timeout=timeout)
                except LocalError as exc:
                    if exc.reason != "timeout":
                        raise
                    timed_out = exc
            else:
                await item.close()
        self._ctx.destroy(linger=1000)
        if timed_out is not None:
            raise timed_out


class AsyncSender:
    def __init__(self, mesh: AsyncMesh, info: dict[str, Any], linger: float,
                 ring_bytes: int = RING_BYTES) -> None:
        self._mesh = mesh
        self._ring: Ring | None = None
        self._ring_bytes = ring_bytes  # 0 once a ring was made or tried
        self.id: str = info["id"]
        self.name: str = info["name"]
        self.peer: str = info["peer"]
        self.sent = 0
        self._linger = linger
        self._sock = mesh._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, 8)
        self._sock.connect(info["endpoint"])
        self._batch: list[tuple[Any, Any]] = []
        self._batch_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._sending = asyncio.Lock()

    async def send(self, obj: Any, meta: Mapping[str, Any] | None = None) -> None:
        head, body = _encode(obj, meta)
        nbody = memoryview(body).nbytes
        if nbody >= _ALONE:
            await self._push()
            async with self._sending:
                await self._sock.send_multipart(await self._frames([(head, body)], nbody),
                                                copy=False)
        else:
            if not self._batch and self._timer is None:
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(self._linger,
                                              lambda: asyncio.ensure_future(self._push()))
            self._batch.append((head, body if isinstance(body, bytes) or nbody >= _BIG
                                else bytes(body)))
            self._batch_bytes += nbody + len(head) + 12
            if (self._batch_bytes >= batch.MAX_BATCH_BYTES
                    or len(self._batch) >= batch.MAX_BATCH_MESSAGES):
                await self._push()
        self.sent += 1

    async def _push(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._batch:
            return
        messages, nbytes = self._batch, self._batch_bytes
        self._batch = []
        self._batch_bytes = 0
        async with self._sending:
            await self._sock.send_multipart(await self._frames(messages, nbytes), copy=False)

    async def _frames(self, messages: list[tuple[Any, Any]], nbytes: int) -> list[Any]:
        if self._ring_bytes and ring_worthy(nbytes, len(messages)):
            ring_bytes, self._ring_bytes = self._ring_bytes, 0
            self._ring = await asyncio.to_thread(_start_ring, self._mesh.client, self.id,
                                                 ring_bytes)
        return _batch_frames(self._ring, messages, nbytes)

    async def flush(self, timeout: float | None = None) -> None:
        await self._push()
        target = self.sent
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            slice_s = _FLUSH_SLICE if deadline is None else min(_FLUSH_SLICE,
                                                               max(0.0, deadline - loop.time()))
            try:
                await asyncio.to_thread(self._mesh.client.flush_sender, self.id, target, slice_s)
                return
            except LocalError as exc:
                if exc.reason != "timeout" or (deadline is not None and loop.time() >= deadline):
                    raise

    async def close(self, *, flush: bool = True, timeout: float | None = None) -> None:
        """As :meth:`Sender.close`."""
        await self._push()
        timed_out: LocalError | None = None
        if flush:
            try:
                await self.flush(timeout)
            except LocalError as exc:
                if exc.reason != "timeout":
                    raise
                timed_out = exc
        self._sock.close(linger=2000)
        if self._ring is not None:
            self._ring.close()
        try:
            await asyncio.to_thread(self._mesh.client.close_sender, self.id)
        except LocalError:
            pass
        if self in self._mesh._open:
            self._mesh._open.remove(self)
        if timed_out is not None:
            raise timed_out


class AsyncReceiver:
    def __init__(self, mesh: AsyncMesh, info: dict[str, Any],
                 ring: ReleaseTracker | None = None) -> None:
        self._mesh = mesh
        self._ring = ring
        self.name: str = info["name"]
        self._sock = mesh._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, 4)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(info["endpoint"])
        self._ready: deque[Message] = deque()

    async def recv(self, timeout: float | None = None) -> Message:
        while not self._ready:
            if self._ring is not None:
                self._ring.collect()
            try:
                parts = await asyncio.wait_for(self._sock.recv_multipart(copy=False), timeout)
            except asyncio.TimeoutError:
                raise TimeoutError(f"no message on {self.name!r} within {timeout} s") from None
            self._ready.extend(_checked_messages(parts, self.name, self._ring))
        return self._ready.popleft()

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Message]:
        while True:
            yield await self.recv()

    async def close(self) -> None:
        if self._sock.closed:
            return
        self._sock.close(0)
        if self._ring is not None:
            self._ring.ring.close()
        try:
            await asyncio.to_thread(self._mesh.client.close_receiver, self.name)
        except LocalError:
            pass
        if self in self._mesh._open:
            self._mesh._open.remove(self)


def aconnect(home: str | os.PathLike[str] | None = None) -> AsyncMesh:
    """The asyncio flavour of :func:`connect`: ``async with meshd.aconnect() as mesh:``."""
    return AsyncMesh(home)
