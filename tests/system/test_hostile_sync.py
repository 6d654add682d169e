"""A hostile member floods ``sync`` with thousands of copies of one valid signed record
(issue 11): the site keeps answering its control socket, tells the flooder ``busy``, and its
view is unchanged."""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import pytest

from meshd.peer import wire
from meshd.testing.processes import wait_until
from meshd.trust import records
from meshd.trust.identity import SiteKey
from meshd.trust.records import SiteRecord

from tests.helpers import Site, mesh_of, state_dump
from tests.system.test_hostile_peer import RawPeer

FLOOD_SECONDS = 6.0
SYNCS_PER_SECOND = 4.0


def _status_round_trips(site: Site, until: threading.Event | float) -> list[float]:
    """Round trips of ``meshd status`` over the control socket, one every 20 ms."""
    out: list[float] = []
    while not (until.is_set() if isinstance(until, threading.Event) else len(out) >= until):
        t0 = time.monotonic()
        site.client.status()
        out.append(time.monotonic() - t0)
        time.sleep(0.02)  # the pace of the probe, not a wait for an event
    return out


def _p95(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=20)[-1]


@pytest.mark.parametrize("kind", ["copies", "distinct"])
def test_a_member_flooding_sync_with_valid_records_is_told_busy(sites: Any, kind: str) -> None:
    """``copies``: thousands of copies of alcf's current record.  ``distinct``: thousands of
    different records, each validly signed by alcf but stale (its sequence is not newer), so
    each needs a signature check once."""
    a, b = mesh_of(sites, "aps", "alcf")
    mesh_id = bytes.fromhex(a.json("status")["mesh_id"])
    b_key = SiteKey.load(b.home / "site.key")
    assert b.stop() == 0  # the flooder speaks as alcf, with alcf's key
    wait_until(lambda: {p["name"]: p["state"] for p in a.client.peers()}["alcf"] == "left", 30,
               "aps to see alcf leave")
    peer = RawPeer(a, curve_secret=b_key.curve_keypair()[1])
    try:
        snapshot = peer.ask({"t": "sync", "mesh": mesh_id, "items": []})["items"]
    finally:
        peer.close()
    held = next(s for s in (records.decode(raw, now=int(time.time())) for raw in snapshot)
                if s.signer == b_key.public)
    copies = min(wire.MAX_ITEMS, (wire.MAX_MESSAGE_BYTES - 4096) // (len(held.raw) + 8))
    assert copies >= 2048
    body = held.body
    assert isinstance(body, SiteRecord)
    if kind == "copies":
        items = [held.raw] * copies
    else:
        items = [records.sign(SiteRecord(b_key.public, mesh_id, "alcf",
                                         (f"10.9.{i // 250}.{i % 250}:1",), True, body.seq,
                                         body.issued), b_key).raw for i in range(copies)]
        assert len(set(items)) == copies
    flood = wire.encode({"t": "sync", "id": 1, "mesh": mesh_id, "items": items})
    assert len(flood) < wire.MAX_MESSAGE_BYTES
    before = state_dump(a)
    baseline = _status_round_trips(a, 40)

    done = threading.Event()
    replies: list[dict[str, Any]] = []

    def take(p: RawPeer) -> None:
        msg = wire.decode(p.sock.recv())
        if msg["t"] in ("ok", "error"):  # not the membership messages aps sends alcf
            replies.append(msg)

    def flooder() -> None:
        p = RawPeer(a, curve_secret=b_key.curve_keypair()[1])
        try:
            sent, start = 0, time.monotonic()
            while time.monotonic() - start < FLOOD_SECONDS:
                if sent < (time.monotonic() - start) * SYNCS_PER_SECOND:
                    p.send_raw(flood)
                    sent += 1
                while p.sock.poll(10):
                    take(p)
            deadline = time.monotonic() + 60
            while len(replies) < sent and time.monotonic() < deadline:
                if p.sock.poll(100):
                    take(p)
        finally:
            p.close()
            done.set()

    thread = threading.Thread(target=flooder, daemon=True)
    thread.start()
    during = _status_round_trips(a, done)
    thread.join(5)

    base_p95, flood_p95 = _p95(baseline), _p95(during)
    print(f"status p95: baseline {base_p95 * 1000:.1f} ms, under the flood "
          f"{flood_p95 * 1000:.1f} ms (max {max(during) * 1000:.1f} ms); replies "
          f"{[r.get('reason', r['t']) for r in replies]}")
    # The control socket keeps answering: the flood adds at most 100 ms to the median round trip
    # and 500 ms to its p95 (a loop blocked on the flood's signatures would add seconds; a
    # loaded shared machine alone moves a p95 by a hundred milliseconds).
    assert statistics.median(during) < statistics.median(baseline) + 0.1
    assert flood_p95 < base_p95 + 0.5
    busy = [r for r in replies if r["t"] == "error" and r["reason"] == "busy"]
    assert busy and all(r.get("retry_after", 0) > 0 for r in busy)
    counters = a.json("status")["counters"]
    assert counters.get("sync_refused_busy", 0) == len(busy)
    if kind == "distinct":  # each distinct record was checked, and refused as stale
        assert counters.get("records_refused_stale", 0) >= copies
    assert state_dump(a) == before
