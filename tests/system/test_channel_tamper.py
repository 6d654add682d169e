"""A hostile relay, and strangers, against real daemons: tampering is detected, nothing corrupts.

The relay site advertises the address of a man-in-the-middle proxy run by this test in front of
its real port, so both legs of a relayed channel pass through it (membership traffic too,
untouched).  The proxy parses the data-connection records of the sender's leg and flips, drops,
replays or reorders chosen data frames.  The stream must still arrive complete, in order and
exactly once, and the tampering must be visible (a dropped connection and a renegotiation, a
resend, a counted duplicate).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from typing import Any

import numpy as np
import pytest

import meshd
from meshd.channel import link
from meshd.testing.processes import wait_until
from meshd.trust.identity import SiteKey

from tests.helpers import mesh_of, Site

N = 40
SIZE = 100_000  # bytes per message: each travels alone, so frame seq == message index


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TamperProxy:
    """Forwards 127.0.0.1:listen -> 127.0.0.1:target in a thread; tampers with data frames of
    kind DATA and the given seqs on connections that start with a data preamble (client side)."""

    def __init__(self, listen: int, target: int, mode: str, seqs: set[int]) -> None:
        self.listen, self.target, self.mode, self.seqs = listen, target, mode, seqs
        self.tampered = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._conn, "127.0.0.1", self.listen))
        self.ready.set()
        self.loop.run_forever()

    async def _conn(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            cw.close()
            return
        back = asyncio.ensure_future(self._pipe(sr, cw))
        try:
            first = await cr.read(1)
            if first and first[0] == link.PREAMBLE:
                await self._records(first, cr, sw)  # re-sends ``first`` with each record
            elif first:
                sw.write(first)
                await self._pipe(cr, sw)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            sw.close()
            back.cancel()

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(1 << 16):
                w.write(data)
                await w.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            w.close()

    async def _records(self, first: bytes, r: asyncio.StreamReader,
                       w: asyncio.StreamWriter) -> None:
        head = first + await r.readexactly(4)
        held: bytes | None = None
        while True:
            kind, length = link.RECORD_HEADER.unpack(head)
            body = bytearray(await r.readexactly(length))
            seq = None
            if kind == link.FRAME and body[1] == 0 and len(body) > 32:  # a DATA frame
                seq = struct.unpack_from(">Q", body, 20)[0]
            raw = link.record_header(kind, length) + bytes(body)
            if seq in self.seqs:
                self.seqs.discard(seq)
                self.tampered += 1
                if self.mode == "flip":
                    body[40] ^= 0x01
                    raw = link.record_header(kind, length) + bytes(body)
                elif self.mode == "drop":
                    raw = b""
                elif self.mode == "replay":
                    raw = raw + raw
                elif self.mode == "reorder":
                    held, raw = raw, b""
            elif held is not None and seq is not None:
                raw, held = raw + held, None
            w.write(raw)
            await w.drain()
            head = await r.readexactly(5)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def _shutdown(self) -> None:
        self.server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def relayed_mesh(sites: Any, mode: str, seqs: set[int]) -> tuple[Site, Site, Site, TamperProxy]:
    real, front = free_port(), free_port()
    proxy = TamperProxy(front, real, mode, seqs)
    a, b, r = mesh_of(sites, "aps", "alcf", "evil",
                      configs={"aps": 'paths = ["relay"]\ndiscovery = false',
                               "alcf": "discovery = false",
                               "evil": f'discovery = false\nadvertise = ["127.0.0.1:{front}"]'},
                      listen={"evil": f"127.0.0.1:{real}"})
    return a, b, r, proxy


def stream(a: Site, b: Site) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    with meshd.connect(b.home) as mb, meshd.connect(a.home) as ma:
        rx = mb.receiver("t")
        tx = ma.sender("t", to="alcf")
        for i in range(N):
            tx.send(np.full(SIZE, i % 251, dtype=np.uint8), meta={"i": i})
        tx.flush(timeout=60)
        got = [rx.recv(timeout=30) for _ in range(N)]
        with pytest.raises(TimeoutError):
            rx.recv(timeout=0.5)  # and nothing more
        out = next(c for c in ma.channels() if c["direction"] == "out")
        wait_until(lambda: [c["messages"] for c in mb.channels() if c["direction"] == "in"]
                   == [N], 30, "the receiving application to report its counters")
        inc = next(c for c in mb.channels() if c["direction"] == "in")
        return [(m.seq, m.meta["i"], bool((m.array == m.meta["i"] % 251).all()), m.array.size)
                for m in got], out, inc


EXPECTED = [(i, i, True, SIZE) for i in range(N)]


@pytest.mark.parametrize("mode", ["flip", "drop", "replay", "reorder"])
def test_a_hostile_relay_cannot_corrupt_lose_or_duplicate(sites: Any, mode: str) -> None:
    a, b, r, proxy = relayed_mesh(sites, mode, {5, 17})
    try:
        got, out, inc = stream(a, b)
    finally:
        proxy.close()
    assert got == EXPECTED
    assert proxy.tampered >= 1 and out["path"] == "relay" and out["relay"] == "evil"
    if mode == "flip":   # the receiver drops the connection; the sender renegotiates, resends
        assert out["renegotiations"] >= 1 and "auth-failed" in b.log()
    elif mode == "drop":  # a gap: the receiver asks, the sender resends
        assert out["retransmits"] >= 1
    elif mode == "replay":  # an authentic but old frame: counted and dropped
        assert inc["duplicates"] >= 1
    assert inc["messages"] == N


def _records(sock: socket.socket) -> list[tuple[int, bytes]]:
    out, buf = [], b""
    while True:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not data:
            break
        buf += data
    while len(buf) >= 5:
        kind, n = link.RECORD_HEADER.unpack_from(buf)
        out.append((kind, buf[5:5 + n]))
        buf = buf[5 + n:]
    return out


def test_a_non_member_cannot_open_a_channel(sites: Any) -> None:
    a, b = mesh_of(sites, "aps", "alcf")
    with meshd.connect(b.home) as mb:
        mb.receiver("open-to-all")
        port = int(b.client.status()["listen"].rpartition(":")[2])
        stranger = SiteKey.generate()
        # 1. a stranger naming itself: refused at the preamble
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            pre = link.encode_preamble(link.Preamble("direct", b"\x01" * 16, stranger.public,
                                                     b"\x02" * 32, "s", b"", 0))
            s.sendall(link.record_header(link.PREAMBLE, len(pre)) + pre)
            recs = _records(s)
        assert recs and recs[0][0] == link.REFUSE and recs[0][1].startswith(b"not-member")
        # 2. a stranger claiming to be a member: the Hello must be signed by that member's key
        from meshd.channel.handshake import Initiator

        member = _site_key_of(a)
        receiver = _site_key_of(b)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            pre = link.encode_preamble(link.Preamble("direct", b"\x03" * 16, member, receiver,
                                                     "s", b"", 0))
            hello = bytearray(Initiator(stranger, receiver, b"\x03" * 16,
                                        now=time.time()).hello)
            hello[18:50] = member  # name the member as initiator; the stranger signed it
            s.sendall(link.record_header(link.PREAMBLE, len(pre)) + pre
                      + link.record_header(link.HELLO, len(hello)) + bytes(hello))
            recs = _records(s)
        assert not any(k == link.ACCEPT for k, _ in recs)
        counters = b.client.status()["counters"]
        assert counters.get("channel_untrusted_refused_bad_signature") == 1, counters
        assert not [c for c in mb.channels() if c["direction"] == "in"]
        assert b.client.status()["pid"]  # still running


def _site_key_of(site: Site) -> bytes:
    from meshd.trust.identity import SiteKey as _K

    return _K.load(site.home / "site.key").public


def test_the_relay_sees_only_ciphertext(sites: Any) -> None:
    a, b, r, proxy = relayed_mesh(sites, "none", set())
    seen = bytearray()
    orig = proxy._records

    async def capture(first: bytes, rd: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        class Tap:
            async def readexactly(self, n: int) -> bytes:
                data = await rd.readexactly(n)
                seen.extend(data)
                return data
        await orig(first, Tap(), w)  # type: ignore[arg-type]

    proxy._records = capture  # type: ignore[method-assign]
    secret = b"the detector's secret frame " * 4000
    try:
        with meshd.connect(b.home) as mb, meshd.connect(a.home) as ma:
            rx = mb.receiver("c")
            tx = ma.sender("c", to="alcf")
            tx.send(secret)
            tx.flush(timeout=30)
            assert rx.recv(timeout=30).bytes() == secret
    finally:
        proxy.close()
    assert len(seen) > len(secret) and b"detector" not in bytes(seen)
