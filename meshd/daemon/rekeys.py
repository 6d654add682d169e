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
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from meshd.daemon.counters import Counters
from meshd.errors import JoinRefused, RecordError, RemoteError
from meshd.peer.server import PeerInfo
from meshd.peer.wire import MAX_REKEY_ITEMS
from meshd.state.throttle import Budgets, Throttle
from meshd.state.view import IngestResult, MeshView, Screened, Verified
from meshd.trust import records
from meshd.trust.identity import curve_public_of, site_id_of
from meshd.trust.records import Rotation, Signed

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
