"""What the sync and the asyncio flavour share around a channel: the state of a mesh, a sender
and a receiver, their sockets, and the blocking control steps they take (the asyncio flavour
runs those in a thread).  The flavours add only how they wait: a lock and a thread, or the
event loop."""

from __future__ import annotations

import logging
import secrets
from collections import deque
from types import TracebackType
from typing import Any

import zmq

from meshd.app.batching import Batcher
from meshd.app.client import Client
from meshd.app.direct import DirectLink
from meshd.app.direct_in import InLinks
from meshd.app.message import Message, checked_messages
from meshd.errors import ChannelClosed, LocalError, ProtocolError
from meshd.local.ipc import ChannelEnd, unpack_end
from meshd.local.ring import ReleaseTracker, Ring

log = logging.getLogger("meshd.app.streams")

__all__ = ["FLUSH_SLICE", "STALL_CHECK", "FlushWait", "MeshEnd", "ReceiverEnd", "SenderEnd",
           "TimeoutLater", "open_receiver", "start_ring"]

FLUSH_SLICE = 20.0
"""A flush asks the daemon at most this long at a time (then asks again)."""
STALL_CHECK = 1.0
"""Seconds a send may wait for room before it asks the daemon whether the channel ended."""
REOPEN_TIMEOUT = 5.0
"""Seconds a receiver waits for the answer when it opens itself again at a daemon that
restarted (the reader thread asks; the receiver's close waits for that thread)."""


def _new_ring(ring_bytes: int) -> Ring | None:
    """A ring for a sender, or None (disabled, or no room in /dev/shm: inline then)."""
    if not ring_bytes:
        return None
    try:
        return Ring.create(ring_bytes)
    except (OSError, LocalError):
        return None


def start_ring(client: Client, channel_id: str, ring_bytes: int) -> Ring | None:
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


def open_receiver(client: Client, name: str, allow: list[str] | None, ring_bytes: int,
                  handover: bool = False) -> tuple[dict[str, Any], ReleaseTracker | None]:
    """Open the receiver ``name`` with a ring of ``ring_bytes`` (0: none), mapped here; without
    one if the daemon's ring cannot be mapped.  ``handover``: ask to take the channels' data
    connections; a receiver whose daemon grants that has no ring (the daemon carries only what
    arrives before a hand-over)."""
    claim = secrets.token_hex(16)  # names this receiver when it opens itself again
    info = client.open_receiver(name, allow, 0 if handover else ring_bytes, handover,
                                claim=claim)
    if handover and not info.get("handover") and ring_bytes:  # refused: the daemon carries all
        info = client.open_receiver(name, allow, ring_bytes, False, claim=claim)
    info["claim"] = claim
    if not info.get("ring"):
        return info, None
    try:
        ring = Ring.attach(info["ring"])
    except LocalError:  # cannot map the daemon's ring: ask for a receiver without one
        return {**client.open_receiver(name, allow, 0, claim=claim), "claim": claim}, None
    ring.unlink()
    return info, ReleaseTracker(ring)


class FlushWait:
    """A flush's wait for the receiving daemon's acknowledgement, as control calls of at most
    :data:`FLUSH_SLICE` seconds each, until ``timeout`` seconds (None: no end) from ``now``."""

    def __init__(self, timeout: float | None, now: float) -> None:
        self._deadline = None if timeout is None else now + timeout

    def slice(self, now: float) -> float:
        """How long the next control call may wait."""
        if self._deadline is None:
            return FLUSH_SLICE
        return min(FLUSH_SLICE, max(0.0, self._deadline - now))

    def ends(self, exc: LocalError, now: float) -> bool:
        """Whether the error ``exc`` of a control call ends the wait (else: ask again)."""
        return exc.reason != "timeout" or (self._deadline is not None and now >= self._deadline)


class TimeoutLater:
    """A ``with`` block whose LocalError of reason ``timeout`` or ChannelClosed is kept, to be
    raised by :meth:`raise_kept` once the rest is closed (the last one kept wins); other errors
    go through."""

    def __init__(self) -> None:
        self.kept: LocalError | ChannelClosed | None = None

    def __enter__(self) -> TimeoutLater:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if isinstance(exc, ChannelClosed) or (isinstance(exc, LocalError)
                                               and exc.reason == "timeout"):
            self.kept = exc
            return True
        return False

    def raise_kept(self) -> None:
        if self.kept is not None:
            raise self.kept


