"""The control server over its real unix socket (aiohttp), serving real services of a temporary
site (state made by ``init_site``) with a recording fake for the channels and the rotation."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meshd.daemon.admin import Admin
from meshd.daemon.contacts import Contacts
from meshd.daemon.control import ControlServer
from meshd.daemon.joins import Joins
from meshd.daemon.membership import MembershipService
from meshd.daemon.own_record import OwnRecord
from meshd.daemon.reports import Reports
from meshd.daemon.tasks import TaskSet
from meshd.errors import ChannelClosed, LocalError
from meshd.local import api
from meshd.state.admission import Admissions
from meshd.state.config import Config
from meshd.trust.identity import site_id_of
from tests.glue.daemon_kit import T, Net, Node, make_node


class Channels:
    """The channel service as the control server sees it (its registry and errors)."""

    def __init__(self) -> None:
        self.out: dict[bytes, Any] = {}
        self.gone: dict[bytes, ChannelClosed] = {}
        self.closed: list[bytes] = []

    def sender(self, cid: bytes) -> Any:
        if cid in self.gone:
            raise self.gone[cid]
        if cid not in self.out:
            raise LocalError("no such channel at this site", reason="not-found")
        return self.out[cid]

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": "c1"}]

    def reach_of(self, key: bytes) -> dict[str, Any]:
        return {"we_dial": True, "dials_us": None}

    def close_sender(self, cid: bytes) -> None:
        if self.gone.pop(cid, None) is None and self.out.pop(cid, None) is None:
            raise LocalError("no such channel", reason="not-found")
        self.closed.append(cid)


class Control:
    def __init__(self, node: Node) -> None:
        self.node = node
        site, view, config = node.site, node.view, Config()
        links = Net().links(node)
        self.tasks = TaskSet("control-test")
        self.membership = MembershipService(site=site, view=view, store=node.store,
                                            links=links,  # type: ignore[arg-type]
                                            counters=node.counters, on_change=lambda: None)
        admissions = Admissions(node.store, view, site.keys, config)
        own = OwnRecord(site, view, node.store)
        self.announced = 0
        self.admin = Admin(site=site, view=view, admissions=admissions, config=config,
                           own_record=own, announce=self._announce, advertise_mesh=lambda: None)
        joins = Joins(site=site, view=view, admissions=admissions, config=config,
                      links=links, own_record=own, counters=node.counters,  # type: ignore[arg-type]
                      tasks=self.tasks, announce=self._announce, advertise_mesh=lambda: None)
        reports = Reports(site=site, view=view, admissions=admissions, counters=node.counters,
                          contacts=Contacts(), membership=self.membership,
                          links=links,  # type: ignore[arg-type]
                          reach_of=Channels().reach_of, dropped=lambda: 3,
                          port=lambda: ({"refused_busy": 5}, {"sniffing": 2}),
                          untrusted=lambda: 1)
        self.channels = Channels()
        self.rotations = 0
        self.server = ControlServer(view=view, reports=reports, admin=self.admin, joins=joins,
                                    membership=self.membership,
                                    channels=self.channels,  # type: ignore[arg-type]
                                    rotate=self._rotate)

    def _announce(self) -> None:
        self.announced += 1

    async def _rotate(self) -> tuple[bytes, bytes, tuple[int, int]]:
        self.rotations += 1
        return b"\x01" * 32, self.node.key, (1, 2)


@pytest.fixture
async def control(tmp_path: Path) -> AsyncIterator[tuple[Control, aiohttp.ClientSession]]:
    node = make_node(tmp_path, "ctl", ("127.0.0.1:4750",))
    c = Control(node)
    await c.server.start(node.home.socket_path)
    session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(node.home.socket_path)),
                                    timeout=aiohttp.ClientTimeout(total=T))
    yield c, session
    await session.close()
    await c.server.stop()
    await c.tasks.close()
    node.store.close()


async def call(session: aiohttp.ClientSession, method: str, path: str,
               body: Any = None) -> tuple[int, Any]:
    async with session.request(method, "http://meshd" + path, json=body) as resp:
        return resp.status, await resp.json()


async def test_status_and_metrics_report_the_site(control) -> None:
    c, session = control
    code, status = await call(session, "GET", api.STATUS)
    assert code == 200 and status["name"] == "ctl" and status["site_id"] == site_id_of(c.node.key)
    assert status["counters"]["peer_dropped"] == 3 and status["mesh_id"] is None
    assert status["counters"]["peer_port_refused_busy"] == 5
    assert status["peer_port"]["unauthenticated"] == 3  # 2 sniffing + 1 data connection
    async with session.get("http://meshd" + api.METRICS) as resp:
        text = await resp.text()
    assert "meshd_peer_dropped 3" in text and "meshd_peer_port_refused_busy 5" in text
    assert "# TYPE meshd_peer_port_unauthenticated gauge\nmeshd_peer_port_unauthenticated 3" in text
    assert stat.S_IMODE(c.node.home.socket_path.stat().st_mode) == 0o600


async def test_the_first_invitation_founds_the_mesh_and_lists_this_site(control) -> None:
    c, session = control
    code, inv = await call(session, "POST", api.INVITES, {"name": "bob", "uses": 2})
    assert code == 200 and inv["token"] and inv["addrs"] == ["127.0.0.1:4750"]
    assert c.node.view.mesh_id is not None
    code, peers = await call(session, "GET", api.PEERS)
    assert code == 200 and [(p["name"], p["self"], p["reached"]) for p in peers] == [
        ("ctl", True, "self")]
    assert peers[0]["state"] == "alive"


async def test_bad_input_is_a_usage_error_with_the_error_shape(control) -> None:
    _, session = control
    code, body = await call(session, "POST", api.INVITES, {"uses": "two"})
    assert code == 400 and body == api.error_body("usage", "field 'uses' must be int")
    code, body = await call(session, "POST", api.JOINS, {"text": "not a token"})
    assert code == 400 and body["error"]["reason"]
    code, body = await call(session, "GET", api.JOINS + "/nope")
    assert code == 400 and body["error"]["reason"] == "not-found"
    code, body = await call(session, "POST", api.REVOKE, {"site": "nobody"})
    assert code == 400 and body["error"]["reason"] == "no-mesh"


async def test_channel_routes_go_to_the_channel_service(control) -> None:
    c, session = control
    assert await call(session, "GET", api.CHANNELS) == (200, [{"name": "c1"}])
    code, body = await call(session, "DELETE", api.CHANNELS + "/zz")
    assert code == 400 and body["error"]["reason"] == "usage"
    code, body = await call(session, "DELETE", api.CHANNELS + "/00")
    assert code == 400 and body["error"]["reason"] == "not-found"
    assert c.channels.closed == []


async def test_a_call_on_a_channel_that_ended_on_its_own_is_answered_gone_with_why(
        control) -> None:
    c, session = control
    c.channels.gone[b"\x01"] = ChannelClosed("channel 'c1' to dcs ended: dcs was revoked",
                                              reason="revoked")
    code, body = await call(session, "POST", api.CHANNELS + "/01/flush", {"messages": 0})
    assert code == api.GONE == 410
    assert body["error"] == {"reason": "revoked",
                             "message": "channel 'c1' to dcs ended: dcs was revoked"}
    code, body = await call(session, "DELETE", api.CHANNELS + "/01")  # the app closes it
    assert code == 200 and body["state"] == "ended" and c.channels.closed == [b"\x01"]
    code, body = await call(session, "POST", api.CHANNELS + "/01/flush", {"messages": 0})
    assert code == 400 and body["error"]["reason"] == "not-found"


async def test_a_stopping_daemon_answers_only_its_status(control) -> None:
    """Once the daemon begins to stop, a receiving application that lost its hand-over lease
    must not open its receiver again there (it would find no hand-over socket and not come back
    to the next daemon): every call but status and metrics is answered 503 ``stopping``."""
    c, session = control
    c.server.stopping = True
    code, body = await call(session, "POST", api.RECEIVERS, {"name": "frames", "handover": True})
    assert code == 503 and body == api.error_body("stopping", "the daemon is stopping")
    code, body = await call(session, "POST", api.INVITES, {"name": "bob"})
    assert code == 503 and c.node.view.mesh_id is None  # nothing done
    code, status = await call(session, "GET", api.STATUS)
    assert code == 200 and status["name"] == "ctl"


async def test_rotate_goes_to_the_rotation(control) -> None:
    c, session = control
    code, body = await call(session, "POST", api.ROTATE, {})
    assert code == 200 and c.rotations == 1
    assert body["site_id"] == site_id_of(c.node.key) and body["old_site_id"] == site_id_of(
        b"\x01" * 32)
    assert (body["told"], body["members"]) == (1, 2)


async def test_events_stream_history_then_live_until_the_server_stops(control) -> None:
    c, session = control
    c.membership.emit("admitted", c.node.key)
    async with session.get("http://meshd" + api.EVENTS) as resp:
        first = json.loads(await asyncio.wait_for(resp.content.readline(), T))
        assert first["type"] == "admitted" and first["site_id"] == site_id_of(c.node.key)
        c.membership.emit("revoked", c.node.key)
        live = json.loads(await asyncio.wait_for(resp.content.readline(), T))
        assert live["type"] == "revoked"
        await c.server.stop()  # ends the stream
        assert await asyncio.wait_for(resp.content.readline(), T) == b""


async def test_a_second_server_on_a_socket_that_answers_is_refused(control) -> None:
    c, _ = control
    with pytest.raises(LocalError) as exc:
        await c.server.start(c.node.home.socket_path)  # the running one answers there
    assert exc.value.reason == "running"
