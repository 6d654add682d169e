"""meshd channels side by side with their baselines, in one run; print a table or one JSON object.

    python bench/channels.py [--json] [--seconds 3] [--sizes 64KiB,1MiB,16MiB]
                             [--only raw,stunnel,direct,relay,small,setup] [--setup-runs 50]
                             [--via-daemon] [--asyncio] [--no-cipher]

Needs ``stunnel`` for the stunnel column (``apt-get install -y stunnel4``; without it that column
says "not installed" and the rest runs) and ``cryptography`` (its throwaway certificate).

Columns, per frame size, in MB/s (10**6 payload bytes per second, headers not counted):

- ``raw_pyzmq``: PUSH -> PULL over tcp://127.0.0.1, zero copy from 64 KiB;
- ``stunnel``: the same PUSH -> client stunnel -> TLS -> server stunnel -> PULL (what SciStream
  deploys; a self-signed P-256 certificate, the client verifies it);
- ``direct``: a channel from ``site-r`` to ``site-b`` (``meshd.connect(...).sender(...)``);
- ``relay``: a channel from ``site-a``, whose config allows only ``paths = ["relay"]``, to
  ``site-b`` through ``site-r`` (the only third site, so the only relay).

Also 64 B messages per second (raw pyzmq ``copy=True``, and a direct channel; one message per
send, no batching by the app, though meshd's client batches them itself) and channel setup
latency: from the ``mesh.sender()`` call to the receiving app holding the first message (sent,
then flushed so as not to wait out the client's 2 ms batch linger), over ``--setup-runs`` fresh
channel names (after one unrecorded run), p50 and p99 in ms.

Every figure is two app processes (multiprocessing, spawn): the receiver counts from the first
message after a warm-up of ``min(1, seconds / 2)`` s to the last one received ``--seconds``
later, checks the contents of both against the pattern sent (and, for channels, that ``seq``
has no gap), then drains until the sender stops.  A channel figure also checks, from the
sender's ``mesh.channels()``, that the channel took the path the column names.  The three
daemons (``meshd run``, one state dir each in a temporary directory, on loopback, mDNS off) are
started only for the channel columns, after the baselines, and stopped at the end.

``cpu_s_per_GB``: per frame size, for ``raw_pyzmq`` and ``direct``, the CPU seconds each
process spent per GB (10**9 payload bytes) inside the receiver's counting window:
``sender_app``, ``receiver_app``, ``sending_daemon``, ``receiving_daemon`` (0 for raw pyzmq,
which has no daemons), sampled from ``/proc/PID/stat`` every 50 ms.  The sites hand each
channel's connection to the sending app (``channel_handover = true``) unless ``--via-daemon``;
``--asyncio`` makes the channels' sending apps use ``meshd.aconnect``;
``--no-cipher`` replaces the AEAD in every process the bench starts by a copy (a
``sitecustomize`` on ``PYTHONPATH``: the bench only, never the product), to show what the
cipher costs.

A column that fails gives ``{"error": "..."}`` in its place and the run goes on; a column left
out with ``--only`` is ``null``.  This is a benchmark, not a test: figures vary with the machine
and its load (two cores are shared by both apps, their daemons or stunnels, and zmq's I/O threads).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np
import zmq
from _baselines import (
    CpuSampler,
    Pair,
    Unavailable,
    check_every,
    count_window,
    drain,
    measure_raw,
    measure_small_raw,
    measure_stunnel,
    pattern,
    stunnel_version,
    warmup_for,
)

SIZES = [64 << 10, 1 << 20, 16 << 20]
COLUMNS = ("raw", "stunnel", "direct", "relay", "small", "setup")
SMALL = 64
RECEIVER = "site-b"
DIRECT_FROM, RELAY_FROM = "site-r", "site-a"
SITES: dict[str, dict[str, Any]] = {
    "site-a": {"paths": ["relay"]},  # sends the relayed channels; site-r is its only relay
    "site-b": {},                    # receives every channel
    "site-r": {},                    # relays, and sends the direct channels
}
"""The bench mesh: each site's config changes (``discovery = false`` for all)."""
MESH_TIMEOUT = 60.0
HANDOVER = [True]
ASYNCIO = [False]
"""Whether the channels' sending apps use the asyncio flavour (``--asyncio``)."""
"""``channel_handover`` of the bench sites (``--via-daemon`` sets it False)."""

