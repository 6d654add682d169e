"""Handing a receiver's channels to its application (asyncio glue).

The receiving half of :mod:`.handover`: the daemon still answers the Hello, opens each
channel's first frame and each resumed connection's first frame (so only authentic connections
of member sites reach an application), then gives the connected socket and the channel's
receiving end (:class:`~meshd.channel.inbound.InGrant`) to the application that holds the
receiver (one :class:`InLease` per receiver port, over ``handover.sock``; the messages are in
:mod:`meshd.local.handover`).  The application opens the frames, delivers the messages and
sends the Feedback itself.

The daemon keeps a duplicate of each socket it handed over, never reading it: to cut the
connection when the channel ends from outside (its sender revoked, the application gone), even
if the application does not cooperate.  When the sender resumes the channel on a new connection,
the daemon holds that connection (its first frame kept unread), asks the application to give
the channel back (``yield``), goes on from the state it returns (``lost``), then hands the new
connection over in turn.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from meshd.channel.inbound import InGrant, ReceivingEnd
from meshd.daemon.channels.connection import DataConnection, detach, unhold
from meshd.daemon.counters import Counters
from meshd.daemon.tasks import TaskSet
from meshd.state.view import MeshView
from meshd.errors import LocalError, ProtocolError
from meshd.local.handover import MessageReader, decode_state, encode_in_grant, pack


class InChannel(Protocol):
    """What this module needs of :class:`.inbound.InChannel` (typed here: that module imports
    this one)."""

    cid: bytes
    name: str
    sender: bytes
    path: str
    relay: bytes | None
    core: ReceivingEnd
    conn: DataConnection | None
    lease: InLease | None
    giving: bool
    handed: bool
    dup: socket.socket | None

    def lost(self, conn: DataConnection) -> None: ...


class ReceiverPort(Protocol):
    name: str
    allow: frozenset[bytes] | None
    lease: InLease | None
    pushed: dict[bytes, int]


class Receiving(Protocol):
    """What this module needs of :class:`.inbound.Receiving`."""

    tasks: TaskSet
    counters: Counters
    view: MeshView
    stopping: bool

    @property
    def inc(self) -> Mapping[bytes, InChannel]: ...

    def wake_port(self, name: str) -> None: ...

    def after_give(self, inc: Any) -> None: ...

    def taken_back(self, inc: Any, state: InGrant) -> None: ...

    def finished(self, inc: Any) -> None: ...

    def end(self, inc: Any, reason: str, message: str) -> None: ...

    def adopt_in(self, lease: InLease, cid: bytes, msg: dict[str, Any]) -> None: ...


log = logging.getLogger("meshd.daemon.channels.handover")

LEFT_PIECE = 32 << 10
"""Bytes of a grant's leftover per ``left`` message (each message is at most 64 KiB)."""
DRAIN_FOR = 5.0
"""Seconds a hand-over waits for the port to deliver what the daemon holds of the channel."""


def cut_socket(sock: socket.socket | None) -> None:
    """Shut ``sock`` (a duplicate of a handed-over connection) down for every holder, and close
    this copy."""
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def forget_socket(sock: socket.socket) -> None:
    """Close ``sock``, on which :meth:`run` may wait in ``loop.sock_recv``: its reader is
    removed first.  Closing it under a waiting ``sock_recv`` left the reader registered on the
    descriptor number, and the next socket given that number (a control connection, say) had
    its bytes read by the dead waiter: its request vanished and it was reset.  A writer (a
    ``sock_sendall`` waiting for room) is removed for the same reason."""
    try:
        loop = asyncio.get_running_loop()
        loop.remove_reader(sock.fileno())
        loop.remove_writer(sock.fileno())
    except (RuntimeError, ValueError, OSError):
        pass
    sock.close()


