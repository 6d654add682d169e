"""``meshd demo``: a mesh of several sites on this machine, each its own daemon and state dir.

The first site invites the second as an introducer; each later site is invited by the one before
it, the last one with manual approval; then every site lists every member with a verified record,
the first site streams arrays over a channel to the last, which only dials out (it has no peer
port: the channel takes the reversed path), a plain TCP service of the first site is carried
to the last through a tunnel (``expose`` / ``connect``), each with its path and rate printed,
and a reused invitation is refused.  Everything goes through the real CLI paths: the client over
each daemon's control socket, and the daemons over their CURVE peer ports on loopback.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from meshd.app.client import Client
from meshd.state.site import init_site
from meshd.errors import MeshdError
from meshd.state.home import Home
from meshd.testing.processes import start_daemon, stop_daemons, wait_until

NAMES = ["aps-8id", "alcf", "nersc", "slac-lcls", "esnet-edge", "ornl-olcf", "bnl-nsls2", "desy"]


def _step(text: str, quiet: bool) -> None:
    if not quiet:
        print(f"==> {text}", flush=True)


def run_demo(*, sites: int = 3, keep: bool = False, home: str | None = None,
             as_json: bool = False) -> int:
    if not 2 <= sites <= len(NAMES):
        print(f"meshd demo: --sites must be between 2 and {len(NAMES)}", file=sys.stderr)
        return 2
    quiet = as_json
    root = Path(home) if home else Path(tempfile.mkdtemp(prefix="meshd-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    names = NAMES[:sites]
    homes = [root / n for n in names]
    procs: list[subprocess.Popen[bytes]] = []
    result: dict[str, Any] = {"root": str(root), "sites": {}}
    try:
        for name, h in zip(names, homes):
            outbound_only = h == homes[-1]  # like a detector's edge box behind a firewall
            key = init_site(Home(h), name, "" if outbound_only else "127.0.0.1:0")
            _step(f"init {name:<10} fingerprint {key.fingerprint}  state {h}"
                  f"{'  (dials out only)' if outbound_only else ''}", quiet)
        for h in homes:
            procs.append(start_daemon(h, h / "daemon.log"))
        clients = [Client(h) for h in homes]
        for name, c in zip(names, clients):
            st = wait_until(c.status, 30, f"the daemon of {name}")
            port = f"peer port {st['listen']}" if st["listen"] else "no peer port (dials out only)"
            _step(f"run  {name:<10} pid {st['pid']}, {port}", quiet)

        used_token = None
        for i in range(1, sites):
            inviter, joiner = clients[i - 1], clients[i]
            last = i == sites - 1 and sites > 2
            role = "member" if i == sites - 1 else "introducer"
            inv = inviter.invite(name=names[i], expires=3600, role=role, approve=last)
            used_token = inv["token"]
            _step(f"{names[i - 1]} invites {names[i]} (role {role}"
                  f"{', with manual approval' if last else ''}):\n{_indent(inv['token'])}", quiet)
            email = _as_email(inv["token"], names[i - 1], names[i])
            j = joiner.join(email)
            if last:
                j = _wait_join(joiner, j, ("pending", "admitted", "failed"), 30,
                               "the join to reach the inviter")
                _step(f"{names[i]} waits; compare by phone: joiner {j['fingerprint']},"
                      f" inviter {j['inviter_fingerprint']}", quiet)
                pend = wait_until(inviter.pending, 30, "the pending join")
                _step(f"{names[i - 1]} sees pending join of {pend[0]['name']}"
                      f" ({pend[0]['fingerprint']}); approves", quiet)
                inviter.approve(pend[0]["fingerprint"])
            j = _wait_join(joiner, j, ("admitted", "failed"), 60, f"{names[i]} to be admitted")
            if j["state"] != "admitted":
                raise MeshdError(f"{names[i]} could not join: {j['error']}")
            _step(f"{names[i]} joined", quiet)

        _step("waiting until every site knows every member by its verified record", quiet)
        for name, c in zip(names, clients):
            wait_until(lambda c=c: sum(p["verified"] for p in c.peers()) == sites,  # type: ignore[misc]
                       60,
                       f"{name} to know all {sites} sites")
        for name, c in zip(names, clients):
            peers = c.peers()
            result["sites"][name] = {"status": c.status(), "peers": peers}
            if not quiet:
                print(f"\n--- meshd peers at {name}")
                for p in peers:
                    print(f"  {p['name']:<11} {p['state']:<8} {p['reached']:<9} {p['role'] or '-':<10}"
                          f" {p['fingerprint']}  {','.join(p['addrs'])}")
        result["channel"] = _channel(homes[0], homes[-1], names[0], names[-1], quiet)
        result["tunnel"] = _tunnel(clients[0], clients[-1], names[0], names[-1], quiet)
        if used_token is not None:
            extra = Path(tempfile.mkdtemp(prefix="meshd-demo-late-", dir=root))
            init_site(Home(extra), "latecomer", "127.0.0.1:0")
            procs.append(start_daemon(extra, extra / "daemon.log"))
            homes.append(extra)
            late = Client(extra)
            wait_until(late.status, 30, "the latecomer's daemon")
            j = late.join(used_token)
            j = _wait_join(late, j, ("admitted", "failed"), 60, "the reused token's answer")
            result["reused_token"] = j
            _step(f"a latecomer tries the used invitation again: {j['state']}"
                  f" ({(j['error'] or {}).get('message')})", quiet)
        if as_json:
            print(json.dumps(result, indent=2))
        elif keep:
            print(f"\nThe daemons keep running. Try: meshd peers --home {homes[0]}\n"
                  f"Stop them with: for h in {' '.join(str(h) for h in homes)};"
                  f" do meshd stop --home $h; done")
        return 0
    except (MeshdError, TimeoutError) as exc:
        print(f"meshd demo: {exc}; daemon logs are in {root}", file=sys.stderr)
        return 1
    finally:
        if not keep:
            stop_daemons(procs, timeout=10)


def _channel(sender_home: Path, receiver_home: Path, sender: str, receiver: str,
             quiet: bool) -> dict[str, Any]:
    """64 arrays of 1 MiB streamed from the first site to the last (which only dials out) over
    a channel; checked in order, timed, its path read from ``meshd channels``."""
    import numpy as np

    from meshd.app.sync import connect

    count, shape = 64, (512, 256)
    with connect(receiver_home) as mr, connect(sender_home) as ms:
        rx = mr.receiver("frames")
        t0 = time.perf_counter()
        tx = ms.sender("frames", to=receiver)
        for i in range(count):
            tx.send(np.full(shape, i, dtype=np.float64), meta={"frame": i})
        got = [rx.recv(timeout=60) for _ in range(count)]
        seconds = time.perf_counter() - t0
        ok = all(m.meta == {"frame": i} and m.array.shape == shape and m.array[0, 0] == i
                 for i, m in enumerate(got))
        (row,) = [c for c in ms.channels() if c["id"] == tx.id]
        tx.close(timeout=30)
    nbytes = count * 8 * shape[0] * shape[1]
    path = f"relay via {row['relay']}" if row["relay"] else row["path"]
    out = {"name": "frames", "from": sender, "to": receiver, "path": row["path"],
           "relay": row["relay"], "messages": count, "bytes": nbytes, "in_order": ok,
           "MBps": round(nbytes / seconds / 1e6, 1)}
    _step(f"{count} arrays of 1 MiB over a channel {sender} -> {receiver}: path {path},"
          f" {out['MBps']} MB/s, {'in order and intact' if ok else 'NOT IN ORDER'}", quiet)
    if not ok:
        raise MeshdError("the arrays over the channel arrived out of order or changed")
    return out


def _tunnel(owner: Client, consumer: Client, owner_name: str, consumer_name: str,
            quiet: bool) -> dict[str, Any]:
    """A plain TCP service at the first site (a sha256 sink, this process's thread) exposed to the
    last site, and 16 MiB carried to it through a tunnel from there; checked, timed."""
    data = os.urandom(16 << 20)
    srv = socket.create_server(("127.0.0.1", 0))

    def sink() -> None:
        conn, _ = srv.accept()
        with conn:
            h = hashlib.sha256()
            while chunk := conn.recv(1 << 20):
                h.update(chunk)
            conn.sendall(h.hexdigest().encode())

    threading.Thread(target=sink, daemon=True).start()
    target = "127.0.0.1:%d" % srv.getsockname()[1]
    owner.expose("sink", target, [consumer_name])
    tun = consumer.connect_tunnel(owner_name, "sink")
    _step(f"{owner_name} exposes a plain TCP service 'sink' ({target}) to {consumer_name};"
          f" {consumer_name} connects to it at {tun['listen']}", quiet)
    host, port = tun["listen"].rsplit(":", 1)
    t0 = time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=30) as c:
        c.sendall(data)
        c.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := c.recv(128):
            answer += chunk
    seconds = time.perf_counter() - t0
    srv.close()
    ok = answer.decode() == hashlib.sha256(data).hexdigest()
    (view,) = [t for t in consumer.tunnels() if t["service"] == "sink"]
    path = f"relay via {view['relay']}" if view["relay"] else view["path"]
    out = {"service": "sink", "from": consumer_name, "to": owner_name, "path": view["path"],
           "relay": view["relay"], "bytes": len(data), "sha256_ok": ok,
           "MBps": round(len(data) / seconds / 1e6, 1)}
    _step(f"16 MiB through the tunnel {consumer_name} -> {owner_name}/sink: path {path},"
          f" {out['MBps']} MB/s, sha256 {'matches' if ok else 'DIFFERS'}", quiet)
    if not ok:
        raise MeshdError("the bytes through the tunnel differ from those sent")
    return out


def _wait_join(client: Client, join: dict[str, Any], until: tuple[str, ...], timeout: float,
               what: str) -> dict[str, Any]:
    """Long-poll a join's state until it is one of ``until``."""
    def poll() -> dict[str, Any] | None:
        state = client.join_state(join["id"], wait=2, state=join["state"])
        return state if state["state"] in until else None

    result: dict[str, Any] = wait_until(poll, timeout, what)
    return result


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines())


def _as_email(token: str, sender: str, to: str) -> str:
    """The token as it arrives after a trip through a mail client: quoted and CRLF'd."""
    body = (f"Hi {to},\r\n\r\n{sender} invites you to our meshd mesh.\r\n"
            f"On {sender}, the admin wrote:\r\n")
    body += "".join(f"> {line}\r\n" for line in token.splitlines())
    return body + "\r\nRun: meshd join < this-email.txt\r\n"
