"""Channels in the daemon: the registry and the API the daemon and the control server call.

The pure cores do the thinking (:mod:`meshd.channel`): :mod:`~meshd.channel.outbound` races
paths, keys and numbers a sending end; :mod:`~meshd.channel.inbound` opens and acknowledges a
receiving end; :mod:`~meshd.channel.control` codes the ``chan`` messages.  The glue is one
module per concern, and this one builds them:

- :mod:`.outbound` — sending ends: attempts, dials, adopting a connection, the app's PULL socket;
- :mod:`.inbound` — receiving ends and the receiver ports that feed applications;
- :mod:`.relay` — relay legs of other members' channels;
- :mod:`.reach` — the reachability table, dial-backs, ``reach?``/``reach``;
- :mod:`.ipc` — ipc endpoints, noticing a departed application, shared-memory rings;
- :mod:`.connection` — data connections (TCP records) and dialing them.

Roles.  The *sending* site S owns a channel: it races the paths, runs the handshake as
initiator, and after a lost connection races again and *resumes* (a sealed probe under the
channel's keys proves it is the same channel; the receiver answers with its feedback; S resends
every unacked frame).  The *receiving* site R keeps a receiving end per channel id.  A *relay*
X pairs two signed legs and copies bytes.  Every dial goes to addresses in the target's signed
site record (or seen on the LAN), never to an address a message names, so no member can make
another dial somewhere arbitrary.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import msgpack
import zmq.asyncio

from meshd.channel import control, link
from meshd.channel.control import DialRequest, ReachReport, ReachRequest, RelayNotice, check_name
from meshd.channel.frames import Block
from meshd.channel.paths import PathKind
from meshd.daemon.channels import ipc, listing
from meshd.daemon.channels.connection import DataConnection
from meshd.daemon.channels.handover import Handovers
from meshd.daemon.channels.inbound import ReceiverPort, Receiving
from meshd.daemon.channels.outbound import MAX_SENDERS, OutChannel, Sending
from meshd.daemon.channels.reach import Reachability
from meshd.daemon.channels.relay import Relay
from meshd.daemon.counters import Counters
from meshd.daemon.links import MemberLinks
from meshd.daemon.rekeys import chain_from, own_rotations
from meshd.daemon.site import LocalSite
from meshd.daemon.tasks import CoreTimer, TaskSet
from meshd.errors import LocalError, ProtocolError
from meshd.local.handover import SOCKET_NAME
from meshd.local.ring import Ring
from meshd.peer.limits import SourceLimit
from meshd.state.config import Config
from meshd.state.home import Home
from meshd.state.view import MeshView
from meshd.trust.records import Signed

log = logging.getLogger("meshd.daemon.channels.service")

AUTH_TIMEOUT = 10.0
"""Seconds an accepted data connection has to prove itself (see :meth:`ChannelService.accept`)."""
MAX_UNTRUSTED = 256
MAX_UNTRUSTED_PER_SOURCE = 32
MAX_RECEIVERS = 256
"""Receiver ports open at once (3 ZeroMQ sockets and about 4 descriptors each); beyond, ``busy``."""
MAX_RING_BYTES = 256 << 20
"""The largest ring a receiver may ask for."""
RING_BUDGET = 1 << 30
"""Bytes of ``/dev/shm`` all receivers' rings may take together; beyond, a receiver is fed
inline (counted in ``channel_rings_over_budget``)."""


class ChannelService:
    """Every channel of one daemon, the relay, and the reachability checks."""

    def __init__(self, *, site: LocalSite, view: MeshView, config: Config, home: Home,
                 zctx: zmq.asyncio.Context, links: MemberLinks,
                 liveness: Callable[[bytes], str], counters: Counters) -> None:
        self.site = site
        self.view = view
        self.config = config
        self.counters = counters
        self._own_chain: tuple[tuple[int, bytes], list[Signed]] = ((-1, b""), [])
        """This site's own rotations (``rotations`` answers), and the view they were read from."""
        self.tasks = TaskSet("channels")
        endpoints = ipc.IpcEndpoints(home.root)
        self.reach = Reachability(site=site, view=view, config=config, links=links,
                                  liveness=liveness, counters=counters, tasks=self.tasks)
        self.relay = Relay(site=site, view=view, config=config, links=links, counters=counters,
                           tasks=self.tasks)
        self.receiving = Receiving(site=site, view=view, config=config, reach=self.reach,
                                   counters=counters, tasks=self.tasks, ipc=endpoints, zctx=zctx)
        self.sending = Sending(site=site, view=view, config=config, links=links,
                               reach=self.reach, counters=counters, tasks=self.tasks,
                               ipc=endpoints, zctx=zctx)
        self.out: dict[bytes, OutChannel] = self.sending.out
        self.handovers = Handovers(home.root / SOCKET_NAME, self.sending, self.receiving,
                                   self.tasks, counters)
        self.untrusted = SourceLimit(total=MAX_UNTRUSTED, per_source=MAX_UNTRUSTED_PER_SOURCE)
        """Accepted data connections that have not proved themselves yet."""
        self._pending_conns: set[DataConnection] = set()
        self._rings_in_making = 0

    def start(self) -> None:
        self.reach.start()
        self.receiving.start()
        self.handovers.start()

    async def stop(self) -> None:
        self.handovers.close()
        for ch in self.out.values():  # their applications go on and give them to the next daemon
            if ch.lease is not None and ch.core.handed_over:
                ch.lease.close()
                ch.lease = None
        self.sending.close_all()
        self.receiving.close()
        self.relay.close()
        for conn in list(self._pending_conns):
            conn.close()
        await self.tasks.close()

    # -- control messages ------------------------------------------------------------------

    def on_control(self, key: bytes, op: str, body: bytes) -> None:
        """A ``chan`` message from member ``key`` (authenticated by the peer link)."""
        self.counters.count(f"control_{op.replace('?', '_req')}")
        try:
            msg = control.decode(op, body)
        except ProtocolError as exc:
            log.info("dropped a %s message from %s: %s", op, self.view.name_of(key), exc)
            return
        if isinstance(msg, DialRequest):
            self.tasks.spawn(self.receiving.dial_back(key, msg), "chan-dial")
        elif isinstance(msg, RelayNotice):
            self.tasks.spawn(self.receiving.join_relay(key, msg), "chan-relay")
        elif isinstance(msg, ReachRequest):
            self.tasks.spawn(self.reach.answer(key), "reach-answer")
        elif isinstance(msg, ReachReport):
            self.reach.take_report(key, msg)

    def cut_member(self, key: bytes, reason: str) -> None:
        """``key`` is a member no more (``reason``: revoked): every channel to or from it and
        every relay leg of its channels ends now; their applications are told why.  Channels
        relayed through it lose that connection and race another path."""
        self.sending.cut_peer(key, reason)
        self.receiving.cut_sender(key, reason)
        self.relay.cut_member(key)
        # Channels relayed *through* it leave it: their connection closes and the sender races
        # another path (and resumes), so no data keeps flowing through a site that is out.
        for ch in self.out.values():
            path = ch.core.path
            if path is not None and path.relay == key:
                if ch.conn is not None:
                    ch.conn.abort(f"the relay was {reason}")
                elif ch.lease is not None:  # handed over: the application gives it back
                    ch.lease.cut()
        self.receiving.leave_relay(key, reason)

    def sender(self, cid: bytes) -> OutChannel:
        """The open sending end ``cid``; ChannelClosed if it ended on its own (revoked, no
        path), LocalError ``not-found`` if there is none."""
        ch = self.out.get(cid)
        if ch is not None:
            return ch
        gone = self.sending.gone.get(cid)
        if gone is not None:
            raise gone
        raise LocalError("no such channel at this site", reason="not-found")

    def on_members_changed(self) -> None:
        """The member set, or a member's record, changed (see :class:`.reach.Reachability`)."""
        self.reach.on_members_changed()

    def reach_of(self, key: bytes) -> dict[str, str]:
        return self.reach.reach_of(key)

    # -- incoming data connections ---------------------------------------------------------

    def accept(self, transport: asyncio.Transport, first: bytes) -> DataConnection | None:
        """The port multiplexer hands over a connection that is not ZeroMQ.

        Until it proves itself (a valid Hello, a frame under a channel's keys, a member's signed
        relay preamble: :meth:`DataConnection.trust`) it costs a few KiB, it must do so within
        AUTH_TIMEOUT, and at most MAX_UNTRUSTED such connections may be open, at most
        MAX_UNTRUSTED_PER_SOURCE from one address; over the bound it is closed at once."""
        peer = transport.get_extra_info("peername")
        source = str(peer[0]) if peer else "?"
        why = self.untrusted.admit(source)
        if why is not None:
            self.counters.count("refused_busy" if why == "total" else "refused_busy_source")
            return None
        conn = DataConnection(self._conn_lost, trusted=False)
        deadline = CoreTimer(lambda now: self._auth_deadline(conn))

        def release() -> None:  # trusted, or gone: the deadline must not keep it 10 s more
            deadline.cancel()
            self.untrusted.release(source)

        conn.release_slot = release
        conn.handler = self._on_preamble
        self._pending_conns.add(conn)
        deadline.arm(CoreTimer.now() + AUTH_TIMEOUT)
        self.counters.count("accepted")
        return conn

    def _auth_deadline(self, conn: DataConnection) -> None:
        self._pending_conns.discard(conn)
        if not conn.trusted and not conn.closed.done():
            self.counters.count("auth_timeouts")
            conn.abort("did not authenticate in time")

    def _conn_lost(self, conn: DataConnection) -> None:
        self._pending_conns.discard(conn)
        if not conn.trusted:  # a stranger's failures are counted, not logged one by one
            self.counters.count("untrusted_closed")
            if conn.refused_for:
                self.counters.count(f"untrusted_refused_{conn.refused_for.replace('-', '_')}")
        self.receiving.conn_lost(conn)

    def _on_preamble(self, conn: DataConnection, kind: int, body: Block) -> None:
        self._pending_conns.discard(conn)
        if kind != link.PREAMBLE:
            raise ProtocolError("a data connection must start with a preamble",
                                reason="malformed")
        pre = link.decode_preamble(body)
        if pre.mode == "probe":
            self.counters.count("probes_answered")
            conn.handler = None
            conn.close()
            return
        if pre.mode == "rotations":
            self._answer_rotations(conn, pre.to)
            return
        if not self.view.is_member(pre.sender):
            self.counters.count("refused_not_member")
            conn.refuse("not-member: this site does not know you as a member")
            return
        if pre.mode == "relay":
            self.relay.take_leg(conn, pre)
            return
        if pre.to != self.site.public:
            conn.refuse("wrong-site: this is not the site you asked for")
            return
        if pre.role == "s":  # the sender dialed us: we are the receiving end
            self.receiving.start_end(conn, pre.cid, pre.sender, "direct", None)
            return
        self.sending.take_reversed(conn, pre)

    def _answer_rotations(self, conn: DataConnection, old: bytes) -> None:
        """A ``rotations`` preamble: the signed rotations that hand this site's past key
        ``old`` over to its key now, for a member that missed them and cannot reach us under
        the key it knows (see :mod:`meshd.daemon.rekeys`).  Asked by anybody: the rotations
        are signed public statements, and the answer costs a walk of at most 65 of this
        site's own rotations, kept between questions."""
        conn.handler = None
        stamp = (len(self.view.rotations), self.site.public)
        if self._own_chain[0] != stamp:  # rotations only come and go with the view
            self._own_chain = (stamp, own_rotations(self.view.rotations.values(),
                                                    self.site.public))
        chain = chain_from(self._own_chain[1], self.site.public, old)
        if chain is None:
            self.counters.count("rotations_unknown")
            conn.refuse("unknown-key: no rotation of this site hands over that key")
            return
        self.counters.count("rotations_answered")
        own = self.view.site_records.get(self.site.public)
        if chain and own is not None:  # where to dial the new key
            chain.append(own.raw)
        conn.send(link.ROTATIONS, msgpack.packb(chain, use_bin_type=True))
        conn.close()

    # -- the application API -----------------------------------------------------------------

    def open_sender(self, name: str, to: bytes, paths: list[str] | None = None,
                    handover: bool = False) -> OutChannel:
        """``handover``: the application asks to take the data connection (granted if this
        site's ``channel_handover`` allows and the hand-over socket is up)."""
        check_name(name)
        if to == self.site.public:
            raise LocalError("a channel to this site itself", reason="bad-peer")
        if not self.view.is_member(to):
            raise LocalError("that site is not a member of this mesh", reason="not-member")
        allowed = paths or self.config.paths
        kinds = [PathKind(p) for p in allowed if p in self.config.paths]
        if not kinds:
            raise LocalError(f"none of the paths {allowed} is allowed by this site's config",
                             reason="bad-path")
        if len(self.out) >= MAX_SENDERS:
            self.counters.count("refused_senders")
            raise LocalError(f"this site has {MAX_SENDERS} channels open already; close some",
                             reason="busy")
        handover = handover and self.config.channel_handover and self.handovers.available
        return self.sending.open(name, to, kinds, handover)

    @staticmethod
    def attach_ring(ch: OutChannel, path: str) -> bool:
        """Map the shared-memory ring a sending application made (once per channel)."""
        if ch.ring is not None:
            raise LocalError("this channel has a ring already", reason="conflict")
        ch.ring = ipc.attach_ring(path)
        return ch.ring is not None

    async def make_ring(self, ring_bytes: int, name: str) -> Ring | None:
        """A ring of ``ring_bytes`` (0: none) for the receiver ``name`` about to open, see
        :func:`.ipc.make_ring`; None if over RING_BUDGET.  LocalError if the size is out of range
        or no receiver can open (checked first, so that no ring is made in vain)."""
        self._check_receiver_room(name)
        if not 0 <= ring_bytes <= MAX_RING_BYTES:
            raise LocalError(f"ring_bytes is 0 to {MAX_RING_BYTES >> 20} MiB", reason="usage")
        if not ring_bytes:
            return None
        used = sum(p.ring.capacity for p in self.receiving.ports.values()
                   if p.ring is not None and p.name != name)
        if used + self._rings_in_making + ring_bytes > RING_BUDGET:
            self.counters.count("rings_over_budget")
            return None
        self._rings_in_making += ring_bytes
        try:
            return await ipc.make_ring(ring_bytes)
        finally:
            self._rings_in_making -= ring_bytes

    def _check_receiver_room(self, name: str) -> None:
        if name not in self.receiving.ports and len(self.receiving.ports) >= MAX_RECEIVERS:
            self.counters.count("refused_receivers")
            raise LocalError(f"this site has {MAX_RECEIVERS} receivers open already; close some",
                             reason="busy")

    def open_receiver(self, name: str, allow: list[bytes] | None,
                      ring: Ring | None = None, replace: bool = True,
                      claim: str | None = None) -> ReceiverPort:
        """``ring``: shared memory the application maps (see :meth:`make_ring`); ``replace``:
        a receiver of ``name`` open already is closed (else LocalError ``conflict``, unless it
        was opened with the same ``claim``)."""
        check_name(name)
        try:
            if claim is not None and not 0 < len(claim) <= 64:
                raise LocalError("claim must be 1 to 64 characters", reason="usage")
            self._check_receiver_room(name)
            return self.receiving.open_receiver(name, frozenset(allow) if allow else None, ring,
                                                replace, claim)
        except LocalError:
            if ring is not None:
                ring.unlink()
                ring.close()
            raise

    def handover_path(self, asked: bool) -> str | None:
        """The hand-over socket's path for an application that ``asked`` to take its data
        connections, if this site's ``channel_handover`` allows and the socket is up."""
        if asked and self.config.channel_handover and self.handovers.available:
            return str(self.handovers.path)
        return None

    def close_sender(self, cid: bytes) -> None:
        """Close the sending end ``cid`` (one that ended on its own is forgotten)."""
        self.sending.close(cid)

    def close_receiver(self, name: str) -> None:
        self.receiving.close_receiver(name)

    def describe(self) -> list[dict[str, Any]]:
        out = [listing.describe(c) for c in self.out.values()]
        return out + self.receiving.describe() + self.relay.describe()
