"""This site's own key, held in one place, and the creation of a site's state directory.

:class:`SiteKeys` is the only holder of the site key in a running daemon: every service reads
``keys.key`` when it signs, handshakes or compares, never a copy taken at start-up, so that
``meshd rotate`` (:meth:`SiteKeys.rotate_to`) reaches every one of them at once.
"""

from __future__ import annotations

import time
from pathlib import Path

from meshd.errors import LocalError, RecordError, StateError
from meshd.state import config as config_mod
from meshd.state.config import Config
from meshd.state.home import Home
from meshd.state.store import Store
from meshd.trust import records
from meshd.trust.identity import SiteKey


class SiteKeys:
    """The current site key (the one holder; see the module docstring)."""

    __slots__ = ("_key", "rotations")

    def __init__(self, key: SiteKey) -> None:
        self._key = key
        self.rotations = 0
        """How many times the key was replaced since this holder was made."""

    @property
    def key(self) -> SiteKey:
        return self._key

    @property
    def public(self) -> bytes:
        return self._key.public

    def rotate_to(self, new: SiteKey) -> SiteKey:
        """Make ``new`` the site key for every reader; returns the old one."""
        old, self._key = self._key, new
        self.rotations += 1
        return old


def new_key_path(key_path: Path) -> Path:
    """Where ``meshd rotate`` writes the new key before it announces the rotation."""
    return key_path.with_name(key_path.name + ".new")


def finish_rotation(home: Home, store: Store) -> str | None:
    """At start: a ``site.key.new`` left by a rotation that stopped half-way.  If the store
    holds the rotation from the current key to it, the mesh may know the new key only: it
    replaces the old one ("finished").  Otherwise the rotation was never announced and the old
    key is still this site's: the new one is removed ("discarded").  None if there is none."""
    new_path = new_key_path(home.key_path)
    if not new_path.exists():
        return None
    current, new = SiteKey.load(home.key_path).public, SiteKey.load(new_path).public
    for raw in store.rotations():
        try:  # verified when stored; read again with no clock limit
            body = records.decode(raw, now=int(time.time()), kinds=("rotation",),
                                  max_skew=1 << 62).body
        except RecordError:
            continue
        if isinstance(body, records.Rotation) and (body.old, body.new) == (current, new):
            new_path.replace(home.key_path)
            return "finished"
    new_path.unlink()
    return "discarded"


def init_site(home: Home, name: str, listen: str | None) -> SiteKey:
    """Create a site's state directory: key (0600), config, trust store. Refuses to overwrite."""
    if not records.is_valid_name(name):
        raise LocalError("a site name is 1 to 64 letters, digits, '.', '_' or '-', starting with"
                         " a letter or digit", reason="usage")
    if home.exists():
        raise StateError(f"a site already exists in {home.root}; remove it first or pick"
                         " another --home", reason="exists")
    if listen:
        config_mod.check_listen(listen)
    home.create()
    key = SiteKey.generate()
    cfg = Config() if listen is None else Config(listen=listen)
    config_mod.save(home.config_path, cfg)
    store = Store(home.db_path)
    try:
        store.set_meta("name", name, own_seq=0)
    finally:
        store.close()
    key.save(home.key_path)
    return key
