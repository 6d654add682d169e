"""The membership core: SWIM failure detection with Lifeguard, sans-IO.

Theory of operation
-------------------
The owner (the daemon glue, a test, or :mod:`meshd.testing.sim`) feeds decoded messages to
:meth:`Membership.receive`, calls :meth:`Membership.handle_timer` when :meth:`get_timer` says so,
and drains :meth:`outgoing` (``(destination id, message)`` pairs) and :meth:`events`.  The core
never reads a clock or a global random generator: ``now`` and ``rng`` come in.

*Probing.*  Every ``probe_interval * (health + 1)`` the core pings the next member of a shuffled
round-robin list (reshuffled, and long-dead members reaped, at the end of each round).  Without
an ack after ``probe_timeout * (health + 1)`` it sends ping-req to ``indirect_checks`` random
helpers, which ping the target and relay the ack, or send a nack when they hear nothing for
``probe_timeout``; with ``fallback_ping`` it also pings the target directly once more
(memberlist's TCP fallback ping).  A probe without any ack by its deadline (the next probe)
makes the target suspect; the prober probes it again two probes later, and again while it stays
silent, each ping carrying the suspicion (buddy system), so that the target can refute even if
every gossip about it was lost (e.g. across a partition).  Outbound-only members are never
probed (see below).

*Suspicion.*  Membership changes follow the table in :mod:`meshd.swim.state`.  A suspicion runs a
:class:`~meshd.swim.suspicion.Suspicion` timer that starts at ``suspicion_max_timeout_mult * min``
and shrinks toward ``min = suspicion_mult * log10(N) * probe_interval`` as independent suspect
messages (from other accusers) arrive; when it fires the core declares the member dead.  A node
that hears itself suspected or declared dead refutes by gossiping alive with a higher
incarnation.  A node whose timer fires but that only *heard* of the suspicion (its own probes
never failed) first pings the member directly, up to twice, one probe timeout each: a live
member answers any accusation carried in a ping (and anyone answers a ping from a member it
holds suspect or dead) with the news first, so a node that missed the refutation gossip catches
up instead of declaring a false death.

*Incarnations.*  Only a member raises its own incarnation: it starts at the one its owner
gives it, and moves it past an accusation (refutation) or on :meth:`set_meta`.  What others say
of it is hearsay, since incarnations are not signed; the sender passed to :meth:`receive` is the
one the transport authenticated (in meshd, the CURVE key of the connection).  So:

- the codec refuses any message with an incarnation above ``MAX_INCARNATION`` (2**53 - 1), and
  the core never goes above it (a refutation or new meta at the bound stays there);
- an update or push-pull row about member N that comes from N itself is taken at any incarnation;
- one about N from anyone else moves N's incarnation at most ``max_incarnation_step`` (K, 16)
  above the one held when the message arrived (0 for a member not known yet), however many
  updates about N the message carries; a larger claim is taken, and passed on, as a claim at
  that height, and counted in :attr:`Membership.clamped`.  This applies to accusations of
  ourselves too, so a refutation is at most K + 1 above our incarnation.

Accusations are never ignored for their height, and our own (a failed probe, the suspicion
timer) apply at whatever incarnation we hold.  So a forged ``alive`` at a huge incarnation gives
N at most K more; the next failed probe suspects N at that incarnation, and the suspicion (equal
incarnation) wins over the forged alive, which the table ignores as stale.  What a liar can still
do, with one message per suspicion, is forge each refutation of a member it wants kept alive
(alive at the suspected incarnation + 1): that member flaps suspect/alive instead of dying for
as long as the liar keeps it up, as in any SWIM without signed alives.  To walk an incarnation
to the bound takes it ``MAX_INCARNATION / K`` (2**49) messages.  An honest site that lags more
than K behind a member (it missed many refutations) catches up by K per message, or at once
from the member itself (its acks to pings that carry an accusation, its push-pulls).

*Lifeguard health.*  Score ``0 .. awareness_max_multiplier - 1`` (:mod:`.awareness`): +1 for
each expected nack that did not arrive in a failed probe (+1 for a failed probe when no nack was
expected), +1 per refutation, -1 per successful probe.

*Dissemination.*  Every accepted update is queued (:mod:`.queue`) and piggybacked on pings,
ping-reqs, acks and nacks, fewest transmits first, up to ``packet_budget`` bytes, each at most
``retransmit_mult * ceil(log10(N + 1))`` times; every ``gossip_interval`` the core also sends
pending updates to ``gossip_nodes`` random members (including ones dead for less than
``gossip_to_the_dead_time``, so a falsely dead node learns and refutes).

*Anti-entropy.*  Every ``push_pull_interval`` (scaled for N) the core exchanges its full state
and its verified blobs with one random member; the receiver merges first (so a node that the
sender believes dead refutes at once) and then answers with its own state.  Remote suspect and
dead rows are merged as suspicions, never as deaths.  Every ``reconnect_interval``, with
probability ``dead / live``, it push-pulls with a random dead member, so partitions heal.

*Rejoin.*  Every dead member is also pinged on a back-off schedule (:mod:`.rejoin`, from
``rejoin_interval`` up to ``rejoin_max_interval``), and at once when a message comes from it; the
ping carries our accusation, so a live member refutes it and its ack brings its new alive back.
Two members that each declared the other dead so find each other again, whoever else is there.

*Blobs.*  Opaque signed blobs ride on push-pull.  ``verify_blob(blob)`` returns a dedup key or
None; only verified blobs are kept and forwarded, the first blob per key wins, at most
``max_blobs`` are held; without a hook no remote blob is accepted.

*Outbound-only members* (``reachable=False``: nobody can dial them).  Nobody probes them, asks
them to help, or gossips or push-pulls to them unprompted: they only receive messages on
connections they opened.  Such a node sends, every (unscaled) probe interval, a heartbeat ping flagged
``FLAG_WATCH`` to ``outbound_anchors`` reachable members (its anchors), besides probing
reachable members normally and starting its own push-pulls; when it replaces an anchor it sends
the old one a ping flagged ``FLAG_UNWATCH``.  An anchor answers over that connection, includes
the node in its gossip fan-out, and treats any message from it as proof of life; only an anchor
that hears nothing from it for ``outbound_watch_mult * probe_interval`` suspects it.  The usual
suspicion, confirmation (other anchors) and refutation (the node hears of the suspicion in the
acks to its heartbeats) follow.  So an outbound-only node is declared dead when it stops
talking, never because nobody can dial it.
"""

