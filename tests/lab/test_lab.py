"""The lab: network namespaces with a reachable, an outbound-only and a NATed site (needs root).

Real namespaces, veth, iptables and sockets, built by ``bootstrap/lab``.  If the lab cannot be
built these tests fail with the script's error; they never skip.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import LAB, lab, lab_up

A, B, C, ROUTER = "10.77.0.10", "10.77.0.20", "192.168.77.10", "10.77.0.30"
PORT = 7000
NS = {"A": "mlab-a", "B": "mlab-b", "C": "mlab-c"}

# TCP: first line is the address the server sees; then "bulk N" -> reads N bytes, answers
# "got N"; any other line is echoed.  UDP: each datagram comes back prefixed with the peer address.
SERVER = r"""
import socket, sys, threading
port = int(sys.argv[1])
tcp = socket.create_server(("0.0.0.0", port))
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", port))
def serve(conn, peer):
    with conn:
        f = conn.makefile("rb")
        conn.sendall(peer[0].encode() + b"\n")
        for line in f:
            if line.startswith(b"bulk "):
                n = int(line.split()[1]); got = 0
                while got < n:
                    chunk = f.read1(min(1 << 20, n - got))
                    if not chunk: return
                    got += len(chunk)
                conn.sendall(b"got %d\n" % got)
            else:
                conn.sendall(line)
def tcp_loop():
    while True:
        conn, peer = tcp.accept()
        threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
def udp_loop():
    while True:
        data, peer = udp.recvfrom(65536)
        udp.sendto(peer[0].encode() + b" " + data, peer)
threading.Thread(target=tcp_loop, daemon=True).start()
threading.Thread(target=udp_loop, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""

CLIENT = r"""
import json, select, socket, sys, time
proto, host, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
out = {"ok": False}
if proto == "tcp":
    bulk = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    t0 = time.monotonic()
    try:
        c = socket.create_connection((host, port), timeout=timeout)
    except socket.timeout:
        out["error"] = "timeout"
    except OSError as e:
        out["error"] = e.strerror or str(e)
    else:
        c.settimeout(30)
        out["connect_s"] = time.monotonic() - t0
        f = c.makefile("rb")
        out["seen"] = f.readline().decode().strip()
        t1 = time.monotonic()
        c.sendall(b"hello\n")
        out["echo"] = f.readline().decode().strip()
        out["rtt_s"] = time.monotonic() - t1
        if bulk:
            t2 = time.monotonic()
            c.sendall(b"bulk %d\n" % bulk)
            block = b"x" * (1 << 20)
            left = bulk
            while left:
                c.sendall(block[:min(left, len(block))])
                left -= min(left, len(block))
            out["bulk_reply"] = f.readline().decode().strip()
            out["bulk_s"] = time.monotonic() - t2
        out["ok"] = True
else:
    count = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((host, port))
    sent = {}
    for i in range(count):
        sent[i] = time.monotonic()
        s.send(b"%d" % i)
    rtts, seen = [], set()
    deadline = time.monotonic() + timeout
    while len(rtts) < count:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([s], [], [], left)[0]:
            break
        try:
            data = s.recv(65536)
        except OSError as e:
            out["error"] = e.strerror
            break
        peer, seq = data.decode().split()
        seen.add(peer)
        rtts.append(time.monotonic() - sent[int(seq)])
    out.update(ok=bool(rtts), sent=count, received=len(rtts), seen=sorted(seen),
               min_rtt_s=min(rtts) if rtts else None)
    if not rtts:
        out.setdefault("error", "timeout")
print(json.dumps(out))
"""


def probe(site: str, proto: str, host: str, timeout: float = 1.0, *extra: int) -> dict[str, Any]:
    """Run the client inside SITE (through ``bootstrap/lab exec``) and return its report."""
    r = lab("exec", site, sys.executable, "-c", CLIENT, proto, host, str(PORT), str(timeout),
            *map(str, extra))
    assert r.returncode == 0, f"client in {site} crashed ({r.returncode}): {r.stderr}"
    return json.loads(r.stdout)


def start_servers(sites: str) -> list[subprocess.Popen[str]]:
    procs = []
    for site in sites:
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", NS[site], sys.executable, "-c", SERVER, str(PORT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 20
    for site, p in zip(sites, procs):
        assert p.stdout is not None
        ready = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]
        line = p.stdout.readline() if ready else ""
        why = p.stderr.read() if p.poll() is not None else "no answer"  # type: ignore[union-attr]
        assert line.strip() == "ready", f"echo server in {site} did not start: {why}"
    return procs


