"""A member that missed this site's key rotation learns it from this site itself (``rekey``).

A rotation reaches the other members by anti-entropy under the old key while that key still
opens their doors (:mod:`meshd.daemon.rotation`), and later through any member that holds it.  A
member that heard of it from nobody (it was down, and no third member relays it) would refuse the
new key as a stranger for good, and the old key is gone.  So a site whose exchange is refused
with ``not-member`` presents the chain of its own rotations (:func:`rotation_chain`), and the
peer port takes from a key it does not know this one narrow request besides ``join``.  The
checks, cheapest first, and nothing is stored unless all pass:

1. at most :data:`MAX_CHAIN` items; those this site holds already (by digest) come first;
2. the first it does not hold is parsed (signatures not checked) and must be a rotation of
   this mesh that hands over a key that is a member here *now*: not a retired key (a thief of
   a retired key must not add a second, conflicting rotation through this door), not a revoked
   one, not a stranger's;
3. past here the work is budgeted, per address and for the whole port: the rest are parsed,
   each must hand over to the next, none to a key this site knows already (a member, a retired
   key), and the last to the very key that sent the request (the connection is authenticated
   by it), so nobody presents another site's rotations;
4. only then the signatures, one rotation after the other (the first bad one ends the check).

Refusals are counted (``rekeys_refused``), throttled per address and key (a stranger sharing a
site's address cannot shut the site out), and logged at most once a minute.

The other way round: a member that only dials out cannot be told anything by the site that
rotated (which cannot reach it), and it dials the old key, which the site's peer port no longer
answers to.  So a member that gets no answer from a site asks the site's peer port on a plain
data connection (a ``rotations`` preamble, :mod:`meshd.channel.link`) which rotations hand over
the key it knows (:func:`ask_rotations`; the site answers with :func:`chain_from`); it checks
that they are one chain from that key (:func:`check_chain`) and keeps them as an exchange's
objects, every signature verified.  Nothing in the answer is trusted for being on that
connection: anybody could have answered, but only the holder of the key it knows could have
signed the first rotation.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import msgpack

from meshd.channel import link
from meshd.daemon.channels.dialing import dial
from meshd.daemon.counters import Counters
from meshd.errors import JoinRefused, ProtocolError, RecordError, RemoteError
from meshd.peer.server import PeerInfo
from meshd.peer.wire import MAX_REKEY_ITEMS
from meshd.state.throttle import Budgets, Throttle
from meshd.state.view import IngestResult, MeshView, Screened, Verified
from meshd.trust import records
from meshd.trust.identity import curve_public_of, site_id_of
from meshd.trust.records import Rotation, Signed, SiteRecord

log = logging.getLogger("meshd")

MAX_CHAIN = MAX_REKEY_ITEMS
"""Most rotations one ``rekey`` carries (a member that missed more cannot be told this way)."""
CHECKS_PER_SECOND = 96.0
"""Work per second that ``rekey`` requests may cost, from every address together, counted as
three per rotation checked: its parse and its two signatures (the old key's, the new key's)."""
CHECKS_BURST = 6.0 * MAX_CHAIN
"""Work they may cost at once (two full chains)."""
ADDRESS_CHECKS_PER_SECOND = 6.0
"""Work per second that the requests from one address may cost (a full chain passes on a full
budget whatever its size)."""
LOG_EVERY = 60.0
"""Seconds between two warnings about refused rotation chains (the rest are counted)."""


def rotation_chain(rotations: Iterable[Signed], key: bytes,
                   limit: int = MAX_CHAIN) -> list[bytes]:
    """The signed rotations that lead to ``key``, oldest first (the newest ``limit`` of them);
    empty if ``key`` never came from a rotation."""
    by_new = {s.body.new: s for s in rotations if isinstance(s.body, Rotation)}
    chain: list[bytes] = []
    seen: set[bytes] = set()
    while key in by_new and key not in seen and len(chain) < limit:
        seen.add(key)
        s = by_new[key]
        assert isinstance(s.body, Rotation)
        chain.append(s.raw)
        key = s.body.old
    chain.reverse()
    return chain


def own_rotations(rotations: Iterable[Signed], current: bytes,
                  limit: int = MAX_CHAIN + 1) -> list[Signed]:
    """The signed rotations that lead to ``current``, newest ``limit`` of them (a small list
    for :func:`chain_from` to answer from: scanning every rotation of the mesh for each
    stranger's question would cost the event loop that much each time)."""
    by_new = {s.body.new: s for s in rotations if isinstance(s.body, Rotation)}
    chain: list[Signed] = []
    key = current
    while key in by_new and len(chain) < limit:
        s = by_new[key]
        assert isinstance(s.body, Rotation)
        chain.append(s)
        key = s.body.old
    return chain


def chain_from(rotations: Iterable[Signed], current: bytes, old: bytes,
               limit: int = MAX_CHAIN) -> list[bytes] | None:
    """The signed rotations that lead from this site's past key ``old`` to its key ``current``,
    oldest first (empty if ``old`` is ``current``); None if ``old`` is not on that chain within
    ``limit`` rotations (another site's key, or one more than ``limit`` rotations ago)."""
    by_new = {s.body.new: s for s in rotations if isinstance(s.body, Rotation)}
    chain: list[bytes] = []
    key = current
    while key != old:
        s = by_new.get(key)
        if s is None or len(chain) >= limit:
            return None
        assert isinstance(s.body, Rotation)
        chain.append(s.raw)
        key = s.body.old
    chain.reverse()
    return chain


def check_chain(items: Any, known: bytes, mesh_id: bytes) -> bytes:
    """The key that the answer ``items`` to ``rotations`` hands ``known`` over to, once its
    rotations are seen to be one chain of this mesh from ``known``, followed by at most one
    site record, of that key (signatures not checked here: the caller keeps them as an
    exchange's objects, which verifies each).  RemoteError naming what is wrong."""
    if not isinstance(items, list) or not 0 < len(items) <= MAX_CHAIN + 1 \
            or not all(isinstance(raw, bytes) for raw in items):
        raise RemoteError("the answer is not a list of signed objects", reason="malformed")
    key = known
    for i, raw in enumerate(items):
        try:
            body = records.peek(raw, kinds=("rotation", "site-record"))
        except RecordError as exc:
            raise RemoteError(f"not a rotation: {exc}", reason=exc.reason or "malformed") \
                from None
        if body.mesh_id != mesh_id:
            raise RemoteError("a rotation of another mesh", reason="mesh")
        if isinstance(body, SiteRecord):
            if i != len(items) - 1 or i == 0 or body.key != key:
                raise RemoteError("a site record that is not the last key's, after its"
                                  " rotations", reason="malformed")
        elif not isinstance(body, Rotation) or body.old != key:
            raise RemoteError("the rotations do not hand over one to the next from the key"
                              " this site knows", reason="malformed")
        else:
            key = body.new
    return key


async def ask_rotations(address: str, me: bytes, known: bytes, *,
                        timeout: float) -> list[Any]:
    """Ask the peer port at ``address`` for the rotations that hand over ``known`` (see the
    module docstring); the items of the answer, unchecked (empty: it holds no rotation of that
    key).  ProtocolError or OSError when it does not answer so."""
    conn = await dial(address, timeout=timeout)
    try:
        conn.send(link.PREAMBLE, link.encode_preamble(
            link.Preamble("rotations", bytes(16), me, known, "s", b"",
                          int(time.time() * 1000))))
        body = await conn.expect(link.ROTATIONS, timeout=timeout)
    finally:
        conn.close()
    try:
        items: Any = msgpack.unpackb(bytes(body), raw=False, max_array_len=MAX_CHAIN + 1,
                                     max_bin_len=records.MAX_SIGNED_BYTES, max_map_len=0,
                                     max_str_len=0)
    except Exception:  # msgpack raises several unrelated types on garbage
        raise ProtocolError("the rotations are not msgpack", reason="malformed") from None
    return items if isinstance(items, list) else [None]


class Rekeys:
    """Answers ``rekey`` requests (:meth:`answer`): see the module docstring.  ``keep`` keeps
    verified objects as an exchange's are (``MeshSync.keep_verified``)."""

    def __init__(self, *, view: MeshView,
                 keep: Callable[[bytes, Screened, Verified], IngestResult],
                 counters: Counters, throttle: Throttle | None = None,
                 checks: Budgets | None = None) -> None:
        self.view = view
        self.keep = keep
        self.counters = counters
        self.throttle = throttle or Throttle(base=1.0, cap=60.0)
        self.checks = checks or Budgets(CHECKS_BURST, CHECKS_PER_SECOND)
        self.per_address = Budgets(3.0 * MAX_CHAIN, ADDRESS_CHECKS_PER_SECOND)
        self._logged = -LOG_EVERY
        self._unlogged = 0

    async def answer(self, msg: dict[str, Any], info: PeerInfo) -> dict[str, Any]:
        """Take the rotations that lead to the sender's key, or refuse them with why."""
        if info.curve_key in self.view.by_curve:
            return {"t": "ok"}  # nothing to learn: no signature checked
        now = time.monotonic()
        source = f"{info.address} {info.curve_key.hex()}"
        wait = self.throttle.retry_after(source, now)
        if wait > 0:
            self.counters.count("rekeys_throttled")
            raise JoinRefused(f"too many refused rotation chains from {info.address}; try"
                              f" again in {wait:.0f} s", reason="throttled", retry_after=wait)
        try:
            new, name = self._take(msg, info, now)
        except JoinRefused:
            self.counters.count("rekeys_busy")
            raise
        except RemoteError as exc:
            self.counters.count("rekeys_refused")
            wait = self.throttle.failure(source, now)
            self._warn(info.address, exc.message, now)
            raise JoinRefused(exc.message, reason=exc.reason, retry_after=wait) from None
        self.counters.count("rekeys_taken")
        log.info("took the new key of %s from the site itself (rotations this site had missed):"
                 " %s", name or "a member", site_id_of(new))
        return {"t": "ok"}

    def _warn(self, address: str, why: str, now: float) -> None:
        if now - self._logged < LOG_EVERY:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more refused since the last warning)" if self._unlogged else ""
        log.warning("refused a rotation chain from %s: %s%s", address, why, more)
        self._logged, self._unlogged = now, 0

    def _take(self, msg: dict[str, Any], info: PeerInfo, now: float) -> tuple[bytes, str]:
        """The sender's new key and its site's name, once its rotations are kept."""
        mesh_id = self.view.mesh_id
        if mesh_id is None or msg["mesh"] != mesh_id:
            raise RemoteError("this site is not in that mesh", reason="not-member")
        items: list[Any] = msg["items"]
        if not all(isinstance(raw, bytes) for raw in items):
            raise RemoteError("a rotation is bytes", reason="malformed")
        held = [records.digest_of(raw) in self.view.rotations for raw in items]
        first = held.index(False) if False in held else len(held)
        if any(held[first:]):
            raise RemoteError("the rotations this site holds do not all come first",
                              reason="malformed")
        if first == len(items):
            raise RemoteError("this site holds every one of these rotations, and the key they"
                              " lead to is no member here", reason="not-member")
        fresh = items[first:]
        head = self._peek(fresh[0], mesh_id)  # the one parse before the budget
        if not self.view.is_member(head.old):
            raise RemoteError("the first rotation this site does not hold hands over a key that"
                              " is no member here (retired, revoked or never admitted)",
                              reason="not-member")
        # Past here the work is budgeted, per address and for the whole port: a parse and two
        # signature checks per rotation, charged up front.
        cost = 3 * len(fresh)
        # Per address and the key handed over: a stranger sharing a site's address (a NAT)
        # cannot drain the site's own budget without naming the site's previous key.
        wait = self.per_address.take(info.address.encode() + head.old, cost, now) \
            or self.checks.take(b"", cost, now)
        if wait > 0:
            raise JoinRefused("too many rotation chains to check now; try again later",
                              reason="busy", retry_after=wait)
        bodies = [head] + [self._peek(raw, mesh_id) for raw in fresh[1:]]
        if any(a.new != b.old for a, b in zip(bodies, bodies[1:])):
            raise RemoteError("the rotations do not hand over one to the next",
                              reason="malformed")
        known = {*self.view.members, *self.view.retired,
                 *(r.body.old for r in self.view.rotations.values() if isinstance(r.body, Rotation))}
        if any(b.new in known for b in bodies):
            raise RemoteError("a rotation hands over to a key this site knows already",
                              reason="unauthorized")
        new = bodies[-1].new
        if curve_public_of(new) != info.curve_key:
            raise RemoteError("the rotations do not end at the key that sent them",
                              reason="unauthorized")
        signed: list[Signed] = []
        for raw in fresh:  # the first bad signature ends the check
            try:
                signed.append(records.decode(raw, now=int(time.time()), mesh_id=mesh_id,
                                             kinds=("rotation",)))
            except RecordError as exc:
                raise RemoteError(f"a rotation does not check out: {exc}",
                                  reason=exc.reason or "bad-record") from None
        self.keep(new, Screened(list(fresh), first, Counter()), Verified(signed, []))
        if self.view.by_curve.get(info.curve_key) != new:  # the checks above make this hold
            raise RemoteError("the rotations did not hand a membership to the key that sent"
                              " them", reason="not-member")
        return new, self.view.name_of(new)

    @staticmethod
    def _peek(raw: Any, mesh_id: bytes) -> Rotation:
        try:
            body = records.peek(raw, kinds=("rotation",))
        except RecordError as exc:
            raise RemoteError(f"not a rotation: {exc}", reason=exc.reason or "malformed") from None
        assert isinstance(body, Rotation)
        if body.mesh_id != mesh_id:
            raise RemoteError("a rotation of another mesh", reason="mesh")
        return body