NULL_CIPHER = '''"""bench/channels.py --no-cipher: frames are copied, not encrypted (never outside the bench)."""
import numpy as np

import meshd.channel.frames as f


class NullAead:
    def __init__(self, key):
        pass

    def encrypt_into(self, nonce, data, aad, out):
        n = memoryview(data).nbytes
        view = memoryview(out).cast("B")
        view[:n] = memoryview(data).cast("B")
        view[n:n + 16] = bytes(16)

    def decrypt_into(self, nonce, data, aad, out):
        view = memoryview(out).cast("B")
        src = memoryview(data).cast("B")[:view.nbytes]
        if _address(view) != _address(src):  # opened in place: nothing to do
            view[:] = src


def _address(view):
    return np.frombuffer(view, dtype=np.uint8).ctypes.data if view.nbytes else 0


def seal_into(self, seq, parts, out):
    views = [f.byte_view(p) for p in parts]
    n = sum(v.nbytes for v in views)
    dst = memoryview(out)
    dst[:f.HEADER_SIZE] = f._HEADER.pack(f.VERSION, f.KIND_DATA, self.direction, 0,
                                         self.channel_id, seq, n)
    pos = f.HEADER_SIZE
    for v in views:
        dst[pos:pos + v.nbytes] = v
        pos += v.nbytes
    dst[pos:pos + 16] = bytes(16)
    return out


f.CIPHERS[f.AES256GCM] = f.CIPHERS[f.CHACHA20POLY1305] = NullAead
f.Sealer.seal_into = seal_into
'''


def no_cipher() -> str:
    """Make every process this bench starts from now on copy frames instead of encrypting them
    (a ``sitecustomize`` on ``PYTHONPATH``); the directory to remove afterwards."""
    where = tempfile.mkdtemp(prefix="meshd-bench-nocipher-")
    Path(where, "sitecustomize.py").write_text(NULL_CIPHER)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [where, str(HERE.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(
            os.pathsep) if p])
    return where


# --- the mesh ----------------------------------------------------------------------------------

def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def set_config(path: Path, **values: Any) -> None:
    """Set top-level keys of ``config.toml``: replace the line ``key = ...`` or append one."""
    text = path.read_text()
    for key, value in values.items():
        line = f"{key} = {_toml(value)}"
        text, n = re.subn(rf"(?m)^{re.escape(key)}\s*=.*$", line.replace("\\", "\\\\"), text)
        if not n:
            text = text.rstrip("\n") + f"\n{line}\n"
    path.write_text(text)