from __future__ import annotations

import dataclasses
import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import msgpack

from meshd.errors import LocalError

from .awareness import Awareness
from .config import SwimConfig
from .events import (
    BlobAccepted,
    Event,
    MemberAlive,
    MemberDead,
    MemberInfo,
    MemberJoined,
    MemberLeft,
    MemberSuspect,
    MemberUpdated,
    Refuted,
    Status,
)
from .messages import (
    FLAG_UNWATCH,
    FLAG_WATCH,
    MAX_INCARNATION,
    MAX_BLOB_LEN,
    STATUS_ALIVE,
    STATUS_DEAD,
    STATUS_LEFT,
    STATUS_SUSPECT,
    Ack,
    Alive,
    Dead,
    Gossip,
    Left,
    MemberState,
    Message,
    Nack,
    Ping,
    PingReq,
    PushPullRequest,
    PushPullResponse,
    Suspect,
    Update,
    encode_update,
)
from .queue import BroadcastQueue
from .rejoin import RejoinSchedule
from .state import Action, decide
from .suspicion import Suspicion
from .util import push_pull_scale, retransmit_limit, suspicion_timeout

VerifyBlob = Callable[[bytes], "bytes | None"]

_STATUS_CODE = {Status.ALIVE: STATUS_ALIVE, Status.SUSPECT: STATUS_SUSPECT, Status.DEAD: STATUS_DEAD,
                Status.LEFT: STATUS_LEFT}
_LIVE = (Status.ALIVE, Status.SUSPECT)
_MAX_REJECTED = 4096
_REPROBE_AFTER = 2
"""A member we suspect ourselves is probed again after this many other probes."""
_VERIFY_PINGS = 2
"""Direct pings a node that only heard of a suspicion sends before declaring the member dead."""


@dataclass(slots=True)
class _Member:
    node: bytes
    incarnation: int
    status: Status
    meta: bytes
    reachable: bool
    since: float
    last_heard: float | None = None
    suspicion: Suspicion | None = None


@dataclass(slots=True)
class _Probe:
    target: bytes
    seq: int
    timeout_at: float
    acked: bool = False
    indirect: bool = False
    helpers: tuple[bytes, ...] = ()
    nackers: tuple[bytes, ...] = ()


def _update_size(u: Update) -> int:
    return len(msgpack.packb(encode_update(u), use_bin_type=True))


