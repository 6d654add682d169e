"""Channels in the daemon: path race, end-to-end handshake, frames, delivery, relaying (glue).

The pure cores do the thinking (:mod:`meshd.channel`): :class:`~meshd.channel.paths.PathRace`
picks paths, :mod:`~meshd.channel.handshake` makes keys, :mod:`~meshd.channel.frames` seals,
:mod:`~meshd.channel.reliable` numbers, acks, resends and grants credit.  This module only moves
bytes between them, the data connections (:mod:`meshd.daemon.channels.connection`) and the applications' ipc
sockets.

Roles.  The *sending* site S owns a channel (:class:`OutChannel`): it races the paths, runs the
handshake as initiator, and after a lost connection races again and *resumes* (a sealed probe
under the channel's keys proves it is the same channel; the receiver answers with its feedback;
S resends every unacked frame).  The *receiving* site R keeps an :class:`InChannel` per channel
id: the responder side of the handshake, the receiver core, and the hand-off to the
application's receiver port.  A *relay* X pairs two signed legs and copies bytes.

Control messages (one-way ``chan`` peer messages over the membership links, ``op`` + msgpack
body): ``dial`` (S asks R to dial S for a reversed path), ``relay`` (X tells R that S waits at X),
``reach?`` (dial me back, please) and ``reach`` (how that went).  Every dial goes to addresses
in the target's signed site record (or seen on the LAN), never to an address a message names,
so no member can make another dial somewhere arbitrary.

Applications: a sender writes batches (:mod:`meshd.channel.batch`) to a PULL socket the daemon
binds per channel; a receiver reads ``[meta, batch]`` from a PUSH socket the daemon binds per
name.  Both over ipc in the site's home directory (mode 0700).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import struct
import tempfile
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path as FsPath
from typing import TYPE_CHECKING, Any

import msgpack
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from meshd.channel import batch, link
from meshd.channel.control import CTRL_CLOSE, CTRL_OPEN, check_name
from meshd.channel.events import AllAcked, Feedback, Probe, Transmit, Writable
from meshd.channel.frames import (
    FRAME_OVERHEAD,
    KIND_CONTROL,
    KIND_DATA,
    MAX_PAYLOAD,
    Block,
    Opener,
    Sealer,
)
from meshd.channel.handshake import ChannelKeys, Initiator, Responder
from meshd.channel.paths import (
    CancelAttempt,
    NoPath,
    Path,
    PathChosen,
    PathKind,
    PathRace,
    RaceConfig,
    StartAttempt,
)
from meshd.channel.reach import Observation, Outcome, ReachabilityTable, Tri
from meshd.channel.reliable import (
    Receiver,
    ReceiverConfig,
    Sender,
    SenderConfig,
    WouldBlock,
    decode_control,
    encode_control,
)
from meshd.daemon.channels.connection import DataConnection, dial_any
from meshd.errors import LocalError, ProtocolError
from meshd.trust.identity import site_id_of
from meshd.local.ring import DESCRIPTOR, RING_MARK, Ring, ring_worthy

if TYPE_CHECKING:
    from meshd.daemon.app import Daemon

log = logging.getLogger("meshd.daemon.channels.service")

PREAMBLE_TIMEOUT = 10.0
RELAY_WAIT = 10.0
MAX_RELAY_WAITING = 256
DIAL_TIMEOUT = 3.0
_COUNT = struct.Struct(">I")
_BIG_PAYLOAD = 64 << 10
"""Payloads at least this big are handed to ZeroMQ without a copy."""
_MAX_RETRY = 10.0


async def until_app_leaves(sock: zmq.asyncio.Socket) -> None:
    """Return once no application is connected to ``sock`` (an ipc socket the daemon bound)
    after one was, or after the only one that connected before this started watching left:
    how a daemon notices an application that died without closing its channel."""
    monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
    try:
        connected = 0
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())["event"]
            if event == zmq.EVENT_ACCEPTED:
                connected += 1
            elif event == zmq.EVENT_DISCONNECTED:
                connected -= 1
                if connected <= 0:
                    return
    finally:
        if not sock.closed:
            sock.disable_monitor()
        monitor.close(0)


def _pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def _unpack(data: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, max_bin_len=4096, max_str_len=4096,
                               max_array_len=64, max_map_len=16)
    except Exception:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"{what}: undecodable body", reason="malformed") from None


class _RSide:
    """What a receiving-end data connection is for, before and after it joins a channel."""

    __slots__ = ("cid", "inc", "path", "pending", "relay", "sender")

    def __init__(self, cid: bytes, sender: bytes, path: str, relay: bytes | None) -> None:
        self.cid = cid
        self.sender = sender
        self.path = path
        self.relay = relay
        self.pending: ChannelKeys | None = None
        self.inc: InChannel | None = None


# ================================================================================== sender side


class OutChannel:
    """The sending end of one channel (owned by the sending site)."""

    def __init__(self, svc: ChannelService, name: str, peer: bytes, kinds: Iterable[PathKind]):
        self.svc = svc
        self.ring: Ring | None = None
        """The application's shared-memory ring for big batches, once it hands one over
        (:meth:`ChannelService.attach_ring`, see :mod:`meshd.local.ring`)."""
        self.name = name
        self.peer = peer
        self.cid = secrets.token_bytes(16)
        cfg = svc.daemon.config
        self.sender = Sender(SenderConfig(max_buffer_bytes=cfg.channel_window_bytes,
                                          max_message_bytes=MAX_PAYLOAD,
                                          first_message_free=True),
                             seal=self._seal, overhead=FRAME_OVERHEAD)
        self.race = PathRace(svc.me, peer, svc.table, svc.relay_candidates(peer),
                             RaceConfig(), kinds=kinds)
        self.keys: ChannelKeys | None = None
        self.sealer: Sealer | None = None
        self.opener: Opener | None = None
        self.conn: DataConnection | None = None
        self.path: Path | None = None
        self.attempts: dict[Path, asyncio.Task[None]] = {}
        self.created = time.time()
        self.setup_s: float | None = None
        self.state = "negotiating"
        self.error: str | None = None
        self.messages = 0
        self.bytes = 0
        self.acked_messages = 0
        self.retransmits = 0
        self.renegotiations = 0
        self._marks: deque[tuple[int, int]] = deque()  # (batch seq, messages up to it)
        self._writable = asyncio.Event()
        self._acked = asyncio.Event()
        self._keyed = asyncio.Event()  # set once the first handshake gave us keys to seal with
        self._timer: asyncio.TimerHandle | None = None
        self._retry_s = 0.5
        self.endpoint = svc.ipc_endpoint(f"tx-{self.cid.hex()[:16]}")
        self.pull = svc.zctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.setsockopt(zmq.RCVHWM, 8)
        self.pull.setsockopt(zmq.MAXMSGSIZE, MAX_PAYLOAD)
        self.pull.bind(self.endpoint)
        self._in_hand = False  # a batch read from the app and not yet queued for sending
        self._reader = asyncio.create_task(self._read_app(), name=f"tx-{name}")
        self._reader.add_done_callback(self._reader_done)
        self._watcher = asyncio.create_task(self._watch_app(), name=f"tx-watch-{name}")

    def _reader_done(self, task: asyncio.Task[None]) -> None:
        """A bug must not leave a channel that silently stops reading its application."""
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("channel %r: reading the application failed", self.name, exc_info=exc)
            self.state, self.error = "failed", f"internal error: {exc!r}"[:200]

    # -- path race ---------------------------------------------------------------------------------

    def start(self) -> None:
        self.race.start(time.monotonic())
        self._drive()

    def _drive(self) -> None:
        for action in self.race.outgoing():
            if isinstance(action, StartAttempt):
                task = asyncio.create_task(self._attempt(action.path),
                                           name=f"attempt-{action.path}")
                self.attempts[action.path] = task
            elif isinstance(action, CancelAttempt):
                cancelled = self.attempts.pop(action.path, None)
                if cancelled is not None:
                    cancelled.cancel()
        for event in self.race.events():
            if isinstance(event, PathChosen):
                self.path = event.path
                self.state = "open"
                self._retry_s = 0.5
                if self.setup_s is None:
                    self.setup_s = event.setup_s
                log.info("channel %r to %s: %s in %.1f ms", self.name,
                         self.svc.daemon.view.name_of(self.peer), self._path_text(),
                         event.setup_s * 1000)
            elif isinstance(event, NoPath):
                self.path = None
                self.state = "no-path"
                self.error = "; ".join(f"{p}: {r}" for p, r in event.reasons)
                log.warning("channel %r to %s: no path (%s); retrying in %.1f s", self.name,
                            self.svc.daemon.view.name_of(self.peer), self.error, self._retry_s)
                asyncio.get_running_loop().call_later(self._retry_s, self._renegotiate,
                                                      "no-path")
                self._retry_s = min(self._retry_s * 2, _MAX_RETRY)
        self._arm()

    def _renegotiate(self, reason: str) -> None:
        if self.state == "closed" or not self.race.done:
            return
        self.renegotiations += 1
        self.state = "negotiating"
        self.race.renegotiate(time.monotonic(), reason,
                              relays=self.svc.relay_candidates(self.peer))
        self._drive()

    async def _attempt(self, path: Path) -> None:
        conn: DataConnection | None = None
        svc = self.svc
        timeout = self.race.config.attempt_timeout
        try:
            t0 = time.monotonic()
            resume_keys = self.keys
            init = (Initiator(svc.daemon.key, self.peer, self.cid, now=time.time())
                    if resume_keys is None else None)
            # A reversed path carries the Hello in its dial request: the receiver answers
            # with Accept right after its preamble, one round trip sooner.
            hello_in_dial = init is not None and path.kind is PathKind.REVERSED
            conn = await self._connect(path, timeout,
                                       hello=init.hello if init and hello_in_dial else None)
            if init is not None:
                if not hello_in_dial:
                    conn.send(link.HELLO, init.hello)
                body = await conn.expect(link.ACCEPT, timeout=timeout)
                keys = init.on_accept(bytes(body))
                fb = None
            else:
                assert resume_keys is not None and self.sealer is not None
                keys = resume_keys
                conn.send(link.FRAME, self.sealer.seal_control(encode_control(Probe())))
                fb = await self._await_feedback(conn, timeout)
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
            if not self.race.done:
                self.race.attempt_failed(path, time.monotonic(), f"{reason}: {exc}"[:200])
                self._drive()
            return
        self.attempts.pop(path, None)
        if path not in self.race.running:  # another attempt won meanwhile
            conn.close()
            return
        self._adopt(conn, keys, fb)
        self.race.attempt_succeeded(path, time.monotonic(), rtt)
        self._drive()

    async def _connect(self, path: Path, timeout: float,
                       hello: bytes | None = None) -> DataConnection:
        svc = self.svc
        me = svc.me
        if path.kind is PathKind.DIRECT:
            conn, address, rtt = await svc.dial(self.peer, timeout)
            conn.send(link.PREAMBLE, link.encode_preamble(
                link.Preamble("direct", self.cid, me, self.peer, "s", b"", svc.now_ms())))
            return conn
        if path.kind is PathKind.REVERSED:
            if not svc.daemon.addrs:
                raise OSError("this site has no address the receiver could dial")
            fut: asyncio.Future[DataConnection] = asyncio.get_running_loop().create_future()
            svc.reverse_waiters[self.cid] = (self.peer, fut)
            try:
                request: dict[str, Any] = {"cid": self.cid}
                if hello is not None:
                    request["hello"] = hello
                if not await svc.send_control(self.peer, "dial", request):
                    raise OSError("no control link to the receiver")
                return await asyncio.wait_for(fut, timeout)
            finally:
                if svc.reverse_waiters.get(self.cid, (None, None))[1] is fut:
                    del svc.reverse_waiters[self.cid]
        assert path.relay is not None
        conn, address, rtt = await svc.dial(path.relay, timeout)
        conn.send(link.PREAMBLE, link.encode_preamble(
            link.Preamble("relay", self.cid, me, self.peer, "s", path.relay,
                          svc.now_ms()).signed(svc.daemon.key)))
        return conn

    async def _await_feedback(self, conn: DataConnection, timeout: float) -> Feedback:
        assert self.opener is not None
        while True:
            body = await conn.expect(link.FRAME, timeout=timeout)
            frame = self.opener.open(body)
            if frame.kind == KIND_CONTROL:
                msg = decode_control(frame.payload)
                if isinstance(msg, Feedback):
                    return msg

    def _adopt(self, conn: DataConnection, keys: ChannelKeys, fb: Feedback | None) -> None:
        now = time.monotonic()
        old, self.conn = self.conn, conn
        if old is not None and old is not conn:
            old.close()
        conn.owner = self
        conn.on_lost = self._lost
        if self.keys is None:
            self.keys = keys
            self.sealer = Sealer.for_channel(keys)
            self.opener = Opener.for_channel(keys)
            self._keyed.set()
            conn.send(link.FRAME, self.sealer.seal_control(bytes([CTRL_OPEN])
                                                           + self.name.encode()))
        else:
            self.sender.on_reconnect(now=now)
            if fb is not None:
                self.sender.on_feedback(fb, now=now)
        conn.handler = self._on_record
        while not conn.inbox.empty():
            item = conn.inbox.get_nowait()
            if item is not None:
                self._on_record(conn, *item)
        self._after_input()

    def _lost(self, conn: DataConnection) -> None:
        if conn is not self.conn:
            return
        self.conn = None
        if self.state == "closed":
            return
        log.info("channel %r to %s: connection lost (%s); renegotiating", self.name,
                 self.svc.daemon.view.name_of(self.peer), conn.error or "closed")
        self.svc.record_lost(self.peer, self.path)
        self._renegotiate("connection-lost")

    # -- frames ------------------------------------------------------------------------------------

    def _seal(self, seq: int, payload: Any) -> Block:
        assert self.sealer is not None
        return self.sealer.seal(seq, payload)

    def _on_record(self, conn: DataConnection, kind: int, body: Block) -> None:
        if conn is not self.conn:
            return
        if kind == link.REFUSE:
            conn.error = bytes(body[:200]).decode("utf-8", "replace")
            conn.close()
            return
        if kind != link.FRAME:
            raise ProtocolError(f"record type {kind} on an open channel", reason="unexpected")
        assert self.opener is not None
        frame = self.opener.open(body)
        if frame.kind != KIND_CONTROL:
            raise ProtocolError("a data frame from the receiver", reason="unexpected")
        msg = decode_control(frame.payload)
        if isinstance(msg, Feedback):
            self.sender.on_feedback(msg, now=time.monotonic())
        self._after_input()

    def _after_input(self) -> None:
        for event in self.sender.events():
            if isinstance(event, Writable):
                self._writable.set()
            elif isinstance(event, AllAcked):
                pass
        first = self.sender.first_unacked
        progressed = False
        while self._marks and self._marks[0][0] < first:
            self.acked_messages = self._marks.popleft()[1]
            progressed = True
        if progressed:
            self._acked.set()
            self._acked = asyncio.Event()
        self._transmit()
        self._arm()

    def _transmit(self) -> None:
        conn = self.conn
        for item in self.sender.take_outgoing():
            if conn is None:
                continue  # resent from the buffer on the next connection
            if isinstance(item, Transmit):
                conn.send(link.FRAME, item.frame)
                self.retransmits += item.resend
            else:
                assert self.sealer is not None
                conn.send(link.FRAME, self.sealer.seal_control(encode_control(item)))

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        times = [t for t in (self.sender.get_timer(), self.race.get_timer()) if t is not None]
        if not times or self.state == "closed":
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, min(times) - time.monotonic())
        self._timer = loop.call_at(loop.time() + delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = time.monotonic()
        self.race.handle_timer(now)
        self.sender.handle_timer(now)
        self._drive()
        self._transmit()

    # -- the application's side ----------------------------------------------------------------------

    def _app_batch(self, parts: list[zmq.Frame]) -> tuple[memoryview, int | None]:
        """The batch an application message carries, inline or in the ring (then also the
        ring offset to release once it is sealed); ProtocolError if it is malformed."""
        if len(parts) == 1:
            return parts[0].buffer, None
        if len(parts) == 2 and parts[0].bytes == RING_MARK and self.ring is not None:
            start, view = self.ring.record(parts[1].bytes)
            return view, start + view.nbytes
        raise ProtocolError(f"an application message of {len(parts)} parts", reason="frames")

    async def _watch_app(self) -> None:
        """An application that dies without closing its sender: what it handed over still goes
        through, then the channel closes itself (its resend buffer and ring are freed)."""
        await until_app_leaves(self.pull)
        if self.state == "closed":
            return
        log.info("channel %r to %s: the application is gone; closing once the receiver has"
                 " everything it sent", self.name, self.svc.daemon.view.name_of(self.peer))
        while self.state != "closed":
            if (not self._in_hand and not int(self.pull.get(zmq.EVENTS)) & zmq.POLLIN
                    and self.acked_messages >= self.messages):
                self.svc.count("orphans_closed")
                self.svc.close_sender(self.cid)
                return
            try:
                await asyncio.wait_for(self._acked.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    async def _read_app(self) -> None:
        while True:
            self._in_hand = False
            parts = await self.pull.recv_multipart(copy=False)
            self._in_hand = True
            release = None
            try:
                buf, release = self._app_batch(parts)
                count = batch.check(buf)  # a malformed batch never reaches the far app
            except ProtocolError as exc:
                log.warning("channel %r: dropped a malformed message from the application: %s",
                            self.name, exc)
                if release is not None and self.ring is not None:
                    self.ring.release(release)
                continue
            n = buf.nbytes
            await self._keyed.wait()  # the first message needs no credit, but it needs keys
            while True:
                try:
                    seq = self.sender.send(buf, now=time.monotonic())
                    break
                except WouldBlock:
                    self._writable.clear()
                    self._arm()
                    await self._writable.wait()
            if release is not None:  # sealed: the sealed copy is what the resend buffer keeps
                assert self.ring is not None
                self.ring.release(release)
            self.messages += count
            self.bytes += n
            self._marks.append((seq, self.messages))
            self._transmit()
            self._arm()
            conn = self.conn
            if conn is not None and not conn.writable.is_set():
                await conn.writable.wait()

    async def flush(self, messages: int, timeout: float | None) -> int:
        """Wait until the receiver's daemon has acknowledged ``messages`` messages."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self.acked_messages < messages:
            if self.state == "closed":
                raise LocalError("the channel is closed", reason="closed")
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise LocalError(f"flush timed out: {self.acked_messages} of {messages}"
                                 f" messages acknowledged ({self.state})", reason="timeout")
            try:
                await asyncio.wait_for(self._acked.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        return self.acked_messages

    def close(self) -> None:
        if self.state == "closed":
            return
        self.state = "closed"
        self._reader.cancel()
        if self._watcher is not asyncio.current_task():
            self._watcher.cancel()
        for task in self.attempts.values():
            task.cancel()
        if self._timer is not None:
            self._timer.cancel()
        if self.conn is not None:
            if self.sealer is not None:
                self.conn.send(link.FRAME, self.sealer.seal_control(bytes([CTRL_CLOSE])))
            self.conn.close()
        self.pull.close(0)
        self.svc.remove_ipc(self.endpoint)
        if self.ring is not None:
            self.ring.close()

    def _path_text(self) -> str:
        if self.path is None:
            return "no path yet"
        if self.path.relay is not None:
            return f"relay via {self.svc.daemon.view.name_of(self.path.relay)}"
        return self.path.kind.value

    def describe(self) -> dict[str, Any]:
        elapsed = max(1e-9, time.time() - self.created)
        return {
            "id": self.cid.hex(), "name": self.name, "direction": "out",
            "peer": self.svc.daemon.view.name_of(self.peer), "peer_id": site_id_of(self.peer),
            "path": self.path.kind.value if self.path else None,
            "relay": (self.svc.daemon.view.name_of(self.path.relay)
                      if self.path and self.path.relay else None),
            "state": self.state, "error": self.error if self.state != "open" else None,
            "bytes": self.bytes, "messages": self.messages,
            "acked_messages": self.acked_messages,
            "rate_Bps": round(self.bytes / elapsed), "retransmits": self.retransmits,
            "renegotiations": self.renegotiations,
            "setup_ms": None if self.setup_s is None else round(self.setup_s * 1000, 3),
            "buffered_bytes": self.sender.buffered_bytes,
        }


# ================================================================================ receiver side


class InChannel:
    """The receiving end of one channel."""

    def __init__(self, svc: ChannelService, side: _RSide, keys: ChannelKeys, opener: Opener,
                 name: str) -> None:
        self.svc = svc
        self.cid = side.cid
        self.sender = side.sender
        self.name = name
        self.keys = keys
        self.opener = opener
        self.sealer = Sealer.for_channel(keys)
        cfg = svc.daemon.config
        self.rx = Receiver(ReceiverConfig(window_messages=cfg.channel_window_messages,
                                          window_bytes=cfg.channel_window_bytes))
        self.conn: DataConnection | None = None
        self.path = side.path
        self.relay = side.relay
        self.created = time.time()
        self.messages = 0
        self.bytes = 0
        self.closed_by_sender = False
        self._feedback_due = False

    def adopt(self, conn: DataConnection, side: _RSide) -> None:
        self.conn = conn
        self.path, self.relay = side.path, side.relay
        side.inc = self

    def on_frame(self, conn: DataConnection, side: _RSide, body: Block) -> None:
        frame = self.opener.open(body)  # ProtocolError: the connection is dropped, not the channel
        if conn is not self.conn:
            self.adopt(conn, side)
        if frame.kind == KIND_DATA:
            self.rx.on_data(frame.seq, frame.payload)
        else:
            self._on_control(frame.payload)
        self.svc.wake_port(self.name)
        self.schedule_feedback()

    def _on_control(self, payload: Block) -> None:
        if bytes(payload[:1]) == bytes([CTRL_OPEN]):
            return
        if bytes(payload[:1]) == bytes([CTRL_CLOSE]):
            self.closed_by_sender = True
            return
        msg = decode_control(payload)
        if isinstance(msg, Probe):
            self.rx.on_probe()

    def schedule_feedback(self) -> None:
        if not self._feedback_due:
            self._feedback_due = True
            asyncio.get_running_loop().call_soon(self._send_feedback)

    def _send_feedback(self) -> None:
        self._feedback_due = False
        conn = self.conn
        if conn is None:
            return
        fb = self.rx.take_feedback()
        if fb is not None:
            conn.send(link.FRAME, self.sealer.seal_control(encode_control(fb)))

    def lost(self, conn: DataConnection) -> None:
        if conn is self.conn:
            self.conn = None
            self.rx.on_reconnect()  # the next connection starts with fresh feedback

    def describe(self) -> dict[str, Any]:
        view = self.svc.daemon.view
        elapsed = max(1e-9, time.time() - self.created)
        return {
            "id": self.cid.hex(), "name": self.name, "direction": "in",
            "peer": view.name_of(self.sender), "peer_id": site_id_of(self.sender),
            "path": self.path, "relay": view.name_of(self.relay) if self.relay else None,
            "state": "closed" if self.closed_by_sender else ("open" if self.conn else
                                                              "waiting"),
            "bytes": self.bytes, "messages": self.messages,
            "rate_Bps": round(self.bytes / elapsed), "retransmits": None,
            "duplicates": self.rx.duplicates, "held_bytes": self.rx.held_bytes,
            "held_messages": self.rx.held_messages,
        }


class ReceiverPort:
    """An application's receiver for one channel name: a PUSH socket the daemon feeds."""

    def __init__(self, svc: ChannelService, name: str, allow: frozenset[bytes] | None,
                 ring: Ring | None = None) -> None:
        self.svc = svc
        self.name = name
        self.allow = allow
        self.ring = ring
        """Shared memory the application maps: big payloads go there, not through the socket."""
        self.endpoint = svc.ipc_endpoint(f"rx-{secrets.token_hex(8)}")
        self.sock = svc.zctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 4)
        self.sock.bind(self.endpoint)
        self.wake = asyncio.Event()
        self.wake.set()
        self.task = asyncio.create_task(self._run(), name=f"rx-{name}")
        self._watcher = asyncio.create_task(self._watch_app(), name=f"rx-watch-{name}")

    async def _watch_app(self) -> None:
        """An application that dies without closing its receiver: the port closes, and what
        arrives for the name is held (within the window) until a new receiver opens it."""
        await until_app_leaves(self.sock)
        if self.svc.ports.get(self.name) is self:
            log.info("receiver %r: the application is gone; closing it", self.name)
            self.svc.count("orphans_closed")
            self.svc.close_receiver(self.name)

    async def _run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            progressed = True
            while progressed:
                progressed = False
                for inc in [c for c in self.svc.inc.values() if c.name == self.name]:
                    msg = inc.rx.pop()
                    if msg is None:
                        continue
                    progressed = True
                    payload = msg.payload
                    count = _COUNT.unpack_from(payload, 0)[0] if len(payload) >= 4 else 0
                    meta = _pack([inc.cid, inc.sender, inc.messages,
                                  self.svc.daemon.view.name_of(inc.sender)])
                    inc.messages += count
                    inc.bytes += len(payload)
                    inc.schedule_feedback()
                    await self.sock.send_multipart(self._delivery(meta, payload, count),
                                                   copy=len(payload) < _BIG_PAYLOAD)
            self.svc.gc_inbound()

    def _delivery(self, meta: bytes, payload: Any, count: int) -> list[Any]:
        """The frames that hand ``payload`` (a batch of ``count`` messages) to the application: a
        descriptor of a ring record when the batch is worth it and the ring has room, else the
        payload itself."""
        n = len(payload)
        if self.ring is not None and ring_worthy(n, count):
            start = self.ring.reserve(n)
            if start is not None:
                self.ring.region(start, n)[:] = payload
                return [meta, RING_MARK, DESCRIPTOR.pack(start, n)]
        return [meta, payload]

    def close(self) -> None:
        self.task.cancel()
        if self._watcher is not asyncio.current_task():
            self._watcher.cancel()
        self.sock.close(0)
        self.svc.remove_ipc(self.endpoint)
        if self.ring is not None:
            self.ring.unlink()
            self.ring.close()


