"""Channel setup latency in the lab with WAN delay: direct and reversed paths (needs root).

    python bench/lab_setup.py [--json] [--runs 20] [--delay-ms 20] [--reach-interval S]
                              [--keep-logs DIR]

What it checks (the issue's target): channel setup, request to first byte, "in the lab with
20 ms of added one-way delay, under 3 round trips plus 20 ms for direct and reversed paths".

The set-up:

- ``bootstrap/lab down``, then ``bootstrap/lab up --delay-ms D`` (default 20).  The lab delays
  every IPv4 frame D ms in each direction on the uplink of site A only (its default
  ``--impair A``), so between A and B, and between A and C, the added one-way delay is D and the
  round trip about 2*D.  Every measured pair involves A.
- The round trip is measured, not assumed: a UDP echo server in A's namespace, 20 probes one at
  a time from B and from C (``rtt_ms``: their median; ``rtt_min_ms`` the least).
- One daemon per site, each inside its namespace (``bootstrap/lab exec SITE python -m meshd
  run``), state dirs in a temporary directory: lab-a (A, listens on 10.77.0.10:4750), lab-b
  (B, listens on 10.77.0.20:4750 but B's firewall drops inbound connects), lab-c (C, behind NAT,
  ``--no-listen``); ``discovery = false`` and ``sync_interval = 2.0`` for all.  A invites B and
  C; the bench waits until every site lists every other alive with its verified record, and
  until the reachability checks have run (A knows it cannot dial B or C, B and C know A cannot
  dial them and that they can dial A), so each channel can take its expected path at once.
- Pairs (sender -> receiver, expected path): B -> A direct, A -> B reversed, C -> A direct,
  A -> C reversed.

What is measured, per pair, over ``--runs`` fresh channel names (after one unrecorded warm-up
channel, whose figure is reported as ``first_ms``), as ``bench/channels.py`` defines its
"setup" figure: from just before the sending app's ``mesh.sender(name, to=...)`` call to the
receiving app holding the first message (one 64 B array, sent then flushed so as not to wait
out the client's 2 ms batch linger).  Both times are CLOCK_MONOTONIC, one clock for every
process on the host (the namespaces share it).  The receiver is opened before each sender and
its app is already blocked in ``recv`` when the message comes (the daemon pushes it at once),
so the figure does not wait for the sender's ``flush`` to return (half a round trip later: in
``bench/channels.py`` the receiver is only asked to ``recv`` after that).  The apps are two
processes (multiprocessing, spawn) in the host's namespace: an app talks only to
its own site's daemon, over the unix control socket and ipc endpoints in the daemon's state dir,
which the namespaces share.  Also recorded, from the sender's ``mesh.channels()`` row before
the channel is closed: the daemon's ``setup_ms`` (its path race, from start to the completed
end-to-end handshake) and the ``path`` taken; ``app_minus_daemon_ms_p50`` is what comes after
that handshake (the open, the receiver's first credit, the message).

The bound per pair is ``3 * rtt_ms + 20``; ``met`` says whether p50, p99 and max are each
under it (``met.all``: all three).  The lab is always torn down at the end (``bootstrap/lab
down``), on error or Ctrl-C too; the daemon logs are printed on failure and kept with
``--keep-logs DIR``.  Takes about 90 s with meshd's default ``reach_interval`` (60 s): A asks
C to dial it back only at its next periodic check, about a minute after C joins, and the bench
waits for that; ``--reach-interval 5`` brings a run down to about 30 s.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from channels import _now_ns, _serve, stop_apps  # noqa: E402  (the same app protocol as its setup figure)

LAB = ROOT / "bootstrap" / "lab"
A_IP, B_IP = "10.77.0.10", "10.77.0.20"
PORT = 4750
ECHO_PORT = 45998
CONFIG = {"discovery": "false", "sync_interval": "2.0"}
PAIRS = (("B", "A", "direct"), ("A", "B", "reversed"), ("C", "A", "direct"),
         ("A", "C", "reversed"))
"""(sender site, receiver site, expected path)."""
SMALL = 64
MESH_TIMEOUT = 120.0
RECV_TIMEOUT = 30.0
RTT_PROBES = 20


class BenchError(Exception):
    """A step of the bench failed; the message says which and why."""


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """:func:`meshd.cli.demo.wait_until`, where any error means "not yet" (a daemon in another
    namespace not answering), and a timeout is a BenchError."""
    from meshd.testing.processes import wait_until

    try:
        return wait_until(predicate, timeout, what, ignore=(Exception,))
    except TimeoutError as exc:
        raise BenchError(str(exc)) from None


def lab(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, str(LAB), *args], capture_output=True, text=True,
                       timeout=120)
    if check and r.returncode != 0:
        raise BenchError(f"`bootstrap/lab {' '.join(args)}` failed ({r.returncode}):"
                         f" {(r.stderr or r.stdout).strip()}")
    return r


ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def meshd_cli(home: Path, *args: str, input: str | None = None) -> str:
    r = subprocess.run([sys.executable, "-m", "meshd", *args, "--home", str(home)], input=input,
                       capture_output=True, text=True, timeout=120, env=ENV)
    if r.returncode != 0:
        raise BenchError(f"`meshd {' '.join(args)}` for {home.name} failed ({r.returncode}):"
                         f" {r.stderr.strip()}")
    return r.stdout


# --- the sites ---------------------------------------------------------------------------------

@dataclass
class Site:
    """One daemon, run inside a lab namespace."""

    ns: str  # A, B or C
    home: Path
    listen: str | None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"lab-{self.ns.lower()}"

    def init(self, reach_interval: float | None) -> None:
        meshd_cli(self.home, "init", "--name", self.name,
                  *(["--listen", self.listen] if self.listen else ["--no-listen"]))
        path = self.home / "config.toml"
        lines = path.read_text().splitlines()
        config = dict(CONFIG)
        if reach_interval is not None:
            config["reach_interval"] = f"{reach_interval:g}"
        for key, value in config.items():
            hits = [i for i, ln in enumerate(lines) if ln.split("=")[0].strip() == key]
            if hits:
                lines[hits[0]] = f"{key} = {value}"
            else:
                lines.append(f"{key} = {value}")
        path.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        from meshd.app.client import Client

        with open(self.home / "daemon.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(LAB), "exec", self.ns, sys.executable, "-m", "meshd", "run",
                 "--home", str(self.home)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=ENV)

        def running() -> Any:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise BenchError(f"the daemon of {self.name} exited ({self.proc.returncode}):"
                                 f"\n{self.log()}")
            with Client(self.home, timeout=5) as c:
                return c.status()

        deadline = time.monotonic() + 30
        while True:
            try:
                if running():
                    return
            except BenchError:
                raise
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"the daemon of {self.name} did not answer within 30 s:"
                                 f"\n{self.log()}")
            time.sleep(0.1)

    def stop(self) -> int | None:
        from meshd.testing.processes import stop_daemons

        if self.proc is None:
            return None
        (code,) = stop_daemons([self.proc])
        self.proc = None
        return code

    def peers(self) -> dict[str, dict[str, Any]]:
        from meshd.app.client import Client

        with Client(self.home, timeout=5) as c:
            return {p["name"]: p for p in c.peers() if not p["self"]}

    def log(self, lines: int = 40) -> str:
        path = self.home / "daemon.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def logs(sites: list[Site], lines: int = 40) -> str:
    return "".join(f"\n--- daemon log of {s.name} (last {lines} lines)\n{s.log(lines)}"
                   for s in sites)


def form_mesh(sites: dict[str, Site], reach_timeout: float) -> None:
    """A invites B and C; wait until all see each other alive and verified, and until the
    reachability checks tell each the way it can (not) be dialed."""
    a, b, c = sites["A"], sites["B"], sites["C"]
    token = meshd_cli(a.home, "invite", "--uses", "2")
    for s in (b, c):
        meshd_cli(s.home, "join", input=token)
    names = {s.name for s in sites.values()}

    def alive() -> bool:
        for s in sites.values():
            seen = {n: (p["state"], p["verified"]) for n, p in s.peers().items() if n in names}
            if seen != {n: ("alive", True) for n in names - {s.name}}:
                return False
        return True

    wait_for(alive, MESH_TIMEOUT, "every site to see every other alive with its record")

    def reach() -> bool:
        pa, pb, pc = a.peers(), b.peers(), c.peers()
        return bool(pa[b.name]["we_dial"] == "no" and pb[a.name]["dials_us"] == "no"
                and pb[a.name]["we_dial"] == "yes" and pa[b.name]["dials_us"] == "yes"
                and pc[a.name]["we_dial"] == "yes" and pa[c.name]["dials_us"] == "yes"
                and pa[c.name]["we_dial"] != "yes" and pc[a.name]["dials_us"] != "yes")

    try:
        wait_for(reach, reach_timeout, "the reachability checks between A and B, A and C")
    except BenchError as exc:
        views = {s.name: {n: (p.get("we_dial"), p.get("dials_us")) for n, p in s.peers().items()}
                 for s in sites.values()}
        raise BenchError(f"{exc}; (we_dial, dials_us) seen: {views}") from None


# --- the round trip ----------------------------------------------------------------------------

ECHO_SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
"""