class InLease:
    """One application's hold on the channels of one receiver port."""

    def __init__(self, receiving: Receiving, port: ReceiverPort, sock: socket.socket) -> None:
        self.receiving = receiving
        self.port = port
        self.sock = sock
        self.closed = False
        self.task: asyncio.Task[None] | None = None
        self._out: asyncio.Queue[tuple[bytes, int | None]] = asyncio.Queue()
        self._writer = receiving.tasks.spawn(self._write(), f"handover-in-write-{port.name}")
        self.said_bye = False
        """The application closed its receiver (``bye``), rather than died."""
        self.fds: list[int] = []
        """Descriptors the application sent (each ``adopt-in`` of a live channel takes one)."""

    # -- the daemon's side -----------------------------------------------------------------------

    def give(self, inc: InChannel, conn: DataConnection) -> None:
        """Hand ``conn`` (``inc``'s connection, just adopted) to the application."""
        inc.giving = True
        inc.lease = self
        conn.hold()
        self.receiving.tasks.spawn(self._give(inc, conn), f"handover-in-{inc.name}")

    async def _give(self, inc: InChannel, conn: DataConnection) -> None:
        rx = self.receiving
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_FOR
        while inc.core.rx.held_messages and self._serves(inc) and loop.time() < deadline:
            rx.wake_port(inc.name)  # what the daemon holds goes over the ipc socket first
            await asyncio.sleep(0.002)
        if not self._serves(inc) or inc.conn is not conn or inc.core.rx.held_messages:
            inc.giving = False
            if rx.inc.get(inc.cid) is inc and inc.conn is conn:
                unhold(conn)  # the daemon goes on carrying this channel
            rx.after_give(inc)
            return
        detached = await detach(conn)
        if detached is None or not self._serves(inc):
            inc.giving = False
            if detached is not None:
                cut_socket(detached[0])
            if rx.inc.get(inc.cid) is inc and inc.conn is conn:
                inc.lost(conn)
            rx.after_give(inc)
            return
        sock, left = detached
        grant = inc.core.hand_over()
        inc.conn = None
        # What the daemon read past the last record (up to a scratch buffer and part of a big
        # frame) goes ahead in pieces: one message is at most 64 KiB.
        if len(left) > LEFT_PIECE:
            rx.counters.count("handover_left_pieces")
        while len(left) > LEFT_PIECE:
            self._send({"t": "left", "id": inc.cid.hex(), "b": left[:LEFT_PIECE]})
            left = left[LEFT_PIECE:]
        window = (inc.core.rx.config.window_messages, inc.core.rx.config.window_bytes)
        self._send(encode_in_grant(grant, rx.view.name_of(inc.sender), inc.path, left, window,
                                   self.port.pushed.get(inc.cid, 0), inc.relay), sock)
        rx.counters.count("handovers_in")
        inc.dup = sock  # kept open: it is also the descriptor the writer sends
        inc.handed = True
        inc.giving = False
        rx.after_give(inc)

    def _serves(self, inc: InChannel) -> bool:
        return not self.closed and self.receiving.inc.get(inc.cid) is inc

    def ask_back(self, inc: InChannel) -> None:
        """The sender resumed ``inc`` on a new connection: the application gives it back."""
        self._send({"t": "yield", "id": inc.cid.hex()})

    def cut(self, inc: InChannel, reason: str, message: str) -> None:
        """``inc`` ended from outside: the application delivers nothing more of it."""
        self._send({"t": "cut", "id": inc.cid.hex(), "reason": reason, "message": message})

    def refuse_adoption(self, cid: bytes, message: str) -> None:
        """The application offered channel ``cid`` (``adopt-in``) and this daemon will not take
        it on: the application ends it itself, after what it holds of it."""
        self._send({"t": "cut", "id": cid.hex(), "reason": "failed", "message": message,
                    "tell": True})

    def _send(self, msg: dict[str, Any], sock: socket.socket | None = None) -> None:
        """Queue ``msg`` (with a descriptor of ``sock``) for :meth:`_write`, which sends the
        messages whole and in order.  The queue holds its own duplicate of the descriptor: the
        channel's copy may be closed (cut) before the message goes, and its number taken by
        another socket (a gossip connection), which the application would then be sent."""
        if not self.closed:
            self._out.put_nowait((pack(msg), None if sock is None else os.dup(sock.fileno())))

    async def _write(self) -> None:
        """Send the queued messages, each whole (a non-blocking socket may take part of one:
        the rest follows; a descriptor goes with the first byte)."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                data, fd = await self._out.get()
                view = memoryview(data)
                try:  # once sent, the message holds its own reference: ours goes either way
                    while fd is not None:
                        try:
                            view = view[socket.send_fds(self.sock, [view], [fd]):]
                            break
                        except BlockingIOError:
                            await _ready(loop, self.sock, True)
                finally:
                    if fd is not None:
                        os.close(fd)
                await loop.sock_sendall(self.sock, view)
        except OSError as exc:
            log.info("receiver %r: hand-over socket: %s", self.port.name, exc)
            self.close()
        finally:
            while not self._out.empty():  # never sent: the duplicates go
                if (fd := self._out.get_nowait()[1]) is not None:
                    os.close(fd)

    # -- the application's messages ----------------------------------------------------------------

    async def run(self, reader: MessageReader, early: list[dict[str, Any]]) -> None:
        """Serve the application's messages until it goes away (``early``: those that came
        with its first, ``reader`` holding what followed them)."""
        self.task = asyncio.current_task()
        try:
            await serve_messages(self, self._on_message, f"receiver {self.port.name!r}", reader,
                                 early, self.fds)
        finally:
            self.task = None
            self.close()

    def _on_message(self, msg: dict[str, Any]) -> None:
        if msg["t"] == "bye":  # the receiver closes: what is still handed over was never used
            self.said_bye = True
            return
        try:
            cid = bytes.fromhex(str(msg.get("id", "")))
        except ValueError:
            raise ProtocolError("a channel id that is not hex", reason="malformed") from None
        if msg["t"] == "adopt-in":
            self.receiving.adopt_in(self, cid, msg)
            return
        inc = self.receiving.inc.get(cid)
        if inc is None or inc.lease is not self or not inc.handed:
            return  # ended meanwhile (cut, or the daemon took it back)
        t = msg["t"]
        if t == "lost":
            log.info("channel %r from %s: its connection came back from the application: %s",
                     inc.name, self.receiving.view.name_of(inc.sender), str(msg.get("why"))[:200])
            try:
                self.receiving.taken_back(inc, decode_state(msg, inc.core.give_back()))
            except (LocalError, ProtocolError) as exc:  # only this channel pays for it
                why = f"the application gave back a state the channel cannot take: {exc}"
                log.warning("channel %r from %s: %s; it ends", inc.name,
                            self.receiving.view.name_of(inc.sender), why)
                self.cut(inc, "failed", why)
                self.receiving.end(inc, "failed", why)
        elif t == "finished":
            note_counts(inc, msg)
            self.receiving.finished(inc)
        elif t == "count":
            note_counts(inc, msg)

    def close(self) -> None:
        """The application went away (or its receiver closed): the channels it held end."""
        if self.closed:
            return
        self.closed = True
        if self.port.lease is self:
            self.port.lease = None
        forget_socket(self.sock)
        keep(None, self.fds)
        self.fds.clear()
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        if self._writer is not asyncio.current_task():
            self._writer.cancel()
        for inc in [c for c in self.receiving.inc.values() if c.lease is self]:
            if self.receiving.stopping and inc.dup is not None:
                inc.dup.close()  # the daemon stops: the application goes on with it
                inc.dup = None
            elif self.said_bye and inc.handed:  # granted, never read: back as it was given
                self.receiving.taken_back(inc, inc.core.give_back())
            elif inc.handed or (inc.giving and not self.said_bye):
                self.receiving.end(inc, "failed", "the receiving application went away")


async def _ready(loop: asyncio.AbstractEventLoop, sock: socket.socket, writing: bool) -> None:
    """Wait until ``sock`` takes more bytes (``writing``) or has some to read."""
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    (loop.add_writer if writing else loop.add_reader)(fd, _settle, ready)
    try:
        await ready
    finally:
        if sock.fileno() == fd:  # else closed, and :func:`forget_socket` removed it
            (loop.remove_writer if writing else loop.remove_reader)(fd)


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Served(Protocol):
    sock: socket.socket
    closed: bool


async def serve_messages(lease: _Served, on_message: Callable[[dict[str, Any]], None],
                         label: str, reader: MessageReader, early: list[dict[str, Any]],
                         fds: list[int] | None = None) -> None:
    """Act on ``early`` (messages read with the application's first), then read its messages
    on ``lease.sock`` with ``reader`` (which may hold the start of one) and act on each, until
    it closes, sends something malformed, or ``lease`` is closed.  Descriptors that come with
    them go to ``fds`` (at most :data:`MAX_HELD_FDS` held; None: none expected), else are
    closed."""
    loop = asyncio.get_running_loop()
    try:
        for msg in early:
            if not lease.closed:
                on_message(msg)
        while not lease.closed:
            data, got = await recv_with_fds(loop, lease.sock)
            keep(fds, got)
            if not data:
                break
            for msg in reader.feed(data):
                on_message(msg)
    except (OSError, ProtocolError) as exc:
        log.info("%s: hand-over socket: %s", label, exc)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        # A message of the right shape with a field that is not what it must be ("co": "abc",
        # "co": inf): the lease ends as for any malformed message, in one line.
        log.info("%s: hand-over socket: a malformed message (%s: %s)", label,
                 type(exc).__name__, exc)


MAX_HELD_FDS = 16
"""Descriptors an application's lease may have sent ahead of the messages that use them."""


async def recv_with_fds(loop: asyncio.AbstractEventLoop,
                        sock: socket.socket) -> tuple[bytes, list[int]]:
    """One read of the non-blocking ``sock`` (once it is readable), with the descriptors that
    came with it.  A read without room for them would have the kernel close them: an
    application's ``adopt-in`` carries its connection's."""
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 4)
            return data, fds
        except (BlockingIOError, InterruptedError):
            await _ready(loop, sock, False)