class DemoMesh:
    """Daemons on loopback, members of one mesh (the first site invites the others);
    ``sites`` maps each name to its config changes (``discovery = false`` for all).
    ``close()`` stops them and removes their state."""

    def __init__(self, sites: dict[str, dict[str, Any]] | None = None,
                 prefix: str = "meshd-bench-channels-") -> None:
        self.sites = SITES if sites is None else sites
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def home(self, name: str) -> Path:
        return self.root / name

    def start(self) -> DemoMesh:
        from meshd.app.client import Client
        from meshd.state.site import init_site
        from meshd.testing.processes import start_daemon, wait_until
        from meshd.state.home import Home

        started = False
        try:
            for name, changes in self.sites.items():
                init_site(Home(self.home(name)), name, "127.0.0.1:0")
                set_config(self.home(name) / "config.toml", discovery=False,
                           channel_handover=HANDOVER[0], **changes)
                self.procs[name] = start_daemon(self.home(name), self.home(name) / "daemon.log")
            clients = {n: Client(self.home(n)) for n in self.sites}
            for name, client in clients.items():
                wait_until(functools.partial(self._started, name, client), MESH_TIMEOUT,
                           f"the daemon of {name}")
            founder, *joiners = self.sites
            token = clients[founder].invite(uses=len(joiners), expires=3600)["token"]
            for name in joiners:
                j = clients[name].join(token)
                deadline = time.monotonic() + MESH_TIMEOUT
                while j["state"] not in ("admitted", "failed") and time.monotonic() < deadline:
                    j = clients[name].join_state(j["id"], wait=5, state=j["state"])
                if j["state"] != "admitted":
                    raise RuntimeError(f"{name} could not join: {j.get('error') or j['state']}")
            for name, client in clients.items():
                wait_until(functools.partial(self._sees_all, client), MESH_TIMEOUT,
                           f"{name} to see all {len(self.sites)} sites alive")
            for client in clients.values():
                client.close()
            started = True
        except Exception as exc:  # noqa: BLE001 - said again with the daemons' last words
            logs = "; ".join(f"{n}: {self.log_tail(n)}" for n in self.sites if self.log_tail(n))
            raise RuntimeError(f"the bench mesh did not start: {exc}"
                               + (f" (daemon logs: {logs})" if logs else "")) from None
        finally:
            if not started:
                self.close()
        return self

    def _started(self, name: str, client: Any) -> Any:
        """The daemon's status once it answers; raises if its process has exited."""
        proc = self.procs[name]
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon of {name} exited with {proc.returncode}")
        return client.status()

    def _sees_all(self, client: Any) -> bool:
        alive = sum(bool(p["verified"]) and p["state"] == "alive" for p in client.peers())
        return bool(alive == len(self.sites))

    def log_tail(self, name: str, lines: int = 2) -> str:
        try:
            text = (self.home(name) / "daemon.log").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def close(self) -> None:
        from meshd.testing.processes import stop_daemons

        stop_daemons(self.procs.values())
        self.procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)


class LazyMesh:
    """Starts the :class:`DemoMesh` on the first ``get()``; a failed start is raised again."""

    def __init__(self) -> None:
        self._mesh: DemoMesh | None = None
        self._error: BaseException | None = None

    def get(self) -> DemoMesh:
        if self._error is not None:
            raise self._error
        if self._mesh is None:
            try:
                self._mesh = DemoMesh().start()
            except Exception as exc:
                self._error = exc
                raise
        return self._mesh

    def close(self) -> None:
        if self._mesh is not None:
            self._mesh.close()
            self._mesh = None


def _api() -> Callable[..., Any]:
    """``meshd.connect``, or AttributeError while the channel API does not exist yet."""
    import meshd

    return meshd.connect


# --- channel apps (each runs in its own spawned process) ---------------------------------------

def _recv(rx: Any, timeout: float) -> Any:
    """``rx.recv(timeout=...)``; None on a timeout (returned as None or raised as TimeoutError)
    and once the sender closed the channel (a handed-over sender's CTRL_CLOSE can reach the
    receiver before the bench hears that the sender is done)."""
    import meshd

    try:
        return rx.recv(timeout=timeout)
    except (TimeoutError, meshd.ChannelClosed):
        return None


def _close(obj: Any) -> None:
    close = getattr(obj, "close", None)
    if callable(close):
        close()


def _nbytes(msg: Any) -> int:
    array = getattr(msg, "array", None)
    return int(array.nbytes) if array is not None else len(msg.data)