ECHO_CLIENT = r"""
import json, socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((host, port))
s.settimeout(2.0)
rtts = []
for i in range(count + 1):  # the first one (ARP, conntrack entries) is not counted
    t0 = time.monotonic()
    s.send(b"%d" % i)
    try:
        while s.recv(2048) != b"%d" % i:
            pass
    except socket.timeout:
        continue
    if i:
        rtts.append((time.monotonic() - t0) * 1000)
print(json.dumps(rtts))
"""


def measure_rtt() -> dict[str, dict[str, float]]:
    """Round trips A <-> B and A <-> C in ms (UDP echo, from B and C to A)."""
    server = subprocess.Popen([sys.executable, str(LAB), "exec", "A", sys.executable, "-c",
                               ECHO_SERVER, str(ECHO_PORT)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise BenchError(f"the echo server in A did not start: {server.stderr}")
        out = {}
        for site in ("B", "C"):
            r = lab("exec", site, sys.executable, "-c", ECHO_CLIENT, A_IP, str(ECHO_PORT),
                    str(RTT_PROBES))
            rtts = json.loads(r.stdout)
            if len(rtts) < RTT_PROBES // 2:
                raise BenchError(f"UDP echo {site} -> A: only {len(rtts)} of {RTT_PROBES}"
                                 " answers")
            out[site] = {"median": round(statistics.median(rtts), 2),
                         "min": round(min(rtts), 2)}
        return out
    finally:
        server.kill()
        server.wait(10)


# --- the apps (spawned processes; mirror bench/channels.py's setup figure) ---------------------

def _payload() -> Any:
    import numpy as np

    return np.arange(SMALL, dtype=np.uint8)


def setup_receiver(conn: Any, home: str) -> None:
    """``("open", name)``: a receiver, answered at once; then, at once, block in ``recv`` and
    answer again with the time the first message arrived.  (Already waiting in ``recv`` when
    the message comes: the daemon pushes it to the app as soon as it has it.)"""
    import numpy as np

    import meshd

    expected = _payload()
    with meshd.connect(home=home) as mesh:
        try:
            while (cmd := conn.recv())[0] != "quit":
                rx = mesh.receiver(cmd[1])
                conn.send(("ok", None))
                try:
                    msg = rx.recv(timeout=RECV_TIMEOUT)
                except TimeoutError:
                    msg = None
                t1 = _now_ns()
                if msg is None:
                    raise TimeoutError(f"no first message within {RECV_TIMEOUT:.0f} s")
                if not np.array_equal(msg.array, expected):
                    raise RuntimeError("the first message differs from the one sent")
                rx.close()
                conn.send(("ok", t1))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        finally:
            conn.close()


def setup_sender(conn: Any, home: str, to: str) -> None:
    """``("send", name)``: the time, then ``mesh.sender(name)``, one 64 B send and a flush;
    ``("close",)``: the channel's row from ``mesh.channels()``, then close the sender."""
    import meshd

    payload = _payload()
    tx: list[Any] = []

    def handle(cmd: tuple[Any, ...]) -> Any:
        if cmd[0] == "send":
            t0 = _now_ns()
            tx[:] = [mesh.sender(cmd[1], to=to)]
            tx[0].send(payload)
            tx[0].flush()  # pushes the message now rather than after the client's batch linger
            return t0
        s = tx.pop()
        row = next((c for c in mesh.channels() if c.get("id") == s.id), {})
        s.close()
        return row

    with meshd.connect(home=home) as mesh:
        _serve(conn, handle)


def _ask(conn: Any, proc: Any, cmd: tuple[Any, ...], timeout: float = 60.0) -> Any:
    conn.send(cmd)
    return _answer(conn, proc, cmd[0], timeout)


def _answer(conn: Any, proc: Any, what: str, timeout: float = 60.0) -> Any:
    if not conn.poll(timeout):
        raise BenchError(f"{proc.name}: no answer to {what!r} within {timeout:.0f} s")
    try:
        kind, value = conn.recv()
    except EOFError:
        proc.join(2)
        raise BenchError(f"{proc.name} died (exit code {proc.exitcode})") from None
    if kind == "error":
        raise BenchError(f"{proc.name}: {value}")
    return value


def _pctl(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _stats(values: list[float]) -> dict[str, float]:
    return {"p50": round(statistics.median(values), 1), "p99": round(_pctl(values, 99), 1),
            "max": round(max(values), 1)}


def measure_pair(src: Site, dst: Site, runs: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    apps = {}
    try:
        roles = (("receiver", setup_receiver, (str(dst.home),)),
                 ("sender", setup_sender, (str(src.home), dst.name)))
        for role, target, args in roles:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=target, args=(child, *args),
                               name=f"{role} app at {(dst if role == 'receiver' else src).name}")
            proc.start()
            child.close()
            apps[role] = (parent, proc)
        tag = uuid.uuid4().hex[:8]
        app_ms: list[float] = []
        daemon_ms: list[float] = []
        after_ms: list[float] = []
        paths: dict[str, int] = {}
        first: dict[str, Any] = {}
        for i in range(runs + 1):  # run 0 is the warm-up, reported apart
            name = f"setup-{src.ns}{dst.ns}-{tag}-{i}".lower()
            _ask(*apps["receiver"], ("open", name))
            t0 = _ask(*apps["sender"], ("send", name))
            t1 = _answer(*apps["receiver"], "recv", RECV_TIMEOUT + 30)
            row = _ask(*apps["sender"], ("close",))
            ms = (t1 - t0) / 1e6
            label = f"{row.get('path')}" + (f" via {row['relay']}" if row.get("relay") else "")
            if i == 0:
                first = {"app_ms": round(ms, 1), "daemon_setup_ms": row.get("setup_ms"),
                         "path": label}
                continue
            app_ms.append(ms)
            if row.get("setup_ms") is not None:
                daemon_ms.append(float(row["setup_ms"]))
                after_ms.append(ms - float(row["setup_ms"]))
            paths[label] = paths.get(label, 0) + 1
    finally:
        stop_apps(apps)
    return {"app_ms": _stats(app_ms), "daemon_setup_ms": _stats(daemon_ms) if daemon_ms else None,
            "app_minus_daemon_ms_p50": (round(statistics.median(after_ms), 1) if after_ms
                                        else None),
            "paths": paths, "first": first, "n": len(app_ms)}


# --- the run -----------------------------------------------------------------------------------

def run(runs: int, delay_ms: float, reach_interval: float | None, keep_logs: Path | None,
        progress: Callable[[str], None]) -> dict[str, Any]:
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="meshd-labsetup-"))
    sites = {"A": Site("A", tmp / "a", f"{A_IP}:{PORT}"), "B": Site("B", tmp / "b",
                                                                     f"{B_IP}:{PORT}"),
             "C": Site("C", tmp / "c", None)}
    codes: dict[str, int | None] = {}
    ok = False
    try:
        lab("down", check=False)
        lab("up", "--delay-ms", f"{delay_ms:g}")
        progress(f"lab up with --delay-ms {delay_ms:g} (impaired: A)")
        rtt = measure_rtt()
        progress(f"UDP echo RTT: B<->A {rtt['B']}, C<->A {rtt['C']} ms")
        t0 = time.monotonic()
        for s in sites.values():
            s.init(reach_interval)
            s.start()
        form_mesh(sites, (reach_interval or 60.0) + 60.0)
        mesh_s = time.monotonic() - t0
        progress(f"mesh formed, reachability known, in {mesh_s:.1f} s")
        pairs = []
        for src_ns, dst_ns, expected in PAIRS:
            src, dst = sites[src_ns], sites[dst_ns]
            t1 = time.monotonic()
            try:
                res = measure_pair(src, dst, runs)
            except BenchError as exc:
                raise BenchError(f"{src.name} -> {dst.name}: {exc}") from None
            r = rtt["B" if "B" in (src_ns, dst_ns) else "C"]
            bound = round(3 * r["median"] + 20, 1)
            met = {k: res["app_ms"][k] < bound for k in ("p50", "p99", "max")}
            met["all"] = all(met.values())
            path = max(res["paths"], key=res["paths"].get)
            pairs.append({"pair": f"{src_ns}->{dst_ns}", "sender": src.name, "receiver": dst.name,
                          "expected_path": expected, "path": path,
                          "path_as_expected": res["paths"] == {expected: res["n"]},
                          "rtt_ms": r["median"], "bound_ms": bound, **res, "met": met})
            progress(f"{src_ns} -> {dst_ns}: {path}, app {res['app_ms']} ms, daemon"
                     f" {res['daemon_setup_ms']} ms, bound {bound} ms"
                     f" ({time.monotonic() - t1:.1f} s)")
        ok = True
    finally:
        codes = {s.name: s.stop() for s in sites.values()}
        if not ok and not isinstance(sys.exc_info()[1], KeyboardInterrupt):
            started = [s for s in sites.values() if (s.home / "daemon.log").exists()]
            if started:
                print(logs(started), file=sys.stderr)
        if keep_logs is not None:
            keep_logs.mkdir(parents=True, exist_ok=True)
            for s in sites.values():
                if (s.home / "daemon.log").exists():
                    shutil.copy(s.home / "daemon.log", keep_logs / f"{s.name}.log")
        down = lab("down", check=False)
        if down.returncode != 0:
            print(f"lab_setup: `bootstrap/lab down` failed: {down.stderr.strip()}",
                  file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
    bad = {n: c for n, c in codes.items() if c not in (0, None)}
    return {"delay_ms": delay_ms, "impaired": ["A"], "runs": runs,
            "reach_interval_s": reach_interval,
            "rtt_ms": {"A<->B": rtt["B"], "A<->C": rtt["C"]},
            "bound": "3 * rtt_ms + 20 (rtt_ms: median UDP echo round trip of the pair)",
            "pairs": pairs, "mesh_setup_s": round(mesh_s, 1),
            "total_s": round(time.monotonic() - t_start, 1),
            "met": all(p["met"]["all"] and p["path_as_expected"] for p in pairs),
            "daemon_exit_codes": codes if bad else "all 0"}


def print_table(r: dict[str, Any]) -> None:
    rtt = r["rtt_ms"]
    print(f"channel setup in the lab, --delay-ms {r['delay_ms']:g} on A's uplink (one way, each"
          f" direction); UDP echo RTT A<->B {rtt['A<->B']['median']} ms, A<->C"
          f" {rtt['A<->C']['median']} ms; {r['runs']} channels per pair")
    print("app: mesh.sender() to the first message held by the receiving app;"
          " daemon: setup_ms on the sender; bound: 3*RTT + 20 ms\n")
    print(f"{'pair':<6} {'path':<9} {'app p50':>8} {'p99':>7} {'max':>7} {'daemon p50':>11}"
          f" {'p99':>7} {'max':>7} {'first':>7} {'bound':>7}  met (p50/p99/max)")
    for p in r["pairs"]:
        d = p["daemon_setup_ms"] or {"p50": "-", "p99": "-", "max": "-"}
        a = p["app_ms"]
        mark = "" if p["path_as_expected"] else f"  (expected {p['expected_path']}: {p['paths']})"
        print(f"{p['pair']:<6} {p['path']:<9} {a['p50']:>8} {a['p99']:>7} {a['max']:>7}"
              f" {d['p50']:>11} {d['p99']:>7} {d['max']:>7} {p['first']['app_ms']:>7}"
              f" {p['bound_ms']:>7}  {'/'.join('yes' if p['met'][k] else 'NO' for k in ('p50', 'p99', 'max'))}"
              f"{mark}")
    print(f"\ntarget met on every pair (p50, p99 and max, expected path): "
          f"{'yes' if r['met'] else 'NO'}; mesh formed in {r['mesh_setup_s']} s, whole run"
          f" {r['total_s']} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                epilog="Details: the module docstring of bench/lab_setup.py.")
    p.add_argument("--json", action="store_true", help="print one JSON object (default: a table)")
    p.add_argument("--runs", type=int, default=20, help="channels measured per pair (default 20)")
    p.add_argument("--delay-ms", type=float, default=20.0,
                   help="one-way delay added on A's uplink, each direction (default 20)")
    p.add_argument("--reach-interval", type=float, default=None, metavar="S",
                   help="the daemons' reach_interval (default: meshd's, 60 s); the mesh is"
                        " ready only after A has checked C, about one interval after C joins")
    p.add_argument("--keep-logs", type=Path, default=None, metavar="DIR",
                   help="copy the three daemon logs here at the end")
    args = p.parse_args(argv)
    if args.runs < 1 or args.delay_ms < 0 or (args.reach_interval is not None
                                               and args.reach_interval <= 0):
        p.error("--runs must be at least 1, --delay-ms not negative, --reach-interval positive")
    if os.geteuid() != 0:
        print("lab_setup: needs root (the lab builds network namespaces)", file=sys.stderr)
        return 1

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # so that the finally clauses stop the daemons and the lab

    signal.signal(signal.SIGTERM, on_term)

    def progress(text: str) -> None:
        if not args.json:
            print(f"  {text}", file=sys.stderr, flush=True)

    try:
        report = run(args.runs, args.delay_ms, args.reach_interval, args.keep_logs, progress)
    except BenchError as exc:
        print(f"lab_setup: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lab_setup: interrupted; the lab is down", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