class MeshEnd:
    """A connection to the local daemon: its control client, a ZeroMQ context for the channels'
    ipc sockets, and the senders and receivers open on it."""

    def __init__(self, client: Client, ctx: zmq.Context[Any]) -> None:
        self.client = client
        self._ctx = ctx
        self._open: list[Any] = []

    def _closed_all(self, later: TimeoutLater) -> None:
        """The end of ``close`` once every sender and receiver is closed."""
        self._ctx.destroy(linger=1000)
        later.raise_kept()


class SenderEnd:
    """A sender's state: the channel, its ipc socket (PUSH to the daemon) and its batching."""

    def __init__(self, mesh: MeshEnd, info: dict[str, Any], linger: float,
                 ring_bytes: int) -> None:
        self._mesh = mesh
        self.id: str = info["id"]
        self.name: str = info["name"]
        self.peer: str = info["peer"]
        self._core = Batcher(linger, ring_bytes)
        self._sock: Any = None  # the PUSH socket to the daemon (not on a handed-over channel)
        if not info.get("handover"):
            self._sock = mesh._ctx.socket(zmq.PUSH)
            self._sock.setsockopt(zmq.SNDHWM, 8)
            self._sock.setsockopt(zmq.LINGER, -1)
            self._sock.connect(info["endpoint"])
        self.ended: ChannelClosed | None = None
        """Why the channel ended on its own (revoked, no path), once a call found out."""
        self._link = self._open_link(info) if info.get("handover") else None
        """The data connection, when this process holds it (:mod:`meshd.app.direct`)."""

    def _open_link(self, info: dict[str, Any]) -> DirectLink | None:
        """The sync flavour's link on a handed-over channel (the asyncio flavour holds its own,
        :mod:`meshd.app.aio_direct`, and has None here)."""
        return DirectLink(info["handover"], self.id, self.name)

    def _check_ended(self) -> None:
        """Ask the daemon whether the channel ended (a send waits for room a long time):
        ChannelClosed if it did, and from then on at every call."""
        if self.ended is None:
            try:
                self._mesh.client.flush_sender(self.id, 0, 0.0)
                return
            except ChannelClosed as exc:
                self._ended(exc)
        assert self.ended is not None
        raise self.ended

    def _ended(self, exc: ChannelClosed) -> ChannelClosed:
        """Note that the channel ended (``exc`` from the daemon) and fill in who."""
        exc.channel, exc.peer = self.id, self.peer
        self.ended = exc
        return exc

    @property
    def sent(self) -> int:
        """Messages handed to the daemon (or batched) so far."""
        return self._core.sent

    @property
    def _ring(self) -> Ring | None:
        """The sender's ring, once made (None until its first big batch, or without one)."""
        return self._core.ring

    def _release(self) -> None:
        """Close the socket (what it holds still goes, for two seconds) and the ring."""
        if self._sock is not None:
            self._sock.close(linger=2000)
        if self._core.ring is not None:
            self._core.ring.close()

    def _forget(self) -> None:
        if self in self._mesh._open:
            self._mesh._open.remove(self)


