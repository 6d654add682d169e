"""Data connections on loopback: records small and large, refusals, and the splice helper's
flow control (the relay's and the port multiplexer's)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from meshd.channel import link
from meshd.daemon.channels.connection import MAX_INBOX, DataConnection
from meshd.daemon.channels.dialing import dial_any
from meshd.errors import ProtocolError
from meshd.peer.splice import SpliceEnd, pair

pytestmark = pytest.mark.glue
T = 10.0


async def _server(trusted: bool) -> tuple[asyncio.Server, str, asyncio.Queue[DataConnection]]:
    accepted: asyncio.Queue[DataConnection] = asyncio.Queue()

    def make() -> DataConnection:
        conn = DataConnection(trusted=trusted)
        accepted.put_nowait(conn)
        return conn

    srv = await asyncio.get_running_loop().create_server(make, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    return srv, f"127.0.0.1:{port}", accepted


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, asyncio.Queue[DataConnection]]]:
    srv, address, accepted = await _server(trusted=True)
    yield address, accepted
    srv.close()


@pytest.fixture
async def stranger_server() -> AsyncIterator[tuple[str, asyncio.Queue[DataConnection]]]:
    """Accepts as the channel service does: untrusted until told otherwise."""
    srv, address, accepted = await _server(trusted=False)
    yield address, accepted
    srv.close()


async def stranger_pair(stranger_server: Any) -> tuple[DataConnection, DataConnection, list[int]]:
    """A dialed connection, its untrusted far end, and the list its slot releases append to."""
    address, accepted = stranger_server
    conn, _, _ = await dial_any([address], timeout=T)
    far = await asyncio.wait_for(accepted.get(), T)
    released: list[int] = []
    far.release_slot = lambda: released.append(1)
    return conn, far, released


async def test_an_untrusted_connection_refuses_a_big_record_before_allocating_it(
        stranger_server: Any) -> None:
    conn, far, released = await stranger_pair(stranger_server)
    assert len(far._scratch) <= 8 << 10  # a stranger costs a few KiB
    conn.send(link.PREAMBLE, b"p" * 100)  # small records are fine
    assert bytes(await far.expect(link.PREAMBLE, timeout=T)) == b"p" * 100
    # A 16 MiB frame announced: closed on its header, nothing allocated for its body.
    conn.transport.write(link.record_header(link.FRAME, 16 << 20) + b"x" * 1000)  # type: ignore
    await asyncio.wait_for(far.closed, T)
    assert far._body is None and "before the connection is authenticated" in (far.error or "")
    assert released == [1]  # its slot came back once


async def test_a_trusted_connection_takes_whole_frames_and_gives_its_slot_back_once(
        stranger_server: Any) -> None:
    conn, far, released = await stranger_pair(stranger_server)
    conn.send(link.HELLO, b"h")
    assert bytes(await far.expect(link.HELLO, timeout=T)) == b"h"
    far.trust()
    assert released == [1] and far.max_record == link.MAX_RECORD
    big = b"b" * (2 << 20)
    conn.send(link.FRAME, big)
    assert bytes(await far.expect(link.FRAME, timeout=T)) == big
    conn.close()
    await asyncio.wait_for(far.closed, T)
    assert released == [1]


async def test_a_record_that_stalls_halfway_is_timed_out_and_freed(server: Any) -> None:
    address, accepted = server
    conn, _, _ = await dial_any([address], timeout=T)
    far = await asyncio.wait_for(accepted.get(), T)
    far.stall_timeout = 0.2
    conn.transport.write(link.record_header(link.FRAME, 4 << 20) + b"x" * (1 << 20))  # type: ignore
    await asyncio.wait_for(far.closed, T)
    assert far._body is None and "stalled in the middle of a 4194304-byte record" in far.error


async def test_unread_records_are_bounded(server: Any) -> None:
    address, accepted = server
    conn, _, _ = await dial_any([address], timeout=T)
    far = await asyncio.wait_for(accepted.get(), T)
    for _ in range(MAX_INBOX + 1):  # nobody reads far's inbox
        conn.send(link.REFUSE, b"r")
    await asyncio.wait_for(far.closed, T)
    assert "nobody has read" in (far.error or "")


async def test_small_and_large_records_arrive_whole_and_in_order(server: Any) -> None:
    address, accepted = server
    conn, got_address, rtt = await dial_any(["127.0.0.1:1", address], timeout=T)
    assert got_address == address and rtt >= 0
    far = await asyncio.wait_for(accepted.get(), T)
    big = bytes(range(256)) * 4096  # 1 MiB: received straight into its own buffer
    for body in (b"p" * 10, big, b"f" * 3):
        conn.send(link.FRAME, body)
    for body in (b"p" * 10, big, b"f" * 3):
        assert bytes(await far.expect(link.FRAME, timeout=T)) == body
    assert far.bytes_in == conn.bytes_out
    conn.close()
    await asyncio.wait_for(far.closed, T)


async def test_a_refusal_reaches_the_other_side_as_a_protocol_error(server: Any) -> None:
    address, accepted = server
    conn, _, _ = await dial_any([address], timeout=T)
    far = await asyncio.wait_for(accepted.get(), T)
    far.refuse("not-member: go away")
    with pytest.raises(ProtocolError, match="not-member"):
        await conn.expect(link.ACCEPT, timeout=T)


async def test_held_bytes_pass_on_once_spliced(server: Any) -> None:
    """A relay leg holds what arrived before its partner came, then splices both ways."""
    address, accepted = server
    a, _, _ = await dial_any([address], timeout=T)
    leg_a = await asyncio.wait_for(accepted.get(), T)
    b, _, _ = await dial_any([address], timeout=T)
    leg_b = await asyncio.wait_for(accepted.get(), T)
    leg_a.hold()
    a.send(link.FRAME, b"early")  # waits, unread, until the splice
    leg_a.splice(leg_b)
    leg_b.splice(leg_a)
    assert bytes(await b.expect(link.FRAME, timeout=T)) == b"early"
    b.send(link.FRAME, b"back")
    assert bytes(await a.expect(link.FRAME, timeout=T)) == b"back"
    a.close()
    await asyncio.wait_for(b.closed, T)  # one side closing closes the other


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.reading = True
        self.closing = False

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


def test_the_splice_passes_bytes_and_a_full_side_pauses_the_other() -> None:
    ta, tb = FakeTransport(), FakeTransport()
    a, b = SpliceEnd(ta), SpliceEnd(tb)  # type: ignore[arg-type]
    pair(a, b)
    scratch = bytearray(b"hello")
    a.received(memoryview(scratch), reused=True)
    scratch[:] = b"xxxxx"  # a reused buffer: what was passed on is unchanged
    b.received(b"back")
    assert tb.written == [b"hello"] and ta.written == [b"back"]
    assert (b.bytes_out, a.bytes_out) == (5, 4)
    b.pause_writing()  # b's buffer is full: a must stop reading
    assert not ta.reading and tb.reading
    b.resume_writing()
    assert ta.reading
    tb.closing = True
    a.received(b"lost")
    assert tb.written == [b"hello"]
