"""Asking a silent member's port for the rotations it made while we were away (``rotations``).

The answering side's chain (:func:`chain_from`), the asking side's check of an answer
(:func:`check_chain`) and the question itself over a real TCP connection to a port that answers
what a test tells it (:func:`ask_rotations`).  A real MeshView over a real SQLite file keeps what
passes: an answer it must not take leaves the store as it was.  The daemons' side of it, end to
end: ``tests/system/test_membership_daemons.py``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from meshd.channel import link
from meshd.daemon.contacts import Contacts
from meshd.daemon.counters import Counters
from meshd.daemon.rekeys import (MAX_CHAIN, ask_rotations, chain_from, check_chain,
                                  own_rotations)
from meshd.daemon.site import LocalSite
from meshd.daemon.sync import MeshSync
from meshd.daemon.tasks import TaskSet
from meshd.state.config import Config
from meshd.errors import ProtocolError, RemoteError
from meshd.state.site import SiteKeys
from meshd.state.store import Store
from meshd.state.view import MeshView
from meshd.trust import records
from meshd.trust.identity import SiteKey
from meshd.trust.records import SiteRecord, Vouch


def key(n: int) -> SiteKey:
    return SiteKey(bytes([n]) * 32)


F, A, A1, A2, X = (key(i) for i in range(1, 6))  # F founds (and asks); A rotates; X outsider
OTHER = b"\x02" * 16
"""Another mesh's id."""


class Mesh:
    """F's view, with A vouched in: F is the member that missed A's rotations."""

    def __init__(self, path: Path) -> None:
        self.now = int(time.time())
        self.store = Store(path)
        self.view = MeshView(self.store, SiteKeys(F))
        self.view.found("testmesh", b"\x01" * 16, self.now)
        assert self.view.mesh_id is not None
        self.mesh = self.view.mesh_id
        self.view.ingest([records.sign(Vouch(self.mesh, F.public, A.public, "alcf", "member",
                                             self.now, 0), F).raw], self.now)

    def rotation(self, old: SiteKey, new: SiteKey, dt: int = 0) -> bytes:
        return records.sign_rotation(self.mesh, old, new, self.now + dt).raw

    def record(self, of: SiteKey, mesh: bytes | None = None) -> bytes:
        return records.sign(SiteRecord(of.public, mesh or self.mesh, "alcf", ("127.0.0.1:4000",), True, 1,
                                       self.now), of).raw

    def snapshot(self) -> list[bytes]:
        return sorted(self.view.snapshot())


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path / "f.db")
    yield m
    m.store.close()


def signed(mesh: Mesh, raws: list[bytes]) -> list[records.Signed]:
    return [records.decode(raw, now=int(time.time()), mesh_id=mesh.mesh) for raw in raws]


# -- the answering side: which rotations lead from a past key to the key now ---------------------

def test_the_chain_from_a_past_key_is_its_rotations_oldest_first(mesh: Mesh) -> None:
    r1, r2 = mesh.rotation(A, A1), mesh.rotation(A1, A2, 1)
    held = signed(mesh, [r2, r1])  # the order they are held in does not matter
    assert chain_from(held, A2.public, A.public) == [r1, r2]
    assert chain_from(held, A2.public, A1.public) == [r2]
    assert chain_from(held, A2.public, A2.public) == []  # the key now: nothing to tell


def test_no_chain_from_a_key_this_site_never_had(mesh: Mesh) -> None:
    held = signed(mesh, [mesh.rotation(A, A1), mesh.rotation(A1, A2, 1)])
    assert chain_from(held, A2.public, X.public) is None
    assert chain_from(held, A2.public, F.public) is None


def test_no_chain_from_a_key_more_rotations_ago_than_the_limit(mesh: Mesh) -> None:
    keys = [A] + [key(100 + i) for i in range(4)]
    held = signed(mesh, [mesh.rotation(a, b, i) for i, (a, b) in enumerate(zip(keys, keys[1:]))])
    assert chain_from(held, keys[-1].public, A.public, limit=4) is not None
    assert chain_from(held, keys[-1].public, A.public, limit=3) is None


def test_the_port_answers_from_its_own_chain_kept_between_questions(mesh: Mesh) -> None:
    r1, r2 = mesh.rotation(A, A1), mesh.rotation(A1, A2, 1)
    held = signed(mesh, [r1, mesh.rotation(X, key(50)), r2])  # another site's among them
    own = own_rotations(held, A2.public)
    assert [s.raw for s in own] == [r2, r1]  # newest first
    assert chain_from(own, A2.public, A.public) == chain_from(held, A2.public, A.public) \
        == [r1, r2]
    assert chain_from(own, A2.public, X.public) is None


