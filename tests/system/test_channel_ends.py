"""How channels end, with real daemons: the receiver hears that its sender closed, a revoked
site's channels and relay legs are cut at once with the reason, and a channel with no path
ends instead of leaving its application waiting for ever."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest

import meshd as api
from meshd.errors import ChannelClosed
from meshd.testing.processes import wait_until
from tests.helpers import invite, mesh_of


def test_the_receiver_hears_the_end_and_the_closed_channel_leaves_the_list(sites: Any) -> None:
    """Before: ``recv()`` only timed out after the sender closed, and the closed channel stayed
    in ``meshd channels``."""
    a, b = mesh_of(sites, "aps", "alcf")
    with api.connect(a.home) as ma, api.connect(b.home) as mb:
        rx = ma.receiver("frames")
        with mb.sender("frames", to="aps") as tx:
            for i in range(100):
                tx.send(np.full(16, i))
        got = [int(m.array[0]) for m in rx]  # iteration ends with the stream
        assert got == list(range(100))
        (end,) = rx.ended
        assert end.reason == "closed" and end.peer == "alcf"
        # the end notice follows the channel's removal: nothing is left to wait for
        assert [c for c in a.client.channels() if c["direction"] == "in"] == []
        assert "alcf" in str(end) and "closed" in str(end)
        with pytest.raises(TimeoutError):
            rx.recv(timeout=0.2)  # a new sender may open the name again: recv waits for it


def test_the_asyncio_receiver_ends_its_iteration_too(sites: Any) -> None:
    a, b = mesh_of(sites, "aps", "alcf")

    async def run() -> list[int]:
        async with api.aconnect(a.home) as ma, api.aconnect(b.home) as mb:
            rx = await ma.receiver("frames")
            tx = await mb.sender("frames", to="aps")
            for i in range(50):
                await tx.send(np.full(4, i))
            await tx.close()
            got = [int(m.array[0]) async for m in rx]
            with pytest.raises(TimeoutError):
                await rx.recv(timeout=0.2)
            return got

    assert asyncio.run(run()) == list(range(50))


class Streamer(threading.Thread):
    """An application at ``site`` that sends to ``to`` until its channel ends."""

    def __init__(self, site: Any, to: str, name: str, paths: list[str] | None = None) -> None:
        super().__init__(daemon=True)
        self.mesh = api.connect(site.home)
        self.tx = self.mesh.sender(name, to=to, paths=paths, linger=0)
        self.sent = 0
        self.error: BaseException | None = None
        self.started_sending = threading.Event()

    def run(self) -> None:
        try:
            while True:
                self.tx.send(np.full(1024, self.sent, dtype=np.int64))
                self.sent += 1
                if self.sent == 20:
                    self.started_sending.set()
        except BaseException as exc:  # noqa: BLE001 - what ended the stream is the result
            self.error = exc

    def close(self) -> None:
        self.join(30)
        self.mesh.close(flush=False)


def test_revocation_cuts_a_revoked_sites_channels_at_once_and_tells_the_application(
        sites: Any) -> None:
    """Bug: site A revoked D while D streamed to A, and A's application kept receiving D's
    messages for as long as D sent."""
    a, b, d = mesh_of(sites, "aps", "alcf", "dcs", configs={"dcs": "channel_give_up = 2"})
    with api.connect(a.home) as ma, api.connect(b.home) as mb:
        rx = ma.receiver("frames")
        brx = mb.receiver("relayed")
        streamer = Streamer(d, "aps", "frames")
        relayed = Streamer(d, "alcf", "relayed", paths=["relay"])  # through aps
        streamer.start()
        relayed.start()
        assert streamer.started_sending.wait(30) and relayed.started_sending.wait(30)
        first = rx.recv(timeout=30)
        assert first.sender == "dcs"
        brx.recv(timeout=30)
        wait_until(lambda: any(c["direction"] == "relay" for c in a.client.channels()), 30,
                   "the relayed channel to run through aps")
        to_d = ma.sender("back", to="dcs")

        a.client.revoke("dcs", "stolen key")
        # Cut while the revocation was ingested, before the call returned: no waiting.
        rows = a.client.channels()
        assert [r for r in rows if r["direction"] in ("in", "relay")] == [], rows
        assert [r["id"] for r in rows if r["direction"] == "out"] == []
        counters = a.client.status()["counters"]
        assert counters["channel_in_ended_revoked"] == 1
        assert counters["channel_ended_revoked"] == 1

        # A's receiving application: what was delivered before, then the end, then nothing.
        seen = 1
        with pytest.raises(ChannelClosed) as exc:
            while True:
                rx.recv(timeout=30)
                seen += 1
        assert exc.value.reason == "revoked" and exc.value.peer == "dcs"
        assert "revoked" in str(exc.value)
        assert seen < streamer.sent
        with pytest.raises(TimeoutError):
            rx.recv(timeout=1.0)  # d keeps trying: nothing of it reaches the application
        # A's sending application hears it at its next call.
        with pytest.raises(ChannelClosed) as sent_exc:
            to_d.flush(timeout=30)
        assert sent_exc.value.reason == "revoked" and sent_exc.value.peer == "dcs"
        with pytest.raises(ChannelClosed):
            to_d.send(b"x")
        to_d.close(flush=False)
        # D's applications are not left hanging: their channels end (no path any more).
        for s in (streamer, relayed):
            s.join(60)
            assert isinstance(s.error, ChannelClosed), s.error
            s.close()
    assert "Traceback" not in a.log() + d.log()


def test_a_channel_without_a_path_ends_and_its_application_hears_why(sites: Any) -> None:
    """Bug: with no path, channels failed for ten minutes and ``mesh.sender()`` and ``flush``
    reported nothing; a ``with`` block's close hung for ever."""
    a, b = mesh_of(sites, "aps", "alcf", configs={"aps": "channel_give_up = 2"})
    b.kill()
    with api.connect(a.home) as ma:
        tx = ma.sender("frames", to="alcf")
        tx.send(np.arange(10))
        with pytest.raises(ChannelClosed) as exc:
            tx.flush()  # no timeout: the channel's own end stops the wait
        assert exc.value.reason == "no-path" and exc.value.peer == "alcf"
        assert "no path for" in str(exc.value)
        assert tx.id not in [c["id"] for c in a.client.channels()]
        with pytest.raises(ChannelClosed):
            tx.send(np.arange(10))
        with pytest.raises(ChannelClosed):
            tx.close()  # closed all the same; says why
        tx2 = ma.sender("other", to="alcf")
        tx2.send(b"x")
        with pytest.raises(ChannelClosed):
            ma.close()  # closes every end, then says why one ended
    assert a.client.status()["counters"]["channel_ended_no_path"] == 2