class ReceiverEnd:
    """A receiver's state: its ipc socket (PULL from the daemon), its ring and the messages of
    the last delivery not yet handed out."""

    def __init__(self, mesh: MeshEnd, info: dict[str, Any],
                 ring: ReleaseTracker | None = None, allow: list[str] | None = None) -> None:
        self._mesh = mesh
        self._ring = ring
        self.name: str = info["name"]
        self._sock: Any = mesh._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, 4)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._endpoint: str = info["endpoint"]
        self._sock.connect(self._endpoint)
        self._ready: deque[Message | ChannelEnd] = deque()
        self.ended: list[ChannelClosed] = []
        """The channels to this receiver that ended, oldest first (see :meth:`_next`)."""
        home, claim = mesh.client.home.root, info.get("claim")
        self._links = (InLinks(info["handover"], info["port"], self.name,
                               reopen=lambda: Client(home, REOPEN_TIMEOUT).open_receiver(
                                   self.name, allow, 0, True, rejoin=True, claim=claim))
                       if info.get("handover") and info.get("port") else None)
        """The channels whose data connections this process holds (:mod:`.direct_in`)."""

    def _watched(self) -> list[Any]:
        """What a receive waits on: the ipc socket, and the hand-over reader's wake socket."""
        return [self._sock] if self._links is None else [self._sock, self._links.wake]

    def _ready_now(self, ipc_ready: bool) -> None:
        """Take what is ready: a delivery on the ipc socket, what the hand-over links hold."""
        if ipc_ready:
            self._take(self._sock.recv_multipart(copy=False))
        if self._links is None:
            return
        got, cuts = self._links.take()
        self._ready.extend(got)
        moved = self._links.rejoin.endpoint
        if moved is not None and moved != self._endpoint:  # the daemon restarted
            self._move_ipc(moved)
        for cut in cuts:
            if cut.tell:  # ended here, after what it delivered (the daemon is away)
                self._ready.append(ChannelEnd(cut.cid, b"", cut.sender_name, cut.reason,
                                              cut.message, len(self._links.links)))
            else:  # cut by the daemon: nothing more of it (its end notice comes over ipc)
                self._drop(cut.cid)

    def _move_ipc(self, endpoint: str) -> None:
        """Take deliveries and end notices from ``endpoint`` (the receiver's at the daemon that
        came back) instead of the old daemon's."""
        try:
            self._sock.disconnect(self._endpoint)
        except zmq.ZMQError:
            pass
        self._sock.connect(endpoint)
        self._endpoint = endpoint

    def _drop(self, cid: bytes) -> None:
        """Nothing more of channel ``cid`` (it ended) is handed out."""
        if self._links is not None:
            self._links.drop(cid)
        if any(isinstance(m, Message) and m._cid == cid for m in self._ready):
            self._ready = deque(m for m in self._ready
                                if not (isinstance(m, Message) and m._cid == cid))

    def _collect(self) -> None:
        """Release the ring records no received array views any more."""
        if self._ring is not None:
            self._ring.collect()

    def _take(self, parts: list[Any]) -> None:
        """Decode one delivery or end notice (a malformed one is logged and skipped)."""
        if len(parts) == 1:
            try:
                end = unpack_end(parts[0].bytes)
            except ProtocolError as exc:
                log.warning("channel %r: skipped a malformed delivery: %s", self.name, exc)
                return
            if end.reason != "closed":  # cut: what is not handed out yet is dropped
                self._drop(end.cid)
            elif self._links is not None:  # closed: what the links hold of it goes first
                self._ready.extend(self._links.take_channel(end.cid))
                self._links.drop(end.cid)
            self._ready.append(end)
            return
        got = checked_messages(parts, self.name, self._ring)
        if got and self._links is not None:
            self._links.note_delivery(got[0]._cid, got[0].seq, len(got))
        self._ready.extend(got)

    def _next(self) -> Message | None:
        """The next message ready, or None.  A channel's end is noted in :attr:`ended`; it
        raises ChannelClosed when no other channel feeds this receiver (a new sender may open
        the name again later: the next call then waits for it)."""
        while self._ready:
            item = self._ready.popleft()
            if isinstance(item, Message):
                return item
            end = ChannelClosed(f"channel {self.name!r} from {item.sender_name} ended:"
                                f" {item.message}", reason=item.reason, channel=item.cid.hex(),
                                peer=item.sender_name)
            self.ended.append(end)
            del self.ended[:-64]
            if item.still_open == 0:
                raise end
        return None

    def _timed_out(self, timeout: float | None) -> TimeoutError:
        return TimeoutError(f"no message on {self.name!r} within {timeout} s")

    def _release(self) -> bool:
        """Close the socket and the ring; False if they were closed already.  The channels this
        process holds go back to the daemon first (they stay open for the next receiver)."""
        if self._sock.closed:
            return False
        if self._links is not None:
            self._links.close()
        self._sock.close(0)
        if self._ring is not None:
            self._ring.ring.close()
        return True

    def _forget(self) -> None:
        if self in self._mesh._open:
            self._mesh._open.remove(self)
