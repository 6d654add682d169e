"""The ``meshd`` command line: every subcommand but ``init``, ``run`` and ``demo`` is a thin
caller of :class:`meshd.app.client.Client`.

Exit status: 0 success, 1 the request failed (the message says why), 2 usage error,
3 no daemon is running for the state directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import stat
import sys
import time
from typing import Any, Callable

from meshd import __version__
from meshd.app.client import Client
from meshd.errors import DaemonNotRunning, LocalError, MeshdError
from meshd.state.home import Home, HomeLock, resolve_home
from meshd.testing.processes import wait_until
from meshd.trust import tokens

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str) -> float:
    """Parse ``90s``, ``10m``, ``72h``, ``3d``, ``1w`` or plain seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 10m, 72h or 3d")
    return float(m.group(1)) * _UNITS.get(m.group(2) or "s", 1)


def _out(args: argparse.Namespace, data: Any, text: str | Callable[[], str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(text() if callable(text) else text)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- subcommands -----------------------------------------------------------------------------------

def cmd_init(args: argparse.Namespace) -> int:
    from meshd.state.site import init_site

    home = Home(resolve_home(args.home))
    listen = "" if args.no_listen else args.listen
    key = init_site(home, args.name, listen)
    data = {"name": args.name, "site_id": key.site_id, "fingerprint": key.fingerprint,
            "home": str(home.root), "listen": listen if listen is not None else "0.0.0.0:4750"}
    _out(args, data, lambda: (
        f"Created site {args.name} in {home.root}\n"
        f"  site id      {key.site_id}\n  fingerprint  {key.fingerprint}\n"
        f"  peer port    {data['listen'] or 'none (this site only dials out)'}\n"
        f"Start it with: meshd run --home {home.root}"))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from meshd.state import config as config_mod
    from meshd.daemon.app import Daemon
    from meshd.daemon.host import keep_freed_memory

    home = Home(resolve_home(args.home))
    home.require()
    level = args.log_level or config_mod.load(home.config_path).log_level
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    keep_freed_memory()
    lock = HomeLock(home)
    if not lock.try_acquire():
        _wait_for_stopping_daemon(home, lock)
    asyncio.run(Daemon(home, lock=lock).serve_forever())
    return 0


def _wait_for_stopping_daemon(home: Home, lock: HomeLock, timeout: float = 30.0) -> None:
    """Another daemon holds the home: wait for it if it is stopping (a restart right after a
    stop), refuse at once if it runs on."""
    try:
        stopping = bool(Client(home.root, timeout=5).status().get("stopping"))
    except DaemonNotRunning:  # no control socket: the last steps of a stop (or the first of a start)
        stopping = True
    except MeshdError:
        stopping = False
    if not stopping:
        raise lock.refusal()
    pid = home.running_pid()
    _say(f"waiting for the daemon that is stopping{f' (pid {pid})' if pid else ''} ...")
    try:
        wait_until(lock.try_acquire, timeout, "the home's lock")
    except TimeoutError:  # it was starting, not stopping, or it hangs
        raise lock.refusal() from None


def cmd_status(args: argparse.Namespace) -> int:
    s = Client(args.home).status()
    _out(args, s, lambda: "\n".join([
        f"site         {s['name']}  ({s['site_id']})",
        f"fingerprint  {s['fingerprint']}",
        f"mesh         {s['mesh_name'] or '-'}  ({s['mesh_id'] or 'none yet: meshd invite founds one'})",
        f"role         {s['role'] or '-'}",
        f"peer port    {s['listen'] or 'none (dial-out only)'}",
        f"addresses    {', '.join(s['addrs']) or '-'}",
        f"members      {s['members']}",
        f"tunnels      {s.get('tunnels', 0)} (exposed services: {s.get('exposed', 0)})",
    ]))
    return 0


def cmd_invite(args: argparse.Namespace) -> int:
    r = Client(args.home).invite(name=args.name or "", expires=args.expires, uses=args.uses,
                                 role=args.role, approve=args.approve)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        sys.stdout.write(r["token"])
    return 0


_COUNT_LIMIT = 64 << 20
"""An oversized invitation read from a stream is counted (for the refusal) up to this much; a
stream without end (``/dev/zero``, ``yes |``) is then refused as "more than" it."""


def _read_invitation(path: str | None) -> bytes:
    """The raw bytes of FILE or stdin, at most ``tokens.MAX_INPUT``; the size of anything
    larger is taken from the file, or counted (not kept, up to :data:`_COUNT_LIMIT`) from a
    stream, so the refusal can state it."""
    more = False
    try:
        with open(path, "rb") if path else contextlib.nullcontext(sys.stdin.buffer) as f:
            data = f.read(tokens.MAX_INPUT + 1)
            size = len(data)
            if size > tokens.MAX_INPUT:
                st = os.fstat(f.fileno())
                if stat.S_ISREG(st.st_mode):
                    size = max(size, st.st_size)
                else:
                    while (chunk := f.read(1 << 20)) and not more:
                        size += len(chunk)
                        more = size >= _COUNT_LIMIT
    except OSError as exc:
        raise LocalError(f"cannot read {path or 'stdin'}: {exc.strerror or exc}", reason="usage") from None
    tokens.check_size(size, more=more)
    return data


def cmd_join(args: argparse.Namespace) -> int:
    # The mail is read here, in this process, and only the token goes to the daemon.
    inv = tokens.parse(_read_invitation(args.file))
    client = Client(args.home)
    j = client.join(tokens.encode(inv))
    deadline = time.monotonic() + args.wait
    told_pending = False
    if not args.json:
        _say(f"Joining the mesh of {j['inviter']} (fingerprint {j['inviter_fingerprint']}) ...")
    while j["state"] in ("connecting", "pending"):
        if j["state"] == "pending" and not told_pending and not args.json:
            told_pending = True
            _say(f"Waiting for the inviter's admin to approve. Compare fingerprints by phone:\n"
                 f"  this site    {j['fingerprint']}\n"
                 f"  the inviter  {j['inviter_fingerprint']}  ({j['inviter_name'] or '?'})\n"
                 f"They approve with: meshd approve {j['fingerprint']}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        j = client.join_state(j["id"], wait=min(remaining, 30.0), state=j["state"])
    if args.json:
        print(json.dumps(j, indent=2))
    if j["state"] == "admitted":
        if not args.json:
            print(f"Joined: this site is now a member of the mesh of {j['inviter_name'] or j['inviter']}.")
        return 0
    if j["state"] == "failed":
        err = j["error"] or {}
        if not args.json:
            _say(f"meshd: join failed: {err.get('message', '?')}")
        return 1
    if not args.json:
        _say(f"meshd: no decision within {args.wait:.0f} s; the join is still {j['state']}."
             " Run meshd join again to keep waiting.")
    return 1


def cmd_pending(args: argparse.Namespace) -> int:
    rows = Client(args.home).pending()
    _out(args, rows, lambda: _table(
        [[r["name"], r["fingerprint"], r["site_id"][:12], ",".join(r["addrs"]) or "-",
          time.strftime("%H:%M:%S", time.localtime(r["since"]))] for r in rows],
        ["NAME", "FINGERPRINT", "SITE", "ADDRESSES", "SINCE"]) if rows else "no pending joins")
    return 0


def cmd_decide(args: argparse.Namespace) -> int:
    client = Client(args.home)
    r = client.approve(args.fingerprint) if args.command == "approve" else client.deny(args.fingerprint)
    _out(args, r, f"{r['state']}: {r['name']} ({r['fingerprint']})")
    return 0


def cmd_peers(args: argparse.Namespace) -> int:
    if args.discovered:
        seen = Client(args.home).peers(discovered=True)
        _out(args, seen, lambda: _table(
            [[r["name"], "member" if r["member"] else "not a member", r["fingerprint"],
              r["site_id"][:12], ",".join(r["addrs"])] for r in seen],
            ["NAME", "TRUST", "FINGERPRINT", "SITE", "LAN ADDRESSES"]) if seen
            else "no meshd daemons seen on the LAN")
        return 0
    rows = Client(args.home).peers(revoked=args.revoked)
    now = time.time()

    def ago(t: float | None) -> str:
        return "-" if t is None else f"{max(0.0, now - t):.1f}s"

    _out(args, rows, lambda: _table(
        [[r["name"] + (" *" if r["self"] else ""), r["state"], r["role"] or "-",
          str(r["incarnation"]), "-" if r["rtt_ms"] is None else f"{r['rtt_ms']:.1f}ms",
          "-" if r["self"] else ago(r["last_seen"]), r["reached"],
          "-" if r["self"] else f"{r['we_dial']}/{r['dials_us']}", r["fingerprint"],
          ",".join(r["addrs"]) or "(dials out)", "yes" if r["verified"] else "no"] for r in rows],
        ["NAME", "STATE", "ROLE", "INC", "RTT", "SEEN", "REACHED", "DIAL OUT/IN", "FINGERPRINT",
         "ADDRESSES", "VERIFIED"]) if rows else "no sites")
    return 0


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}TB"


def cmd_channels(args: argparse.Namespace) -> int:
    rows = Client(args.home).channels()

    def path(r: dict[str, object]) -> str:
        if r["path"] is None:
            return "-"
        return f"relay via {r['relay']}" if r["path"] == "relay" and r["direction"] != "relay" \
            else str(r["path"])

    _out(args, rows, lambda: _table(
        [[r["name"] or "-", r["direction"], r["peer"], path(r), r["state"], _size(r["bytes"]),
          "-" if r["messages"] is None else str(r["messages"]), _size(r["rate_Bps"]) + "/s",
          "-" if r.get("retransmits") is None else str(r["retransmits"])] for r in rows],
        ["NAME", "DIR", "PEER", "PATH", "STATE", "BYTES", "MESSAGES", "RATE", "RESENT"])
        if rows else "no channels")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    for event in Client(args.home).events(history=not args.new):
        if args.json:
            print(json.dumps(event), flush=True)
        else:
            extra = f" by {event['by'][:12]}" if "by" in event else ""
            inc = f" inc {event['incarnation']}" if "incarnation" in event else ""
            stamp = time.strftime("%H:%M:%S", time.localtime(event["time"]))
            print(f"{stamp}  {event['type']:<9} {event['name'] or '?':<12}"
                  f" {event['site_id'][:12]}{inc}{extra}", flush=True)
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    r = Client(args.home).revoke(args.site, args.reason or "")
    _out(args, r, f"revoked {r['name']} ({r['revoked']}); every member is being told")
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    r = Client(args.home).rotate()
    _out(args, r, f"rotated: this site is now {r['site_id']} (fingerprint {r['fingerprint']});"
                  f" {r['old_site_id']} is retired. Invitations issued before no longer work.")
    if r.get("told", 0) < r.get("members", 0):
        _say(f"warning: only {r['told']} of {r['members']} members heard of the rotation. A"
             " member that missed it learns it from another member, or from this site when it"
             " next reaches that member (see docs/architecture.md, key rotation)")
    return 0


def _running(pid: int) -> bool:
    """Whether daemon ``pid`` is still there: the process is a meshd or on its way out.  Gone:
    no such process, a zombie (dead, not yet reaped by its parent), or another program (the
    pid reused).  (Not the pid file: a home renamed under the daemon keeps a stale one.)"""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (OSError, IndexError):
        return False
    return not cmdline or b"meshd" in cmdline  # empty: exiting, its memory already let go


def cmd_stop(args: argparse.Namespace) -> int:
    client = Client(args.home, timeout=max(min(args.timeout, 30.0), 0.5))
    try:
        pid = int(client.status()["pid"])
    except MeshdError as exc:
        # Its control socket may be closed already, late in a stop another caller (or a
        # signal) began: then the pid file names a meshd still on its way out; wait for it.
        late = client.home.running_pid()
        if exc.reason not in ("not-running", "disconnected") or late is None or not _running(late):
            raise
        pid = late
    else:
        try:
            client.stop()
        except MeshdError as exc:
            if exc.reason != "stopping":  # already on its way out: wait like the first caller
                raise
    if not args.json:
        _say(f"stopping meshd (pid {pid}) for {client.home.root} ...")
    start = time.monotonic()
    try:
        wait_until(lambda: not _running(pid), args.timeout, "the daemon to stop")
    except TimeoutError:
        raise LocalError(f"the daemon (pid {pid}) did not stop within {args.timeout:.0f} s;"
                         f" it is still running (kill -KILL {pid} ends it at once)",
                         reason="timeout") from None
    took = time.monotonic() - start
    _out(args, {"stopped": True, "pid": pid, "seconds": round(took, 3)},
         f"stopped meshd (pid {pid}) in {took:.1f} s")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from meshd.cli.demo import run_demo

    return run_demo(sites=args.sites, keep=args.keep, home=args.home, as_json=args.json)


# -- parser -------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", default=argparse.SUPPRESS,
                        help="state directory (default: $MESHD_HOME or the per-user data dir)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print machine-readable JSON")
    p = argparse.ArgumentParser(prog="meshd", parents=[common],
                                description="A peer-to-peer mesh of scientific sites.")
    p.add_argument("--version", action="version", version=f"meshd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, parents=[common], help=help, description=help)
        sp.set_defaults(func=func)
        return sp

    sp = add("init", cmd_init, "create this site's identity and state directory")
    sp.add_argument("--name", required=True, help="the site's name, e.g. aps-8id")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--listen", metavar="HOST:PORT", help="the one inbound peer port"
                   " (default 0.0.0.0:4750; port 0 picks a free one)")
    g.add_argument("--no-listen", action="store_true", help="open no port: this site only dials out")
    sp = add("run", cmd_run, "run the daemon in the foreground until SIGTERM or SIGINT")
    sp.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    sp = add("stop", cmd_stop, "stop the running daemon gracefully and wait until it is gone")
    sp.add_argument("--timeout", type=duration, default=30.0,
                    help="how long to wait for it (default 30s)")
    add("status", cmd_status, "show this site's identity and mesh")
    sp = add("invite", cmd_invite, "print an invitation token to send by email")
    sp.add_argument("--name", help="name hint for the invited site")
    sp.add_argument("--expires", type=duration, default=72 * 3600.0,
                    help="lifetime, e.g. 30m, 72h, 3d (default 72h)")
    sp.add_argument("--uses", type=int, default=1, help="how many sites may join with it (default 1)")
    sp.add_argument("--role", choices=["member", "introducer"], default="member",
                    help="role granted: introducers may invite others (default member)")
    sp.add_argument("--approve", action="store_true",
                    help="hold each join until `meshd approve FINGERPRINT`")
    sp = add("join", cmd_join, "join a mesh with an invitation (a token or a whole pasted email)")
    sp.add_argument("file", nargs="?", help="file holding the invitation (default: stdin)")
    sp.add_argument("--wait", type=duration, default=600.0,
                    help="how long to wait for an approval (default 10m)")
    add("pending", cmd_pending, "list joins waiting for approval")
    for name, text in (("approve", "admit a pending join"), ("deny", "refuse a pending join")):
        sp = add(name, cmd_decide, text)
        sp.add_argument("fingerprint", help="the joiner's fingerprint, as `meshd pending` shows it")
    sp = add("peers", cmd_peers, "list the mesh's members with their verified records")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--discovered", action="store_true",
                   help="list daemons seen on the LAN instead (members and strangers)")
    g.add_argument("--revoked", action="store_true", help="list the revoked sites instead")
    add("channels", cmd_channels, "list channels: outgoing, incoming and relayed, with path,"
        " bytes, messages, rate and retransmits")
    sp = add("events", cmd_events, "stream membership changes (joined, suspect, alive, dead,"
             " left, admitted, revoked) until interrupted")
    sp.add_argument("--new", action="store_true", help="skip the recent history")
    sp = add("revoke", cmd_revoke, "shut a site out of the mesh (name, site id or fingerprint)")
    sp.add_argument("site")
    sp.add_argument("--reason", default="")
    add("rotate", cmd_rotate, "retire this site's key and hand its membership to a new one")
    from meshd.cli.tunnels import register as register_tunnels

    register_tunnels(add, _out, _table, _size)
    sp = add("demo", cmd_demo, "run a demo mesh of several sites on this machine")
    sp.add_argument("--sites", type=int, default=3, help="number of sites (default 3)")
    sp.add_argument("--keep", action="store_true", help="leave the daemons running at the end")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.home = getattr(args, "home", None)
    args.json = getattr(args, "json", False)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # here, where a reader that left is caught, not at exit
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `meshd peers | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except MeshdError as exc:
        if args.json:
            print(json.dumps({"error": {"reason": exc.reason, "message": exc.message}}))
        print(f"meshd: error: {exc.message}", file=sys.stderr)
        return 3 if isinstance(exc, DaemonNotRunning) else 1
    except OSError as exc:  # the machine refused something (a file, a socket): one line
        print(f"meshd: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
