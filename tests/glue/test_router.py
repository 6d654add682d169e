"""The peer router with recording fakes: both ways a message arrives reach the same handler, and
only members get through (a ``join`` request is the one thing a stranger may send)."""

from __future__ import annotations

from typing import Any

import pytest

from meshd.daemon.contacts import Contacts
from meshd.daemon.counters import Counters
from meshd.daemon.router import PeerRouter
from meshd.errors import RemoteError
from meshd.peer.server import PeerInfo

MEMBER, STRANGER = b"M" * 32, b"S" * 32
MEMBER_CURVE, STRANGER_CURVE = b"m" * 32, b"s" * 32


class View:
    by_curve = {MEMBER_CURVE: MEMBER}


class Links:
    def __init__(self) -> None:
        self.routes: dict[bytes, bytes] = {}

    def remember_route(self, curve_key: bytes, route: bytes) -> None:
        self.routes[curve_key] = route


class Setup:
    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes, dict[str, Any]]] = []
        self.joins: list[tuple[dict[str, Any], PeerInfo]] = []
        self.refused: list[bytes] = []
        self.counters = Counters()
        self.contacts = Contacts()
        self.links = Links()
        self.router = PeerRouter(view=View(), links=self.links,  # type: ignore[arg-type]
                                 contacts=self.contacts, counters=self.counters,
                                 members={"swim": self._record("swim"),
                                          "sync": self._record("sync", {"t": "ok", "items": []}),
                                          "bad": self._refuse},
                                 strangers={"join": self._join},
                                 refused_us=self.refused.append)

    def _record(self, kind: str, reply: dict[str, Any] | None = None) -> Any:
        def handler(key: bytes, msg: dict[str, Any]) -> dict[str, Any] | None:
            self.calls.append((kind, key, msg))
            return reply
        return handler

    def _refuse(self, key: bytes, msg: dict[str, Any]) -> None:
        raise RemoteError("sync for another mesh", reason="wrong-mesh")

    async def _join(self, msg: dict[str, Any], info: PeerInfo) -> dict[str, Any]:
        self.joins.append((msg, info))
        return {"t": "ok", "status": "pending"}


@pytest.fixture
def s() -> Setup:
    return Setup()


def info(curve: bytes) -> PeerInfo:
    return PeerInfo(curve, "10.0.0.9:5000", b"route-" + curve[:1])


async def test_a_member_request_reaches_its_handler_and_is_answered(s: Setup) -> None:
    reply = await s.router.on_request({"t": "sync", "id": 7}, info(MEMBER_CURVE))
    assert reply == {"t": "ok", "items": []}
    assert s.calls == [("sync", MEMBER, {"t": "sync", "id": 7})]
    assert s.counters.get("peer_requests_sync") == 1
    assert s.links.routes == {MEMBER_CURVE: b"route-m"}  # the way back to it
    contact = s.contacts.get(MEMBER)
    assert contact is not None and contact.last_ok is not None


async def test_a_one_way_message_on_a_dialed_link_reaches_the_same_handler(s: Setup) -> None:
    s.router.on_link_message({"t": "swim", "m": b"x"}, MEMBER_CURVE)
    assert s.calls == [("swim", MEMBER, {"t": "swim", "m": b"x"})]
    assert MEMBER in s.contacts and not s.links.routes


async def test_a_stranger_is_refused_on_both_paths(s: Setup) -> None:
    with pytest.raises(RemoteError) as exc:
        await s.router.on_request({"t": "swim", "m": b""}, info(STRANGER_CURVE))
    assert exc.value.reason == "not-member"
    s.router.on_link_message({"t": "swim", "m": b""}, STRANGER_CURVE)
    s.router.on_link_message({"t": "join"}, STRANGER_CURVE)
    assert s.calls == [] and not s.links.routes and STRANGER not in s.contacts
    assert s.counters.get("peer_refused_not_member") == 3


async def test_a_join_from_a_stranger_goes_to_the_join_handler(s: Setup) -> None:
    msg = {"t": "join", "inviter": MEMBER}
    assert await s.router.on_request(msg, info(STRANGER_CURVE)) == {"t": "ok", "status": "pending"}
    assert s.joins == [(msg, info(STRANGER_CURVE))]
    assert s.counters.get("peer_requests_join") == 1


async def test_unknown_types_are_refused_as_requests_and_counted_as_one_way(s: Setup) -> None:
    with pytest.raises(RemoteError) as exc:
        await s.router.on_request({"t": "tunnel"}, info(MEMBER_CURVE))
    assert exc.value.reason == "type"
    s.router.on_link_message({"t": "join"}, MEMBER_CURVE)  # only as a request to our port
    assert s.counters.get("peer_unexpected") == 1 and s.calls == [] and s.joins == []


async def test_a_refusal_is_told_to_a_requester_and_dropped_one_way(s: Setup) -> None:
    with pytest.raises(RemoteError) as exc:
        await s.router.on_request({"t": "bad"}, info(MEMBER_CURVE))
    assert exc.value.reason == "wrong-mesh"
    s.router.on_link_message({"t": "bad"}, MEMBER_CURVE)  # nobody to tell: no exception


async def test_a_member_refusing_our_one_way_message_as_a_strangers_is_told_to_the_owner(
        s: Setup) -> None:
    """A member that missed our key rotation answers our swim messages ``not-member`` (an error
    for id 0): the owner hears it, so that it can present its rotations at once."""
    refusal = {"t": "error", "id": 0, "reason": "not-member", "message": "who are you"}
    s.router.on_link_message(refusal, MEMBER_CURVE)
    assert s.refused == [MEMBER]
    s.router.on_link_message(refusal, STRANGER_CURVE)  # not a member of ours: nothing to do
    s.router.on_link_message({**refusal, "reason": "type"}, MEMBER_CURVE)
    assert s.refused == [MEMBER] and s.calls == []