# -- the asking side: an answer is one chain from the key it knows, then that key's record -------

def test_an_answer_of_rotations_and_the_new_keys_record_is_taken(mesh: Mesh) -> None:
    items = [mesh.rotation(A, A1), mesh.rotation(A1, A2, 1), mesh.record(A2)]
    assert check_chain(items, A.public, mesh.mesh) == A2.public
    result = mesh.view.ingest(items, mesh.now + 1)
    assert result.stored == 3
    assert A2.public in mesh.view.members and A.public not in mesh.view.members
    assert mesh.view.record_of(A2.public) is not None  # where to dial it


def bad_answers(mesh: Mesh) -> dict[str, Any]:
    """Answers that must be refused, by what is wrong with them (see ``BAD``)."""
    r1, r2 = mesh.rotation(A, A1), mesh.rotation(A1, A2, 1)
    return {
        "not a list": {"items": [r1]},
        "empty": [],
        "too long": [r1] * (MAX_CHAIN + 2),
        "not bytes": [r1, "text"],
        "garbage": [b"\x93\x01\x02"],
        "a vouch": [records.sign(Vouch(mesh.mesh, F.public, X.public, "x", "member", mesh.now, 0),
                                 F).raw],
        "from another key": [mesh.rotation(X, A1)],
        "a gap": [r2],
        "out of order": [r2, r1],
        "another mesh": [records.sign_rotation(OTHER, A, A1, mesh.now).raw],
        "a record alone": [mesh.record(A)],
        "a record of another key": [r1, mesh.record(X)],
        "a record before the end": [r1, mesh.record(A1), r2],
        "a record of another mesh": [r1, mesh.record(A1, OTHER)],
    }


BAD = ["not a list", "empty", "too long", "not bytes", "garbage", "a vouch", "from another key",
       "a gap", "out of order", "another mesh", "a record alone", "a record of another key",
       "a record before the end", "a record of another mesh"]


@pytest.mark.parametrize("what", BAD)
def test_an_answer_that_is_not_one_chain_from_the_known_key_is_refused(
        mesh: Mesh, what: str) -> None:
    with pytest.raises(RemoteError):
        check_chain(bad_answers(mesh)[what], A.public, mesh.mesh)


def test_a_chain_with_a_forged_signature_is_checked_before_anything_is_kept(
        mesh: Mesh) -> None:
    """``check_chain`` does not check signatures; keeping does, and keeps nothing forged."""
    forged = bytearray(mesh.rotation(A, A1))
    forged[-1] ^= 1
    items = [bytes(forged), mesh.record(A1)]
    assert check_chain(items, A.public, mesh.mesh) == A1.public  # the shape is right
    before = mesh.snapshot()
    mesh.view.ingest(items, mesh.now)
    assert mesh.snapshot() == before
    assert A.public in mesh.view.members and A1.public not in mesh.view.members


# -- the question over a real connection ----------------------------------------------------------

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def ask_port(answer: Answer, timeout: float = 5.0) -> Any:
    """``ask_rotations`` against a port on loopback that answers with ``answer``; also returns
    the preamble the port read."""
    seen: list[link.Preamble] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        kind, length = link.RECORD_HEADER.unpack(await reader.readexactly(5))
        assert kind == link.PREAMBLE
        seen.append(link.decode_preamble(await reader.readexactly(length)))
        await answer(reader, writer)
        writer.close()

    async def main() -> Any:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await ask_rotations(f"127.0.0.1:{port}", F.public, A.public,
                                       timeout=timeout)
        finally:
            server.close()

    result = asyncio.run(main())
    assert seen and seen[0].mode == "rotations" and seen[0].to == A.public
    assert seen[0].sender == F.public
    return result


def record(kind: int, body: bytes) -> bytes:
    return link.record_header(kind, len(body)) + body


