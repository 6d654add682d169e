"""Key rotation through the real services of two sites over a fake ``MemberLinks``: the members
are told while the old key is current, then every reader of the one key holder sees the new key
(the mesh view, the own record, the membership core, invitations, reports, the key file)."""

from __future__ import annotations

from pathlib import Path

from meshd.daemon.admin import Admin
from meshd.daemon.contacts import Contacts
from meshd.daemon.membership import MembershipService
from meshd.daemon.own_record import OwnRecord
from meshd.daemon.reports import Reports
from meshd.daemon.roster import Roster
from meshd.daemon.rotation import Rotation
from meshd.daemon.sync import MeshSync
from meshd.daemon.tasks import TaskSet
from meshd.state.admission import Admissions
from meshd.state.config import Config
from meshd.trust.identity import SiteKey
from tests.glue.daemon_kit import Net, real_mesh


async def test_rotation_makes_the_new_key_visible_to_every_reader(tmp_path: Path) -> None:
    f, a = real_mesh(tmp_path, ("f", ("10.0.0.1:1",)), ("a", ("10.0.0.2:1",)))
    net = Net()
    config = Config()
    tasks = TaskSet("rotation-test")
    links = net.links(f)
    contacts = Contacts()
    membership = MembershipService(site=f.site, view=f.view, store=f.store,
                                   links=links,  # type: ignore[arg-type]
                                   counters=f.counters, on_change=lambda: None)
    roster = Roster(view=f.view, membership=membership, links=links,  # type: ignore[arg-type]
                    on_members_changed=lambda: None)
    sync = MeshSync(site=f.site, view=f.view, config=config, links=links,  # type: ignore[arg-type]
                    contacts=contacts, counters=f.counters, tasks=tasks,
                    on_change=roster.changed, start_membership=membership.start)
    own = OwnRecord(f.site, f.view, f.store)
    admissions = Admissions(f.store, f.view, f.site.keys, config)
    admin = Admin(site=f.site, view=f.view, admissions=admissions, config=config, own_record=own,
                  announce=sync.announce, advertise_mesh=lambda: None)
    reports = Reports(site=f.site, view=f.view, admissions=admissions, counters=f.counters,
                      contacts=contacts, membership=membership,
                      links=links,  # type: ignore[arg-type]
                      reach_of=lambda key: {}, dropped=lambda: 0, port=lambda: ({}, {}),
                      untrusted=lambda: 0)
    told_under: list[bytes] = []  # the key that was current when a member was told
    restarts: list[bytes] = []  # the key the transport restarted under

    def a_hears(src: bytes, msg: dict) -> dict | None:
        if msg["t"] != "sync":  # membership gossip: a runs no core here
            return None
        told_under.append(f.site.keys.public)
        return a_sync.on_sync(src, msg)

    a_sync = MeshSync(site=a.site, view=a.view, config=config,
                      links=net.links(a),  # type: ignore[arg-type]
                      contacts=Contacts(), counters=a.counters, tasks=tasks,
                      on_change=lambda: None, start_membership=lambda: None)
    net.handlers[a.key] = a_hears

    async def restart_transport() -> None:
        restarts.append(f.site.keys.public)

    rotation = Rotation(site=f.site, view=f.view, key_path=f.home.key_path, sync=sync,
                        own_record=own, contacts=contacts, roster=roster, membership=membership,
                        restart_transport=restart_transport)
    roster.reset()
    membership.start()
    old = f.key
    contacts.ok(a.key)

    old_pub, new, told = await rotation.rotate()

    assert old_pub == old and new != old and f.site.keys.public == new
    assert told_under[0] == old  # members learn of it while the old key opens their doors
    assert told == (1, 1)
    assert a.view.is_member(new) and not a.view.is_member(old)
    assert restarts == [new]
    assert SiteKey.load(f.home.key_path).public == new
    assert f.view.is_member(new) and not f.view.is_member(old)
    record = f.view.record_of(new)
    assert record is not None and record.name == "f"
    assert membership.core is not None and membership.core.self_id == new
    assert membership.state_of(new)["state"] == "alive"
    assert admin.invite("x", None, 1, "member", False).inviter_key == new
    assert reports.status()["fingerprint"] == f.site.keys.key.fingerprint
    assert [p["self"] for p in reports.peers() if p["site_id"] == reports.status()["site_id"]] == [
        True]
    await tasks.close()
    await membership.close()
    f.store.close()
    a.store.close()
