"""The baselines of ``bench/channels.py``: raw pyzmq and a stunnel pair, and the harness they share.

Every measurement runs two apps, each a separate process (multiprocessing, spawn):

- the receiver starts first, reports ``ready`` (with its port, for pyzmq), receives for
  ``warmup`` seconds, then counts payload bytes from the first message after the warm-up to the
  last one received at least ``seconds`` later (rate = bytes after the first / time between them);
  it checks the first and the last payload of the window against the pattern, sets ``stop``, and
  keeps draining until the sender is done, so no sender is left blocked on a full pipe;
- the sender sends one pattern buffer (float32 standard normals, seeded by the size) in a loop
  until ``stop``, then reports.

``stunnel`` is the ``stunnel4`` apt package (what SciStream deploys): a client stunnel on P1
speaks TLS to a server stunnel on P2, which forwards in clear to the PULL app on P3.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self, cast

import numpy as np

WARMUP_MAX = 1.0
"""Warm-up before the counting window: ``min(WARMUP_MAX, seconds / 2)`` seconds."""
SILENCE = 20.0
"""A receiver that gets nothing for this long gives up (a stalled sender or channel)."""
DRAIN = 30.0
"""Longest a receiver keeps draining after its window, waiting for the sender to stop."""
STUNNEL_READY = 10.0
"""Seconds to wait for a stunnel to accept on its port."""

Clock = Callable[[], float]


class Unavailable(Exception):
    """A column that cannot be measured on this machine (its message says why)."""


def warmup_for(seconds: float) -> float:
    return min(WARMUP_MAX, seconds / 2)


def pattern(size: int) -> np.ndarray:
    """The payload of every message of ``size`` bytes: float32 standard normals, seeded by size."""
    if size % 4:
        return np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    return np.random.default_rng(size).standard_normal(size // 4).astype("<f4")


def same_bytes(buf: Any, expected: np.ndarray) -> bool:
    """Whether the buffer ``buf`` holds exactly the bytes of ``expected``."""
    got = np.frombuffer(buf, dtype=np.uint8)
    return got.size == expected.nbytes and bool(np.array_equal(got, expected.view(np.uint8)))


def count_window(recv: Callable[[float], tuple[int, Any] | None], seconds: float, warmup: float,
                 check: Callable[[Any], None]) -> dict[str, Any]:
    """Receive with ``recv(timeout) -> (nbytes, message) | None`` for ``warmup`` + ``seconds``.

    Returns ``bytes`` and ``messages`` after the window's first message, the ``seconds`` between
    the first and last message of the window, and ``MBps`` / ``msgs_per_s`` over them.
    ``check`` is called on the window's first and last message.
    """
    clock = time.perf_counter
    start = clock()
    first_ns = 0
    last_seen = start
    first_t = None
    nbytes = messages = 0
    item = None
    while True:
        got = recv(1.0)
        now = clock()
        if got is None:
            if now - last_seen > SILENCE:
                phase = "in the window" if first_t else "in the warm-up"
                raise TimeoutError(f"no message for {SILENCE:.0f} s {phase}"
                                   f" ({messages} counted)")
            continue
        last_seen = now
        n, item = got
        if first_t is None:
            if now - start >= warmup:
                first_t = now
                first_ns = mono_ns()
                check(item)
            continue
        nbytes += n
        messages += 1
        if now - first_t >= seconds:
            break
    end_ns = mono_ns()
    check(item)
    dt = now - first_t
    return {"bytes": nbytes, "messages": messages, "seconds": round(dt, 4),
            "MBps": nbytes / dt / 1e6, "msgs_per_s": messages / dt,
            "window_ns": [first_ns, end_ns]}


def mono_ns() -> int:
    """CLOCK_MONOTONIC in ns: one clock for every process of the host."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of process ``pid`` (clock ticks), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