def test_sites_that_drop_out_with_a_revoked_introducer_are_cut_like_it(sites: Any) -> None:
    """Bug: revoking an introducer dropped the site it had admitted out of the mesh, but that
    site's channels were not cut: what they held still reached the application, which never
    heard an end."""
    aps = sites("aps")
    alcf, dcs = sites("alcf", start=False), sites("dcs")
    r = alcf.start().cli("join", input=invite(aps, "--role", "introducer"))
    assert r.returncode == 0, r.stderr
    r = dcs.cli("join", input=invite(alcf))
    assert r.returncode == 0, r.stderr
    with api.connect(aps.home) as ma, api.connect(dcs.home) as md:
        rx = ma.receiver("frames")
        tx = md.sender("frames", to="aps", linger=0)
        for i in range(20):
            tx.send(np.full(1024, i))
        assert rx.recv(timeout=30).sender == "dcs"

        aps.client.revoke("alcf", "gone rogue")  # dcs is a member only through alcf
        assert "dcs" not in {p["name"] for p in aps.client.peers()}
        assert [c for c in aps.client.channels() if c["peer"] == "dcs"] == []
        with pytest.raises(ChannelClosed) as exc:
            while True:
                rx.recv(timeout=30)
        assert exc.value.reason == "revoked" and exc.value.peer == "dcs"
        md.close(flush=False)


def test_channels_relayed_through_a_revoked_site_leave_it(sites: Any) -> None:
    """Bug: after aps revoked dcs, a channel from alcf to aps kept flowing through dcs, the
    revoked relay, for as long as its connection lasted."""
    aps, alcf, dcs = mesh_of(sites, "aps", "alcf", "dcs")
    with api.connect(aps.home) as ma, api.connect(alcf.home) as ml:
        rx = ma.receiver("relayed")
        tx = ml.sender("relayed", to="aps", paths=["relay"], linger=0)  # through dcs
        tx.send(np.arange(1000))
        assert rx.recv(timeout=30).sender == "alcf"
        assert any(c["direction"] == "relay" for c in dcs.client.channels())

        aps.client.revoke("dcs", "stolen key")
        wait_until(lambda: not any(c["direction"] == "relay" for c in dcs.client.channels()),
                   10, "the revoked relay to carry nothing")
        ml.close(flush=False)