def channel_receiver(ready: Callable[[Any], None], stop: Any, sender_done: Any, home: str,
                     name: str, size: int, seconds: float) -> dict[str, Any]:
    """Receive channel ``name`` at ``home`` and count, as the raw receiver does."""
    import meshd

    expected = pattern(size)
    last_seq: list[int] = []

    def recv(timeout: float) -> tuple[int, Any] | None:
        msg = _recv(rx, timeout)
        if msg is None:
            return None
        if last_seq and msg.seq != last_seq[0] + 1:
            raise RuntimeError(f"seq {msg.seq} after {last_seq[0]}")
        last_seq[:] = [msg.seq]
        return _nbytes(msg), msg

    def check(msg: Any) -> None:
        a = msg.array
        if a is None or a.dtype != expected.dtype or a.shape != expected.shape \
                or not np.array_equal(a, expected):
            raise RuntimeError(f"message {msg.seq} differs from the pattern sent")

    with meshd.connect(home=home) as mesh:
        rx = mesh.receiver(name)
        ready(None)
        result = count_window(recv, seconds, warmup_for(seconds), check)
        stop.set()
        drain(recv, sender_done)
        _close(rx)
    return result


def channel_sender(stop: Any, home: str, name: str, to: str, size: int,
                   flavour: str = "sync") -> dict[str, Any]:
    """Send the pattern on channel ``name`` until ``stop``; return its ``channels()`` row."""
    import meshd

    payload = pattern(size)
    every = check_every(size)
    sent = 0
    if flavour == "asyncio":
        return asyncio.run(_async_sender(stop, home, name, to, payload, every))
    with meshd.connect(home=home) as mesh:
        tx = mesh.sender(name, to=to)
        while not stop.is_set():
            for _ in range(every):
                tx.send(payload)
            sent += every
        tx.flush()
        rows = [c for c in mesh.channels()
                if c.get("name") == name and c.get("direction", "out") == "out"]
        _close(tx)
    return {"sent": sent, "channel": rows[0] if rows else None}


async def _async_sender(stop: Any, home: str, name: str, to: str, payload: Any,
                        every: int) -> dict[str, Any]:
    """:func:`channel_sender` with ``meshd.aconnect``."""
    import meshd

    sent = 0
    async with meshd.aconnect(home) as mesh:
        tx = await mesh.sender(name, to=to)
        while not stop.is_set():
            for _ in range(every):
                await tx.send(payload)
            sent += every
        await tx.flush()
        rows = [c for c in await mesh.channels()
                if c.get("name") == name and c.get("direction", "out") == "out"]
        await tx.close()
    return {"sent": sent, "channel": rows[0] if rows else None}


def _channel_window(mesh: DemoMesh, sender: str, size: int, seconds: float,
                    path: str) -> dict[str, Any]:
    _api()
    name = f"bench-{path}-{size}-{uuid.uuid4().hex[:8]}"
    with Pair(timeout=seconds + 120) as pair:
        pair.start_receiver(channel_receiver, str(mesh.home(RECEIVER)), name, size, seconds)
        pair.start_sender(channel_sender, str(mesh.home(sender)), name, RECEIVER, size,
                          "asyncio" if ASYNCIO[0] else "sync")
        sampler = CpuSampler({**pair.pids(), "sending_daemon": mesh.procs[sender].pid,
                              "receiving_daemon": mesh.procs[RECEIVER].pid})
        try:
            rx, tx = pair.wait()
        except (RuntimeError, TimeoutError) as exc:
            raise type(exc)(f"{exc}{_channel_state(mesh, sender, name)}") from None
        finally:
            sampler.stop()
    row = tx["channel"] or {}
    if row.get("path") != path:
        raise RuntimeError(f"the channel took path {row.get('path')!r}, not {path!r}: {row}")
    rx["cpu_s_per_GB"] = sampler.per_gb(rx["window_ns"], rx["MBps"])
    rx["handed_over"] = bool(row.get("handed_over"))
    return rx


