"""Daemon memory while a receiving application stalls: bounded by the channel window.

    python bench/channel_memory.py [--stall 60] [--size 1MiB] [--windows default,32MiB]
                                   [--warm 8] [--after 5] [--interval 1]
                                   [--json [--samples]]

Per window setting (``default`` leaves ``channel_window_bytes`` out of config.toml; anything else
is written into both sites' config.toml before their daemons start), a fresh mesh of two daemons
(``site-s`` sends, ``site-r`` receives; ``meshd run`` on loopback, mDNS off, one temporary state
dir each) and two apps (multiprocessing, spawn):

- the receiving app opens ``mesh.receiver(name)``, takes ``--warm`` messages, then stops reading
  for ``--stall`` seconds; then it drains everything and checks that it got every message the
  sender sent, once, in order (``msg.seq`` 0, 1, 2, ... and the counter the sender wrote into
  the first 8 bytes of each array), the rest of each array equal to the pattern sent;
- the sending app sends ``--size`` uint8 arrays (a fresh copy per send) as fast as
  ``tx.send`` lets it, during the stall too (it blocks once the channel's window is full), and
  ``--after`` seconds into the drain it stops, flushes and closes.

Every ``--interval`` seconds (default 1, and at each phase change) the bench samples VmRSS
(``/proc/PID/status``) of both daemons and both apps, the messages the sending app has handed to
``tx.send``, and both daemons' rows of the channel (``Client.channels()``, what ``meshd channels
--json`` prints): ``buffered_bytes`` at the sending site (its resend buffer), ``held_bytes`` /
``held_messages`` at the receiving site.  VmHWM is read at the end (each app reads its own
before it exits).

Per run: the window W; per process RSS when idle (daemons only: before the apps start), at the
start and end of the stall, its growth during the stall and during the stall's second half
(after the window has filled: ~0 when memory is bounded), peak sampled RSS, VmHWM, final RSS,
and ``peak_growth_over_idle`` = max(peak, VmHWM) - idle; messages sent during the stall,
messages sent but not yet read at its end, and when the sender last got one through; the
largest ``buffered_bytes`` / ``held_bytes`` seen; the verification.

The design bound on a process's growth over idle, in batches of one ``--size`` message (one
large message travels alone): the receiving daemon W (``held_bytes``) + SNDHWM 4 of its PUSH to
the app + the one it awaits; the receiving app RCVHWM 4 + one in hand; the sending daemon W (the
resend buffer, which is ~0 once the receiving daemon has acked what it holds, but reaches W
while data flows) + RCVHWM 8 + the one being sealed; the sending app SNDHWM 8 + the one being
packed + its copy.  Each daemon also maps one shared-memory ring (``meshd.app.streams.RING_BYTES``,
48 MiB: the receiver's, which it fills, or the sending app's, which it reads; RSS counts a
ring's pages once touched).  ``bounded`` means every process grew by at most max(2 MiB, 2 messages) in the
stall's second half and each daemon's ``peak_growth_over_idle`` stayed within its design bound
+ 16 MiB (allocator slack: RSS is what the kernel counts, freed-but-cached memory included).

A benchmark, not a test: nothing under ``meshd/`` is changed; exit status 1 if a run failed or
did not verify or stay bounded.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np
from channels import DemoMesh, _size_name, parse_size

SENDER, RECEIVER = "site-s", "site-r"
APP_TIMEOUT = 60.0
"""Longest wait for an app to be ready, to take its warm-up messages, or to finish draining."""
SILENCE = 30.0
"""A draining receiver that gets nothing for this long stops and reports what it has."""
MiB = 1 << 20
RX_QUEUE, TX_QUEUE = 4 + 1, 8 + 1
"""Batches in an ipc queue: the HWM (daemon's PUSH SNDHWM 4 / app's PULL RCVHWM 4; app's PUSH
SNDHWM 8 / daemon's PULL RCVHWM 8) plus the one the process is working on."""
SLACK = 16 * MiB


# --- /proc ---------------------------------------------------------------------------------------

def proc_mem(pid: int) -> dict[str, int] | None:
    """``{"rss": VmRSS, "hwm": VmHWM}`` in bytes, or None once the process is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key[2:].lower()] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        return None
    return out if len(out) == 2 else None


# --- the apps (each in its own spawned process) -------------------------------------------------

def _payload(template: np.ndarray, i: int) -> np.ndarray:
    a = template.copy()
    a[:8].view("<u8")[0] = i
    return a


def _template(size: int) -> np.ndarray:
    return np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)


def receiver_app(conn: Any, home: str, name: str, size: int, warm: int, drain: Any,
                 total: Any) -> None:
    """Take ``warm`` messages, say ``stalled``, read nothing until ``drain``, then read until
    ``total`` (set by the sender once it is done) messages and report."""
    import meshd

    template = _template(size)
    parent = os.getppid()
    got = 0
    bad: list[str] = []

    def check(msg: Any) -> None:
        nonlocal got
        a = msg.array
        if len(bad) < 5:
            if msg.seq != got:
                bad.append(f"message {got}: seq {msg.seq}")
            elif a.dtype != np.uint8 or a.shape != (size,):
                bad.append(f"message {got}: {a.dtype} {a.shape}")
            elif int(a[:8].view("<u8")[0]) != got:
                bad.append(f"message {got}: counter {int(a[:8].view('<u8')[0])}")
            elif not np.array_equal(a[8:], template[8:]):
                bad.append(f"message {got}: contents differ from the pattern")
        got += 1

    with meshd.connect(home=home) as mesh:
        rx = mesh.receiver(name)
        conn.send(("ready", os.getpid()))
        while got < warm:
            check(rx.recv(timeout=APP_TIMEOUT))
        conn.send(("stalled", got))
        while not drain.wait(1.0):  # the stall: nothing is read
            if os.getppid() != parent:
                return
        t0 = time.monotonic()
        last = t0
        extra = 0
        while True:
            try:
                msg = rx.recv(timeout=0.5)
            except TimeoutError:
                n = total.value
                if n >= 0 and got >= n:
                    break  # everything arrived, and 0.5 s of nothing after it
                if time.monotonic() - last > SILENCE:
                    bad.append(f"nothing for {SILENCE:.0f} s after {got} messages")
                    break
                continue
            last = time.monotonic()
            if 0 <= total.value <= got:
                extra += 1
            check(msg)
        mem = proc_mem(os.getpid()) or {}
        rx.close()
    n = total.value
    if n >= 0 and got != n:
        bad.append(f"received {got} of {n} messages")
    conn.send(("result", {"received": got, "extra": extra, "ok": not bad, "errors": bad,
                          "drain_s": round(last - t0, 2), "rss_end": mem.get("rss"),
                          "hwm": mem.get("hwm")}))


def sender_app(conn: Any, home: str, name: str, size: int, stop: Any, sent: Any,
               total: Any) -> None:
    """Send numbered arrays until ``stop``; then flush, close and report."""
    import meshd

    template = _template(size)
    with meshd.connect(home=home) as mesh:
        tx = mesh.sender(name, to=RECEIVER)
        conn.send(("ready", os.getpid()))
        i = 0
        while not stop.is_set():
            tx.send(_payload(template, i))
            i += 1
            sent.value = i
        t0 = time.monotonic()
        tx.flush(timeout=APP_TIMEOUT)
        flush_s = time.monotonic() - t0
        row = next((c for c in mesh.channels() if c.get("id") == tx.id), None)
        total.value = i
        mem = proc_mem(os.getpid()) or {}
        tx.close()
    conn.send(("result", {"sent": i, "flush_s": round(flush_s, 2), "channel": row,
                          "rss_end": mem.get("rss"), "hwm": mem.get("hwm")}))


def _app_main(target: Any, conn: Any, *args: Any) -> None:
    try:
        target(conn, *args)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
    finally:
        conn.close()


class App:
    """One spawned app process and the pipe it reports on."""

    def __init__(self, ctx: Any, role: str, target: Any, *args: Any) -> None:
        self.role = role
        self.conn, child = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_app_main, args=(target, child, *args), daemon=True,
                                name=f"bench-{role}")
        self.proc.start()
        child.close()
        self.pid: int = self.proc.pid
        self.got: dict[str, Any] = {}

    def expect(self, kind: str, timeout: float) -> Any:
        """The app's next report of ``kind``; raises on its error, its death or a timeout."""
        deadline = time.monotonic() + timeout
        while kind not in self.got:
            self.poll(max(0.0, deadline - time.monotonic()))
            if kind not in self.got and time.monotonic() >= deadline:
                raise TimeoutError(f"the {self.role} app: no {kind!r} within {timeout:.0f} s")
        return self.got[kind]

    def poll(self, timeout: float = 0.0) -> None:
        if self.conn.closed or not self.conn.poll(timeout):
            return
        try:
            kind, value = self.conn.recv()
        except EOFError:
            self.conn.close()
            self.proc.join(2)
            raise RuntimeError(f"the {self.role} app died (exit code {self.proc.exitcode})"
                               ) from None
        if kind == "error":
            raise RuntimeError(f"the {self.role} app: {value}")
        self.got[kind] = value

    def close(self) -> None:
        self.proc.join(3)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


# --- one run -------------------------------------------------------------------------------------

class Sampler(threading.Thread):
    """Samples RSS of ``pids`` and both daemons' channel rows every ``interval`` s (and on
    ``now()``)."""

    def __init__(self, mesh: DemoMesh, pids: dict[str, int], sent: Any, name: str,
                 interval: float) -> None:
        super().__init__(daemon=True, name="sampler")
        from meshd.app.client import Client

        self.pids = pids
        self.sent = sent
        self.interval = interval
        self.channel = name
        self.clients = {n: Client(mesh.home(n), timeout=5) for n in (SENDER, RECEIVER)}
        self.t0 = time.monotonic()
        self.phase = "start"
        self.samples: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.now()

    def now(self) -> dict[str, Any]:
        """Take one sample now (thread-safe) and return it."""
        with self._lock:
            t = time.monotonic() - self.t0
            s: dict[str, Any] = {"t": round(t, 2), "phase": self.phase, "sent": self.sent.value,
                                 "rss": {}}
            for role, pid in self.pids.items():
                mem = proc_mem(pid)
                s["rss"][role] = mem["rss"] if mem else None
            for site, client in self.clients.items():
                try:
                    rows = [c for c in client.channels() if c.get("name") == self.channel]
                except Exception as exc:  # noqa: BLE001 - a missed sample, noted
                    if len(self.errors) < 5:
                        self.errors.append(f"channels() at {site}, t={t:.0f}: {exc}")
                    continue
                for row in rows:
                    if row.get("direction") == "out":
                        s["buffered_bytes"] = row.get("buffered_bytes")
                        s["acked_messages"] = row.get("acked_messages")
                    elif row.get("direction") == "in":
                        s["held_bytes"] = row.get("held_bytes")
                        s["held_messages"] = row.get("held_messages")
                        s["delivered_messages"] = row.get("messages")
            self.samples.append(s)
            return s

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        for client in self.clients.values():
            client.close()


def _window_of(setting: int | None) -> int:
    from meshd.state.config import Config

    return setting if setting is not None else Config().channel_window_bytes


def expected_growth(window: int, size: int) -> dict[str, int]:
    """The design bound on each process's RSS growth over idle, in bytes (see the docstring)."""
    from meshd.app.streams import RING_BYTES

    batch = size + 256  # one message per batch: count, entry, msgpack header and the frame
    # Each daemon also maps a shared-memory ring (the receiver's, which it fills; the sending
    # app's, which it reads): RSS counts the ring's pages once the daemon has touched them.
    return {"receiver_daemon": window + RX_QUEUE * batch + RING_BYTES,
            "sender_daemon": window + TX_QUEUE * batch + RING_BYTES,
            "receiver_app": RX_QUEUE * batch,
            "sender_app": (TX_QUEUE + 1) * batch}


def one_run(setting: int | None, size: int, stall: float, warm: int, after: float,
            interval: float, progress: Any) -> dict[str, Any]:
    window = _window_of(setting)
    config = {} if setting is None else {"channel_window_bytes": setting}
    name = f"memory-{uuid.uuid4().hex[:8]}"
    ctx = mp.get_context("spawn")
    drain, stop = ctx.Event(), ctx.Event()
    sent, total = ctx.Value("q", 0, lock=False), ctx.Value("q", -1, lock=False)
    result: dict[str, Any] = {"window": "default" if setting is None else setting,
                              "window_bytes": window, "size": size, "stall_s": stall}
    mesh = DemoMesh({RECEIVER: config, SENDER: config}, prefix="meshd-bench-memory-")
    apps: list[App] = []
    sampler: Sampler | None = None
    t_start = time.monotonic()
    try:
        mesh.start()
        pids = {"sender_daemon": mesh.procs[SENDER].pid,
                "receiver_daemon": mesh.procs[RECEIVER].pid}
        time.sleep(1.0)
        idle = {role: (proc_mem(pid) or {}).get("rss") for role, pid in pids.items()}
        progress(f"window {_size_name(window)}: mesh up; receiver app takes {warm} messages")
        rx = App(ctx, "receiver", receiver_app, str(mesh.home(RECEIVER)), name, size, warm,
                 drain, total)
        apps.append(rx)
        pids["receiver_app"] = rx.expect("ready", APP_TIMEOUT)
        tx = App(ctx, "sender", sender_app, str(mesh.home(SENDER)), name, size, stop, sent,
                 total)
        apps.append(tx)
        pids["sender_app"] = tx.expect("ready", APP_TIMEOUT)
        sampler = Sampler(mesh, pids, sent, name, interval)
        sampler.start()
        rx.expect("stalled", APP_TIMEOUT)
        sampler.phase = "stall"
        first = sampler.now()
        progress(f"window {_size_name(window)}: receiver stalls for {stall:g} s")
        half = None
        end = time.monotonic() + stall
        while (left := end - time.monotonic()) > 0:
            if half is None and left <= stall / 2:
                half = sampler.now()
            for app in apps:
                app.poll(min(0.5, max(0.0, left)))  # raises if an app failed meanwhile
        last = sampler.now()
        sampler.phase = "drain"
        drain.set()
        progress(f"window {_size_name(window)}: draining; sender stops in {after:g} s")
        time.sleep(after)
        stop.set()
        sres = tx.expect("result", APP_TIMEOUT)
        rres = rx.expect("result", APP_TIMEOUT + SILENCE)
        sampler.phase = "end"
        final = sampler.now()
        sampler.stop()
        daemons_end = {role: proc_mem(pid) or {} for role, pid in pids.items()
                       if role.endswith("daemon")}
        result.update(_summarize(sampler.samples, first, half or first, last, final, idle,
                                 daemons_end, rres, sres, window, size, warm))
        result["sampler_errors"] = sampler.errors
    except Exception as exc:  # noqa: BLE001 - one run fails, the next goes on
        tails = {n: mesh.log_tail(n, 3) for n in (SENDER, RECEIVER)}
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["daemon_logs"] = tails
    finally:
        drain.set()
        stop.set()
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        for app in apps:
            app.close()
        mesh.close()
    result["run_s"] = round(time.monotonic() - t_start, 1)
    return result


def _summarize(samples: list[dict[str, Any]], first: dict[str, Any], half: dict[str, Any],
               last: dict[str, Any], final: dict[str, Any], idle: dict[str, Any],
               daemons_end: dict[str, dict[str, int]], rres: dict[str, Any],
               sres: dict[str, Any], window: int, size: int, warm: int) -> dict[str, Any]:
    bound = expected_growth(window, size)
    stall_samples = [s for s in samples if s["phase"] == "stall"]
    procs: dict[str, Any] = {}
    bounded = True
    for role in ("sender_app", "sender_daemon", "receiver_daemon", "receiver_app"):
        series = [s["rss"].get(role) for s in samples if s["rss"].get(role)]
        start, mid, end = first["rss"].get(role), half["rss"].get(role), last["rss"].get(role)
        if role.endswith("daemon"):
            hwm, fin = daemons_end[role].get("hwm"), daemons_end[role].get("rss")
            base = idle.get(role)
        else:
            res = rres if role == "receiver_app" else sres
            hwm, fin, base = res.get("hwm"), res.get("rss_end"), None
        peak = max(series) if series else None
        row = {"idle": base, "stall_start": start, "stall_end": end,
               "growth_stall": _sub(end, start), "growth_second_half": _sub(end, mid),
               "peak_sampled": peak, "hwm": hwm, "final": fin,
               "peak_growth_over_idle": _sub(max(peak or 0, hwm or 0), base),
               "design_bound_growth": bound[role]}
        flat = row["growth_second_half"] is not None \
            and row["growth_second_half"] <= max(2 * MiB, 2 * size)
        within = row["peak_growth_over_idle"] is None \
            or row["peak_growth_over_idle"] <= bound[role] + SLACK
        row["bounded"] = bool(flat and within)
        bounded = bounded and row["bounded"]
        procs[role] = row
    gains = [(s["t"], s["sent"]) for s in stall_samples]
    moved = [t for (t, n), (_, prev) in zip(gains[1:], gains[:-1], strict=True) if n != prev]
    held = [s.get("held_bytes") or 0 for s in stall_samples]
    buffered = [s.get("buffered_bytes") or 0 for s in stall_samples]
    return {
        "processes": procs,
        "sent_before_stall": first["sent"],
        "sent_during_stall": last["sent"] - first["sent"],
        "in_flight_at_stall_end": last["sent"] - warm,
        "sender_last_progress_s": round(moved[-1] - first["t"], 1) if moved else 0.0,
        "max_held_bytes": max(held, default=0),
        "held_bytes_at_stall_end": last.get("held_bytes"),
        "held_messages_at_stall_end": last.get("held_messages"),
        "max_buffered_bytes": max(buffered, default=0),
        "buffered_bytes_at_stall_end": last.get("buffered_bytes"),
        "daemons_growth_over_idle_peak": _sum(procs[r]["peak_growth_over_idle"]
                                              for r in ("sender_daemon", "receiver_daemon")),
        "daemons_design_bound": bound["sender_daemon"] + bound["receiver_daemon"],
        "sent_total": sres["sent"], "received_total": rres["received"],
        "extra_messages": rres["extra"], "flush_s": sres["flush_s"], "drain_s": rres["drain_s"],
        "retransmits": (sres.get("channel") or {}).get("retransmits"),
        "verified": bool(rres["ok"] and rres["received"] == sres["sent"]),
        "verify_errors": rres["errors"],
        "bounded": bounded,
        "samples": [{k: v for k, v in s.items()} for s in samples],
    }


def _sub(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a - b


def _sum(xs: Any) -> int | None:
    xs = list(xs)
    return None if any(x is None for x in xs) else sum(xs)


# --- output --------------------------------------------------------------------------------------

def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MiB:,.1f}"


def print_table(report: dict[str, Any]) -> None:
    print(f"meshd daemon memory while the receiving app stalls: {report['size_name']} arrays,"
          f" stall {report['stall_s']:g} s; {report['machine']}")
    for r in report["runs"]:
        label = "default" if r["window"] == "default" else "config"
        print(f"\nchannel_window_bytes {_size_name(r['window_bytes'])} ({label})")
        if "error" in r:
            print(f"  FAILED: {r['error']}")
            for site, tail in r.get("daemon_logs", {}).items():
                print(f"  {site} log: {tail}")
            continue
        print(f"  {'MiB':<16}{'idle':>7}{'stall@0':>9}{'stall@end':>10}{'growth':>8}"
              f"{'2nd half':>9}{'peak':>8}{'VmHWM':>8}{'final':>8}{'pk-idle':>8}{'bound':>8}  ok")
        for role, p in r["processes"].items():
            print(f"  {role:<16}{_mib(p['idle']):>7}{_mib(p['stall_start']):>9}"
                  f"{_mib(p['stall_end']):>10}{_mib(p['growth_stall']):>8}"
                  f"{_mib(p['growth_second_half']):>9}{_mib(p['peak_sampled']):>8}"
                  f"{_mib(p['hwm']):>8}{_mib(p['final']):>8}"
                  f"{_mib(p['peak_growth_over_idle']):>8}"
                  f"{_mib(p['design_bound_growth']):>8}  {'yes' if p['bounded'] else 'NO'}")
        print(f"  (pk-idle: max(peak, VmHWM) - idle; bound: its design bound; both daemons:"
              f" {_mib(r['daemons_growth_over_idle_peak'])} MiB of"
              f" {_mib(r['daemons_design_bound'])} MiB)")
        print(f"  sent during the stall: {r['sent_during_stall']} messages,"
              f" {r['in_flight_at_stall_end']} sent but not read at its end"
              f" (last one through {r['sender_last_progress_s']:g} s into it);"
              f" receiving daemon held {_mib(r['held_bytes_at_stall_end'])} MiB"
              f" ({r['held_messages_at_stall_end']} batches) at its end, max"
              f" {_mib(r['max_held_bytes'])}; sender's resend buffer max"
              f" {_mib(r['max_buffered_bytes'])} MiB, {_mib(r['buffered_bytes_at_stall_end'])}"
              f" at the end")
        verdict = "ok" if r["verified"] else "FAILED " + "; ".join(r["verify_errors"])
        print(f"  verified: {verdict} ({r['received_total']} of {r['sent_total']} received,"
              f" {r['extra_messages']} extra, retransmits {r['retransmits']});"
              f" bounded: {'yes' if r['bounded'] else 'NO'}; run {r['run_s']:g} s")
        for err in r.get("sampler_errors", []):
            print(f"  sampler: {err}")


def _machine() -> str:
    import platform

    import zmq

    return (f"{os.cpu_count()} CPUs, Python {platform.python_version()}, pyzmq {zmq.__version__}"
            f" / libzmq {zmq.zmq_version()}")


def parse_window(text: str) -> int | None:
    if text.strip().lower() == "default":
        return None
    n = parse_size(text)
    if n < 17 * MiB:
        raise argparse.ArgumentTypeError("channel_window_bytes must be at least 17 MiB")
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Details: the module docstring of bench/channel_memory.py.")
    p.add_argument("--stall", type=float, default=60.0,
                   help="seconds the receiving app reads nothing (default 60)")
    p.add_argument("--size", type=parse_size, default=MiB, help="array size (default 1MiB)")
    p.add_argument("--windows", default="default,32MiB",
                   type=lambda t: [parse_window(x) for x in t.split(",") if x.strip()],
                   help="channel_window_bytes per run: 'default' or a size >= 17MiB"
                        " (default: default,32MiB)")
    p.add_argument("--warm", type=int, default=8, help="messages read before the stall")
    p.add_argument("--after", type=float, default=5.0,
                   help="seconds the sender keeps sending once the receiver drains")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    p.add_argument("--json", action="store_true", help="print one JSON object (default: a table)")
    p.add_argument("--samples", action="store_true", help="keep the per-second samples in --json")
    args = p.parse_args(argv)
    if args.stall <= 0 or args.after < 0 or args.warm < 1 or not args.windows \
            or args.interval <= 0:
        p.error("--stall and --interval must be positive, --after >= 0, --warm >= 1,"
                " --windows not empty")
    if not 8 <= args.size <= 16 * MiB:
        p.error("--size must be 8 B .. 16 MiB")

    def progress(text: str) -> None:
        if not args.json:
            print(f"  {text}", file=sys.stderr, flush=True)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through every run's teardown

    signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    runs = []
    try:
        for setting in args.windows:
            r = one_run(setting, args.size, args.stall, args.warm, args.after, args.interval,
                        progress)
            if not args.samples:
                r.pop("samples", None)
            runs.append(r)
    except KeyboardInterrupt:
        print("interrupted; daemons and apps stopped", file=sys.stderr)
        return 130
    report = {"machine": _machine(), "size": args.size, "size_name": _size_name(args.size),
              "stall_s": args.stall, "runs": runs, "total_s": round(time.monotonic() - t0, 1)}
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    ok = all("error" not in r and r["verified"] and r["bounded"] for r in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