PATHS = ("direct", "reversed", "relay")


def path_refusal(view: MeshView, ends: tuple[bytes, bytes], path: str,
                 relay: bytes | None) -> str | None:
    """Why an application's ``path`` and ``relay`` for a channel between ``ends`` (the two
    sites' keys) cannot be believed; None if they can: a relayed path names a relay, only a
    relayed one does, and the relay is a member other than the two ends."""
    if path not in PATHS:
        return f"a path that is not one of {', '.join(PATHS)}"
    if (relay is not None) != (path == "relay") or (relay is not None and (
            relay in ends or not view.is_member(relay))):
        return "a relay that is not another member, or a relay without a relayed path"
    return None


def tcp_socket(fds: list[int]) -> socket.socket:
    """The next descriptor in ``fds`` (taken from it), which an application sent with a live
    channel, as a connected TCP socket; LocalError if there is none or it is not one (it is
    closed)."""
    if not fds:
        raise LocalError("a live channel came without its socket", reason="usage")
    fd = fds.pop(0)
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        raise LocalError("what came with it is not a socket", reason="usage") from None
    try:
        connected = sock.type == socket.SOCK_STREAM and sock.family in (
            socket.AF_INET, socket.AF_INET6) and bool(sock.getpeername())
    except OSError:
        connected = False
    if not connected:
        sock.close()
        raise LocalError("what came with it is not a connected TCP socket", reason="usage")
    return sock


def keep(held: list[int] | None, got: list[int]) -> None:
    """Move ``got`` to ``held`` up to :data:`MAX_HELD_FDS` (None: keep none) and close the
    rest; ``got`` is left empty (so that no descriptor is closed twice)."""
    for fd in got:
        if held is not None and len(held) < MAX_HELD_FDS:
            held.append(fd)
        else:
            os.close(fd)
    got.clear()


def refuse(sock: socket.socket, why: str) -> None:
    """Tell an application on the hand-over socket why it cannot take what it asked for."""
    try:
        sock.send(pack({"t": "ended", "reason": why, "message": f"cannot take: {why}"}))
    except OSError:
        pass
    sock.close()


def note_counts(inc: InChannel, msg: dict[str, Any]) -> None:
    """Take an application's counters of ``inc`` (for ``meshd channels``)."""
    core = inc.core
    for attr, key in (("messages", "m"), ("bytes", "b")):
        value = msg.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(core, attr, max(getattr(core, attr), value))
    dup = msg.get("dup")
    if isinstance(dup, int) and not isinstance(dup, bool):
        core.rx.duplicates = max(core.rx.duplicates, dup)
