"""Key rotation (``meshd rotate``): retire this site's key and hand its membership to a new one."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from meshd.daemon.contacts import Contacts
from meshd.daemon.membership import MembershipService
from meshd.daemon.own_record import OwnRecord
from meshd.daemon.roster import Roster
from meshd.daemon.site import LocalSite
from meshd.daemon.sync import MeshSync
from meshd.errors import KeyFileError, LocalError, StateError
from meshd.state.site import new_key_path
from meshd.state.view import MeshView
from meshd.trust import records
from meshd.trust.identity import SiteKey

log = logging.getLogger("meshd")


class Rotation:
    """Rotates the site key: ``key_path`` is where the key lives on disk, ``restart_transport``
    restarts the peer port, links and LAN advertisement under the current key."""

    def __init__(self, *, site: LocalSite, view: MeshView, key_path: Path, sync: MeshSync,
                 own_record: OwnRecord, contacts: Contacts, roster: Roster,
                 membership: MembershipService,
                 restart_transport: Callable[[], Awaitable[None]]) -> None:
        self.site = site
        self.view = view
        self.key_path = key_path
        self.sync = sync
        self.own_record = own_record
        self.contacts = contacts
        self.roster = roster
        self.membership = membership
        self.restart_transport = restart_transport

    async def rotate(self) -> tuple[bytes, bytes, tuple[int, int]]:
        """Retire this site's key and hand its membership to a new one (signed by both).
        Returns the old and the new public key, and how many of how many other members were
        told while the old key still opened their doors.

        The rotation is pushed to every member we can dial while the old key still opens their
        doors; then the new key replaces the old one on disk (the old is deleted), and the peer
        port, links and membership core restart under the new key.  Invitations issued under
        the old key stop working (their tokens name it)."""
        keys = self.site.keys
        mesh_id = self.view.mesh_id
        if mesh_id is None or not self.view.is_member(keys.public):
            raise StateError("only a member of a mesh can rotate its key", reason="no-mesh")
        old, new = keys.key, SiteKey.generate()
        now = int(time.time())
        rotation = records.sign_rotation(mesh_id, old, new, now)
        others = [k for k in self.view.members if k != old.public]
        # The new key is on disk before anyone hears of it: a rotation the mesh takes must
        # never outlive the only copy of its new key (a full disk, a crash; see
        # state.site.finish_rotation for a crash before the rename below).
        tmp = new_key_path(self.key_path)
        tmp.unlink(missing_ok=True)
        try:
            new.save(tmp)
        except KeyFileError as exc:
            tmp.unlink(missing_ok=True)
            raise StateError(f"{exc.message}; the key did not change",
                             reason=exc.reason) from None
        try:
            result = self.view.ingest([rotation.raw], now)
            if result.stored != 1:
                raise LocalError(f"the rotation was refused: {result.refused}",
                                 reason="unauthorized")
        except BaseException:  # not announced: the new key goes
            tmp.unlink()
            raise
        told = await asyncio.gather(*(self.sync.sync_with(k) for k in others))
        log.info("key rotation announced to %d of %d members", sum(told), len(others))
        tmp.replace(self.key_path)
        keys.rotate_to(new)
        await self._restart()
        self.own_record.refresh()
        log.info("rotated the site key: %s -> %s (fingerprint %s)", old.site_id, new.site_id,
                 new.fingerprint)
        self.sync.announce()
        return old.public, new.public, (sum(told), len(others))

    async def _restart(self) -> None:
        """Peer port, links, membership core and LAN advertisement under the current key."""
        await self.membership.close()
        await self.restart_transport()
        self.contacts.clear()
        self.roster.reset()
        await self.membership.restart()
