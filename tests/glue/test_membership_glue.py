"""The membership glue pumping real ``swim.Membership`` cores: three services over an in-memory
fake ``MemberLinks`` (each sent message handed to the receiver's ``deliver``), with their
``CoreTimer`` firing on the real loop at a fast probe interval."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from meshd import swim
from meshd.daemon.membership import MembershipService
from tests.glue.daemon_kit import Net, Node, T, real_mesh

FAST = swim.SwimConfig(probe_interval=0.05, probe_timeout=0.02, gossip_interval=0.01,
                       push_pull_interval=0.5)


class Site:
    def __init__(self, node: Node, net: Net) -> None:
        self.node = node
        self.changes = 0
        self.events: list[dict[str, Any]] = []
        self.svc = MembershipService(site=node.site, view=node.view, store=node.store,
                                     links=net.links(node),  # type: ignore[arg-type]
                                     counters=node.counters.scoped("swim_"),
                                     on_change=self._changed, config=FAST)
        self.svc.subscribe(self.events.append)
        net.handlers[node.key] = lambda src, msg: self.svc.deliver(msg["m"], src)

    def _changed(self) -> None:
        self.changes += 1

    def saw(self, kind: str, other: Site) -> bool:
        name = other.node.site.name
        return any(e["type"] == kind and e["name"] == name for e in self.events)


@pytest.fixture
async def trio(tmp_path: Path) -> AsyncIterator[tuple[Net, list[Site]]]:
    nodes = real_mesh(tmp_path, ("a", ("10.0.0.1:1",)), ("b", ("10.0.0.2:1",)),
                      ("c", ("10.0.0.3:1",)))
    net = Net()
    sites = [Site(n, net) for n in nodes]
    for s in sites:
        s.svc.start()
    yield net, sites
    for s in sites:
        await s.svc.close()
        s.node.store.close()


async def test_members_probe_each_other_and_measure_round_trips(trio) -> None:
    net, sites = trio
    await net.until(lambda: all(s.svc.rtt.keys() >= {o.node.key for o in sites if o is not s}
                                for s in sites))
    a, b, _ = sites
    state = a.svc.state_of(b.node.key)
    # alive, or briefly suspect: a 20 ms probe timeout on a real loop may miss one ack
    assert state["state"] in ("alive", "suspect") and state["rtt_ms"] is not None
    assert a.svc.state_of(a.node.key)["state"] == "alive"
    assert a.svc.sent > 0 and b.svc.received > 0


async def test_a_silent_member_is_suspected_then_declared_dead(trio) -> None:
    net, sites = trio
    a, b, c = sites
    net.cut.add(c.node.key)
    await net.until(lambda: a.saw("dead", c) and b.saw("dead", c))
    assert a.saw("suspect", c)
    assert a.svc.state_of(c.node.key)["state"] == "dead"


async def test_a_leaving_member_is_told_to_the_others(trio) -> None:
    net, sites = trio
    a, b, c = sites
    await c.svc.leave(T)
    assert c.svc.core is not None and c.svc.core.leave_done
    await net.until(lambda: a.saw("left", c) and b.saw("left", c))


async def test_a_restart_takes_a_higher_incarnation_and_keeps_listeners(trio) -> None:
    net, sites = trio
    a = sites[0]
    first = a.node.store.get_int("incarnation")
    await a.svc.restart()
    assert a.node.store.get_int("incarnation") == first + 1
    assert a.svc.core is not None and a.svc.core.self_id == a.node.key
    a.svc.emit("admitted", sites[1].node.key)
    assert a.events[-1]["type"] == "admitted" and a.svc.history[-1] == a.events[-1]


async def test_malformed_messages_are_counted_and_gossip_about_strangers_cut(trio) -> None:
    _, sites = trio
    a, b, _ = sites
    a.svc.deliver(b"\x00not swim", b.node.key)
    assert a.node.counters.get("swim_malformed") == 1
    stranger = b"\x99" * 32
    update = swim.Alive(stranger, 1)
    a.svc.deliver(swim.to_bytes(swim.Gossip(updates=(update,))), b.node.key)
    assert a.svc.filtered == 1
    assert a.svc.core is not None and a.svc.core.member(stranger) is None


async def test_closed_service_sends_nothing_more(trio) -> None:
    net, sites = trio
    a = sites[0]
    await a.svc.close()
    sent = len([m for m in net.log if m[1] == a.node.key])
    a.svc.deliver(b"", sites[1].node.key)  # no core: ignored
    assert len([m for m in net.log if m[1] == a.node.key]) == sent