def _channel_state(mesh: DemoMesh, site: str, name: str) -> str:
    """``"; at SITE: state S, error E"`` of channel ``name`` (while its sender is still open)."""
    from meshd.app.client import Client

    try:
        with Client(mesh.home(site), timeout=5) as client:
            rows = [c for c in client.channels() if c.get("name") == name]
    except Exception as exc:  # noqa: BLE001 - only a diagnostic
        return f"; channels() at {site} failed: {exc}"
    if not rows:
        return f"; {site} lists no channel {name!r}"
    row = rows[0]
    return (f"; at {site}: state {row.get('state')}, path {row.get('path')},"
            f" error {row.get('error')}")


def _with_mesh(mesh: DemoMesh | None, fn: Callable[[DemoMesh], Any]) -> Any:
    """``fn(mesh)``, on a mesh of its own (started and stopped here) when ``mesh`` is None."""
    if mesh is not None:
        return fn(mesh)
    _api()
    own = DemoMesh().start()
    try:
        return fn(own)
    finally:
        own.close()


def measure_direct(size: int, seconds: float, mesh: DemoMesh | None = None,
                   cpu: dict[str, Any] | None = None) -> float:
    """MB/s of a direct channel site-r -> site-b, ``size``-byte float32 arrays (``cpu``: filled
    with CPU-s/GB per process role)."""
    rx = _with_mesh(mesh, lambda m: _channel_window(m, DIRECT_FROM, size, seconds, "direct"))
    if cpu is not None:
        cpu.update(rx["cpu_s_per_GB"])
    return float(rx["MBps"])


def measure_relay(size: int, seconds: float, mesh: DemoMesh | None = None) -> float:
    """MB/s of a relayed channel site-a -> site-r -> site-b."""
    return float(_with_mesh(mesh, lambda m: _channel_window(m, RELAY_FROM, size, seconds,
                                                            "relay"))["MBps"])


def measure_small_direct(seconds: float, mesh: DemoMesh | None = None) -> float:
    """Messages/s of a direct channel, 64 B arrays, one per ``send``."""
    return float(_with_mesh(mesh, lambda m: _channel_window(m, DIRECT_FROM, SMALL, seconds,
                                                            "direct"))["msgs_per_s"])


def _now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)  # one clock for every process of the host


