"""meshd tunnels side by side with plain TCP and the gateways facilities deploy; one run.

    python bench/tunnels.py [--json] [--size 1GiB] [--seconds 3] [--latency-runs 200]
                            [--connections 1000]

Two daemons (``meshd run``, one state directory each in a temporary directory, on loopback,
mDNS off): ``owner`` exposes the bench's servers, ``consumer`` connects to them; the tunnel's
data connection is direct.  Every app is its own process (multiprocessing, spawn).

- ``bulk``: one TCP connection carrying ``--size`` bytes (a 4 MiB random block repeated) from a
  sender app to a sink app that hashes everything with sha256 and answers the digest after the
  sender's half-close; MB/s = size / (connect .. digest received), the digest checked.  Columns:
  ``raw_tcp`` (app to app), ``tunnel`` (through meshd), ``stunnel`` (a client/server stunnel
  pair, TLS, a self-signed certificate: what SciStream deploys) and ``ssh`` (``ssh -L``).
  ``stunnel`` and ``ssh`` are ``null`` with the reason in ``unavailable`` when the tools are
  missing (install ``stunnel4`` and ``openssh-server`` in the bench's set-up, never in tests).
  ``ssh`` runs a throwaway ``sshd`` on loopback (its own host key and config) and ``ssh -N -L``
  with OpenSSH's default cipher.  ``bulk_cpu_s_per_GB`` gives, per column, the CPU seconds
  per GB of each process role during that stream (``/proc/PID/stat`` before and after, each
  with the processes under it): ``sender`` (this bench process), ``entry`` (the stunnel
  client, ``ssh``, the consuming daemon), ``exit`` (the stunnel server, ``sshd``, the owning
  daemon) and ``sink``.  On two cores their sum bounds the rate: 2 / sum GB/s.
- ``pyzmq``: PUSH -> PULL of 1 MiB messages for ``--seconds`` (bench/_baselines.py), raw,
  through stunnel and through the tunnel, in MB/s.
- ``connect_ms``: connect-to-first-byte of a new TCP connection through the established tunnel
  (connect, send 1 byte, receive the echo), ``--latency-runs`` times: p50, p99.
- ``concurrent``: ``--connections`` TCP connections at once through one tunnel, each echoing
  64 KiB; how many completed correctly, the time, and both daemons' peak RSS (VmHWM).

This is a benchmark, not a test: figures vary with the machine and its load (two cores shared by
the apps, the daemons and hashing).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _baselines import (Pair, ssh_forward, sshd_binary, stunnel_binary, stunnel_pair,
                        cpu_ticks, tree_cpu_ticks, zmq_receiver, zmq_sender)

from meshd.app.client import Client
from meshd.testing.processes import start_daemon, stop_daemons, wait_until

BLOCK = 4 << 20
ECHO_BYTES = 64 << 10


# --- apps (each in its own process) ---------------------------------------------------------

def _sink(conn: Any) -> None:
    """Hashes every connection until its half-close and answers the hex sha256."""
    srv = socket.create_server(("127.0.0.1", 0))
    conn.send(srv.getsockname()[1])
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while True:
        c, _ = srv.accept()
        h = hashlib.sha256()
        while n := c.recv_into(buf):
            h.update(view[:n])
        c.sendall(h.hexdigest().encode())
        c.close()


def _echo(conn: Any) -> None:
    """An asyncio echo server (many connections at once)."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(1 << 16):
                w.write(data)
                await w.drain()
            w.write_eof()
        except OSError:
            pass
        finally:
            w.close()

    async def main() -> None:
        srv = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
        conn.send(srv.sockets[0].getsockname()[1])
        await srv.serve_forever()

    asyncio.run(main())


def start_app(fn: Any) -> tuple[Any, int]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=fn, args=(child,), daemon=True)
    proc.start()
    return proc, int(parent.recv())


def block() -> bytes:
    return os.urandom(BLOCK)


