"""A member that missed this site's key rotation learns it from this site itself (``rekey``).

A rotation reaches the other members by anti-entropy under the old key while that key still
opens their doors (:mod:`meshd.daemon.rotation`), and later through any member that holds it.  A
member that heard of it from nobody (it was down, and no third member relays it) would refuse the
new key as a stranger for good, and the old key is gone.  So a site whose exchange is refused
with ``not-member`` presents the chain of its own rotations (:func:`rotation_chain`), and the
peer port takes from a key it does not know this one narrow request besides ``join``:

- rotations only, at most :data:`MAX_CHAIN`, each signed by both its keys, for this mesh;
- each handing over to the next, and the last to the very key that sent the request (the
  connection is authenticated by it), so nobody presents another site's rotations;
- kept by the view's own rules (the first must hand over a membership this site holds), after
  which the sender's key must be a member, or the request is refused.

Refusals are counted (``rekeys_refused``) and throttled by source address, as failed joins are.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from meshd.daemon.counters import Counters
from meshd.errors import JoinRefused, RecordError, RemoteError
from meshd.peer.server import PeerInfo
from meshd.state.throttle import Throttle
from meshd.state.view import IngestResult, MeshView
from meshd.trust import records
from meshd.trust.identity import curve_public_of, site_id_of
from meshd.trust.records import Rotation, Signed

log = logging.getLogger("meshd")

MAX_CHAIN = 16
"""Most rotations one ``rekey`` carries: a member that missed more learns them by sync."""


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
    """Answers ``rekey`` requests (:meth:`answer`): see the module docstring.  ``ingest``
    verifies and keeps signed objects as an exchange's are (``MeshSync.ingest``)."""

    def __init__(self, *, view: MeshView, ingest: Callable[[list[bytes], bytes], IngestResult],
                 counters: Counters, throttle: Throttle | None = None) -> None:
        self.view = view
        self.ingest = ingest
        self.counters = counters
        self.throttle = throttle or Throttle(base=1.0, cap=60.0)

    async def answer(self, msg: dict[str, Any], info: PeerInfo) -> dict[str, Any]:
        """Take the rotations that lead to the sender's key, or refuse them with why."""
        if info.curve_key in self.view.by_curve:
            return {"t": "ok"}  # nothing to learn: no signature checked
        now = time.monotonic()
        wait = self.throttle.retry_after(info.address, now)
        if wait > 0:
            self.counters.count("rekeys_throttled")
            raise JoinRefused(f"too many refused rotation chains from {info.address}; try"
                              f" again in {wait:.0f} s", reason="throttled", retry_after=wait)
        try:
            new = self._take(msg, info)
        except RemoteError as exc:
            self.counters.count("rekeys_refused")
            wait = self.throttle.failure(info.address, now)
            log.warning("refused a rotation chain from %s: %s", info.address, exc.message)
            raise JoinRefused(exc.message, reason=exc.reason, retry_after=wait) from None
        self.counters.count("rekeys_taken")
        log.info("took the new key of %s from the site itself (%d rotation(s) this site had"
                 " missed): %s", self.view.name_of(new) or site_id_of(new), len(msg["items"]),
                 site_id_of(new))
        return {"t": "ok"}

    def _take(self, msg: dict[str, Any], info: PeerInfo) -> bytes:
        mesh_id = self.view.mesh_id
        if mesh_id is None or msg["mesh"] != mesh_id:
            raise RemoteError("this site is not in that mesh", reason="not-member")
        items = msg["items"]
        if not 1 <= len(items) <= MAX_CHAIN:
            raise RemoteError(f"a rotation chain has 1 to {MAX_CHAIN} rotations, not"
                              f" {len(items)}", reason="malformed")
        bodies: list[Rotation] = []
        for raw in items:
            try:
                s = records.decode(raw, now=int(time.time()), mesh_id=mesh_id,
                                   kinds=("rotation",))
            except RecordError as exc:
                raise RemoteError(f"a rotation does not check out: {exc}",
                                  reason=exc.reason or "bad-record") from None
            assert isinstance(s.body, Rotation)
            bodies.append(s.body)
        if any(a.new != b.old for a, b in zip(bodies, bodies[1:])):
            raise RemoteError("the rotations do not hand over one to the next",
                              reason="malformed")
        new = bodies[-1].new
        if curve_public_of(new) != info.curve_key:
            raise RemoteError("the rotations do not end at the key that sent them",
                              reason="unauthorized")
        self.ingest(list(items), new)
        if self.view.by_curve.get(info.curve_key) != new:
            raise RemoteError("none of these rotations hands over a membership this site holds",
                              reason="not-member")
        return new