def test_the_port_is_asked_about_the_key_this_site_knows_and_its_answer_returned(
        mesh: Mesh) -> None:
    items = [mesh.rotation(A, A1), mesh.record(A1)]

    async def answer(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(record(link.ROTATIONS, msgpack.packb(items)))

    assert ask_port(answer) == items


@pytest.mark.parametrize("what", ["refused", "silent", "closed", "oversized", "not msgpack",
                                  "another record"])
def test_a_port_that_does_not_answer_with_rotations_is_an_error(what: str) -> None:
    async def answer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if what == "refused":
            w.write(record(link.REFUSE, b"unknown-key: no rotation of this site hands it over"))
        elif what == "silent":
            await r.read()  # until the asker gives up
        elif what == "oversized":
            w.write(link.record_header(link.ROTATIONS, link.MAX_ROTATIONS + 1))
        elif what == "not msgpack":
            w.write(record(link.ROTATIONS, b"\xc1"))
        elif what == "another record":
            w.write(record(link.ACCEPT, b"x" * 32))
        await w.drain()

    with pytest.raises(ProtocolError) as caught:
        ask_port(answer, timeout=0.5)
    if what == "refused":
        assert "unknown-key" in caught.value.message


def test_a_port_nobody_listens_on_is_an_os_error() -> None:
    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        await ask_rotations(f"127.0.0.1:{port}", F.public, A.public, timeout=1)

    with pytest.raises(OSError):
        asyncio.run(main())


# -- MeshSync.ask_rotated: each address in turn, nothing kept from a bad answer -------------------

class Links:
    """What ``MeshSync`` asks of the member links here: where to dial (the record's addresses,
    after any ``lan`` ones), and nothing to dial for anyone else."""

    def __init__(self, view: MeshView, lan: list[str]) -> None:
        self.view, self.lan = view, lan

    def dial_addresses(self, key: bytes) -> list[str]:
        rec = self.view.record_of(key)
        return self.lan + list(rec.addrs) if rec is not None and key == A.public else []


async def port(answer: bytes | None) -> asyncio.Server:
    """A port answering every question with ``answer`` (a ROTATIONS body), or closing."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        if answer is not None:
            writer.write(record(link.ROTATIONS, answer))
            await writer.drain()
        writer.close()
    return await asyncio.start_server(serve, "127.0.0.1", 0)


def address(server: asyncio.Server) -> str:
    return f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


def ask_in_turn(mesh: Mesh, answers: list[bytes | None], *, lan: list[bytes | None] = (),
                extra: list[str] = ()) -> tuple[bool, Counters]:
    """A's record lists ``extra`` addresses, then a port per answer; ``lan`` ports are seen on
    the LAN (dialed first).  F asks whether A rotated."""
    async def main() -> tuple[bool, Counters]:
        servers = [await port(a) for a in answers]
        lan_servers = [await port(a) for a in lan]
        addrs = tuple(extra) + tuple(address(s) for s in servers)
        mesh.view.ingest([records.sign(SiteRecord(A.public, mesh.mesh, "alcf", addrs, True, 1,
                                                  mesh.now), A).raw], mesh.now)
        counters = Counters()
        sync = MeshSync(site=LocalSite("f", SiteKeys(F)), view=mesh.view, config=Config(),
                        links=Links(mesh.view, [address(s) for s in lan_servers]),  # type: ignore[arg-type]
                        contacts=Contacts(), counters=counters, tasks=TaskSet("test"),
                        on_change=lambda: None, start_membership=lambda: None)
        try:
            return await sync.ask_rotated(A.public), counters
        finally:
            for s in servers + lan_servers:
                s.close()
    return asyncio.run(main())


def test_each_address_is_asked_in_turn_until_one_answers_with_a_chain(mesh: Mesh) -> None:
    """A stale address, one the resolver refuses, one that answers "none" and one that answers
    with a forged chain come first; the site's real port last."""
    forged = bytearray(mesh.rotation(A, A1))
    forged[-1] ^= 1
    good = msgpack.packb([mesh.rotation(A, A1), mesh.record(A1)])
    took, counters = ask_in_turn(
        mesh, [None, msgpack.packb([]), msgpack.packb([bytes(forged), mesh.record(A1)]), good],
        extra=["a..b:80", "127.0.0.1:99999"])
    assert took
    assert A1.public in mesh.view.members and A.public not in mesh.view.members
    snap = counters.snapshot()
    assert snap["rotations_taken"] == 1 and snap["rotations_refused"] == 1


def test_addresses_seen_on_the_lan_cannot_crowd_out_the_signed_ones(mesh: Mesh) -> None:
    """Found in review: LAN sightings (anyone there may announce a site's key) were dialed
    first, and 8 of them answering "none" used every question."""
    good = msgpack.packb([mesh.rotation(A, A1), mesh.record(A1)])
    took, _ = ask_in_turn(mesh, [good], lan=[msgpack.packb([])] * 8)
    assert took and A1.public in mesh.view.members


def test_nothing_is_kept_when_no_address_answers_with_a_good_chain(mesh: Mesh) -> None:
    before = mesh.snapshot()
    other = msgpack.packb([mesh.rotation(X, A1), mesh.record(A1)])
    took, counters = ask_in_turn(mesh, [msgpack.packb([]), other, None])
    assert not took
    assert A.public in mesh.view.members and A1.public not in mesh.view.members
    # Only A's record was added (by the test itself, before asking).
    assert len(mesh.snapshot()) == len(before) + 1
    assert counters.snapshot()["rotations_refused"] == 1