def stop(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        p.kill()
        p.communicate(timeout=10)


def host_firewall() -> str:
    r = subprocess.run(["iptables-save"], check=False, capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else f"iptables-save failed: {r.stderr}"


def strip_comments(rules: str) -> list[str]:
    return [line for line in rules.splitlines() if not line.startswith("#")]


HOST_FIREWALL_BEFORE: list[str] = []


@pytest.fixture(scope="module")
def servers() -> Iterator[None]:
    """The plain lab (no impairment) with echo servers on port 7000 in A, B and C."""
    HOST_FIREWALL_BEFORE[:] = strip_comments(host_firewall())
    lab_up()
    procs: list[subprocess.Popen[str]] = []
    try:
        procs = start_servers("ABC")
        yield
    finally:
        stop(procs)
        lab("down")


def test_a_is_reachable_from_b_and_c(servers: None) -> None:
    r = probe("B", "tcp", A)
    assert r["ok"], r
    assert r["seen"] == B and r["echo"] == "hello"
    r = probe("C", "tcp", A)
    assert r["ok"], r
    assert r["seen"] == ROUTER, "A must see C's connection from the NAT router's address"
    assert r["echo"] == "hello"


def test_b_is_outbound_only(servers: None) -> None:
    for site in ("A", "C"):
        r = probe(site, "tcp", B, 1.0)
        assert not r["ok"] and r["error"] == "timeout", f"{site} -> B: {r}"  # dropped, not refused
        r = probe(site, "udp", B, 1.0)
        assert not r["ok"], f"{site} -> B udp: {r}"
    r = probe("B", "tcp", A)  # B dials out fine
    assert r["ok"] and r["seen"] == B, r


def test_c_private_address_is_unreachable(servers: None) -> None:
    for site in ("A", "B"):
        r = probe(site, "tcp", C, 1.0)
        assert not r["ok"], f"{site} -> C: {r}"
    # even a peer that routes C's private subnet via the router gets nothing: the router only
    # forwards connections that C started
    route = ["ip", "-n", "mlab-a", "route", "add", "192.168.77.0/24", "via", ROUTER]
    subprocess.run(route, check=True)
    try:
        r = probe("A", "tcp", C, 1.0)
        assert not r["ok"] and r["error"] == "timeout", r
    finally:
        subprocess.run(["ip", "-n", "mlab-a", "route", "del", "192.168.77.0/24"], check=True)


def test_udp_round_trips_from_b_and_c(servers: None) -> None:
    r = probe("B", "udp", A, 5.0, 3)
    assert r["received"] == 3 and r["seen"] == [B], r
    r = probe("C", "udp", A, 5.0, 3)
    assert r["received"] == 3 and r["seen"] == [ROUTER], r


def test_exec_passes_exit_status(servers: None) -> None:
    assert lab("exec", "A", "sh", "-c", "exit 7").returncode == 7
    assert lab("exec", "b", "true").returncode == 0
    r = lab("exec", "C", "ip", "-o", "-4", "addr", "show")
    assert r.returncode == 0 and C in r.stdout and A not in r.stdout
    r = lab("exec", "nowhere", "true")
    assert r.returncode == 2 and "unknown site" in r.stderr


def test_status_and_repeated_up(servers: None) -> None:
    r = lab("status", "--json")
    report = json.loads(r.stdout)
    assert report["up"] and report["checks"], report
    assert all(report["checks"].values()), report["checks"]
    assert r.returncode == 0
    assert report["addresses"]["c"]["mlab-lan0"] == [f"{C}/24"]
    r = lab("up")
    assert r.returncode == 0 and "already up" in r.stdout


def test_clear_errors_without_root_or_tools(tmp_path: Path) -> None:
    # a world-readable interpreter (a pyenv one under /root is not); the script comes on stdin
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        python, "-", "up"], check=False, input=LAB.read_text(), capture_output=True, text=True,
                       cwd="/")
    assert r.returncode == 1 and "lab: must run as root" in r.stderr, r
    r = lab("up", env={**os.environ, "PATH": str(tmp_path)})
    assert r.returncode == 1 and "apt-get install -y iproute2" in r.stderr, r


def test_delay_and_rate_limit() -> None:
    """One-way delay on A's uplink (user-space forwarder) and a tbf rate limit: lower bounds only."""
    lab_up("--delay-ms", "50", "--rate", "20mbit", "--impair", "A")
    procs = start_servers("A")
    try:
        r = probe("B", "tcp", A, 10.0, 2_000_000)
        assert r["ok"] and r["echo"] == "hello" and r["bulk_reply"] == "got 2000000", r
        assert r["rtt_s"] >= 0.100, r  # 50 ms each way through A's uplink
        # 2 MB at 20 Mbit/s is 0.8 s; allow for the tbf burst (10 ms worth, >= 64 KiB)
        assert r["bulk_s"] >= 0.7, r
        r = probe("C", "udp", A, 5.0, 5)
        assert r["received"] == 5 and r["min_rtt_s"] >= 0.100, r
        status = json.loads(lab("status", "--json", "--no-checks").stdout)
        assert status["config"]["impair"] == ["A"] and status["config"]["delay_ms"] == 50
    finally:
        stop(procs)
        lab("down")


def test_loss() -> None:
    lab_up("--delay-ms", "20", "--loss", "30", "--impair", "A", "--seed", "7")
    procs = start_servers("A")
    try:
        r = probe("B", "udp", A, 2.0, 200)
        # each datagram and its answer cross A's uplink once: ~49% come back
        assert 0 < r["received"] < 200, r
        assert r["min_rtt_s"] >= 0.040, r
    finally:
        stop(procs)
        lab("down")


def test_down_leaves_nothing() -> None:
    if not HOST_FIREWALL_BEFORE:
        HOST_FIREWALL_BEFORE[:] = strip_comments(host_firewall())
    lab_up("--delay-ms", "5", "--impair", "A,B,C", "--rate", "1gbit")
    procs = start_servers("ABC")
    try:
        r = lab("down")
        assert r.returncode == 0, r.stderr
    finally:
        for p in procs:  # down has killed them; reap
            p.communicate(timeout=10)
    r = lab("down")
    assert r.returncode == 0 and "nothing to remove" in r.stdout
    netns = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True,
                           text=True).stdout
    assert "mlab-" not in netns
    links = subprocess.run(["ip", "-o", "link"], check=False, capture_output=True,
                           text=True).stdout
    assert "mlab-" not in links
    assert not Path("/run/mlab").exists()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            assert not (b"_forward" in cmdline and str(LAB).encode() in cmdline), cmdline
    assert all(p.returncode is not None for p in procs)
    assert strip_comments(host_firewall()) == HOST_FIREWALL_BEFORE