# ================================================================================== the service


class ChannelService:
    """Every channel of one daemon, the relay, and the reachability checks."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.table = ReachabilityTable()
        self.responder = Responder(daemon.key, not_before=time.time())
        self.out: dict[bytes, OutChannel] = {}
        self.inc: dict[bytes, InChannel] = {}
        self.ports: dict[str, ReceiverPort] = {}
        self.reverse_waiters: dict[bytes, tuple[bytes, asyncio.Future[DataConnection]]] = {}
        self.relay_waiting: dict[tuple[bytes, bytes, bytes], DataConnection] = {}
        self.relayed: dict[tuple[bytes, bytes, bytes], tuple[DataConnection, DataConnection,
                                                                float]] = {}
        self.relayed_bytes = 0
        self.counters: dict[str, int] = {}
        self._ipc_dir: FsPath | None = None
        self._reach_wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pending_conns: set[DataConnection] = set()

    @property
    def me(self) -> bytes:
        return self.daemon.key.public

    @property
    def zctx(self) -> zmq.asyncio.Context:
        assert self.daemon._ctx is not None
        return self.daemon._ctx

    def count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1
        self.daemon.count(f"channel_{name}")

    @staticmethod
    def now_ms() -> int:
        return int(time.time() * 1000)

    def start(self) -> None:
        self._spawn(self._reach_loop(), "reach-loop")

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def stop(self) -> None:
        for ch in list(self.out.values()):
            ch.close()
        for port in list(self.ports.values()):
            port.close()
        for a, b, _ in self.relayed.values():
            a.close()
            b.close()
        for conn in list(self._pending_conns) + list(self.relay_waiting.values()):
            conn.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- ipc endpoints -----------------------------------------------------------------------------

    def ipc_endpoint(self, name: str) -> str:
        root = self.daemon.home.root
        path = root / name
        if len(str(path)) > 100:  # sun_path is 108 bytes
            if self._ipc_dir is None:
                self._ipc_dir = FsPath(tempfile.mkdtemp(prefix="meshd-"))
            path = self._ipc_dir / name
        return f"ipc://{path}"

    @staticmethod
    def remove_ipc(endpoint: str) -> None:
        try:
            os.unlink(endpoint.removeprefix("ipc://"))
        except OSError:
            pass

    # -- dialing and control messages --------------------------------------------------------------

    async def dial(self, key: bytes, timeout: float) -> tuple[DataConnection, str, float]:
        addrs = self.daemon.dial_addresses(key)
        try:
            conn, address, rtt = await dial_any(addrs, timeout=min(timeout, DIAL_TIMEOUT))
        except (OSError, asyncio.TimeoutError):
            self.table.record(Observation(self.me, key, Outcome.FAILED, time.time()))
            raise
        self.table.record(Observation(self.me, key, Outcome.OK, time.time(), rtt))
        return conn, address, rtt

    async def send_control(self, key: bytes, op: str, body: dict[str, Any]) -> bool:
        return await self.daemon.send_to_member(key, {"t": "chan", "id": 0, "op": op,
                                                      "b": _pack(body)})

    def relay_candidates(self, peer: bytes) -> list[bytes]:
        view = self.daemon.view
        out = []
        for key in view.members:
            if key in (self.me, peer):
                continue
            rec = view.record_of(key)
            state = self.daemon.membership.state_of(key)["state"]
            if rec is not None and rec.reachable and rec.addrs and state in ("alive", "suspect"):
                out.append(key)
        return out

    def record_lost(self, peer: bytes, path: Path | None) -> None:
        pass  # the race excludes the lost path for a while; the table keeps its observations

    def on_control(self, key: bytes, op: str, body: bytes) -> None:
        """A ``chan`` message from member ``key`` (authenticated by the peer link)."""
        self.count(f"control_{op.replace('?', '_req')}")
        try:
            msg = _unpack(body, op)
            if not isinstance(msg, dict):
                raise ProtocolError(f"{op}: body is not a map", reason="malformed")
            if op == "dial":
                hello = msg.get("hello")
                if hello is not None and not isinstance(hello, bytes):
                    raise ProtocolError("dial: hello is not bytes", reason="malformed")
                self._spawn(self._dial_back_for_channel(key, _bin(msg, "cid", 16), hello),
                            "chan-dial")
            elif op == "relay":
                self._spawn(self._join_relay(key, _bin(msg, "cid", 16), _bin(msg, "from", 32)),
                            "chan-relay")
            elif op == "reach?":
                self._spawn(self._answer_reach(key), "reach-answer")
            elif op == "reach":
                self._take_reach(key, msg)
            else:
                raise ProtocolError(f"unknown channel operation {op!r}", reason="type")
        except ProtocolError as exc:
            log.info("dropped a %s message from %s: %s", op, self.daemon.view.name_of(key), exc)

    # -- incoming data connections -----------------------------------------------------------------

    def accept(self, transport: asyncio.Transport, first: bytes) -> DataConnection:
        """The port multiplexer hands over a connection that is not ZeroMQ."""
        conn = DataConnection(self._conn_lost)
        conn.handler = self._on_preamble
        self._pending_conns.add(conn)
        asyncio.get_running_loop().call_later(PREAMBLE_TIMEOUT, self._preamble_deadline, conn)
        self.count("accepted")
        return conn

    def _preamble_deadline(self, conn: DataConnection) -> None:
        if conn in self._pending_conns:
            self._pending_conns.discard(conn)
            conn.abort("no preamble in time")

    def _conn_lost(self, conn: DataConnection) -> None:
        self._pending_conns.discard(conn)
        owner = conn.owner
        if isinstance(owner, _RSide) and owner.inc is not None:
            owner.inc.lost(conn)

    def _on_preamble(self, conn: DataConnection, kind: int, body: Block) -> None:
        self._pending_conns.discard(conn)
        if kind != link.PREAMBLE:
            raise ProtocolError("a data connection must start with a preamble",
                                reason="malformed")
        pre = link.decode_preamble(body)
        view = self.daemon.view
        if pre.mode == "probe":
            self.count("probes_answered")
            conn.handler = None
            conn.close()
            return
        if not view.is_member(pre.sender):
            self.count("refused_not_member")
            conn.refuse("not-member: this site does not know you as a member")
            return
        if pre.mode == "relay":
            self._relay_leg(conn, pre)
            return
        if pre.to != self.me:
            conn.refuse("wrong-site: this is not the site you asked for")
            return
        if pre.role == "s":  # the sender dialed us: we are the receiving end
            side = _RSide(pre.cid, pre.sender, "direct", None)
            conn.owner = side
            conn.handler = self._on_receiving_record
            return
        waiter = self.reverse_waiters.get(pre.cid)
        if waiter is None or waiter[0] != pre.sender or waiter[1].done():
            conn.refuse("unknown-channel: no reversed path is awaited for it")
            return
        conn.handler = None  # the attempt reads the inbox
        waiter[1].set_result(conn)

    # -- the receiving end ---------------------------------------------------------------------------

    async def _dial_back_for_channel(self, sender: bytes, cid: bytes,
                                     hello: bytes | None = None) -> None:
        """A sender asked us to dial it (a reversed path), maybe with its Hello inside.

        The Hello is checked before dialing, so a bad one costs no connection; the Accept
        then follows the preamble on the new connection."""
        if "reversed" not in self._accepted_kinds():
            return
        accepted: tuple[bytes, ChannelKeys] | None = None
        if hello is not None:
            try:
                accepted = self._answer_hello(sender, cid, hello)
                self.count("hello_in_dial")
            except ProtocolError as exc:
                self.count("refused_hello")
                log.info("refused a reversed channel from %s: %s",
                         self.daemon.view.name_of(sender), exc)
                return
        try:
            conn, _, _ = await self.dial(sender, DIAL_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            log.info("cannot dial %s back for a channel: %s", self.daemon.view.name_of(sender), exc)
            return
        self._start_receiving_end(conn, cid, sender, "reversed", None)
        conn.send(link.PREAMBLE, link.encode_preamble(
            link.Preamble("direct", cid, self.me, sender, "r", b"", self.now_ms())))
        if accepted is not None:
            side = conn.owner
            assert isinstance(side, _RSide)
            accept, side.pending = accepted
            conn.send(link.ACCEPT, accept)

    def _answer_hello(self, sender: bytes, cid: bytes, hello: bytes) -> tuple[bytes, ChannelKeys]:
        """Check a sender's Hello for channel ``cid``; ProtocolError if it is not acceptable."""
        allowed = {sender} if self.daemon.view.is_member(sender) else set()
        accept, keys = self.responder.on_hello(hello, now=time.time(), peers=allowed)
        if keys.channel_id != cid:
            raise ProtocolError("Hello for another channel", reason="wrong-channel")
        return accept, keys

    async def _join_relay(self, relay: bytes, cid: bytes, sender: bytes) -> None:
        """A relay says a sender waits there for us."""
        if not self.daemon.view.is_member(sender):
            return
        try:
            conn, _, _ = await self.dial(relay, DIAL_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            log.info("cannot dial relay %s: %s", self.daemon.view.name_of(relay), exc)
            return
        self._start_receiving_end(conn, cid, sender, "relay", relay)
        conn.send(link.PREAMBLE, link.encode_preamble(
            link.Preamble("relay", cid, self.me, sender, "r", relay,
                          self.now_ms()).signed(self.daemon.key)))

    def _accepted_kinds(self) -> list[str]:
        return ["direct", "reversed", "relay"]

    def _start_receiving_end(self, conn: DataConnection, cid: bytes, sender: bytes, path: str,
                             relay: bytes | None) -> None:
        conn.on_lost = self._conn_lost
        conn.owner = _RSide(cid, sender, path, relay)
        conn.handler = self._on_receiving_record

    def _on_receiving_record(self, conn: DataConnection, kind: int, body: Block) -> None:
        side = conn.owner
        assert isinstance(side, _RSide)
        if kind == link.HELLO:
            if side.inc is not None or side.pending is not None:
                raise ProtocolError("a second Hello on one connection", reason="unexpected")
            accept, side.pending = self._answer_hello(side.sender, side.cid, bytes(body))
            conn.send(link.ACCEPT, accept)
            return
        if kind == link.REFUSE:
            conn.close()
            return
        if kind != link.FRAME:
            raise ProtocolError(f"record type {kind} at a receiving end", reason="unexpected")
        inc = side.inc or self.inc.get(side.cid)
        if inc is not None:
            if inc.sender != side.sender:
                raise ProtocolError("frame for another site's channel", reason="wrong-channel")
            inc.on_frame(conn, side, body)
            return
        if side.pending is None:
            conn.refuse("unknown-channel: this site has no such channel (restarted?)")
            self.count("refused_unknown_channel")
            return
        opener = Opener.for_channel(side.pending)
        frame = opener.open(body)
        if frame.kind != KIND_CONTROL or bytes(frame.payload[:1]) != bytes([CTRL_OPEN]):
            raise ProtocolError("a channel must start with its name", reason="unexpected")
        try:
            name = check_name(bytes(frame.payload[1:]).decode())
        except (UnicodeDecodeError, LocalError):
            raise ProtocolError("bad channel name", reason="malformed") from None
        port = self.ports.get(name)
        if port is not None and port.allow is not None and side.sender not in port.allow:
            self.count("refused_policy")
            conn.refuse(f"not-allowed: channel {name!r} does not take messages from you")
            return
        inc = InChannel(self, side, side.pending, opener, name)
        self.inc[side.cid] = inc
        inc.adopt(conn, side)
        log.info("channel %r from %s open (%s%s)", name, self.daemon.view.name_of(side.sender),
                 side.path, f" via {self.daemon.view.name_of(side.relay)}" if side.relay else "")
        self.wake_port(name)
        inc.schedule_feedback()

    def wake_port(self, name: str) -> None:
        port = self.ports.get(name)
        if port is not None:
            port.wake.set()

    def gc_inbound(self) -> None:
        for cid, inc in list(self.inc.items()):
            if inc.closed_by_sender and inc.rx.held_messages == 0:
                del self.inc[cid]
                if inc.conn is not None:
                    inc.conn.close()

    # -- relaying ----------------------------------------------------------------------------------

    def _relay_leg(self, conn: DataConnection, pre: link.Preamble) -> None:
        if pre.relay != self.me:
            conn.refuse("wrong-relay")
            return
        if not self.daemon.config.relay:
            self.count("relay_refused_disabled")
            conn.refuse("relaying-disabled: this site does not relay")
            return
        why = pre.verify(self.now_ms())
        if why is not None:
            self.count("relay_refused_signature")
            conn.refuse(f"{why}: relay preamble")
            return
        if not self.daemon.view.is_member(pre.to):
            conn.refuse("not-member: the far end is not a member")
            return
        s, r = (pre.sender, pre.to) if pre.role == "s" else (pre.to, pre.sender)
        key = (pre.cid, s, r)
        conn.handler = None
        conn.hold()
        if pre.role == "s":
            # A held leg does not read, so it cannot notice that its sender gave up: a new leg
            # for the same channel (a later attempt, signed by the same sender) replaces it.
            old = self.relay_waiting.pop(key, None)
            if old is not None:
                old.refuse("replaced: a newer leg for this channel arrived")
            if len(self.relay_waiting) >= MAX_RELAY_WAITING:
                conn.refuse("busy: too many legs waiting")
                return
            self.relay_waiting[key] = conn
            conn.owner = ("relay-leg", key)
            conn.on_lost = lambda c: self._relay_leg_lost(key, c)
            asyncio.get_running_loop().call_later(RELAY_WAIT, self._relay_leg_expired, key, conn)
            self._spawn(self._notify_relay_receiver(key, conn), "relay-notify")
            return
        partner = self.relay_waiting.pop(key, None)
        if partner is None:
            conn.refuse("unknown-channel: no sender waits here for this channel")
            return
        partner.on_lost = lambda c: self._relay_done(key)
        conn.on_lost = lambda c: self._relay_done(key)
        partner.splice(conn)
        conn.splice(partner)
        self.relayed[key] = (partner, conn, time.time())
        self.count("relayed")
        log.info("relaying a channel from %s to %s", self.daemon.view.name_of(s),
                 self.daemon.view.name_of(r))

    async def _notify_relay_receiver(self, key: tuple[bytes, bytes, bytes],
                                     conn: DataConnection) -> None:
        cid, s, r = key
        if not await self.send_control(r, "relay", {"cid": cid, "from": s}):
            if self.relay_waiting.get(key) is conn:
                del self.relay_waiting[key]
                conn.refuse("unreachable: the relay cannot reach the far end")

    def _relay_leg_lost(self, key: tuple[bytes, bytes, bytes], conn: DataConnection) -> None:
        if self.relay_waiting.get(key) is conn:
            del self.relay_waiting[key]

    def _relay_leg_expired(self, key: tuple[bytes, bytes, bytes], conn: DataConnection) -> None:
        if self.relay_waiting.get(key) is conn:
            del self.relay_waiting[key]
            conn.refuse("timeout: the far end did not come to the relay")

    def _relay_done(self, key: tuple[bytes, bytes, bytes]) -> None:
        pair = self.relayed.pop(key, None)
        if pair is not None:
            a, b, _ = pair
            self.relayed_bytes += a.bytes_in + b.bytes_in
            a.close()
            b.close()

    # -- reachability ------------------------------------------------------------------------------

    def on_members_changed(self) -> None:
        """The member set, or a member's record, changed: forget what we knew about dialing a
        site whose advertised addresses changed (ours included), then re-check."""
        now = time.time()
        view = self.daemon.view
        current: dict[bytes, list[str]] = {self.me: list(self.daemon.addrs)}
        for key in view.members:
            rec = view.record_of(key)
            if key != self.me and rec is not None:
                current[key] = list(rec.addrs)
        for key, addrs in current.items():
            if self.table.note_addresses(key, addrs, now):
                self.count("reach_addresses_changed")
                log.info("%s advertises new addresses %s: checking reachability again",
                         "this site" if key == self.me else view.name_of(key), addrs)
        for key in self.table.members_with_addresses() - current.keys():
            self.table.forget(key)
        self._reach_wake.set()

    async def _reach_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._reach_wake.wait(), self.daemon.config.reach_interval)
            except asyncio.TimeoutError:
                pass
            self._reach_wake.clear()
            now = time.time()
            self.table.prune(now)
            view = self.daemon.view
            if view.mesh_id is None or not self.daemon.addrs:
                continue  # nobody can dial a site without addresses
            alive = [k for k in view.members if k != self.me
                     and self.daemon.membership.state_of(k)["state"] in ("alive", "suspect")]
            for key in self.table.dial_back_plan(self.me, alive, now):
                await self.send_control(key, "reach?", {})

    async def _answer_reach(self, asker: bytes) -> None:
        """Dial ``asker`` at each of its addresses and say how it went."""
        results: list[tuple[str, bool, float]] = []
        for address in self.daemon.dial_addresses(asker)[:8]:
            t0 = time.monotonic()
            try:
                conn, _, rtt = await dial_any([address], timeout=DIAL_TIMEOUT)
            except (OSError, asyncio.TimeoutError):
                results.append((address, False, 0.0))
                continue
            conn.send(link.PREAMBLE, link.encode_preamble(
                link.Preamble("probe", bytes(16), self.me, asker, "s", b"", self.now_ms())))
            conn.close()
            results.append((address, True, time.monotonic() - t0))
        ok = [r for r in results if r[1]]
        outcome = Outcome.OK if ok else (Outcome.FAILED if results else Outcome.UNKNOWN)
        self.table.record(Observation(self.me, asker, outcome, time.time(),
                                      ok[0][2] if ok else None))
        await self.send_control(asker, "reach", {"results": results})

    def _take_reach(self, dialer: bytes, msg: dict[str, Any]) -> None:
        results = msg.get("results")
        if not isinstance(results, list):
            raise ProtocolError("reach: results missing", reason="malformed")
        ok = [r for r in results if isinstance(r, list) and len(r) == 3 and r[1] is True
              and isinstance(r[2], (int, float))]
        outcome = Outcome.OK if ok else (Outcome.FAILED if results else Outcome.UNKNOWN)
        self.table.record(Observation(dialer, self.me, outcome, time.time(),
                                      float(ok[0][2]) if ok else None))

    def reach_of(self, key: bytes) -> dict[str, str]:
        now = time.time()
        word = {Tri.YES: "yes", Tri.NO: "no", Tri.UNKNOWN: "unknown"}
        return {"we_dial": word[self.table.can_dial(self.me, key, now)],
                "dials_us": word[self.table.can_dial(key, self.me, now)]}

    # -- the application API -------------------------------------------------------------------------

    def open_sender(self, name: str, to: bytes, paths: list[str] | None = None) -> OutChannel:
        check_name(name)
        view = self.daemon.view
        if to == self.me:
            raise LocalError("a channel to this site itself", reason="bad-peer")
        if not view.is_member(to):
            raise LocalError("that site is not a member of this mesh", reason="not-member")
        allowed = paths or self.daemon.config.paths
        kinds = [PathKind(p) for p in allowed if p in self.daemon.config.paths]
        if not kinds:
            raise LocalError(f"none of the paths {allowed} is allowed by this site's config",
                             reason="bad-path")
        ch = OutChannel(self, name, to, kinds)
        self.out[ch.cid] = ch
        ch.start()
        return ch

    @staticmethod
    def attach_ring(ch: OutChannel, path: str) -> bool:
        """Map the shared-memory ring a sending application made (once per channel)."""
        if ch.ring is not None:
            raise LocalError("this channel has a ring already", reason="conflict")
        try:
            ch.ring = Ring.attach(path)
        except LocalError as exc:  # the application sends inline then
            log.warning("not using an application's ring: %s", exc)
            return False
        return True

    @staticmethod
    async def make_ring(ring_bytes: int) -> Ring | None:
        """A receiver's ring of ``ring_bytes`` (0: none), its memory allocated in a thread;
        None if ``/dev/shm`` has no room (the receiver is then fed inline).  LocalError if the
        size is out of range."""
        if not ring_bytes:
            return None
        try:
            return await asyncio.to_thread(Ring.create, ring_bytes, background=False)
        except OSError as exc:
            log.warning("no shared-memory ring for a receiver: %s", exc)
            return None

    def open_receiver(self, name: str, allow: list[bytes] | None,
                      ring: Ring | None = None) -> ReceiverPort:
        """``ring``: shared memory the application maps (see :meth:`make_ring`)."""
        check_name(name)
        old = self.ports.pop(name, None)
        if old is not None:  # the newest receiver takes over (the old app may have died)
            old.close()
        port = ReceiverPort(self, name, frozenset(allow) if allow else None, ring)
        self.ports[name] = port
        return port

    def close_sender(self, cid: bytes) -> None:
        ch = self.out.pop(cid, None)
        if ch is None:
            raise LocalError("no such channel", reason="not-found")
        ch.close()

    def close_receiver(self, name: str) -> None:
        port = self.ports.pop(name, None)
        if port is None:
            raise LocalError("no such receiver", reason="not-found")
        port.close()

    def describe(self) -> list[dict[str, Any]]:
        out = [c.describe() for c in self.out.values()]
        out += [c.describe() for c in self.inc.values()]
        view = self.daemon.view
        for (cid, s, r), (a, b, since) in self.relayed.items():
            out.append({"id": cid.hex(), "name": None, "direction": "relay",
                        "peer": f"{view.name_of(s)} -> {view.name_of(r)}", "peer_id": None,
                        "path": "relay", "relay": self.daemon.name, "state": "open",
                        "bytes": a.bytes_in + b.bytes_in, "messages": None,
                        "rate_Bps": round((a.bytes_in + b.bytes_in)
                                          / max(1e-9, time.time() - since))})
        return out


def _bin(msg: dict[str, Any], name: str, size: int) -> bytes:
    v = msg.get(name)
    if not isinstance(v, bytes) or len(v) != size:
        raise ProtocolError(f"field {name} must be {size} bytes", reason="malformed")
    return v