def tree_cpu_ticks(pid: int) -> int | None:
    """utime + stime of process ``pid`` and every live process under it (clock ticks): an
    ``sshd`` forks the process that carries a connection; None if ``pid`` is gone."""
    own = cpu_ticks(pid)
    if own is None:
        return None
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parents[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    total, todo = own, [pid]
    while todo:
        parent = todo.pop()
        for child, ppid in parents.items():
            if ppid == parent:
                todo.append(child)
                total += cpu_ticks(child) or 0
    return total


class CpuSampler:
    """Samples the CPU time of some processes (``{role: pid}``) every ``interval`` seconds in a
    thread, so that the CPU spent inside a receiver's counting window can be read afterwards
    (:meth:`per_gb`)."""

    def __init__(self, pids: dict[str, int], interval: float = 0.05) -> None:
        import threading

        self.pids = pids
        self.samples: list[tuple[int, dict[str, int | None]]] = []
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((mono_ns(), {r: cpu_ticks(p) for r, p in self.pids.items()}))
            self._stop.wait(self._interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def per_gb(self, window_ns: list[int], mbps: float) -> dict[str, float | None]:
        """CPU seconds per GB (10**9 payload bytes) of each process inside the window."""
        t0, t1 = window_ns
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2 or mbps <= 0:
            return {r: None for r in self.pids}
        (a_t, a), (b_t, b) = inside[0], inside[-1]
        span = (b_t - a_t) / 1e9
        tick = os.sysconf("SC_CLK_TCK")
        out: dict[str, float | None] = {}
        for r in self.pids:
            x, y = a.get(r), b.get(r)
            out[r] = (None if x is None or y is None
                      else round((y - x) / tick / span / (mbps / 1e3), 3))
        return out


def drain(recv: Callable[[float], Any], sender_done: Any) -> None:
    """Receive and drop until the sender is done and nothing arrives for 0.2 s (at most DRAIN s)."""
    deadline = time.monotonic() + DRAIN
    while time.monotonic() < deadline:
        if recv(0.2) is None and sender_done.is_set():
            return


def check_every(size: int) -> int:
    """How many messages a sender sends between looks at its stop event (an Event costs ~1 µs)."""
    return max(1, min(1024, (1 << 20) // max(size, 1)))


# --- the two-process harness -------------------------------------------------------------------

def _worker(role: str, fn: Callable[..., Any], conn: Any, stop: Any, done: Any,
            args: tuple[Any, ...]) -> None:
    """Run one app: a receiver sends ``("ready", x)``, then either sends ``("result", r)`` or
    ``("error", e)``."""
    try:
        if role == "receiver":
            result = fn(lambda info: conn.send(("ready", info)), stop, done, *args)
        else:
            result = fn(stop, *args)
        conn.send(("result", result))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        if role == "sender":
            done.set()
        conn.close()


class Pair:
    """A receiver app and a sender app, each a spawned process; terminated on exit if still alive.

    ``start_receiver(fn, *args)`` calls ``fn(ready, stop, sender_done, *args) -> dict`` in a new
    process and returns what it passed to ``ready``; ``start_sender(fn, *args)`` calls
    ``fn(stop, *args) -> dict``; ``wait()`` returns both results or raises the first error.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._ctx = mp.get_context("spawn")
        self.stop = self._ctx.Event()
        self.sender_done = self._ctx.Event()
        self._procs: dict[str, Any] = {}
        self._conns: dict[str, Any] = {}
        self._results: dict[str, Any] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for proc in self._procs.values():
            proc.join(5)
        for proc in self._procs.values():
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns.values():
            conn.close()

    def _start(self, role: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        parent, child = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(target=_worker, name=f"bench-{role}",
                                 args=(role, fn, child, self.stop, self.sender_done, args))
        proc.start()
        child.close()
        self._procs[role], self._conns[role] = proc, parent

    def _next(self, until: Callable[[], bool], timeout: float) -> None:
        """Collect messages from both apps until ``until()``; raise on an error or a dead app."""
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the bench apps did not finish within {timeout:.0f} s")
            waitables = [c for c in self._conns.values() if not c.closed]
            for ready in cast(list[Any], mpc.wait(waitables, left)):
                role = next(r for r, c in self._conns.items() if c is ready)
                try:
                    kind, value = ready.recv()
                except EOFError:
                    ready.close()
                    if "result" not in self._results.get(role, {}):
                        self._procs[role].join(2)
                        raise RuntimeError(f"the {role} app died"
                                           f" (exit code {self._procs[role].exitcode})") from None
                    continue
                if kind == "error":
                    raise RuntimeError(f"{role}: {value}")
                self._results.setdefault(role, {})[kind] = value

    def start_receiver(self, fn: Callable[..., Any], *args: Any) -> Any:
        self._start("receiver", fn, args)
        self._next(lambda: "ready" in self._results.get("receiver", {}), 60)
        return self._results["receiver"]["ready"]

    def start_sender(self, fn: Callable[..., Any], *args: Any) -> None:
        self._start("sender", fn, args)

    def pids(self) -> dict[str, int]:
        """``{"sender_app": pid, "receiver_app": pid}`` of the apps started."""
        return {f"{r}_app": p.pid for r, p in self._procs.items()}

    def wait(self) -> tuple[dict[str, Any], dict[str, Any]]:
        self._next(lambda: all("result" in self._results.get(r, {})
                               for r in ("receiver", "sender")), self.timeout)
        return self._results["receiver"]["result"], self._results["sender"]["result"]


# --- raw pyzmq ---------------------------------------------------------------------------------

def _hwm(size: int) -> int:
    """Queue length of each zmq socket: about 64 MiB of messages, at most the default 1000."""
    return max(4, min(1000, (64 << 20) // size))


def zmq_receiver(ready: Callable[[Any], None], stop: Any, sender_done: Any, size: int,
                 seconds: float) -> dict[str, Any]:
    """PULL bound on a free loopback port; counts ``size``-byte frames (zero copy from 64 KiB)."""
    import zmq

    expected = pattern(size)
    small = size < zmq.COPY_THRESHOLD
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.rcvhwm = _hwm(size)
    try:
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)

        def recv(timeout: float) -> tuple[int, Any] | None:
            # recv with NOBLOCK first: a poll per message would cost more than a 64 B recv
            try:
                frame = pull.recv(zmq.NOBLOCK, copy=small)
            except zmq.Again:
                if not poller.poll(int(timeout * 1000)):
                    return None
                frame = pull.recv(copy=small)
            return len(frame), frame

        def check(frame: Any) -> None:
            buf = frame if small else frame.buffer
            if not same_bytes(buf, expected):
                raise RuntimeError(f"payload differs from the pattern ({len(frame)} bytes)")

        ready(port)
        result = count_window(recv, seconds, warmup_for(seconds), check)
        stop.set()
        drain(recv, sender_done)
        return result
    finally:
        pull.close(linger=0)
        ctx.term()


def zmq_sender(stop: Any, addr: str, size: int) -> dict[str, Any]:
    """PUSH connected to ``addr``: the pattern until ``stop`` (``copy=True`` under 64 KiB)."""
    import zmq

    payload = pattern(size)
    small = size < zmq.COPY_THRESHOLD
    data: Any = payload.tobytes() if small else payload.data.cast("B")
    every = check_every(size)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.sndhwm = _hwm(size)
    push.sndtimeo = 200  # so that a sender blocked on a full pipe still sees ``stop``
    sent = 0
    try:
        push.connect(addr)
        while not stop.is_set():
            try:
                for _ in range(every):
                    push.send(data, copy=small)
                    sent += 1
            except zmq.Again:
                pass
        return {"sent": sent}
    finally:
        push.close(linger=0)
        ctx.term()


def zmq_window(size: int, seconds: float) -> dict[str, Any]:
    """Raw pyzmq PUSH -> PULL over tcp loopback, app process to app process: the window, with
    ``cpu_s_per_GB`` of each app (and 0 for the daemons a channel would add)."""
    with Pair(timeout=seconds + 90) as pair:
        port = pair.start_receiver(zmq_receiver, size, seconds)
        pair.start_sender(zmq_sender, f"tcp://127.0.0.1:{port}", size)
        sampler = CpuSampler(pair.pids())
        try:
            rx, _ = pair.wait()
        finally:
            sampler.stop()
    rx["cpu_s_per_GB"] = {**sampler.per_gb(rx["window_ns"], rx["MBps"]),
                          "sending_daemon": 0.0, "receiving_daemon": 0.0}
    return rx


def measure_raw(size: int, seconds: float, cpu: dict[str, Any] | None = None) -> float:
    """MB/s of raw pyzmq, ``size``-byte frames (``cpu``: filled with CPU-s/GB per role)."""
    rx = zmq_window(size, seconds)
    if cpu is not None:
        cpu.update(rx["cpu_s_per_GB"])
    return float(rx["MBps"])


def measure_small_raw(seconds: float) -> float:
    """Messages/s of raw pyzmq, 64 B frames, one per ``send`` (``copy=True``)."""
    return float(zmq_window(64, seconds)["msgs_per_s"])


# --- stunnel ------------------------------------------------------------------------------------

def stunnel_binary() -> str | None:
    return shutil.which("stunnel") or shutil.which("stunnel4")


def stunnel_version() -> str | None:
    """``"stunnel 5.68 / OpenSSL 3.0.9 30 May 2023"``, or None when stunnel is not installed."""
    exe = stunnel_binary()
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (out.stdout + out.stderr).splitlines()
    version = next((ln.split(" on ")[0] for ln in lines if ln.startswith("stunnel ")), "stunnel")
    ssl = next((ln.split("with ", 1)[1] for ln in lines if ln.startswith("Compiled with")), "")
    return f"{version} / {ssl}" if ssl else version


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A throwaway self-signed P-256 certificate for localhost/127.0.0.1; (cert, key) paths."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return cert_path, key_path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel's pick for port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_accepts(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float,
                  what: str = "stunnel") -> None:
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"{what} exited with {proc.returncode}: {' | '.join(tail)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not accept on port {port} within {timeout:.0f} s") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each child still running, then kill what has not exited within 5 s."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


@contextlib.contextmanager
def stunnel_pair(target_port: int, pids: dict[str, int] | None = None) -> Iterator[int]:
    """Client stunnel on P1 -> TLS -> server stunnel on P2 -> ``target_port``; yields P1.

    Both run in the foreground as child processes (config ``foreground = yes``, no pid file) and
    are terminated (then killed) on exit; their logs go to a temporary directory.  ``pids``
    (if given) gets their process ids as ``entry`` (the client) and ``exit`` (the server).
    """
    exe = stunnel_binary()
    if exe is None:
        raise Unavailable("not installed (apt-get install -y stunnel4)")
    tmp = Path(tempfile.mkdtemp(prefix="meshd-bench-stunnel-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        cert, key = make_cert(tmp)
        p1, p2 = free_port(), free_port()
        common = "foreground = yes\npid =\ndebug = notice\n"
        (tmp / "server.conf").write_text(
            f"{common}[bench]\naccept = 127.0.0.1:{p2}\nconnect = 127.0.0.1:{target_port}\n"
            f"cert = {cert}\nkey = {key}\n")
        (tmp / "client.conf").write_text(
            f"{common}[bench]\nclient = yes\naccept = 127.0.0.1:{p1}\n"
            f"connect = 127.0.0.1:{p2}\nverifyPeer = yes\nCAfile = {cert}\n")
        for side, port in (("server", p2), ("client", p1)):
            log = tmp / f"{side}.log"
            procs.append(_spawn([exe, str(tmp / f"{side}.conf")], log))
            _wait_accepts(port, procs[-1], log, STUNNEL_READY)
        if pids is not None:
            pids.update({"exit": procs[0].pid, "entry": procs[1].pid})
        yield p1
    finally:
        _stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)


def sshd_binary() -> str | None:
    return shutil.which("sshd") or (shutil.which("sshd", path="/usr/sbin:/usr/local/sbin"))


@contextlib.contextmanager
def ssh_forward(target_port: int, pids: dict[str, int] | None = None) -> Iterator[int]:
    """``ssh -L P:127.0.0.1:target_port`` through a throwaway ``sshd`` on loopback; yields P.

    The sshd runs in the foreground (``-D -e``) with its own host key, config and authorized
    key (nothing of the system's sshd is used or changed); the client is ``ssh -N`` with the
    default cipher choice. Both are stopped on exit. Needs openssh-server and openssh-client.
    ``pids`` (if given) gets their process ids as ``entry`` (ssh) and ``exit`` (sshd, whose
    child carries the connection)."""
    sshd, ssh, keygen = sshd_binary(), shutil.which("ssh"), shutil.which("ssh-keygen")
    if sshd is None or ssh is None or keygen is None:
        raise Unavailable("not installed (apt-get install -y openssh-server openssh-client)")
    tmp = Path(tempfile.mkdtemp(prefix="meshd-bench-ssh-"))
    os.chmod(tmp, 0o700)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name in ("host", "client"):
            subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / name)],
                           check=True)
        (tmp / "authorized_keys").write_bytes((tmp / "client.pub").read_bytes())
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
        p_sshd, p_fwd = free_port(), free_port()
        (tmp / "sshd_config").write_text(
            f"Port {p_sshd}\nListenAddress 127.0.0.1\nHostKey {tmp / 'host'}\n"
            f"AuthorizedKeysFile {tmp / 'authorized_keys'}\nPidFile none\nUsePAM no\n"
            "StrictModes no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "AllowTcpForwarding yes\n")
        procs.append(_spawn([sshd, "-D", "-e", "-f", str(tmp / "sshd_config")],
                            tmp / "sshd.log"))
        _wait_accepts(p_sshd, procs[-1], tmp / "sshd.log", STUNNEL_READY, "sshd")
        user = os.environ.get("USER") or __import__("getpass").getuser()
        procs.append(_spawn(
            [ssh, "-N", "-p", str(p_sshd), "-i", str(tmp / "client"), "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={tmp / 'known'}",
             "-o", "ExitOnForwardFailure=yes",
             "-L", f"127.0.0.1:{p_fwd}:127.0.0.1:{target_port}", f"{user}@127.0.0.1"],
            tmp / "ssh.log"))
        _wait_accepts(p_fwd, procs[-1], tmp / "ssh.log", STUNNEL_READY, "ssh -L")
        if pids is not None:
            pids.update({"entry": procs[1].pid, "exit": procs[0].pid})
        yield p_fwd
    finally:
        _stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)


def measure_stunnel(size: int, seconds: float) -> float:
    """MB/s of raw pyzmq PUSH -> client stunnel -> TLS -> server stunnel -> PULL."""
    if stunnel_binary() is None:
        raise Unavailable("not installed (apt-get install -y stunnel4)")
    with Pair(timeout=seconds + 90) as pair:
        port = pair.start_receiver(zmq_receiver, size, seconds)
        with stunnel_pair(port) as p1:
            pair.start_sender(zmq_sender, f"tcp://127.0.0.1:{p1}", size)
            rx, _ = pair.wait()
    return float(rx["MBps"])