def expected_digest(data: bytes, size: int) -> str:
    h = hashlib.sha256()
    for _ in range(size // BLOCK):
        h.update(data)
    return h.hexdigest()


def bulk(port: int, data: bytes, size: int, digest: str,
         roles: dict[str, int]) -> tuple[float, dict[str, float | None]]:
    """MB/s of ``size`` bytes to the sink at ``port``, digest checked, and the CPU seconds
    per GB of each of ``roles`` (name: pid) during the stream."""
    view = memoryview(data)
    ticks = {r: _ticks(r, p) for r, p in roles.items()}
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as c:
        for _ in range(size // BLOCK):
            c.sendall(view)
        c.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := c.recv(128):
            got += chunk
    dt = time.perf_counter() - t0
    if got.decode() != digest:
        raise RuntimeError("the sha256 of what arrived differs from what was sent")
    tick = os.sysconf("SC_CLK_TCK")
    after = {r: _ticks(r, p) for r, p in roles.items()}
    cpu = {r: None if ticks[r] is None or after[r] is None
           else round((after[r] - ticks[r]) / tick / (size / 1e9), 3)  # type: ignore[operator]
           for r in roles}
    return round(size / dt / 1e6, 1), cpu


def _ticks(role: str, pid: int) -> int | None:
    """CPU ticks of a role's process: the gateways with the processes under them (an sshd
    forks the one that carries the connection), the bench itself (the sender) and the sink
    alone (every app is a child of the bench)."""
    return tree_cpu_ticks(pid) if role in ("entry", "exit") else cpu_ticks(pid)



# --- the mesh ---------------------------------------------------------------------------------

class Mesh:
    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="meshd-bench-tunnels-"))
        self.procs: list[Any] = []

    def cli(self, name: str, *args: str) -> Any:
        r = subprocess.run([sys.executable, "-m", "meshd", *args, "--home", str(self.tmp / name),
                            "--json"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(HERE.parent)})
        if r.returncode != 0:
            raise RuntimeError(f"meshd {' '.join(args)}: {r.stderr.strip()}")
        return json.loads(r.stdout) if r.stdout.strip().startswith(("{", "[")) else r.stdout

    def start(self) -> Mesh:
        for name in ("owner", "consumer"):
            self.cli(name, "init", "--name", name, "--listen", "127.0.0.1:0")
            cfg = self.tmp / name / "config.toml"
            cfg.write_text(re.sub(r"(?m)^discovery = .*$", "discovery = false", cfg.read_text()))
            self.procs.append(start_daemon(self.tmp / name, self.tmp / f"{name}.log"))
            wait_until(Client(self.tmp / name).status, 30, f"the daemon of {name}")
        token = self.cli("owner", "invite")["token"]
        r = subprocess.run([sys.executable, "-m", "meshd", "join", "--home",
                            str(self.tmp / "consumer")], input=token, capture_output=True,
                           text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"join: {r.stderr}")
        for name in ("owner", "consumer"):
            wait_until(lambda n=name: len([p for p in Client(self.tmp / n).peers()
                                           if p["state"] == "alive"]) == 2, 60, "both alive")
        return self

    def tunnel(self, name: str, port: int) -> int:
        self.cli("owner", "expose", name, f"127.0.0.1:{port}", "--allow", "consumer")
        listen = self.cli("consumer", "connect", f"owner/{name}")["listen"]
        return int(listen.rsplit(":", 1)[1])

    def peak_rss(self) -> dict[str, int]:
        out = {}
        for name, proc in zip(("owner", "consumer"), self.procs):
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out[name] = int(line.split()[1]) * 1024
        return out

    def close(self) -> None:
        stop_daemons(self.procs)
        shutil.rmtree(self.tmp, ignore_errors=True)


# --- measurements -----------------------------------------------------------------------------

def pyzmq(port_for: Any, seconds: float) -> float:
    """MB/s of PUSH -> PULL, 1 MiB messages; ``port_for(pull_port)`` gives where PUSH connects."""
    size = 1 << 20
    with Pair(timeout=seconds + 90) as pair:
        port = pair.start_receiver(zmq_receiver, size, seconds)
        with port_for(port) as p:
            pair.start_sender(zmq_sender, f"tcp://127.0.0.1:{p}", size)
            rx, _ = pair.wait()
    return float(rx["MBps"])


class _Same:
    def __init__(self, port: int) -> None:
        self.port = port

    def __enter__(self) -> int:
        return self.port

    def __exit__(self, *exc: object) -> None:
        pass


def latency(port: int, runs: int) -> dict[str, Any]:
    ms = []
    for _ in range(runs + 1):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.sendall(b"x")
            if c.recv(1) != b"x":
                raise RuntimeError("no echo")
        ms.append((time.perf_counter() - t0) * 1000)
    ms = ms[1:]  # the first one may have raced the data connection
    p99 = statistics.quantiles(ms, n=100, method="inclusive")[98]
    return {"p50": round(statistics.median(ms), 2), "p99": round(p99, 2), "n": len(ms)}


