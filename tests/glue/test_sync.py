"""Anti-entropy between real mesh views over a fake ``MemberLinks``: exchanges, the announce that
reaches a member we cannot dial, and what a failed exchange leaves in the contacts."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshd.daemon.contacts import Contacts
from meshd.daemon.sync import MeshSync
from meshd.daemon.tasks import TaskSet
from meshd.errors import RemoteError
from meshd.state.config import Config
from meshd.trust import records
from meshd.trust.records import Vouch
from tests.glue.daemon_kit import Net, Node, real_mesh, signed_record, make_node


class Site:
    def __init__(self, node: Node, net: Net) -> None:
        self.node = node
        self.contacts = Contacts()
        self.tasks = TaskSet(node.site.name)
        self.changes = 0
        self.started = 0
        self.sync = MeshSync(site=node.site, view=node.view, config=Config(),
                             links=net.links(node),  # type: ignore[arg-type]
                             contacts=self.contacts, counters=node.counters, tasks=self.tasks,
                             on_change=self._changed, start_membership=self._start)
        net.handlers[node.key] = self.sync.on_sync

    def _changed(self) -> None:
        self.changes += 1

    def _start(self) -> None:
        self.started += 1


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[tuple[Net, list[Site]]]:
    nodes = real_mesh(tmp_path, ("f", ("10.0.0.1:1",)), ("a", ("10.0.0.2:1",)), ("b", ()))
    net = Net()
    sites = [Site(n, net) for n in nodes]
    yield net, sites
    for s in sites:
        await s.tasks.close()
        s.node.store.close()


def admit_newcomer(founder: Node, root: Path) -> Node:
    """The founder vouches for a new site, which only the founder knows so far."""
    now = int(time.time())
    newcomer = make_node(root, "n", ("10.0.0.4:1",))
    mesh_id = founder.view.mesh_id
    assert mesh_id is not None
    vouch = records.sign(Vouch(mesh_id, founder.key, newcomer.key, "n", "member", now, 0),
                         founder.site.keys.key)
    founder.view.ingest([vouch.raw, signed_record(newcomer, mesh_id, now).raw], now)
    return newcomer


async def test_an_exchange_brings_news_both_ways(mesh, tmp_path: Path) -> None:
    net, (f, a, _) = mesh
    newcomer = admit_newcomer(f.node, tmp_path)
    assert await a.sync.sync_with(f.node.key)
    assert a.node.view.is_member(newcomer.key)
    assert a.changes == 1 and a.node.counters.get("records_stored") == 2
    contact = a.contacts.get(f.node.key)
    assert contact is not None and contact.error is None and contact.last_ok is not None
    newcomer.store.close()


async def test_announce_exchanges_with_dialable_members_and_pushes_to_the_others(
        mesh, tmp_path: Path) -> None:
    net, (f, a, b) = mesh
    newcomer = admit_newcomer(f.node, tmp_path)
    f.sync.announce()
    assert f.changes == 1 and f.started == 1
    await net.until(lambda: a.node.view.is_member(newcomer.key)
                    and b.node.view.is_member(newcomer.key))
    kinds = {(kind, dest) for kind, src, dest, _ in net.log if src == f.node.key}
    assert kinds == {("request", a.node.key), ("request", newcomer.key), ("send", b.node.key)}
    newcomer.store.close()


async def test_an_unreachable_or_refusing_member_is_noted_in_contacts(mesh) -> None:
    net, (f, a, _) = mesh
    net.cut.add(f.node.key)
    assert not await a.sync.sync_with(f.node.key)
    contact = a.contacts.get(f.node.key)
    assert contact is not None and "no answer" in (contact.error or "")
    net.cut.clear()
    net.handlers[f.node.key] = lambda key, msg: (_ for _ in ()).throw(
        RemoteError("sync for another mesh", reason="wrong-mesh"))
    assert not await a.sync.sync_with(f.node.key)
    assert a.contacts.get(f.node.key).error == "sync for another mesh"  # type: ignore[union-attr]


async def test_a_member_we_cannot_dial_is_never_asked(mesh) -> None:
    net, (f, _, b) = mesh
    assert not await f.sync.sync_with(b.node.key)
    assert net.log == []


async def test_sync_for_another_mesh_is_refused(mesh) -> None:
    _, (f, a, _) = mesh
    with pytest.raises(RemoteError) as exc:
        f.sync.on_sync(a.node.key, {"t": "sync", "mesh": b"\x00" * 16, "items": []})
    assert exc.value.reason == "wrong-mesh"


async def test_forged_objects_are_refused_counted_and_not_kept(mesh) -> None:
    _, (f, a, _) = mesh
    raw = a.node.view.snapshot()[-1]
    forged = raw[:-1] + bytes([raw[-1] ^ 1])
    f.sync.on_sync(a.node.key, {"t": "sync", "mesh": f.node.view.mesh_id, "items": [forged]})
    refused = {k: v for k, v in f.node.counters.snapshot().items() if k.startswith("records_refused")}
    assert sum(refused.values()) == 1 and f.changes == 0


async def test_a_member_sighted_on_the_lan_gets_an_exchange_once(mesh) -> None:
    net, (f, a, _) = mesh
    a.sync.on_sighting(b"\x42" * 32)  # not a member: nothing
    a.sync.on_sighting(f.node.key)
    await net.until(lambda: f.node.key in a.contacts)
    a.sync.on_sighting(f.node.key)  # heard from already: no second exchange
    assert len(a.tasks) == 0 and len(net.log) == 1


async def test_a_round_picks_a_dialable_member(mesh) -> None:
    net, (f, a, b) = mesh
    await b.sync.round()
    assert [(src, kind) for kind, src, _, _ in net.log] == [(b.node.key, "request")]
    assert net.log[0][2] in (f.node.key, a.node.key)


def test_sync_budget_refuses_past_the_burst_and_refills_with_time() -> None:
    from meshd.state.throttle import Budgets

    b = Budgets(capacity=100, rate=10)
    assert b.take(b"m", 60, 0.0) == 0.0 and b.take(b"m", 40, 0.0) == 0.0
    wait = b.take(b"m", 50, 1.0)  # 10 refilled: 40 short at 10/s
    assert wait == pytest.approx(4.0)
    assert b.take(b"other", 100, 1.0) == 0.0  # each member has its own budget
    assert b.take(b"m", 50, 5.0) == 0.0
    assert b.take(b"m", 1000, 100.0) == 0.0  # bigger than the burst: passes on a full budget
    assert b.take(b"m", 1, 100.0) == pytest.approx(0.1)
