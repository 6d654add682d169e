"""The README's main job: ``meshd demo`` builds a mesh of real daemons and reports it."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import meshd


def test_demo_builds_a_three_site_mesh(tmp_path: Path) -> None:
    r = meshd("demo", "--json", home=tmp_path / "demo", timeout=180)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert set(report["sites"]) == {"aps-8id", "alcf", "nersc"}
    for name, site in report["sites"].items():
        peers = {p["name"]: p for p in site["peers"]}
        assert set(peers) == {"aps-8id", "alcf", "nersc"}
        assert all(p["verified"] for p in peers.values())
        assert peers[name]["self"] and peers[name]["state"] == "alive"
        assert site["status"]["members"] == 3
    ids = {s["status"]["mesh_id"] for s in report["sites"].values()}
    assert len(ids) == 1 and None not in ids
    # the last site only dials out: the arrays reach it by the reversed path
    channel = report["channel"]
    assert channel["in_order"] and channel["path"] == "reversed" and channel["relay"] is None
    assert channel["messages"] == 64 and channel["MBps"] > 0
    assert report["sites"]["nersc"]["status"]["listen"] is None
    tunnel = report["tunnel"]
    assert tunnel["sha256_ok"] and tunnel["path"] in ("direct", "reversed") and tunnel["MBps"] > 0
    assert report["reused_token"]["state"] == "failed"
    assert report["reused_token"]["error"]["reason"] == "used"
    # every daemon stopped cleanly and left no control socket behind
    assert not list((tmp_path / "demo").glob("*/control.sock"))