def concurrent(port: int, n: int) -> dict[str, Any]:
    async def one(i: int) -> bool:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        payload = (i.to_bytes(4, "big") * (ECHO_BYTES // 4))
        w.write(payload)
        w.write_eof()
        got = await r.readexactly(len(payload))
        w.close()
        return got == payload

    async def main() -> list[Any]:
        return await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)

    t0 = time.perf_counter()
    results = asyncio.run(main())
    errors = sorted({type(r).__name__ for r in results if isinstance(r, BaseException)})
    return {"connections": n, "completed": sum(1 for r in results if r is True),
            "seconds": round(time.perf_counter() - t0, 2), "errors": errors}


def run(size: int, seconds: float, runs: int, conns: int, say: Any) -> dict[str, Any]:
    unavailable: dict[str, str] = {}
    if stunnel_binary() is None:
        unavailable["stunnel"] = "stunnel is not installed (apt-get install -y stunnel4)"
    if sshd_binary() is None or shutil.which("ssh") is None:
        unavailable["ssh"] = ("sshd is not installed (apt-get install -y openssh-server"
                              " openssh-client)")
    data = block()
    digest = expected_digest(data, size)
    sink, sink_port = start_app(_sink)
    echo, echo_port = start_app(_echo)
    out: dict[str, Any] = {"size": size}
    mesh = Mesh()
    try:
        bulk_mbps: dict[str, Any] = {"raw_tcp": None, "tunnel": None, "stunnel": None, "ssh": None}
        ends = {"sender": os.getpid(), "sink": sink.pid}
        cpu: dict[str, dict[str, float | None]] = {}
        bulk_mbps["raw_tcp"], cpu["raw_tcp"] = bulk(sink_port, data, size, digest, ends)
        say(f"bulk raw_tcp {bulk_mbps['raw_tcp']} MB/s")
        if "stunnel" not in unavailable:
            pids: dict[str, int] = {}
            with stunnel_pair(sink_port, pids) as p1:
                bulk_mbps["stunnel"], cpu["stunnel"] = bulk(p1, data, size, digest,
                                                            {**ends, **pids})
            say(f"bulk stunnel {bulk_mbps['stunnel']} MB/s")
        if "ssh" not in unavailable:
            pids = {}
            with ssh_forward(sink_port, pids) as p1:
                bulk_mbps["ssh"], cpu["ssh"] = bulk(p1, data, size, digest, {**ends, **pids})
            say(f"bulk ssh -L {bulk_mbps['ssh']} MB/s")
        zmq_mbps: dict[str, Any] = {"raw": round(pyzmq(_Same, seconds), 1), "tunnel": None,
                                    "stunnel": None}
        say(f"pyzmq raw {zmq_mbps['raw']} MB/s")
        if "stunnel" not in unavailable:
            zmq_mbps["stunnel"] = round(pyzmq(stunnel_pair, seconds), 1)
            say(f"pyzmq stunnel {zmq_mbps['stunnel']} MB/s")
        mesh.start()
        sink_tunnel = mesh.tunnel("sink", sink_port)
        bulk_mbps["tunnel"], cpu["tunnel"] = bulk(sink_tunnel, data, size, digest, {
            **ends, "entry": mesh.procs[1].pid, "exit": mesh.procs[0].pid})
        say(f"bulk tunnel {bulk_mbps['tunnel']} MB/s")

        class _Tunnelled(_Same):
            def __init__(self, port: int) -> None:
                super().__init__(mesh.tunnel(f"zmq-{port}", port))

        zmq_mbps["tunnel"] = round(pyzmq(_Tunnelled, seconds), 1)
        say(f"pyzmq tunnel {zmq_mbps['tunnel']} MB/s")
        echo_tunnel = mesh.tunnel("echo", echo_port)
        out["connect_ms"] = latency(echo_tunnel, runs)
        say(f"connect-to-first-byte {out['connect_ms']}")
        out["concurrent"] = {**concurrent(echo_tunnel, conns), "peak_rss": mesh.peak_rss()}
        say(f"concurrent {out['concurrent']}")
        out["bulk_MBps"] = bulk_mbps
        out["bulk_cpu_s_per_GB"] = cpu
        out["pyzmq_1MiB_MBps"] = zmq_mbps
        out["raw_tcp"], out["tunnel"] = bulk_mbps["raw_tcp"], bulk_mbps["tunnel"]
        out["stunnel"], out["ssh"] = bulk_mbps["stunnel"], bulk_mbps["ssh"]
        out["unavailable"] = unavailable
        out["load"] = os.getloadavg()[0]
        return out
    finally:
        mesh.close()
        for proc in (sink, echo):
            proc.terminate()
            proc.join(5)


def size_arg(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*(|KiB|MiB|GiB)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 256MiB or 1GiB")
    n = int(m.group(1)) << {"": 0, "KiB": 10, "MiB": 20, "GiB": 30}[m.group(2)]
    if n < BLOCK or n % BLOCK:
        raise argparse.ArgumentTypeError(f"the size is a multiple of {BLOCK >> 20} MiB")
    return n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--size", type=size_arg, default=1 << 30)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--latency-runs", type=int, default=200)
    p.add_argument("--connections", type=int, default=1000)
    args = p.parse_args()
    say = (lambda m: print(m, file=sys.stderr, flush=True))
    result = run(args.size, args.seconds, args.latency_runs, args.connections, say)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:18} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
