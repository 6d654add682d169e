"""This site's own signed record: re-signed when its name, addresses or reachability change."""

from __future__ import annotations

import time

from meshd.daemon.site import LocalSite
from meshd.state.store import Store
from meshd.state.view import MeshView
from meshd.trust import records
from meshd.trust.records import SiteRecord


class OwnRecord:
    """Signs this site's record with the current key (read from ``site.keys`` at each use)."""

    def __init__(self, site: LocalSite, view: MeshView, store: Store) -> None:
        self.site = site
        self.view = view
        self.store = store

    def refresh(self) -> bool:
        """Sign a new own record when name or addresses changed; True if one was made."""
        mesh_id = self.view.mesh_id
        if mesh_id is None:
            return False
        site, key = self.site, self.site.keys.key
        held = self.view.record_of(key.public)
        addrs = tuple(site.addrs)
        if held is not None and (held.name, held.addrs, held.reachable) == (site.name, addrs,
                                                                             site.reachable):
            return False
        seq = max(held.seq if held else 0, self.store.get_int("own_seq")) + 1
        self.store.set_meta("own_seq", seq)
        now = int(time.time())
        signed = records.sign(SiteRecord(key.public, mesh_id, site.name, addrs, site.reachable,
                                         seq, now), key)
        self.view.add_own(signed, now)
        return True

    def for_mesh(self, mesh_id: bytes) -> records.Signed:
        """A record to present when joining ``mesh_id`` (its seq is kept only once admitted)."""
        key = self.site.keys.key
        seq = self.store.get_int("own_seq") + 1
        return records.sign(SiteRecord(key.public, mesh_id, self.site.name, tuple(self.site.addrs),
                                       self.site.reachable, seq, int(time.time())), key)
