"""The kernel splice a relay runs (meshd.peer.ksplice) on real loopback TCP connections: what
each end sends reaches the other whole and in order, half-close and reset pass through, a
reader that stops reading stops its writer, and the end is reported once."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

from meshd.peer import ksplice

pytestmark = pytest.mark.glue

T = 30.0
MiB = 1 << 20


def _connected() -> tuple[socket.socket, socket.socket]:
    """Two ends of one loopback TCP connection (non-blocking)."""
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        near = socket.create_connection(lsock.getsockname())
        far, _ = lsock.accept()
    for s in (near, far):
        s.setblocking(False)
    return near, far


class Spliced:
    """Two applications, ``x`` and ``y``, each connected to the relay, whose two sockets are
    spliced to each other."""

    def __init__(self, a_first: bytes = b"", b_first: bytes = b"") -> None:
        self.x, a = _connected()
        self.y, b = _connected()
        self.done = asyncio.Event()
        self.ended: list[ksplice.KernelSplice] = []
        self.splice = ksplice.KernelSplice(a, b, self._ended, a_first=a_first, b_first=b_first)

    def _ended(self, sp: ksplice.KernelSplice) -> None:
        self.ended.append(sp)
        self.done.set()

    def close(self) -> None:
        self.splice.close()
        self.x.close()
        self.y.close()


@pytest.fixture
async def spliced() -> AsyncIterator[Any]:
    made: list[Spliced] = []

    def make(**kw: bytes) -> Spliced:
        made.append(Spliced(**kw))
        return made[-1]

    yield make
    for sp in made:
        sp.close()


async def _read_all(sock: socket.socket) -> bytes:
    """Everything ``sock`` receives until its end of file."""
    loop = asyncio.get_running_loop()
    got = bytearray()
    while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), T):
        got += chunk
    return bytes(got)


async def _send_and_shut(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)
    sock.shutdown(socket.SHUT_WR)


async def test_both_ways_arrive_whole_in_order_after_the_bytes_read_before(
        spliced: Any) -> None:
    sp = spliced(a_first=b"x-read-early|", b_first=b"y-read-early|")
    to_y, to_x = os.urandom(8 * MiB + 123), os.urandom(3 * MiB + 7)
    _, _, at_y, at_x = await asyncio.gather(_send_and_shut(sp.x, to_y),
                                            _send_and_shut(sp.y, to_x),
                                            _read_all(sp.y), _read_all(sp.x))
    assert hashlib.sha256(at_y).digest() == hashlib.sha256(b"x-read-early|" + to_y).digest()
    assert hashlib.sha256(at_x).digest() == hashlib.sha256(b"y-read-early|" + to_x).digest()
    await asyncio.wait_for(sp.done.wait(), T)
    assert sp.ended == [sp.splice] and sp.splice.error is None
    assert sp.splice.bytes == len(at_x) + len(at_y)


async def test_a_half_close_passes_through_and_the_other_way_goes_on(spliced: Any) -> None:
    sp = spliced()
    loop = asyncio.get_running_loop()
    await _send_and_shut(sp.x, b"request")
    assert await _read_all(sp.y) == b"request"  # y sees the end of x's writing
    await loop.sock_sendall(sp.y, b"answer after the half-close")
    sp.y.shutdown(socket.SHUT_WR)
    assert await _read_all(sp.x) == b"answer after the half-close"
    await asyncio.wait_for(sp.done.wait(), T)
    assert len(sp.ended) == 1


async def test_a_reset_ends_the_other_side_after_what_was_sent_before(spliced: Any) -> None:
    sp = spliced()
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sp.x, b"some")
    assert await asyncio.wait_for(loop.sock_recv(sp.y, 100), T) == b"some"
    await loop.sock_sendall(sp.x, b"last words")
    sp.x.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sp.x.close()  # a reset
    assert await _read_all(sp.y) == b"last words"
    await asyncio.wait_for(sp.done.wait(), T)


async def test_a_refusal_sent_before_a_close_arrives_while_the_other_side_still_sends(
        spliced: Any) -> None:
    """x answers a refusal and closes while y is still sending: the relay's writes to x then
    fail (x's kernel resets), and y must still read the refusal (a reset towards y would
    have made y's kernel drop it unread)."""
    sp = spliced()
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sp.y, b"hello")
    assert await asyncio.wait_for(loop.sock_recv(sp.x, 100), T) == b"hello"
    await loop.sock_sendall(sp.x, b"REFUSE: not-allowed")
    sp.x.close()

    async def keep_sending() -> None:
        try:
            while True:
                await loop.sock_sendall(sp.y, b"\0" * 65536)
        except OSError:
            return  # the relay closed y's connection: done

    sending = asyncio.create_task(keep_sending())
    try:
        got = b""
        while chunk := await asyncio.wait_for(loop.sock_recv(sp.y, 100), T):
            got += chunk
        assert got == b"REFUSE: not-allowed"
        await asyncio.wait_for(sp.done.wait(), T)
    finally:
        sending.cancel()


async def test_a_reader_that_stops_stops_its_writer(spliced: Any) -> None:
    """y reads nothing: x can write only what the socket buffers and one pipe hold."""
    sp = spliced()
    to_y = sp.splice._ways[0]
    block = os.urandom(MiB)
    written = 0
    while written < 256 * MiB:
        try:
            written += sp.x.send(block)
        except BlockingIOError:
            if to_y.waits == "w":  # its pipe is full and y takes nothing: x is stopped
                break
            await asyncio.sleep(0)  # the splice's turn: it moves what y's buffer still takes
    assert written < 64 * MiB, f"{written / MiB:.0f} MiB written to a reader that reads nothing"
    got = 0
    loop = asyncio.get_running_loop()
    while got < written:  # and nothing was lost
        got += len(await asyncio.wait_for(loop.sock_recv(sp.y, MiB), T))
    assert got == written
