"""A deterministic in-memory network of real membership cores (for tests and benchmarks).

One manual clock (an event heap) drives many :class:`~meshd.swim.core.Membership` cores.  A
seeded router between them can drop, duplicate and delay messages (``delay + U(0, jitter)``),
partition the nodes into groups, block single directions, and model outbound-only nodes: a
message to a node added with ``reachable=False`` arrives only if that node sent something to the
sender within ``conn_ttl`` (it rides the connection the node opened).  "Slow" nodes handle every
message up to ``slow_extra`` (default two probe timeouts) late.  Nodes can crash (stop for good)
or pause and resume (messages wait, timers are late).

Bytes sent per node are the exact size of the msgpack encoding of each message, computed
arithmetically (with a per-update cache) instead of encoding; ``codec_check=True`` additionally
sends every message through ``to_bytes``/``from_bytes``.

Same seed, same calls -> same result: every random draw comes from one ``random.Random(seed)``
(each core gets its own generator seeded from it), ties in the heap are broken by a counter.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from meshd.swim.config import SwimConfig
from meshd.swim.core import Membership, VerifyBlob
from meshd.swim.events import Event, Status
from meshd.swim.messages import (
    Ack,
    Alive,
    Dead,
    Gossip,
    Message,
    Nack,
    Ping,
    PingReq,
    PushPullRequest,
    PushPullResponse,
    Suspect,
    Update,
    encode_message,
    from_bytes,
    to_bytes,
)

_DELIVER = 0
_TIMER = 1
_CALL = 2

EventHook = Callable[[float, bytes, Event], None]


def _isz(v: int) -> int:
    if v < 128:
        return 1
    if v < 256:
        return 2
    if v < 65536:
        return 3
    if v < 4294967296:
        return 5
    return 9


def _bsz(b: bytes) -> int:
    n = len(b)
    return n + 2 if n < 256 else (n + 3 if n < 65536 else n + 5)


def _lsz(n: int) -> int:
    return 1 if n < 16 else (3 if n < 65536 else 5)


def update_size(u: Update) -> int:
    """Exact msgpack size of one encoded update."""
    t = type(u)
    if t is Alive:
        return 3 + _isz(u.incarnation) + _bsz(u.node) + _bsz(u.meta)  # type: ignore[union-attr]
    if t is Suspect or t is Dead:
        return 2 + _isz(u.incarnation) + _bsz(u.node) + _bsz(u.source)  # type: ignore[union-attr]
    return 2 + _isz(u.incarnation) + _bsz(u.node)


@dataclass(slots=True)
class SimNode:
    """One simulated site: a core plus what the network knows about it."""

    id: bytes
    core: Membership
    reachable: bool = True
    meta: bytes = b""
    slow: bool = False
    crashed: bool = False
    paused: bool = False
    held: list[tuple[bytes, Message]] = field(default_factory=list)
    dialed: dict[bytes, float] = field(default_factory=dict)
    bytes_sent: int = 0
    msgs_sent: int = 0
    timer_at: float | None = None
    timer_ver: int = 0
    started: float = 0.0


class Simulator:
    """Many membership cores on one seeded, manually clocked network."""

    def __init__(
        self,
        *,
        seed: int = 0,
        config: SwimConfig | None = None,
        loss: float = 0.0,
        duplicate: float = 0.0,
        delay: float = 0.005,
        jitter: float = 0.005,
        slow_extra: float | None = None,
        conn_ttl: float = 120.0,
        codec_check: bool = False,
        record_events: bool = True,
        on_event: EventHook | None = None,
        verify_blob: VerifyBlob | None = None,
        id_len: int = 32,
    ) -> None:
        self.config = config or SwimConfig()
        self.rng = random.Random(seed)
        self.loss = loss
        self.duplicate = duplicate
        self.delay = delay
        self.jitter = jitter
        self.slow_extra = 2 * self.config.probe_timeout if slow_extra is None else slow_extra
        self.conn_ttl = conn_ttl
        self.codec_check = codec_check
        self.record_events = record_events
        self.on_event = on_event
        self.verify_blob = verify_blob
        self.id_len = id_len
        self.now = 0.0
        self.nodes: dict[bytes, SimNode] = {}
        self.events: list[tuple[float, bytes, Event]] = []
        """(time, observer, event) for every event of every core, if ``record_events``."""
        self.delivered = 0
        self.dropped = 0
        self._heap: list[tuple[float, int, int, Any, Any, Any]] = []
        self._seq = 0
        self._group: dict[bytes, int] = {}
        self._blocked: set[tuple[bytes, bytes]] = set()
        self._sizes: dict[int, tuple[object, int]] = {}

    # ------------------------------------------------------------------ building

    def make_id(self, i: int) -> bytes:
        """The deterministic id of the i-th site: ``b"n00042"`` padded with dots."""
        return f"n{i:05d}".encode().ljust(self.id_len, b".")

    def add_node(
        self,
        node_id: bytes | None = None,
        *,
        reachable: bool = True,
        slow: bool = False,
        meta: bytes = b"",
        join: Iterable[bytes] = (),
        known: Iterable[bytes] = (),
    ) -> bytes:
        """Start a site now; ``join`` seeds get a push-pull, ``known`` ones are restored silently."""
        if node_id is None:
            node_id = self.make_id(len(self.nodes))
        core = Membership(node_id, self.config, random.Random(self.rng.getrandbits(64)), self.now,
                          meta=meta, reachable=reachable, verify_blob=self.verify_blob)
        node = SimNode(node_id, core, reachable=reachable, meta=meta, slow=slow, started=self.now)
        self.nodes[node_id] = node
        known = list(known)
        if known:
            core.restore(((k, 0, self.nodes[k].meta, self.nodes[k].reachable) for k in known if k in self.nodes), self.now)
        seeds = list(join)
        if seeds:
            core.join(seeds, self.now)
        self._after(node)
        return node_id

    def bootstrap(self, n: int, *, slow_fraction: float = 0.0, unreachable_fraction: float = 0.0) -> list[bytes]:
        """Start ``n`` sites that already know each other (as after a restart from saved state).

        Their start-up events (MemberJoined for every other site) are discarded."""
        ids = [self.make_id(len(self.nodes) + i) for i in range(n)]
        slow = set(self.rng.sample(range(n), round(slow_fraction * n)))
        unreach = set(self.rng.sample(range(n), round(unreachable_fraction * n)))
        entries = [(x, 0, b"", i not in unreach) for i, x in enumerate(ids)]
        for i, x in enumerate(ids):
            core = Membership(x, self.config, random.Random(self.rng.getrandbits(64)), self.now,
                              reachable=i not in unreach, verify_blob=self.verify_blob)
            core.restore((e for e in entries if e[0] != x), self.now)
            core.events()
            node = SimNode(x, core, reachable=i not in unreach, slow=i in slow, started=self.now)
            self.nodes[x] = node
            self._after(node)
        return ids

    # ------------------------------------------------------------------ faults

    def crash(self, node_id: bytes) -> None:
        """Stop a site for good: it sends and handles nothing more."""
        self.nodes[node_id].crashed = True

    def pause(self, node_id: bytes) -> None:
        """Freeze a site: messages to it wait, its timers do not run."""
        self.nodes[node_id].paused = True

    def resume(self, node_id: bytes) -> None:
        """Unfreeze a site: it handles the waiting messages and late timers now."""
        node = self.nodes[node_id]
        node.paused = False
        held, node.held = node.held, []
        for src, msg in held:
            self._push(self.now, _DELIVER, node_id, src, msg)
        node.timer_at = None
        self._arm(node)

    def leave(self, node_id: bytes) -> None:
        """Ask a site to leave gracefully (it keeps gossiping its departure)."""
        node = self.nodes[node_id]
        node.core.leave(self.now)
        self._after(node)

    def partition(self, *groups: Iterable[bytes]) -> None:
        """Split the network: sites in different groups cannot talk; unlisted sites are group 0."""
        self._group = {}
        for gi, g in enumerate(groups):
            for x in g:
                self._group[x] = gi

    def heal(self) -> None:
        """Remove any partition and every blocked direction."""
        self._group = {}
        self._blocked = set()

    def block(self, src: bytes, dst: bytes) -> None:
        """Drop everything ``src`` sends to ``dst`` (one direction only)."""
        self._blocked.add((src, dst))

    def inject(self, src: bytes, dst: bytes, msg: Message) -> None:
        """Send ``msg`` from site ``src`` to ``dst`` now, whatever ``src``'s core would say (a
        hostile member's forgery).  It crosses the network like any other message."""
        self._route(self.nodes[src], dst, msg)

    def call_at(self, when: float, fn: Callable[[], None]) -> None:
        """Run ``fn()`` when the clock reaches ``when`` (to script faults inside a run)."""
        self._push(when, _CALL, fn, None, None)

    # ------------------------------------------------------------------ running

    def run_until(self, until: float) -> None:
        """Process every delivery and timer up to ``until``, then set the clock to it."""
        heap = self._heap
        nodes = self.nodes
        pop = heapq.heappop
        while heap and heap[0][0] <= until:
            when, _, kind, a, b, c = pop(heap)
            self.now = when
            if kind == _DELIVER:
                node = nodes[a]
                if node.crashed:
                    continue
                if node.paused:
                    node.held.append((b, c))
                    continue
                self.delivered += 1
                node.core.receive(c, b, when)
                self._after(node)
            elif kind == _TIMER:
                node = nodes[a]
                if b != node.timer_ver or node.crashed or node.paused:
                    continue
                node.timer_at = None
                node.core.handle_timer(when)
                self._after(node)
            else:
                a()
        self.now = until

    def run_for(self, seconds: float) -> None:
        """Advance the clock by ``seconds``."""
        self.run_until(self.now + seconds)

    # ------------------------------------------------------------------ observing

    def live_ids(self) -> list[bytes]:
        """Sites neither crashed nor left."""
        return [x for x, n in self.nodes.items() if not n.crashed and not n.core.leaving]

    def status(self, observer: bytes, node: bytes) -> Status | None:
        """What ``observer`` believes about ``node`` (None: unknown)."""
        info = self.nodes[observer].core.member(node)
        return None if info is None else info.status

    def message_size(self, msg: Message) -> int:
        """Exact size of ``to_bytes(msg)``, computed without encoding for the common messages."""
        t = type(msg)
        if t is Gossip:
            head = 2
        elif t is Ack or t is Nack:
            head = 2 + _isz(msg.seq)  # type: ignore[union-attr]
        elif t is Ping:
            head = 2 + _isz(msg.seq) + _bsz(msg.target) + _isz(msg.flags)  # type: ignore[union-attr]
        elif t is PingReq:
            head = 2 + _isz(msg.seq) + _bsz(msg.target)  # type: ignore[union-attr]
        elif t is PushPullRequest or t is PushPullResponse:
            return self._push_pull_size(msg)  # type: ignore[arg-type]
        else:
            return len(msgpack.packb(encode_message(msg), use_bin_type=True))
        updates = msg.updates  # type: ignore[union-attr]
        size = head + _lsz(len(updates))
        cache = self._sizes
        for u in updates:
            hit = cache.get(id(u))
            if hit is None or hit[0] is not u:
                hit = (u, update_size(u))
                if len(cache) > 1_000_000:
                    cache.clear()
                cache[id(u)] = hit
            size += hit[1]
        return size

    def _push_pull_size(self, msg: PushPullRequest | PushPullResponse) -> int:
        size = 2 + (1 if type(msg) is PushPullRequest else 0) + _lsz(len(msg.states)) + _lsz(len(msg.blobs))
        cache = self._sizes
        states = msg.states
        hit = cache.get(id(states))
        if hit is not None and hit[0] is states:
            size += hit[1]
        else:
            rows = 0
            for r in states:
                rows += 3 + _bsz(r.node) + _isz(r.incarnation) + _bsz(r.meta)
            if len(cache) > 1_000_000:
                cache.clear()
            cache[id(states)] = (states, rows)
            size += rows
        for b in msg.blobs:
            size += _bsz(b)
        return size

    # ------------------------------------------------------------------ internals

    def _push(self, when: float, kind: int, a: Any, b: Any, c: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, a, b, c))

    def _arm(self, node: SimNode) -> None:
        t = node.core.get_timer()
        if t is not None and t != node.timer_at:
            node.timer_at = t
            node.timer_ver += 1
            self._seq += 1
            heapq.heappush(self._heap, (max(self.now, t), self._seq, _TIMER, node.id, node.timer_ver, None))

    def _after(self, node: SimNode) -> None:
        core = node.core
        out = core.outgoing()
        if out:
            for dst, msg in out:
                self._route(node, dst, msg)
        ev = core.events()
        if ev:
            now = self.now
            hook = self.on_event
            for e in ev:
                if hook is not None:
                    hook(now, node.id, e)
                if self.record_events:
                    self.events.append((now, node.id, e))
        self._arm(node)

    def _route(self, src: SimNode, dst_id: bytes, msg: Message) -> None:
        src.msgs_sent += 1
        src.bytes_sent += self.message_size(msg)
        now = self.now
        sid = src.id
        if not src.reachable:
            src.dialed[dst_id] = now
        dst = self.nodes.get(dst_id)
        if dst is None or dst.crashed:
            self.dropped += 1
            return
        if not dst.reachable:
            last = dst.dialed.get(sid)
            if last is None or now - last > self.conn_ttl:
                self.dropped += 1
                return
        if self._group and self._group.get(sid, 0) != self._group.get(dst_id, 0):
            self.dropped += 1
            return
        if self._blocked and (sid, dst_id) in self._blocked:
            self.dropped += 1
            return
        rng = self.rng
        if self.loss and rng.random() < self.loss:
            self.dropped += 1
            return
        if self.codec_check:
            msg = from_bytes(to_bytes(msg))
        copies = 2 if self.duplicate and rng.random() < self.duplicate else 1
        for _ in range(copies):
            d = self.delay + rng.random() * self.jitter
            if dst.slow:
                d += rng.random() * self.slow_extra
            self._seq += 1
            heapq.heappush(self._heap, (now + d, self._seq, _DELIVER, dst_id, sid, msg))


__all__ = ["SimNode", "Simulator", "update_size"]
