"""The sending ends of channels (asyncio glue pumping :mod:`meshd.channel.outbound`).

:class:`OutChannel` carries out what its :class:`~meshd.channel.outbound.SendingEnd` decides:
it runs each path attempt as a task (connect, then the handshake as initiator or, once keyed, a
resume probe), makes the winning connection the channel's, writes the frames the core gives,
re-arms the core's one timer, and reads the application's batches from the channel's PULL
socket.  :class:`Sending` holds every sending end and what they share: the dials, the
reversed-path waiters, the ipc endpoints.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import zmq
import zmq.asyncio

from meshd.channel import batch, link
from meshd.channel.control import DialRequest, peer_message
from meshd.channel.events import Acked, ChannelEnded, NoPathLeft, PathOpen, SendFrame, Writable
from meshd.channel.frames import MAX_PAYLOAD, Block
from meshd.channel.handshake import ChannelKeys, Initiator
from meshd.channel.outbound import CLOSED, FAILED, OutboundConfig, SendingEnd
from meshd.channel.paths import CancelAttempt, Path, PathKind, StartAttempt
from meshd.channel.reliable import WouldBlock
from meshd.daemon.channels.connection import DataConnection
from meshd.daemon.channels.handover import Lease, offer
from meshd.daemon.channels.ipc import IpcEndpoints, close_watched, until_app_leaves
from meshd.local.ipc import read_batch
from meshd.daemon.channels.reach import Reachability, now_ms
from meshd.daemon.counters import Counters
from meshd.daemon.links import MemberLinks
from meshd.daemon.site import LocalSite
from meshd.daemon.tasks import CoreTimer, TaskSet
from meshd.errors import ChannelClosed, LocalError, ProtocolError
from meshd.local.ring import Ring
from meshd.state.config import Config
from meshd.state.view import MeshView

log = logging.getLogger("meshd.daemon.channels.outbound")

MAX_SENDERS = 256
"""Sending ends open at once, opened or taken on from an application after a restart (each
costs 3 ZeroMQ sockets, about 4 descriptors and its resend buffer of up to
``channel_window_bytes``); beyond, ``busy``."""
MAX_GONE = 1024
"""Ended channels remembered for their applications (see :attr:`Sending.gone`)."""


class OutChannel:
    """The sending end of one channel (owned by the sending site)."""

    def __init__(self, owner: Sending, name: str, peer: bytes, kinds: Iterable[PathKind],
                 handover: bool = False, cid: bytes | None = None):
        self.owner = owner
        self.handover = handover  # the app takes each connection (.handover) and sends
        self.lease: Lease | None = None
        self.app_gone = False
        self.reported: dict[str, int] | None = None  # the app's last counters (handed over)
        self.ring: Ring | None = None
        """The application's shared-memory ring for big batches, once it hands one over
        (:meth:`ChannelService.attach_ring`, see :mod:`meshd.local.ring`)."""
        self.name = name
        self.peer = peer
        self.cid = cid or secrets.token_bytes(16)
        self.core = SendingEnd(name, owner.site.public, peer, owner.reach.table,
                               relays=lambda: owner.reach.relay_candidates(peer), kinds=kinds,
                               config=OutboundConfig(
                                   owner.config.channel_window_bytes,
                                   give_up_s=owner.config.channel_give_up or None))
        self.conn: DataConnection | None = None
        self.attempts: dict[Path, asyncio.Task[None]] = {}
        self.created = time.time()
        self._timer = CoreTimer(self._on_timer)
        self._writable = asyncio.Event()
        self._acked = asyncio.Event()
        self._keyed = asyncio.Event()  # set once the first handshake gave us keys to seal with
        self.endpoint = owner.ipc.endpoint(f"tx-{self.cid.hex()[:16]}")
        self.pull = owner.zctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.setsockopt(zmq.RCVHWM, 8)
        self.pull.setsockopt(zmq.MAXMSGSIZE, MAX_PAYLOAD)
        self.pull.bind(self.endpoint)
        self._released = False
        self._in_hand = False  # a batch read from the app and not yet queued for sending
        self._malformed = False  # a malformed batch was logged already
        self._reader = owner.tasks.spawn(self._read_app(), f"tx-{name}")
        self._reader.add_done_callback(self._reader_done)
        self._watcher = owner.tasks.spawn(self._watch_app(), f"tx-watch-{name}")

    @property
    def state(self) -> str:
        return self.core.state

    def _reader_done(self, task: asyncio.Task[None]) -> None:
        """A bug must not leave a channel that silently stops reading its application."""
        if not task.cancelled() and task.exception() is not None:
            self.core.fail(f"internal error: {task.exception()!r}")
            self.pump()

    # -- pumping the core ----------------------------------------------------------------------

    def start(self) -> None:
        self.core.start(CoreTimer.now())
        self.pump()

    def pump(self) -> None:
        """Carry out the core's actions, act on its events, re-arm its timer."""
        core = self.core
        for action in core.outgoing():
            if isinstance(action, SendFrame):
                if self.conn is not None:
                    self.conn.send(link.FRAME, action.frame)
            elif isinstance(action, StartAttempt):
                self.attempts[action.path] = self.owner.tasks.spawn(
                    self._attempt(action.path), f"attempt-{action.path}")
            elif isinstance(action, CancelAttempt):
                cancelled = self.attempts.pop(action.path, None)
                if cancelled is not None:
                    cancelled.cancel()
        for event in core.events():
            if isinstance(event, Writable):
                self._writable.set()
            elif isinstance(event, Acked):
                self._acked.set()
                self._acked = asyncio.Event()
            elif isinstance(event, PathOpen):
                log.info("channel %r to %s: %s in %.1f ms", self.name, self.owner.name(self.peer),
                         path_text(self), event.setup_s * 1000)
            elif isinstance(event, NoPathLeft):
                log.warning("channel %r to %s: no path (%s); retrying in %.1f s", self.name,
                            self.owner.name(self.peer), event.error, event.retry_in)
            elif isinstance(event, ChannelEnded) and event.reason != "closed":
                log.warning("channel %r to %s ended: %s", self.name,
                            self.owner.name(self.peer), event.error)
                self._release()
                self.owner.ended(self)
        self._timer.arm(core.get_timer())

    def _on_timer(self, now: float) -> None:
        self.core.handle_timer(now)
        self.pump()

    # -- attempts ------------------------------------------------------------------------------

    async def _attempt(self, path: Path) -> None:
        conn: DataConnection | None = None
        timeout = self.core.race.config.attempt_timeout
        try:
            t0 = time.monotonic()
            keys = self.core.keys
            init = (Initiator(self.owner.site.keys.key, self.peer, self.cid, now=time.time())
                    if keys is None else None)
            # A reversed path carries the Hello in its dial request: the receiver answers
            # with Accept right after its preamble, one round trip sooner.
            hello_in_dial = init is not None and path.kind is PathKind.REVERSED
            conn = await self.owner.connect(self.peer, self.cid, path, timeout,
                                            init.hello if init and hello_in_dial else None)
            fb = None
            if init is not None:
                if not hello_in_dial:
                    conn.send(link.HELLO, init.hello)
                keys = init.on_accept(bytes(await conn.expect(link.ACCEPT, timeout=timeout)))
            else:
                conn.send(link.FRAME, self.core.probe_frame())
                while fb is None:
                    fb = self.core.feedback_in(await conn.expect(link.FRAME, timeout=timeout))
            conn.trust()  # the far end proved the channel's keys
            rtt = time.monotonic() - t0
        except asyncio.CancelledError:
            if conn is not None and conn is not self.conn:
                conn.close()
            raise
        except (ProtocolError, LocalError, OSError, asyncio.TimeoutError) as exc:
            if conn is not None:
                conn.close()
            reason = getattr(exc, "reason", None) or type(exc).__name__
            log.debug("channel %r: %s failed: %s", self.name, path, exc)
            self.attempts.pop(path, None)
            self.core.attempt_failed(path, time.monotonic(), f"{reason}: {exc}"[:200])
            self.pump()
            return
        self.attempts.pop(path, None)
        assert keys is not None
        self._adopt(path, conn, rtt, keys, fb)

    def _adopt(self, path: Path, conn: DataConnection, rtt: float, keys: ChannelKeys,
               fb: Any) -> None:
        if path not in self.core.race.running or self.core.ended:
            conn.close()  # another attempt won meanwhile
            return
        old, self.conn = self.conn, conn
        if old is not None and old is not conn:
            old.close()
        conn.owner = self
        conn.on_lost = self._lost
        self.core.attempt_succeeded(path, time.monotonic(), rtt, keys, fb)
        self._keyed.set()
        conn.handler = self._on_record
        while not conn.inbox.empty():
            item = conn.inbox.get_nowait()
            if item is not None:
                self._on_record(conn, *item)
        self.pump()
        if self.handover:
            offer(self)

    def _lost(self, conn: DataConnection) -> None:
        if conn is not self.conn:
            return
        self.conn = None
        if self.core.ended:
            return
        log.info("channel %r to %s: connection lost (%s); renegotiating", self.name,
                 self.owner.name(self.peer), conn.error or "closed")
        self.core.connection_lost(time.monotonic())
        self.pump()

    def _on_record(self, conn: DataConnection, kind: int, body: Block) -> None:
        if conn is not self.conn:
            return
        if kind == link.REFUSE:
            conn.error = bytes(body[:200]).decode("utf-8", "replace")
            conn.close()
            return
        if kind != link.FRAME:
            raise ProtocolError(f"record type {kind} on an open channel", reason="unexpected")
        self.core.frame_received(body, time.monotonic())
        self.pump()

    # -- the application's side ----------------------------------------------------------------

    async def _watch_app(self) -> None:
        """An application that dies without closing its sender: what it handed over still goes
        through, then the channel closes itself (its resend buffer and ring are freed)."""
        if self.handover:
            return  # the hand-over socket tells (see .handover.app_left)
        await until_app_leaves(self.pull)
        if self.core.ended:
            return
        log.info("channel %r to %s: the application is gone; closing once the receiver has"
                 " everything it sent", self.name, self.owner.name(self.peer))
        while not self.core.ended:
            if (not self._in_hand and not int(self.pull.get(zmq.EVENTS)) & zmq.POLLIN
                    and self.core.acked_messages >= self.core.messages):
                self.owner.counters.count("orphans_closed")
                self.owner.close(self.cid)
                return
            try:
                await asyncio.wait_for(self._acked.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    async def _read_app(self) -> None:
        while not self.core.ended and not self.handover:
            self._in_hand = False
            parts = await self.pull.recv_multipart(copy=False)
            self._in_hand = True
            release = None
            try:
                buf, release = read_batch(parts, self.ring)
                count = batch.check(buf)  # a malformed batch never reaches the far app
            except ProtocolError as exc:
                self.owner.counters.count("app_malformed")  # logged once per channel
                (log.debug if self._malformed else log.warning)(
                    "channel %r: dropped a malformed message from the application: %s (further"
                    " ones are counted in channel_app_malformed)", self.name, exc)
                self._malformed = True
                if release is not None and self.ring is not None:
                    self.ring.release(release)
                continue
            await self._keyed.wait()  # the first message needs no credit, but it needs keys
            while not self.core.ended:
                try:
                    self.core.send_batch(buf, count, time.monotonic())
                    break
                except WouldBlock:
                    self._writable.clear()
                    self.pump()
                    await self._writable.wait()
            if self.core.ended:
                return
            if release is not None:  # sealed: the sealed copy is what the resend buffer keeps
                assert self.ring is not None
                self.ring.release(release)
            self.pump()
            conn = self.conn
            if conn is not None and not conn.writable.is_set():
                await conn.writable.wait()

    def end_error(self) -> ChannelClosed | LocalError:
        """What a call on this channel raises once it has ended."""
        if self.state == FAILED or self.core.end_reason is not None:
            return ChannelClosed(f"channel {self.name!r} to {self.owner.name(self.peer)} ended:"
                                 f" {self.core.error}", reason=self.core.end_reason,
                                 channel=self.cid.hex(), peer=self.owner.name(self.peer))
        return LocalError("the channel is closed", reason="closed")

    def cut(self, reason: str, error: str) -> None:
        """End the channel at once (its receiver was revoked): no last frame."""
        self.core.cut(reason, error)
        self.pump()

    async def flush(self, messages: int, timeout: float | None) -> int:
        """Wait until the receiver's daemon has acknowledged ``messages`` messages;
        ChannelClosed if the channel ends first."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        core = self.core
        while core.acked_messages < messages:
            if core.ended:
                raise self.end_error()
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise LocalError(f"flush timed out: {core.acked_messages} of {messages}"
                                 f" messages acknowledged ({self.state})", reason="timeout")
            try:
                await asyncio.wait_for(self._acked.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        return core.acked_messages

    def close(self) -> None:
        if self.state == CLOSED:
            return
        self.core.close()
        self.pump()  # the last frame (none if the channel had failed)
        self._release()

    def _release(self) -> None:
        """Stop every task, timer and socket of the channel (once it closed or failed)."""
        if self._released:
            return
        self._released = True
        current = asyncio.current_task()
        for task in (self._reader, self._watcher, *self.attempts.values()):
            if task is not current:
                task.cancel()
        self._timer.cancel()
        if self.conn is not None:
            self.conn.close()
        close_watched(self.pull)
        self.owner.ipc.remove(self.endpoint)
        if self.ring is not None:
            self.ring.close()
        self._acked.set()  # a waiting flush sees the end
        self._writable.set()
        if self.lease is not None:
            self.lease.ended(self.core.end_reason or "closed", self.core.error or "closed")

def path_text(ch: OutChannel) -> str:
    """How the channel goes now, in words (for the log)."""
    path = ch.core.path
    if path is None:
        return "no path yet"
    if path.relay is not None:
        return f"relay via {ch.owner.name(path.relay)}"
    return path.kind.value


class Sending:
    """Every sending end of this site, and how their attempts connect (see the module
    docstring)."""

    def __init__(self, *, site: LocalSite, view: MeshView, config: Config, links: MemberLinks,
                 reach: Reachability, counters: Counters, tasks: TaskSet, ipc: IpcEndpoints,
                 zctx: zmq.asyncio.Context) -> None:
        self.site = site
        self.view = view
        self.config = config
        self.links = links
        self.reach = reach
        self.counters = counters
        self.tasks = tasks
        self.ipc = ipc
        self.zctx = zctx
        self.out: dict[bytes, OutChannel] = {}
        self.gone: OrderedDict[bytes, ChannelClosed | LocalError] = OrderedDict()
        """Channels that ended on their own (revoked, no path), newest last: what their
        application's next call on them raises (at most MAX_GONE kept)."""
        self.reverse_waiters: dict[bytes, tuple[bytes, asyncio.Future[DataConnection]]] = {}

    def name(self, key: bytes) -> str:
        return self.view.name_of(key)

    def open(self, name: str, to: bytes, kinds: list[PathKind],
             handover: bool = False) -> OutChannel:
        ch = OutChannel(self, name, to, kinds, handover)
        self.out[ch.cid] = ch
        ch.start()
        return ch

    def adopt(self, name: str, peer: bytes, cid: bytes, keys: ChannelKeys, ctl_seal: int,
              ctl_open: int, path: Path | None) -> OutChannel:
        """A handed-over channel whose application outlived this daemon's predecessor
        (:meth:`~meshd.channel.outbound.SendingEnd.adopt`); ``busy`` at :data:`MAX_SENDERS`."""
        if len(self.out) >= MAX_SENDERS:
            self.counters.count("refused_senders")
            raise LocalError(f"this site has {MAX_SENDERS} channels open already", reason="busy")
        ch = OutChannel(self, name, peer, [PathKind(p) for p in self.config.paths], True, cid)
        try:
            ch.core.adopt(keys, ctl_seal, ctl_open, path)
        except BaseException:  # keys it cannot use: nothing of the channel stays behind
            ch._release()
            raise
        self.out[ch.cid] = ch
        return ch

    def close(self, cid: bytes) -> None:
        ch = self.out.pop(cid, None)
        if ch is None:
            if self.gone.pop(cid, None) is not None:
                return  # it ended on its own; its application closes it now
            raise LocalError("no such channel", reason="not-found")
        ch.close()

    def ended(self, ch: OutChannel) -> None:
        """``ch`` ended on its own: it leaves the list; its application learns why at its next
        call."""
        if self.out.pop(ch.cid, None) is None:
            return
        self.counters.count(f"ended_{(ch.core.end_reason or 'failed').replace('-', '_')}")
        self.gone[ch.cid] = ch.end_error()
        while len(self.gone) > MAX_GONE:
            self.gone.popitem(last=False)

    def cut_peer(self, key: bytes, reason: str) -> None:
        """End every channel to ``key`` at once (it was revoked)."""
        for ch in [c for c in self.out.values() if c.peer == key]:
            ch.cut(reason, f"{self.name(key)} was {reason}; the channel was cut")
        for cid, (peer, fut) in list(self.reverse_waiters.items()):
            if peer == key and not fut.done():
                fut.set_exception(OSError(f"the receiver was {reason}"))

    async def connect(self, peer: bytes, cid: bytes, path: Path, timeout: float,
                      hello: bytes | None) -> DataConnection:
        """A data connection over ``path`` to ``peer`` for channel (or tunnel) ``cid``, its
        preamble sent (the tunnels' consumer uses it too)."""
        me = self.site.public
        if path.kind is PathKind.DIRECT:
            conn, _, _ = await self.reach.dial(peer, timeout)
            conn.send(link.PREAMBLE, link.encode_preamble(
                link.Preamble("direct", cid, me, peer, "s", b"", now_ms())))
            return conn
        if path.kind is PathKind.REVERSED:
            return await self._reversed(peer, cid, timeout, hello)
        assert path.relay is not None
        conn, _, _ = await self.reach.dial(path.relay, timeout)
        conn.send(link.PREAMBLE, link.encode_preamble(
            link.Preamble("relay", cid, me, peer, "s", path.relay,
                          now_ms()).signed(self.site.keys.key)))
        return conn

    async def _reversed(self, peer: bytes, cid: bytes, timeout: float,
                        hello: bytes | None) -> DataConnection:
        if not self.site.addrs:
            raise OSError("this site has no address the receiver could dial")
        fut: asyncio.Future[DataConnection] = asyncio.get_running_loop().create_future()
        self.reverse_waiters[cid] = (peer, fut)
        try:
            if not await self.links.send(peer, peer_message(DialRequest(cid, hello))):
                raise OSError("no control link to the receiver")
            return await asyncio.wait_for(fut, timeout)
        finally:
            if self.reverse_waiters.get(cid, (None, None))[1] is fut:
                del self.reverse_waiters[cid]

    def take_reversed(self, conn: DataConnection, pre: link.Preamble) -> None:
        """The receiver dialed us back for a reversed path (preamble role ``r``)."""
        waiter = self.reverse_waiters.get(pre.cid)
        if waiter is None or waiter[0] != pre.sender or waiter[1].done():
            conn.refuse("unknown-channel: no reversed path is awaited for it")
            return
        conn.handler = None  # the attempt reads the inbox
        waiter[1].set_result(conn)

    def close_all(self) -> None:
        for ch in list(self.out.values()):
            ch.close()