def _serve(conn: Any, handle: Callable[[tuple[Any, ...]], Any]) -> None:
    """Answer commands on ``conn`` with ``handle`` until ``("quit",)``; an error is the answer."""
    try:
        while (cmd := conn.recv())[0] != "quit":
            conn.send(("ok", handle(cmd)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def setup_receiver(conn: Any, home: str) -> None:
    """``("open", name)``: a receiver, answered at once; ``("recv",)``: the first message's time."""
    import meshd

    expected = pattern(SMALL)
    rx: list[Any] = []

    def handle(cmd: tuple[Any, ...]) -> Any:
        if cmd[0] == "open":
            rx[:] = [mesh.receiver(cmd[1])]
            return None
        msg = _recv(rx[0], 30.0)
        t1 = _now_ns()
        if msg is None:
            raise TimeoutError("no first message within 30 s")
        if not np.array_equal(msg.array, expected):
            raise RuntimeError("the first message differs from the pattern sent")
        _close(rx.pop())
        return t1

    with meshd.connect(home=home) as mesh:
        _serve(conn, handle)


def setup_sender(conn: Any, home: str, to: str) -> None:
    """``("send", name)``: the time, then ``mesh.sender(name)``, one 64 B send and a flush;
    ``("close",)``: close that sender."""
    import meshd

    payload = pattern(SMALL)
    tx: list[Any] = []

    def handle(cmd: tuple[Any, ...]) -> Any:
        if cmd[0] == "send":
            t0 = _now_ns()
            tx[:] = [mesh.sender(cmd[1], to=to)]
            tx[0].send(payload)
            tx[0].flush()  # pushes the message now rather than after the client's batch linger
            return t0
        _close(tx.pop())
        return None

    with meshd.connect(home=home) as mesh:
        _serve(conn, handle)


def stop_apps(apps: dict[str, tuple[Any, Any]]) -> None:
    """Tell each app process (a pipe and a process, as ``_serve`` runs it) to quit; terminate
    one that does not."""
    for conn, proc in apps.values():
        try:
            conn.send(("quit",))
        except OSError:
            pass
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        conn.close()


def _ask(conn: Any, proc: Any, cmd: tuple[Any, ...], timeout: float = 60.0) -> Any:
    conn.send(cmd)
    if not conn.poll(timeout):
        raise TimeoutError(f"{proc.name}: no answer to {cmd[0]!r} within {timeout:.0f} s")
    try:
        kind, value = conn.recv()
    except EOFError:
        proc.join(2)
        raise RuntimeError(f"{proc.name} died (exit code {proc.exitcode})") from None
    if kind == "error":
        raise RuntimeError(f"{proc.name}: {value}")
    return value


def _setup_latencies(mesh: DemoMesh, runs: int) -> dict[str, Any]:
    _api()
    ctx = mp.get_context("spawn")
    apps = {}
    try:
        roles = (("receiver", setup_receiver, (str(mesh.home(RECEIVER)),)),
                 ("sender", setup_sender, (str(mesh.home(DIRECT_FROM)), RECEIVER)))
        for role, target, args in roles:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=target, args=(child, *args), name=f"setup-{role}")
            proc.start()
            child.close()
            apps[role] = (parent, proc)
        tag = uuid.uuid4().hex[:8]
        ms = []
        for i in range(runs + 1):  # run 0 is not recorded
            name = f"bench-setup-{tag}-{i}"
            _ask(*apps["receiver"], ("open", name))
            t0 = _ask(*apps["sender"], ("send", name))
            t1 = _ask(*apps["receiver"], ("recv",))
            _ask(*apps["sender"], ("close",))
            if i:
                ms.append((t1 - t0) / 1e6)
    finally:
        stop_apps(apps)
    p99 = statistics.quantiles(ms, n=100, method="inclusive")[98] if len(ms) > 1 else ms[0]
    return {"p50": round(statistics.median(ms), 2), "p99": round(p99, 2), "n": len(ms)}


def measure_setup(runs: int, mesh: DemoMesh | None = None) -> dict[str, Any]:
    """Setup latency of direct channels in ms: ``{"p50", "p99", "n"}``."""
    result: dict[str, Any] = _with_mesh(mesh, lambda m: _setup_latencies(m, runs))
    return result


# --- the run ------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    import cryptography

    import meshd

    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh
                        if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu or platform.processor(),
            "platform": platform.platform(), "python": platform.python_version(),
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "numpy": np.__version__,
            "cryptography": cryptography.__version__, "stunnel": stunnel_version(),
            "meshd": meshd.__version__}


