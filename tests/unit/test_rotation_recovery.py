"""A key rotation that stopped half-way (``state.site.finish_rotation``, run as a daemon starts):
``meshd rotate`` writes ``site.key.new`` before it announces the rotation, and renames it over
``site.key`` after.  At start, a new key whose rotation the store holds replaces the old one
(the mesh may know only the new key); one whose rotation was never stored is removed (the old
key is still the site's)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from meshd.state.home import Home
from meshd.state.site import finish_rotation, new_key_path
from meshd.state.store import Store
from meshd.trust import records
from meshd.trust.identity import SiteKey


def _site(tmp_path: Path) -> tuple[Home, Store, SiteKey, SiteKey]:
    home = Home(tmp_path)
    old, new = SiteKey.generate(), SiteKey.generate()
    old.save(home.key_path)
    new.save(new_key_path(home.key_path))
    return home, Store(tmp_path / "state.db"), old, new


def test_nothing_half_done_changes_nothing(tmp_path: Path) -> None:
    home = Home(tmp_path)
    key = SiteKey.generate()
    key.save(home.key_path)
    store = Store(tmp_path / "state.db")
    assert finish_rotation(home, store) is None
    assert SiteKey.load(home.key_path).public == key.public


def test_a_rotation_the_store_holds_is_finished(tmp_path: Path) -> None:
    home, store, old, new = _site(tmp_path)
    rotation = records.sign_rotation(os.urandom(16), old, new, int(time.time()))
    store.put_rotation(rotation.digest, old.public, rotation.raw)
    assert finish_rotation(home, store) == "finished"
    assert SiteKey.load(home.key_path).public == new.public
    assert not new_key_path(home.key_path).exists()


def test_a_rotation_never_stored_is_discarded(tmp_path: Path) -> None:
    home, store, old, new = _site(tmp_path)
    other = SiteKey.generate()  # a rotation of this key to another: not the one on disk
    rotation = records.sign_rotation(os.urandom(16), old, other, int(time.time()))
    store.put_rotation(rotation.digest, old.public, rotation.raw)
    assert finish_rotation(home, store) == "discarded"
    assert SiteKey.load(home.key_path).public == old.public
    assert not new_key_path(home.key_path).exists()