class Membership:
    """SWIM + Lifeguard membership of one node; see the module docstring."""

    def __init__(
        self,
        self_id: bytes,
        config: SwimConfig,
        rng: random.Random,
        now: float,
        *,
        meta: bytes = b"",
        reachable: bool = True,
        incarnation: int = 0,
        verify_blob: VerifyBlob | None = None,
    ) -> None:
        if not isinstance(self_id, bytes) or not 1 <= len(self_id) <= 64:
            raise LocalError("self_id must be 1..64 bytes", reason="argument")
        if not 0 <= incarnation <= MAX_INCARNATION:
            raise LocalError(f"incarnation must be 0..{MAX_INCARNATION}", reason="argument")
        self.self_id = self_id
        self.config = config
        self._rng = rng
        self._verify = verify_blob
        self._me = _Member(self_id, incarnation, Status.ALIVE, meta, reachable, now, now)
        self._members: dict[bytes, _Member] = {self_id: self._me}
        self._others: list[bytes] = []
        self._index: dict[bytes, int] = {}
        self._n_live = 1
        self._leaving = False
        self._awareness = Awareness(config.awareness_max_multiplier)
        self._queue = BroadcastQueue()
        self._out: list[tuple[bytes, Message]] = []
        self._events: list[Event] = []
        self._seq = 0
        # probing
        self._probe_order: list[bytes] = []
        self._probe_pos = 0
        self._probe: _Probe | None = None
        # timers (staggered at start so that many cores started together do not tick together)
        self._next_probe = now + rng.uniform(0, config.probe_interval)
        self._next_gossip = now + rng.uniform(0, config.gossip_interval)
        self._next_push_pull = now + rng.uniform(0, config.push_pull_interval)
        self._next_reconnect = now + rng.uniform(0, config.reconnect_interval)
        self._suspicion_heap: list[tuple[float, bytes]] = []
        self._relays: dict[int, tuple[bytes, int, float]] = {}
        self._relay_heap: list[tuple[float, int]] = []
        self._seeds: list[bytes] = []
        self._join_backoff = 0.0
        self._join_retry_at = 0.0
        # outbound-only support
        self._watched: dict[bytes, float] = {}
        self._anchors: list[bytes] = []
        self._next_heartbeat = self._next_probe
        # blobs
        self._blobs: dict[bytes, bytes] = {}
        self._blob_keys: dict[bytes, bytes] = {}
        self._rejected: dict[bytes, None] = {}
        self._blob_tuple: tuple[bytes, ...] | None = ()
        self._rows: tuple[MemberState, ...] | None = None
        self._limit_n = 0
        self._limit = 0
        self.clamped = 0
        """Claims about other members cut down to ``max_incarnation_step`` (module docstring)."""
        self._rejoin = RejoinSchedule(config.rejoin_interval, config.rejoin_max_interval, rng)
        self._broadcast(Alive(self_id, incarnation, meta, reachable))

    # ------------------------------------------------------------------ public API

    @property
    def incarnation(self) -> int:
        """Our current incarnation number."""
        return self._me.incarnation

    @property
    def health(self) -> int:
        """Lifeguard local health score (0 healthy .. awareness_max_multiplier - 1)."""
        return self._awareness.score

    @property
    def num_live(self) -> int:
        """Members believed alive or suspect, ourselves included (the N of the formulas)."""
        return self._n_live

    @property
    def leaving(self) -> bool:
        """True once :meth:`leave` was called."""
        return self._leaving

    @property
    def leave_done(self) -> bool:
        """After :meth:`leave`: True once our leave notice has been transmitted its limit."""
        return self._leaving and not self._queue.pending(self.self_id)

    def members(self) -> list[MemberInfo]:
        """Snapshot of every known member, ourselves included."""
        return [self._info(m) for m in self._members.values()]

    def member(self, node: bytes) -> MemberInfo | None:
        """Snapshot of one member, or None if unknown."""
        m = self._members.get(node)
        return None if m is None else self._info(m)

    def outgoing(self) -> list[tuple[bytes, Message]]:
        """Drain the messages to send, as (destination id, message)."""
        out, self._out = self._out, []
        return out

    def events(self) -> list[Event]:
        """Drain the events that happened since the last call."""
        ev, self._events = self._events, []
        return ev

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` next has work to do."""
        t = self._next_gossip
        if not self._leaving:
            t = min(t, self._next_probe, self._next_push_pull, self._next_reconnect)
            if not self._me.reachable and self._next_heartbeat < t:
                t = self._next_heartbeat
            p = self._probe
            if p is not None and not p.acked and not p.indirect and p.timeout_at < t:
                t = p.timeout_at
        if self._suspicion_heap and self._suspicion_heap[0][0] < t:
            t = self._suspicion_heap[0][0]
        if self._relay_heap and self._relay_heap[0][0] < t:
            t = self._relay_heap[0][0]
        r = self._rejoin.next_due()
        if r is not None and r < t:
            t = r
        return t

    def join(self, seeds: Iterable[bytes], now: float) -> None:
        """Start a full-state exchange with each seed (ids the owner knows how to reach).

        While no other member is known the exchange is retried, backing off from
        ``probe_interval`` to ``push_pull_interval``."""
        self._seeds = [s for s in seeds if s != self.self_id]
        self._join_backoff = self.config.probe_interval
        self._join_retry_at = now + self._join_backoff
        self._send_join()

    def _send_join(self) -> None:
        states, blobs = self._state_rows(), self._blob_list()
        for seed in self._seeds:
            self._out.append((seed, PushPullRequest(states, blobs, True)))

    def restore(self, members: Iterable[tuple[bytes, int, bytes, bool]], now: float) -> None:
        """Add remembered members ``(id, incarnation, meta, reachable)`` as alive without gossip,
        e.g. from a snapshot persisted before a restart.  Known members are left alone."""
        added = 0
        for node, inc, meta, reachable in members:
            if node not in self._members:
                self._add(node, inc, meta, reachable, now, probe=False)
                added += 1
        if added:
            self._reset_probe_order(now)
            self._next_push_pull = now + self._rng.uniform(
                0, push_pull_scale(self.config.push_pull_interval, self._n_live))

    def forget(self, node: bytes) -> None:
        """Drop ``node`` at once, without gossip: the owner knows it is no longer a member
        (revoked, or its key retired).  Keeping gossip about it out is the owner's job."""
        if node == self.self_id or node not in self._members:
            return
        if self._probe is not None and self._probe.target == node:
            self._probe = None
        self._watched.pop(node, None)
        if node in self._anchors:
            self._anchors.remove(node)
        self._remove(node)

    def leave(self, now: float) -> None:
        """Leave gracefully: gossip our departure and stop probing.  Keep calling handle_timer
        (gossip continues) until :attr:`leave_done`, then stop the core."""
        if self._leaving:
            return
        self._leaving = True
        self._probe = None
        self._me.status = Status.LEFT
        self._me.since = now
        self._rows = None
        self._broadcast(Left(self.self_id, self._me.incarnation))

    def set_meta(self, meta: bytes, reachable: bool, now: float) -> None:
        """Change our metadata or reachability; gossips alive with the next incarnation."""
        self._me.meta = meta
        self._me.reachable = reachable
        self._me.incarnation = min(self._me.incarnation + 1, MAX_INCARNATION)
        self._rows = None
        self._next_heartbeat = now
        self._broadcast(Alive(self.self_id, self._me.incarnation, meta, reachable))

    def publish_blob(self, blob: bytes) -> bytes:
        """Hold a local blob for push-pull; returns its key.  It must pass ``verify_blob``."""
        key = self._verify(blob) if self._verify is not None and len(blob) <= MAX_BLOB_LEN else None
        if key is None:
            raise LocalError("blob rejected by verify_blob", reason="blob")
        self._store_blob(key, blob, replace=True)
        return key

    def remove_blob(self, key: bytes) -> None:
        """Forget the blob held under ``key`` (e.g. superseded by a newer record)."""
        blob = self._blobs.pop(key, None)
        if blob is not None:
            self._blob_keys.pop(blob, None)
            self._blob_tuple = None

    def blobs(self) -> dict[bytes, bytes]:
        """The verified blobs held, by key."""
        return dict(self._blobs)

    def receive(self, msg: Message, sender: bytes, now: float) -> None:
        """Handle one message from ``sender`` (as authenticated by the transport)."""
        if sender == self.self_id:
            return
        m = self._members.get(sender)
        if m is not None:
            m.last_heard = now
            if not m.reachable and sender in self._watched:
                self._watched[sender] = now
            if m.status is Status.DEAD:
                self._rejoin.hint(sender, now)
        t = type(msg)
        if t is Ping:
            self._apply_all(msg.updates, sender, now)  # type: ignore[union-attr]
            self._on_ping(msg, sender, now)  # type: ignore[arg-type]
        elif t is Ack:
            self._apply_all(msg.updates, sender, now)  # type: ignore[union-attr]
            self._on_ack(msg.seq, now)  # type: ignore[union-attr]
        elif t is Gossip:
            self._apply_all(msg.updates, sender, now)  # type: ignore[union-attr]
        elif t is PingReq:
            self._apply_all(msg.updates, sender, now)  # type: ignore[union-attr]
            self._on_ping_req(msg, sender, now)  # type: ignore[arg-type]
        elif t is Nack:
            self._apply_all(msg.updates, sender, now)  # type: ignore[union-attr]
            p = self._probe
            if p is not None and p.seq == msg.seq and sender in p.helpers and sender not in p.nackers:  # type: ignore[union-attr]
                p.nackers += (sender,)
        elif t is PushPullRequest:
            self._merge(msg, sender, now)  # type: ignore[arg-type]
            self._out.append((sender, PushPullResponse(self._state_rows(), self._blob_list())))
        elif t is PushPullResponse:
            self._merge(msg, sender, now)  # type: ignore[arg-type]

    def handle_timer(self, now: float) -> None:
        """Run every timer that is due at ``now``."""
        cfg = self.config
        while self._relay_heap and self._relay_heap[0][0] <= now:
            _, seq = heapq.heappop(self._relay_heap)
            relay = self._relays.pop(seq, None)
            if relay is not None:
                origin, origin_seq, _ = relay
                self._out.append((origin, Nack(origin_seq, self._piggyback())))
        while self._suspicion_heap and self._suspicion_heap[0][0] <= now:
            deadline, node = heapq.heappop(self._suspicion_heap)
            m = self._members.get(node)
            s = m.suspicion if m is not None else None
            if m is None or s is None or s.deadline != deadline:
                continue
            if not s.probed and m.reachable and s.verifications < _VERIFY_PINGS and not self._leaving:
                # We only heard of this suspicion: ask the member itself before declaring it dead,
                # in case we missed its refutation (it answers a stale accusation with its alive).
                s.verifications += 1
                s.deadline = now + self._awareness.scale(cfg.probe_timeout)
                heapq.heappush(self._suspicion_heap, (s.deadline, node))
                self._out.append((node, Ping(self._next_seq(), node,
                                             (Suspect(node, m.incarnation, self.self_id),) + self._piggyback())))
                continue
            self._apply(Dead(node, m.incarnation, self.self_id), now)
        if not self._leaving:
            p = self._probe
            if p is not None and not p.acked and not p.indirect and now >= p.timeout_at:
                self._indirect_probe(p, now)
            if now >= self._next_probe:
                self._probe_tick(now)
            if not self._me.reachable and now >= self._next_heartbeat:
                # not scaled by health: it is our proof of life, anchors time it with the base interval
                self._next_heartbeat = now + cfg.probe_interval
                self._heartbeat_anchors(now)
            if now >= self._next_push_pull:
                self._next_push_pull = now + push_pull_scale(cfg.push_pull_interval, self._n_live)
                self._push_pull(now)
            if now >= self._next_reconnect:
                self._next_reconnect = now + cfg.reconnect_interval
                self._reconnect(now)
        self._rejoin_tick(now)
        if now >= self._next_gossip:
            nxt = self._next_gossip + cfg.gossip_interval
            self._next_gossip = nxt if nxt > now else now + cfg.gossip_interval
            self._gossip(now)

    # ------------------------------------------------------------------ handlers

    def _on_ping(self, msg: Ping, sender: bytes, now: float) -> None:
        if msg.target != self.self_id:
            return
        if msg.flags & FLAG_WATCH:
            self._watched[sender] = now
        elif msg.flags & FLAG_UNWATCH:
            self._watched.pop(sender, None)
        updates = self._piggyback()
        me = self._me
        for u in msg.updates:
            if u.node == me.node and type(u) is not Alive and type(u) is not Left and not self._leaving:
                # accused in the ping itself (buddy system): answer with our current alive first,
                # even if the accusation was stale and so did not need a new refutation
                updates = (Alive(me.node, me.incarnation, me.meta, me.reachable),) + updates
                break
        m = self._members.get(sender)
        if m is not None and m.status is Status.SUSPECT:  # tell it first, so it can refute
            updates = (Suspect(sender, m.incarnation, self.self_id),) + updates
        elif m is not None and m.status is Status.DEAD:
            updates = (Dead(sender, m.incarnation, self.self_id),) + updates
        self._out.append((sender, Ack(msg.seq, updates)))

    def _on_ack(self, seq: int, now: float) -> None:
        p = self._probe
        if p is not None and p.seq == seq:
            if not p.acked:
                p.acked = True
                self._awareness.apply_delta(-1)
            return
        relay = self._relays.pop(seq, None)
        if relay is not None:
            origin, origin_seq, _ = relay
            self._out.append((origin, Ack(origin_seq, self._piggyback())))

    def _on_ping_req(self, msg: PingReq, sender: bytes, now: float) -> None:
        if msg.target == self.self_id:
            self._out.append((sender, Ack(msg.seq, self._piggyback())))
            return
        seq = self._next_seq()
        deadline = now + self.config.probe_timeout
        self._relays[seq] = (sender, msg.seq, deadline)
        heapq.heappush(self._relay_heap, (deadline, seq))
        self._out.append((msg.target, Ping(seq, msg.target, self._piggyback())))

    def _merge(self, msg: PushPullRequest | PushPullResponse, sender: bytes, now: float) -> None:
        me = self.self_id
        members = self._members
        codes = _STATUS_CODE
        tops: dict[bytes, int] = {}
        for s in msg.states:
            m = members.get(s.node)
            inc = s.incarnation
            if s.node != sender and (m is None or inc >= m.incarnation):
                inc = self._bound(s.node, inc, m, tops)
            if m is not None and (inc < m.incarnation or (
                    inc == m.incarnation and s.status == codes[m.status])):
                continue  # stale or already known: the table would ignore it
            if s.status == STATUS_ALIVE:
                self._apply(Alive(s.node, inc, s.meta, s.reachable), now)
            elif s.status == STATUS_LEFT:
                self._apply(Left(s.node, inc), now)
            else:  # suspect or dead: suspect it ourselves rather than trust a remote death
                self._apply(Suspect(s.node, inc, me), now)
        if msg.blobs:
            self._accept_blobs(msg.blobs)

    # ------------------------------------------------------------------ state transitions

    def _apply_all(self, updates: tuple[Update, ...], sender: bytes, now: float) -> None:
        members = self._members
        tops: dict[bytes, int] | None = None
        for u in updates:
            node = u.node
            if node != sender:  # hearsay: bounded (module docstring, "Incarnations")
                m = members.get(node)
                if m is None or u.incarnation >= m.incarnation:  # not stale: may act
                    if tops is None:
                        tops = {}
                    inc = self._bound(node, u.incarnation, m, tops)
                    if inc != u.incarnation:
                        u = dataclasses.replace(u, incarnation=inc)
            self._apply(u, now)

    def _bound(self, node: bytes, inc: int, m: _Member | None, tops: dict[bytes, int]) -> int:
        """The incarnation a claim about ``node`` from someone else may set: at most
        ``max_incarnation_step`` above what we held when the message arrived (``tops`` keeps
        that height per node for the rest of the message)."""
        top = tops.get(node)
        if top is None:
            held = 0 if m is None else m.incarnation
            top = tops[node] = min(MAX_INCARNATION, held + self.config.max_incarnation_step)
        if inc <= top:
            return inc
        self.clamped += 1
        return top

    def _apply(self, u: Update, now: float) -> None:
        node = u.node
        m = self._members.get(node)
        if m is not None:
            # Fast exits, only for cells of the table that ignore the update (most updates
            # arrive many times); everything else goes through ``decide``.
            ui, inc = u.incarnation, m.incarnation
            if ui < inc:
                return
            if ui == inc:
                t = type(u)
                if t is Alive:
                    return
                st = m.status
                if st is Status.LEFT or (st is Status.DEAD and t is not Left):
                    return
                if st is Status.SUSPECT and t is Suspect:
                    s = m.suspicion
                    if s is None or s.confirmations >= s.k or s.has(u.source):  # type: ignore[union-attr]
                        return
        is_self = node == self.self_id
        action = decide(u, None if m is None else m.status, 0 if m is None else m.incarnation,
                        is_self, self._leaving)
        if action is Action.IGNORE:
            return
        self._rows = None
        if action is Action.REFUTE:
            self._refute(u, now)
            return
        if action is Action.ADD:
            assert isinstance(u, Alive)
            self._add(node, u.incarnation, u.meta, u.reachable, now)
            self._broadcast(u)
            return
        assert m is not None
        if action is Action.UPDATE or action is Action.RECOVER or action is Action.REVIVE:
            assert isinstance(u, Alive)
            changed = u.meta != m.meta or u.reachable != m.reachable
            old = m.status
            m.incarnation, m.meta, m.reachable = u.incarnation, u.meta, u.reachable
            if action is not Action.UPDATE:
                self._set_status(m, Status.ALIVE, now)
            self._broadcast(u)
            if action is Action.REVIVE:
                if old is Status.DEAD or old is Status.LEFT:
                    self._insert_probe(node)
                self._events.append(MemberJoined(node, u.incarnation, u.meta, u.reachable))
            elif action is Action.RECOVER:
                self._events.append(MemberAlive(node, u.incarnation))
                if changed:
                    self._events.append(MemberUpdated(node, u.incarnation, u.meta, u.reachable))
            elif changed:
                self._events.append(MemberUpdated(node, u.incarnation, u.meta, u.reachable))
        elif action is Action.SUSPECT:
            assert isinstance(u, Suspect)
            m.incarnation = u.incarnation
            self._set_status(m, Status.SUSPECT, now)
            m.suspicion = self._new_suspicion(u.source, now)
            heapq.heappush(self._suspicion_heap, (m.suspicion.deadline, node))
            self._broadcast(u)
            self._events.append(MemberSuspect(node, u.incarnation, u.source))
        elif action is Action.CONFIRM:
            assert isinstance(u, Suspect) and m.suspicion is not None
            m.incarnation = u.incarnation
            if m.suspicion.confirm(u.source):
                heapq.heappush(self._suspicion_heap, (m.suspicion.deadline, node))
                self._broadcast(u)
        elif action is Action.DEAD:
            assert isinstance(u, Dead)
            m.incarnation = u.incarnation
            self._set_status(m, Status.DEAD, now)
            self._broadcast(u)
            self._events.append(MemberDead(node, u.incarnation, u.source))
        elif action is Action.LEFT:
            m.incarnation = u.incarnation
            self._set_status(m, Status.LEFT, now)
            self._broadcast(u)
            self._events.append(MemberLeft(node, u.incarnation))

    def _refute(self, u: Update, now: float) -> None:
        me = self._me
        old = me.incarnation
        me.incarnation = min(max(old, u.incarnation) + 1, MAX_INCARNATION)
        self._awareness.apply_delta(1)
        self._broadcast(Alive(self.self_id, me.incarnation, me.meta, me.reachable))
        if me.incarnation > old:  # at the bound we can only repeat ourselves
            self._events.append(Refuted(me.incarnation))

    def _set_status(self, m: _Member, status: Status, now: float) -> None:
        was_live = m.status in _LIVE
        is_live = status in _LIVE
        m.status = status
        m.since = now
        if status is not Status.SUSPECT:
            m.suspicion = None
        self._rejoin_status(m, status, now)
        if was_live and not is_live:
            self._n_live -= 1
            self._watched.pop(m.node, None)
        elif is_live and not was_live:
            self._n_live += 1

    def _add(self, node: bytes, inc: int, meta: bytes, reachable: bool, now: float, probe: bool = True) -> None:
        self._members[node] = _Member(node, inc, Status.ALIVE, meta, reachable, now)
        self._index[node] = len(self._others)
        self._others.append(node)
        self._n_live += 1
        self._rows = None
        if probe:
            self._insert_probe(node)
        self._events.append(MemberJoined(node, inc, meta, reachable))

    def _remove(self, node: bytes) -> None:
        self._rows = None
        self._rejoin.drop(node)
        m = self._members.pop(node)
        if m.status in _LIVE:
            self._n_live -= 1
        i = self._index.pop(node)
        last = self._others.pop()
        if last != node:
            self._others[i] = last
            self._index[last] = i

    def _new_suspicion(self, source: bytes, now: float) -> Suspicion:
        cfg = self.config
        k = cfg.suspicion_mult - 2
        n = self._n_live
        if n - 2 < k:
            k = 0
        lo = suspicion_timeout(cfg.suspicion_mult, n, cfg.probe_interval)
        return Suspicion(source, k, lo, cfg.suspicion_max_timeout_mult * lo, now)

    # ------------------------------------------------------------------ probing

    def _insert_probe(self, node: bytes) -> None:
        order = self._probe_order
        order.insert(self._rng.randint(0, len(order)), node)

    def _reset_probe_order(self, now: float) -> None:
        for node in [n for n in self._others if self._expired(self._members[n], now)]:
            self._remove(node)
        order = [n for n in self._others if self._members[n].status in _LIVE]
        self._rng.shuffle(order)
        self._probe_order = order
        self._probe_pos = 0

    def _expired(self, m: _Member, now: float) -> bool:
        if m.status is Status.DEAD:
            return now - m.since > self.config.dead_retention
        if m.status is Status.LEFT:
            return now - m.since > self.config.left_retention
        return False

    def _next_target(self, now: float) -> bytes | None:
        for attempt in range(2):
            order = self._probe_order
            while self._probe_pos < len(order):
                node = order[self._probe_pos]
                self._probe_pos += 1
                m = self._members.get(node)
                if m is not None and m.status in _LIVE and m.reachable:
                    return node
            if attempt == 0:
                self._reset_probe_order(now)
        return None

    def _probe_tick(self, now: float) -> None:
        cfg = self.config
        self._finish_probe(now)
        self._next_probe = now + self._awareness.scale(cfg.probe_interval)
        if self._watched:
            self._check_watched(now)
        if self._seeds and self._n_live <= 1 and now >= self._join_retry_at:
            self._join_backoff = min(2 * self._join_backoff, cfg.push_pull_interval)
            self._join_retry_at = now + self._join_backoff
            self._send_join()
        target = self._next_target(now)
        if target is None:
            return
        seq = self._next_seq()
        self._probe = _Probe(target, seq, now + self._awareness.scale(cfg.probe_timeout))
        updates = self._piggyback()
        m = self._members[target]
        if cfg.buddy_system and m.status is Status.SUSPECT:
            updates = (Suspect(target, m.incarnation, self.self_id),) + updates
        self._out.append((target, Ping(seq, target, updates)))

    def _indirect_probe(self, p: _Probe, now: float) -> None:
        p.indirect = True
        helpers = self._random_members(
            self.config.indirect_checks,
            lambda m: m.status is Status.ALIVE and m.reachable and m.node != p.target,
        )
        p.helpers = tuple(helpers)
        for h in helpers:
            self._out.append((h, PingReq(p.seq, p.target, self._piggyback())))
        if self.config.fallback_ping:
            self._out.append((p.target, Ping(p.seq, p.target, self._piggyback())))

    def _finish_probe(self, now: float) -> None:
        p = self._probe
        self._probe = None
        if p is None or p.acked:
            return
        if p.helpers:
            self._awareness.apply_delta(len(p.helpers) - len(p.nackers))
        else:
            self._awareness.apply_delta(1)
        m = self._members.get(p.target)
        if m is not None and m.status in _LIVE:
            self._apply(Suspect(p.target, m.incarnation, self.self_id), now)
            if m.suspicion is not None:
                m.suspicion.probed = True
            if m.status is Status.SUSPECT:
                # Re-probe our own suspect soon: the ping carries the suspicion (buddy system), so
                # it can refute even if our gossip about it was lost (e.g. across a partition).
                self._probe_order.insert(min(self._probe_pos + _REPROBE_AFTER, len(self._probe_order)), p.target)

    # ------------------------------------------------------------------ outbound-only members

    def _heartbeat_anchors(self, now: float) -> None:
        keep: list[bytes] = []
        for a in self._anchors:
            m = self._members.get(a)
            if m is not None and m.status is Status.ALIVE and m.reachable:
                keep.append(a)
            elif m is not None and m.status in _LIVE:
                self._out.append((a, Ping(self._next_seq(), a, (), FLAG_UNWATCH)))
        want = self.config.outbound_anchors - len(keep)
        if want > 0:
            chosen = set(keep)
            keep.extend(self._random_members(
                want, lambda m: m.status is Status.ALIVE and m.reachable and m.node not in chosen))
        self._anchors = keep
        for a in keep:
            self._out.append((a, Ping(self._next_seq(), a, self._piggyback(), FLAG_WATCH)))

    def _check_watched(self, now: float) -> None:
        limit = self._awareness.scale(self.config.outbound_watch_mult * self.config.probe_interval)
        for node, last in list(self._watched.items()):
            m = self._members.get(node)
            if m is None or m.reachable or m.status not in _LIVE:
                del self._watched[node]
            elif now - last > limit:
                del self._watched[node]
                self._apply(Suspect(node, m.incarnation, self.self_id), now)
                if m.suspicion is not None:
                    m.suspicion.probed = True

    # ------------------------------------------------------------------ dissemination

    def _broadcast(self, u: Update) -> None:
        self._queue.push(u, _update_size(u))

    def _piggyback(self) -> tuple[Update, ...]:
        if not len(self._queue):
            return ()
        if self._limit_n != self._n_live:
            self._limit_n = self._n_live
            self._limit = retransmit_limit(self.config.retransmit_mult, self._n_live)
        return tuple(self._queue.take(self.config.packet_budget, self._limit))

    def _gossip(self, now: float) -> None:
        if not len(self._queue):
            return
        dead_time = self.config.gossip_to_the_dead_time
        k = self.config.gossip_nodes
        others, members, rnd = self._others, self._members, self._rng.random
        n = len(others)
        targets: list[bytes] = []
        if n > 4 * k:  # common case inlined: rejection sampling, as in _random_members
            for _ in range(4 * k + 8):
                x = others[int(rnd() * n)]
                m = members[x]
                if x not in targets and m.reachable and (
                        m.status in _LIVE or (m.status is Status.DEAD and now - m.since <= dead_time)):
                    targets.append(x)
                    if len(targets) == k:
                        break
        if len(targets) < k:
            chosen = set(targets)
            targets.extend(self._random_members(
                k - len(targets),
                lambda m: m.node not in chosen and m.reachable and (
                    m.status in _LIVE or (m.status is Status.DEAD and now - m.since <= dead_time)),
            ))
        for w in self._watched:  # outbound-only members we keep a connection with
            if w not in targets:
                targets.append(w)
        for t in targets:
            updates = self._piggyback()
            if not updates:
                break
            self._out.append((t, Gossip(updates)))

    def _random_members(self, k: int, ok: Callable[[_Member], bool]) -> list[bytes]:
        """Up to ``k`` distinct random other members satisfying ``ok``."""
        others = self._others
        n = len(others)
        if n == 0 or k <= 0:
            return []
        members = self._members
        rng = self._rng
        if n <= 4 * k:
            cands = [x for x in others if ok(members[x])]
            return rng.sample(cands, min(k, len(cands)))
        picked: list[bytes] = []
        tries = 0
        while len(picked) < k and tries < 4 * k + 8:
            tries += 1
            x = others[int(rng.random() * n)]
            if x not in picked and ok(members[x]):
                picked.append(x)
        if len(picked) < k:  # sparse: fall back to a scan
            cands = [x for x in others if x not in picked and ok(members[x])]
            picked.extend(rng.sample(cands, min(k - len(picked), len(cands))))
        return picked

    # ------------------------------------------------------------------ anti-entropy

    def _state_rows(self) -> tuple[MemberState, ...]:
        rows = self._rows
        if rows is None:
            rows = self._rows = tuple(
                MemberState(m.node, m.incarnation, _STATUS_CODE[m.status], m.meta, m.reachable)
                for m in self._members.values())
        return rows

    def _push_pull(self, now: float) -> None:
        peers = self._random_members(1, lambda m: m.status is Status.ALIVE and m.reachable)
        if peers:
            self._out.append((peers[0], PushPullRequest(self._state_rows(), self._blob_list())))

    def _reconnect(self, now: float) -> None:
        dead = [n for n in self._others if self._members[n].status is Status.DEAD and self._members[n].reachable]
        if not dead:
            return
        if self._rng.random() < len(dead) / max(1, self._n_live - 1):
            target = dead[int(self._rng.random() * len(dead))]
            self._out.append((target, PushPullRequest(self._state_rows(), self._blob_list())))

    # ------------------------------------------------------------------ rejoin of the dead

    def _rejoin_status(self, m: _Member, status: Status, now: float) -> None:
        """Start or stop the rejoin probes of ``m`` as its status changes."""
        if status is Status.DEAD:
            if m.node not in self._rejoin:
                self._rejoin.track(m.node, now)
        else:
            self._rejoin.drop(m.node)

    def _rejoin_tick(self, now: float) -> None:
        """Ping each dead member whose rejoin probe is due, carrying our accusation."""
        due = self._rejoin.due(now) if self._rejoin.next_due() is not None else ()
        for node in due:
            m = self._members.get(node)
            if self._leaving or m is None or m.status is not Status.DEAD or not m.reachable:
                continue  # an outbound-only member rejoins by probing us (we are reachable)
            accusation = Dead(node, m.incarnation, self.self_id)
            self._out.append((node, Ping(self._next_seq(), node, (accusation,) + self._piggyback())))

    # ------------------------------------------------------------------ blobs

    def _blob_list(self) -> tuple[bytes, ...]:
        if self._blob_tuple is None:
            self._blob_tuple = tuple(self._blobs.values())
        return self._blob_tuple

    def _store_blob(self, key: bytes, blob: bytes, replace: bool) -> bool:
        old = self._blobs.get(key)
        if old is not None:
            if not replace:
                return False
            self._blob_keys.pop(old, None)
        elif len(self._blobs) >= self.config.max_blobs:
            return False
        self._blobs[key] = blob
        self._blob_keys[blob] = key
        self._blob_tuple = None
        return True

    def _accept_blobs(self, blobs: tuple[bytes, ...]) -> None:
        verify = self._verify
        for blob in blobs:
            if blob in self._blob_keys or blob in self._rejected:
                continue
            key = verify(blob) if verify is not None else None
            if key is not None and self._store_blob(key, blob, replace=False):
                self._events.append(BlobAccepted(key, blob))
                continue
            self._rejected[blob] = None
            if len(self._rejected) > _MAX_REJECTED:
                del self._rejected[next(iter(self._rejected))]

    # ------------------------------------------------------------------ helpers

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0x7FFF_FFFF_FFFF_FFFF
        return self._seq

    @staticmethod
    def _info(m: _Member) -> MemberInfo:
        return MemberInfo(m.node, m.status, m.incarnation, m.meta, m.reachable, m.last_heard, m.since)