def column(fn: Callable[[], Any], digits: int = 1) -> Any:
    """``fn()`` rounded, or ``{"error": "..."}``."""
    try:
        value = fn()
    except Unavailable as exc:
        return {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - one column fails, the run goes on
        return {"error": f"{type(exc).__name__}: {exc}"}
    return round(value, digits) if isinstance(value, float) else value


def _ratio(a: Any, b: Any) -> float | None:
    ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and b
    return round(a / b, 3) if ok else None


def run(sizes: list[int], seconds: float, only: set[str], setup_runs: int,
        progress: Callable[[str], None]) -> dict[str, Any]:
    """Baselines first (no daemon runs yet), then the channel columns on one mesh."""
    tp: dict[str, dict[str, Any]] = {str(s): {"raw_pyzmq": None, "stunnel": None, "direct": None,
                                              "relay": None} for s in sizes}
    small: dict[str, Any] = {"raw_pyzmq": None, "direct": None}
    cpu: dict[str, dict[str, Any]] = {str(s): {"raw_pyzmq": None, "direct": None} for s in sizes}
    setup: dict[str, Any] = {"direct": None}
    mesh = LazyMesh()
    load = os.getloadavg()[0]

    def step(label: str, fn: Callable[[], Any]) -> Any:
        t0 = time.monotonic()
        value = column(fn)
        progress(f"{label}: {value}  ({time.monotonic() - t0:.1f} s)")
        return value

    try:
        baselines = (("raw", "raw_pyzmq", measure_raw), ("stunnel", "stunnel", measure_stunnel))
        for col, key, fn in baselines:
            if col in only:
                for s in sizes:
                    roles: dict[str, Any] = {}
                    tp[str(s)][key] = step(f"{key} {s}", functools.partial(
                        fn, s, seconds, **({"cpu": roles} if key == "raw_pyzmq" else {})))
                    if key == "raw_pyzmq" and roles:
                        cpu[str(s)]["raw_pyzmq"] = roles
        if "small" in only:
            small["raw_pyzmq"] = step("raw_pyzmq 64 B msgs/s", lambda: measure_small_raw(seconds))
        if "direct" in only:
            for s in sizes:
                roles = {}
                tp[str(s)]["direct"] = step(f"direct {s}", functools.partial(
                    _on_mesh, functools.partial(measure_direct, cpu=roles), mesh, s, seconds))
                if roles:
                    cpu[str(s)]["direct"] = roles
                    progress(f"  CPU-s/GB {roles}")
        if "small" in only:
            small["direct"] = step("direct 64 B msgs/s", functools.partial(
                _on_mesh, measure_small_direct, mesh, seconds))
        if "relay" in only:
            for s in sizes:
                tp[str(s)]["relay"] = step(f"relay {s}", functools.partial(
                    _on_mesh, measure_relay, mesh, s, seconds))
        if "setup" in only:
            setup["direct"] = step(f"setup x{setup_runs}", functools.partial(
                _on_mesh, measure_setup, mesh, setup_runs))
    finally:
        mesh.close()
    ratios = {k: {"direct_vs_raw": _ratio(v["direct"], v["raw_pyzmq"]),
                  "relay_vs_direct": _ratio(v["relay"], v["direct"]),
                  "direct_vs_stunnel": _ratio(v["direct"], v["stunnel"])} for k, v in tp.items()}
    return {"machine": {**machine(), "loadavg_1min_at_start": round(load, 2)}, "seconds": seconds,
            "throughput_MBps": tp, "ratios": ratios, "small_64B_msgs_per_s": small,
            "setup_ms": setup, "cpu_s_per_GB": cpu}


def _on_mesh(fn: Callable[..., Any], lazy: LazyMesh, *args: Any) -> Any:
    """``fn(*args, mesh)`` on the shared mesh; no daemon starts while the channel API is missing."""
    _api()
    return fn(*args, lazy.get())


def _size_name(n: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*(B|K|KiB|M|MiB|G|GiB)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 65536, 64KiB, 1MiB)")
    shift = {"": 0, "b": 0, "k": 10, "kib": 10, "m": 20, "mib": 20, "g": 30, "gib": 30}
    n = int(m.group(1)) << shift[(m.group(2) or "").lower()]
    if n < 1:
        raise argparse.ArgumentTypeError("a size must be at least 1 byte")
    return n


def print_table(r: dict[str, Any]) -> None:
    def cell(v: Any, width: int, digits: int = 1) -> str:
        if v is None:
            return f"{'-':>{width}}"
        if isinstance(v, dict):
            return f"{'error':>{width}}"
        return f"{v:>{width},.{digits}f}"

    m = r["machine"]
    print(f"meshd channels vs baselines: {r['seconds']:g} s per figure; {m['cpus']} CPUs"
          f" ({m['cpu']}); Python {m['python']}, pyzmq {m['pyzmq']} / libzmq {m['libzmq']},"
          f" {m['stunnel'] or 'no stunnel'}")
    print()
    print(f"{'MB/s':>8} {'raw pyzmq':>10} {'stunnel':>10} {'direct':>10} {'relay':>10}"
          f" {'direct/raw':>11} {'relay/direct':>13} {'direct/stunnel':>15}")
    errors: dict[tuple[str, str], None] = {}
    for size, row in r["throughput_MBps"].items():
        ratio = r["ratios"][size]
        print(f"{_size_name(int(size)):>8}" + "".join(
            " " + cell(row[k], 10) for k in ("raw_pyzmq", "stunnel", "direct", "relay"))
            + f" {cell(ratio['direct_vs_raw'], 11, 3)} {cell(ratio['relay_vs_direct'], 13, 3)}"
            f" {cell(ratio['direct_vs_stunnel'], 15, 3)}")
        errors.update({(k, v["error"]): None for k, v in row.items() if isinstance(v, dict)})
    small = r["small_64B_msgs_per_s"]
    print(f"\n64 B messages/s: raw pyzmq {cell(small['raw_pyzmq'], 0, 0).strip()},"
          f" direct {cell(small['direct'], 0, 0).strip()}")
    errors.update({(k, v["error"]): None for k, v in small.items() if isinstance(v, dict)})
    s = r["setup_ms"]["direct"]
    if isinstance(s, dict) and "error" not in s:
        print(f"setup latency, direct: p50 {s['p50']} ms, p99 {s['p99']} ms (n = {s['n']})")
    else:
        print(f"setup latency, direct: {cell(s, 0).strip()}")
        if isinstance(s, dict):
            errors[("setup", s["error"])] = None
    for col, err in errors:
        print(f"  {col}: {err}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Details: the module docstring of bench/channels.py.")
    p.add_argument("--json", action="store_true", help="print one JSON object (default: a table)")
    p.add_argument("--seconds", type=float, default=3.0, help="counting window per figure")
    p.add_argument("--sizes", type=lambda t: [parse_size(x) for x in t.split(",") if x.strip()],
                   default=SIZES, help="frame sizes, e.g. 64KiB,1MiB,16MiB (the default)")
    p.add_argument("--only", type=lambda t: {x.strip() for x in t.split(",") if x.strip()},
                   default=set(COLUMNS), help=f"some of {','.join(COLUMNS)} (default: all)")
    p.add_argument("--setup-runs", type=int, default=50)
    p.add_argument("--via-daemon", action="store_true",
                   help="channels carry their data through the daemons (channel_handover off)")
    p.add_argument("--asyncio", action="store_true",
                   help="the channels' sending apps use meshd.aconnect (the asyncio flavour)")
    p.add_argument("--no-cipher", action="store_true",
                   help="the channels' frames are copied, not encrypted (the bench only:"
                        " what is left without the cipher)")
    args = p.parse_args(argv)
    HANDOVER[0] = not args.via_daemon
    ASYNCIO[0] = args.asyncio
    nocipher = no_cipher() if args.no_cipher else None
    if unknown := args.only - set(COLUMNS):
        p.error(f"--only: unknown {', '.join(sorted(unknown))}; choose from {', '.join(COLUMNS)}")
    if args.seconds <= 0 or args.setup_runs < 1 or not args.sizes:
        p.error("--seconds must be positive, --setup-runs at least 1, --sizes not empty")

    def progress(text: str) -> None:
        if not args.json:
            print(f"  {text}", file=sys.stderr, flush=True)

    try:
        report = run(args.sizes, args.seconds, args.only, args.setup_runs, progress)
    finally:
        if nocipher:
            shutil.rmtree(nocipher, ignore_errors=True)
    report["handover"] = HANDOVER[0]
    report["flavour"] = "asyncio" if ASYNCIO[0] else "sync"
    report["cipher"] = not args.no_cipher
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
