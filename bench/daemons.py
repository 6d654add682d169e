"""Membership with real daemons on loopback: join latency, spread, crash detection, leave.

    python bench/daemons.py [--sites 5] [--json]

Starts ``--sites`` real ``meshd run`` processes (each its own state dir), then measures, over
the real control sockets and CURVE peer ports:

- ``join_s``: wall time of each ``Client.join`` + wait until admitted, per joining site;
- ``known_everywhere_s``: from a site's admission until every running site lists it alive;
- ``detection_s``: from SIGKILL of one site until every other site shows it dead;
- ``leave_s``: from SIGTERM of one site until every other shows it left.

It is a benchmark, not a test: nothing is asserted, figures go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshd.app.client import Client  # noqa: E402
from meshd.state.site import init_site  # noqa: E402
from meshd.testing.processes import start_daemon, wait_until  # noqa: E402
from meshd.state.home import Home  # noqa: E402


def _summary(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"p50": round(statistics.median(xs), 3), "max": round(xs[-1], 3), "n": len(xs)}


def _state(client: Client, name: str) -> str | None:
    return {p["name"]: p["state"] for p in client.peers()}.get(name)


def run(sites: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="meshd-bench-"))
    names = [f"site{i}" for i in range(sites)]
    procs = {}
    clients = {}
    try:
        for n in names:
            init_site(Home(root / n), n, "127.0.0.1:0")
            procs[n] = start_daemon(root / n, root / n / "daemon.log")
            clients[n] = Client(root / n)
        for n in names:
            wait_until(clients[n].status, 30, f"{n}'s daemon")
        token = clients[names[0]].invite(uses=sites, expires=3600)["token"]
        join_s, known_s = [], []
        for n in names[1:]:
            t0 = time.monotonic()
            j = clients[n].join(token)
            while j["state"] not in ("admitted", "failed"):
                j = clients[n].join_state(j["id"], wait=5, state=j["state"])
            assert j["state"] == "admitted", j
            t1 = time.monotonic()
            join_s.append(t1 - t0)
            members = names[: names.index(n) + 1]
            for m in members:
                wait_until(lambda m=m: _state(clients[m], n) == "alive", 60, f"{m} to see {n}")
            known_s.append(time.monotonic() - t1)
        victim, leaver = names[-1], names[-2]
        others = names[:-2]
        t0 = time.monotonic()
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait()
        for m in [*others, leaver]:
            wait_until(lambda m=m: _state(clients[m], victim) == "dead", 120, f"{m}: {victim} dead")
        detection = time.monotonic() - t0
        t0 = time.monotonic()
        procs[leaver].send_signal(signal.SIGTERM)
        procs[leaver].wait(30)
        for m in others:
            wait_until(lambda m=m: _state(clients[m], leaver) == "left", 60, f"{m}: {leaver} left")
        leave = time.monotonic() - t0
        return {"sites": sites, "join_s": _summary(join_s), "known_everywhere_s": _summary(known_s),
                "detection_s": round(detection, 3), "leave_s": round(leave, 3)}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(20)
            except Exception:
                p.kill()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.sites < 4:
        p.error("--sites must be at least 4")
    r = run(args.sites)
    print(json.dumps(r, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
