"""The receiving ends of channels, and the receiver ports that feed applications (asyncio glue).

A data connection becomes a *receiving end* when the sender dials us (direct), when we dial
the sender back (reversed, maybe with the Hello already checked), or when we join the sender at
a relay.  Its records go to :meth:`Receiving.on_record`: the Hello is answered by the site's one
:class:`~meshd.channel.handshake.Responder` (which reads the current site key at each Hello),
the first frame must open the channel (:func:`~meshd.channel.inbound.open_first_frame`), every
later frame goes to the channel's :class:`~meshd.channel.inbound.ReceivingEnd`.  A
:class:`ReceiverPort` hands delivered batches to the application's PUSH socket, and after a
channel's last batch a notice that it ended (closed by its sender, or cut: the sender was
revoked, its held messages dropped).  A record from a site that is no member any more closes
its connection before it is read.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq.asyncio

from meshd.channel import link
from meshd.channel.control import CTRL_TUNNEL, DialRequest, RelayNotice
from meshd.channel.frames import Block, Opener
from meshd.channel.handshake import ChannelKeys, Responder
from meshd.channel.inbound import InGrant, ReceivingEnd, open_first
from meshd.daemon.channels.adopt_in import take_on
from meshd.daemon.channels.connection import DataConnection, unhold
from meshd.daemon.channels.handover_in import InLease, cut_socket
from meshd.daemon.channels.in_channel import InChannel, RSide, overdue, window_of
from meshd.daemon.channels.ipc import IpcEndpoints, close_watched, until_app_leaves
from meshd.local.ipc import ChannelEnd, delivery_frames, pack_end, pack_meta
from meshd.daemon.channels.reach import DIAL_TIMEOUT, Reachability, now_ms
from meshd.daemon.counters import Counters
from meshd.daemon.site import LocalSite
from meshd.daemon.tasks import TaskSet
from meshd.errors import LocalError, ProtocolError
from meshd.local.ring import Ring
from meshd.state.config import Config
from meshd.state.view import MeshView

log = logging.getLogger("meshd.daemon.channels.inbound")

TunnelAcceptor = Callable[[DataConnection, ChannelKeys, Opener, str, str, "bytes | None"], None]
"""``(conn, keys, opener, service, path, relay)``: see :meth:`meshd.daemon.tunnels.owner.Owning.accept`."""

_BIG_PAYLOAD = 64 << 10
"""Payloads at least this big are handed to ZeroMQ without a copy."""
EXPIRE_EVERY = 5.0
"""Seconds between two looks for channels whose senders did not come back."""



class ReceiverPort:
    """An application's receiver for one channel name: a PUSH socket the daemon feeds."""

    def __init__(self, owner: Receiving, name: str, allow: frozenset[bytes] | None,
                 ring: Ring | None = None) -> None:
        self.owner = owner
        self.name = name
        self.allow = allow
        self.ring = ring
        """Shared memory the application maps: big payloads go there, not through the socket."""
        self.endpoint = owner.ipc.endpoint(f"rx-{secrets.token_hex(8)}")
        self.sock = owner.zctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 4)
        self.sock.bind(self.endpoint)
        self.wake = asyncio.Event()
        self.wake.set()
        self.ends: deque[ChannelEnd] = deque()
        """Channels that ended, to be told to the application after their last delivery."""
        self.token = secrets.token_hex(16)
        """What the application names this port by on the hand-over socket."""
        self.lease: InLease | None = None
        """The application's hold on the channels it was handed (:mod:`.handover_in`)."""
        self.pushed: dict[bytes, int] = {}
        """By channel, the number after the last message sent over this port's socket."""
        self.claim: str | None = None
        """The receiver's own token: opening it again with the same one is no conflict."""
        self.task = owner.tasks.spawn(self._run(), f"rx-{name}")
        self._watcher = owner.tasks.spawn(self._watch_app(), f"rx-watch-{name}")

    async def _watch_app(self) -> None:
        """An application that dies without closing its receiver: the port closes, and what
        arrives for the name is held (within the window) until a new receiver opens it."""
        await until_app_leaves(self.sock)
        if self.owner.ports.get(self.name) is self:
            log.info("receiver %r: the application is gone; closing it", self.name)
            self.owner.counters.count("orphans_closed")
            self.owner.close_receiver(self.name)

    async def _run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            progressed = True
            while progressed:
                progressed = False
                for inc in [c for c in self.owner.inc.values() if c.name == self.name]:
                    if self.owner.inc.get(inc.cid) is not inc:
                        continue  # ended (cut: its sender was revoked) while we sent
                    got = inc.core.pop()
                    if got is None:
                        continue
                    progressed = True
                    inc.pump()
                    meta = pack_meta(inc.cid, inc.sender, got.first,
                                         self.owner.view.name_of(inc.sender))
                    self.pushed[inc.cid] = got.first + got.count
                    await self.sock.send_multipart(
                        delivery_frames(self.ring, meta, got.payload, got.count),
                        copy=len(got.payload) < _BIG_PAYLOAD)
            self.owner.gc()
            while self.ends:
                await self.sock.send(pack_end(self.ends.popleft()))

    def close(self) -> None:
        if self.lease is not None:
            self.lease.close()
        self.task.cancel()
        if self._watcher is not asyncio.current_task():
            self._watcher.cancel()
        close_watched(self.sock)
        self.owner.ipc.remove(self.endpoint)
        if self.ring is not None:
            self.ring.unlink()
            self.ring.close()


class Receiving:
    """Every receiving end and receiver port of this site (see the module docstring)."""

    def __init__(self, *, site: LocalSite, view: MeshView, config: Config, reach: Reachability,
                 counters: Counters, tasks: TaskSet, ipc: IpcEndpoints,
                 zctx: zmq.asyncio.Context) -> None:
        self.site = site
        self.view = view
        self.config = config
        self.reach = reach
        self.counters = counters
        self.tasks = tasks
        self.ipc = ipc
        self.zctx = zctx
        self.responder = Responder(lambda: site.keys.key, not_before=time.time())
        self.inc: dict[bytes, InChannel] = {}
        self.ports: dict[str, ReceiverPort] = {}
        self.stopping = False
        self.tunnels: TunnelAcceptor | None = None
        """Takes a data connection whose first frame asks for a tunnel (set by the tunnels)."""

    # -- connections -------------------------------------------------------------------------

    def start_end(self, conn: DataConnection, cid: bytes, sender: bytes, path: str,
                  relay: bytes | None) -> RSide:
        """Make ``conn`` a receiving end of channel ``cid`` from ``sender``."""
        side = RSide(cid, sender, path, relay)
        conn.owner = side
        conn.handler = self.on_record
        return side

    def conn_lost(self, conn: DataConnection) -> None:
        owner = conn.owner
        if isinstance(owner, RSide) and owner.inc is not None:
            owner.inc.lost(conn)
        elif isinstance(owner, RSide):
            inc = self.inc.get(owner.cid)
            if inc is not None and inc.waiting is not None and inc.waiting[0] is conn:
                inc.waiting = None

    def answer_hello(self, sender: bytes, cid: bytes, hello: bytes) -> tuple[bytes, ChannelKeys]:
        """Check a sender's Hello for channel ``cid``; ProtocolError if it is not acceptable."""
        allowed = {sender} if self.view.is_member(sender) else set()
        accept, keys = self.responder.on_hello(hello, now=time.time(), peers=allowed)
        if keys.channel_id != cid:
            raise ProtocolError("Hello for another channel", reason="wrong-channel")
        return accept, keys

    def on_record(self, conn: DataConnection, kind: int, body: Block) -> None:
        side = conn.owner
        assert isinstance(side, RSide)
        if not self.view.is_member(side.sender):  # revoked since it connected
            self.counters.count("refused_not_member")
            conn.abort("the sender is no member of this mesh any more")
            return
        if kind == link.HELLO:
            if side.inc is not None or side.pending is not None:
                raise ProtocolError("a second Hello on one connection", reason="unexpected")
            accept, side.pending = self.answer_hello(side.sender, side.cid, bytes(body))
            conn.trust()
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
            if (inc.handed or inc.giving) and conn is not inc.conn:
                self._hold_for_app(inc, conn, side, body)
                return
            if inc.on_frame(conn, side, body):  # authentic, or ProtocolError
                self._offer(inc, conn)
            conn.trust()
            self.wake_port(inc.name)
            if inc.core.finished:  # closed with nothing held: it leaves the list now
                self.gc()
            return
        if side.pending is None:
            conn.refuse("unknown-channel: this site has no such channel (restarted?)")
            self.counters.count("refused_unknown_channel")
            return
        self._open(conn, side, side.pending, body)

    def _open(self, conn: DataConnection, side: RSide, keys: ChannelKeys, body: Block) -> None:
        opener, kind, name = open_first(keys, body)
        if kind == CTRL_TUNNEL:
            side.pending = None
            if self.tunnels is None:
                conn.refuse("unknown-service: this site runs no tunnels")
                return
            self.tunnels(conn, keys, opener, name, side.path, side.relay)
            return
        port = self.ports.get(name)
        if port is not None and port.allow is not None and side.sender not in port.allow:
            self.counters.count("refused_policy")
            conn.refuse(f"not-allowed: channel {name!r} does not take messages from you")
            return
        core = ReceivingEnd(keys, opener, name, window_of(self.config))
        inc = InChannel(core, side)
        self.inc[side.cid] = inc
        inc.adopt(conn, side)
        self._offer(inc, conn)
        log.info("channel %r from %s open (%s%s)", name, self.view.name_of(side.sender),
                 side.path, f" via {self.view.name_of(side.relay)}" if side.relay else "")
        self.wake_port(name)

    async def dial_back(self, sender: bytes, req: DialRequest) -> None:
        """A sender asked us to dial it (a reversed path), maybe with its Hello inside.

        The Hello is checked before dialing, so a bad one costs no connection; the Accept
        then follows the preamble on the new connection."""
        accepted: tuple[bytes, ChannelKeys] | None = None
        if req.hello is not None:
            try:
                accepted = self.answer_hello(sender, req.cid, req.hello)
                self.counters.count("hello_in_dial")
            except ProtocolError as exc:
                self.counters.count("refused_hello")
                log.info("refused a reversed channel from %s: %s", self.view.name_of(sender), exc)
                return
        try:
            conn, _, _ = await self.reach.dial(sender, DIAL_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            log.info("cannot dial %s back for a channel: %s", self.view.name_of(sender), exc)
            return
        side = self.start_end(conn, req.cid, sender, "reversed", None)
        conn.on_lost = self.conn_lost
        conn.send(link.PREAMBLE, link.encode_preamble(
            link.Preamble("direct", req.cid, self.site.public, sender, "r", b"", now_ms())))
        if accepted is not None:
            accept, side.pending = accepted
            conn.send(link.ACCEPT, accept)

    async def join_relay(self, relay: bytes, notice: RelayNotice) -> None:
        """A relay says a sender waits there for us."""
        if not self.view.is_member(notice.sender):
            return
        try:
            conn, _, _ = await self.reach.dial(relay, DIAL_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            log.info("cannot dial relay %s: %s", self.view.name_of(relay), exc)
            return
        self.start_end(conn, notice.cid, notice.sender, "relay", relay)
        conn.on_lost = self.conn_lost
        conn.send(link.PREAMBLE, link.encode_preamble(
            link.Preamble("relay", notice.cid, self.site.public, notice.sender, "r", relay,
                          now_ms()).signed(self.site.keys.key)))

    # -- hand-over to the receiving application (:mod:`.handover_in`) -------------------------

    def _offer(self, inc: InChannel, conn: DataConnection) -> None:
        """``inc`` adopted ``conn``: to the receiving application, if it holds a lease."""
        port = self.ports.get(inc.name)
        lease = None if port is None else port.lease
        if lease is not None and not lease.closed and not inc.core.closed_by_sender:
            lease.give(inc, conn)

    def offer_all(self, port: ReceiverPort) -> None:
        """``port``'s application took its lease: its channels' connections go to it."""
        for inc in [c for c in self.inc.values() if c.name == port.name]:
            if inc.conn is not None and not (inc.giving or inc.handed):
                self._offer(inc, inc.conn)

    def _hold_for_app(self, inc: InChannel, conn: DataConnection, side: RSide,
                      body: Block) -> None:
        """A new connection of a channel the application holds: kept, its first frame unread,
        until the application gives the channel back."""
        if inc.waiting is not None and inc.waiting[0] is not conn:
            inc.waiting[0].abort("replaced by a newer connection of the channel")
        conn.hold()
        inc.waiting = (conn, side, body)
        if inc.handed and inc.lease is not None:
            inc.lease.ask_back(inc)

    def adopt_in(self, lease: InLease, cid: bytes, msg: dict[str, Any]) -> None:
        """The application holding ``lease`` offers channel ``cid`` (see
        :func:`.adopt_in.take_on`)."""
        if (inc := take_on(self, lease, cid, msg)) is not None:
            self.inc[cid] = inc

    def after_give(self, inc: InChannel) -> None:
        """A hand-over of ``inc`` ended (done or not): a connection that waited meanwhile."""
        if inc.waiting is None:
            return
        if inc.handed and inc.lease is not None:
            inc.lease.ask_back(inc)
        elif not inc.handed:
            conn, side, body = inc.waiting
            inc.waiting = None
            unhold(conn, (link.FRAME, body))

    def taken_back(self, inc: InChannel, state: InGrant) -> None:
        """The application gave ``inc`` back (its connection broke, or we asked): the daemon
        goes on from ``state``, with the connection that waited if there is one."""
        inc.core.taken_back(state)
        cut_socket(inc.dup)
        inc.dup = None
        inc.handed = False
        self.after_give(inc)

    def leave_relay(self, key: bytes, reason: str) -> None:
        """Channels relayed through ``key`` (it was revoked) lose that connection: their
        senders race another path and resume."""
        for inc in self.inc.values():
            if inc.relay == key:
                if inc.conn is not None:
                    inc.conn.abort(f"the relay was {reason}")
                cut_socket(inc.dup)  # handed over: the application gives it back
                inc.dup = None

    def finished(self, inc: InChannel) -> None:
        """The application delivered everything of a channel its sender closed."""
        self.end(inc, "closed", "the sender closed the channel")

    # -- ports -------------------------------------------------------------------------------

    def wake_port(self, name: str) -> None:
        port = self.ports.get(name)
        if port is not None:
            port.wake.set()

    def start(self) -> None:
        self.tasks.spawn(self._expire(), "channels-in-expire")

    async def _expire(self) -> None:
        """End the channels whose senders did not resume them in ``channel_wait_limit``."""
        while True:
            await asyncio.sleep(EXPIRE_EVERY)
            limit = self.config.channel_wait_limit
            for inc in overdue(self.inc.values(), time.monotonic(), limit):
                self.end(inc, "failed", f"the sender did not resume it within {limit:.0f} s")

    def gc(self) -> None:
        """Forget the channels their senders closed once everything is delivered."""
        for inc in list(self.inc.values()):
            if inc.core.finished:
                self.end(inc, "closed", "the sender closed the channel")

    def cut_sender(self, key: bytes, reason: str) -> None:
        """End every channel from ``key`` now (it was revoked): what it holds is dropped, its
        connection cut, its receiver told why."""
        for inc in [c for c in self.inc.values() if c.sender == key]:
            if inc.conn is not None:
                inc.conn.abort(f"the sender was {reason}")
            message = f"{self.view.name_of(key)} was {reason}; the channel was cut"
            if inc.lease is not None and (inc.handed or inc.giving):
                inc.lease.cut(inc, reason, message)
            self.end(inc, reason, message)

    def end(self, inc: InChannel, reason: str, message: str) -> None:
        """Forget ``inc`` and tell its receiver (after the deliveries already handed out)."""
        if self.inc.pop(inc.cid, None) is None:
            return
        self.counters.count(f"in_ended_{reason}")
        inc.drop_handed()
        if inc.conn is not None:
            inc.conn.close()
        port = self.ports.get(inc.name)
        if port is not None:
            port.pushed.pop(inc.cid, None)
            still_open = sum(1 for c in self.inc.values() if c.name == inc.name)
            port.ends.append(ChannelEnd(inc.cid, inc.sender, self.view.name_of(inc.sender),
                                        reason, message, still_open))
            port.wake.set()

    def open_receiver(self, name: str, allow: frozenset[bytes] | None,
                      ring: Ring | None, replace: bool = True,
                      claim: str | None = None) -> ReceiverPort:
        if not replace and name in self.ports and not _same(self.ports[name].claim, claim):
            raise LocalError(f"a receiver of {name!r} is open at this site already",
                             reason="conflict")
        old = self.ports.pop(name, None)
        if old is not None:  # the newest receiver takes over (the old app may have died)
            old.close()
        port = ReceiverPort(self, name, allow, ring)
        port.claim = claim
        self.ports[name] = port
        return port

    def close_receiver(self, name: str) -> None:
        port = self.ports.pop(name, None)
        if port is None:
            raise LocalError("no such receiver", reason="not-found")
        port.close()

    def close(self) -> None:
        """The daemon stops: handed-over channels go on in their applications (their
        connections are not cut), which offer them to the next daemon (:mod:`.adopt_in`)."""
        self.stopping = True
        for port in list(self.ports.values()):
            port.close()

    def describe(self) -> list[dict[str, Any]]:
        return [c.describe(self.view) for c in self.inc.values()]


def _same(claim: str | None, other: str | None) -> bool:
    return claim is not None and other is not None and secrets.compare_digest(
        claim.encode(), other.encode())
