"""``meshd expose | unexpose | services | connect | disconnect | tunnels``: thin callers of
:class:`meshd.app.client.Client` (the daemon checks everything)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from meshd.app.client import Client
from meshd.errors import LocalError

Out = Callable[[argparse.Namespace, Any, Any], None]
Table = Callable[[list[list[str]], list[str]], str]
Size = Callable[[float], str]


def _ref(text: str) -> tuple[str, str]:
    site, sep, name = text.partition("/")
    if not sep or not site or not name:
        raise LocalError(f"{text!r} is not SITE/NAME", reason="usage")
    return site, name


def register(add: Callable[..., argparse.ArgumentParser], out: Out, table: Table,
             size: Size) -> None:
    """Add the tunnel subcommands with the main parser's ``add``, ``_out``, ``_table``, ``_size``."""

    def cmd_expose(args: argparse.Namespace) -> int:
        allow = [a.strip() for a in args.allow.split(",") if a.strip()]
        r = Client(args.home).expose(args.name, args.target, allow, update=args.update)
        out(args, r, f"exposed {r['name']} -> {r['target']} to {', '.join(r['allow'])}")
        return 0

    def cmd_unexpose(args: argparse.Namespace) -> int:
        r = Client(args.home).unexpose(args.name)
        out(args, r, f"unexposed {r['name']} ({r['target']})")
        return 0

    def cmd_services(args: argparse.Namespace) -> int:
        client = Client(args.home)
        if args.remote:
            rows = client.services(remote=True)
            out(args, rows, lambda: table(
                [[r["site"], r["name"], "yes" if r["connected"] else "no"] for r in rows],
                ["SITE", "SERVICE", "CONNECTED"]) if rows else "no member exposes a service"
                " to this site")
            return 0
        rows = client.services()
        out(args, rows, lambda: table(
            [[r["name"], r["target"], ",".join(r["allow"]), str(r["connections"]),
              size(r["bytes"])] for r in rows],
            ["NAME", "TARGET", "ALLOW", "CONNECTIONS", "BYTES"]) if rows
            else "this site exposes no service")
        return 0

    def cmd_connect(args: argparse.Namespace) -> int:
        site, name = _ref(args.ref)
        r = Client(args.home).connect_tunnel(site, name, args.listen)
        note = "" if r.get("checked") else f" ({site} did not answer; not checked yet)"
        out(args, r, f"{r['site']}/{r['service']} listening on {r['listen']}{note}")
        return 0

    def cmd_disconnect(args: argparse.Namespace) -> int:
        site, name = _ref(args.ref)
        r = Client(args.home).disconnect_tunnel(site, name)
        out(args, r, f"disconnected {r['site']}/{r['service']} ({r['listen']})")
        return 0

    def cmd_tunnels(args: argparse.Namespace) -> int:
        rows = Client(args.home).tunnels()

        def path(r: dict[str, Any]) -> str:
            if r["path"] is None:
                return str(r["state"])
            return f"relay via {r['relay']}" if r["relay"] else str(r["path"])

        out(args, rows, lambda: table(
            [[f"{r['site']}/{r['service']}", r["listen"], path(r), str(r["connections"]),
              size(r["bytes"]), size(r["rate_Bps"]) + "/s", (r["error"] or "")[:60]]
             for r in rows],
            ["SERVICE", "LISTEN", "PATH", "CONNECTIONS", "BYTES", "RATE", "LAST ERROR"]) if rows
            else "no tunnels")
        return 0

    sp = add("expose", cmd_expose, "expose a TCP service of this site to members by name")
    sp.add_argument("name", help="the service's name, e.g. detector")
    sp.add_argument("target", metavar="HOST:PORT", help="where this daemon connects for it")
    sp.add_argument("--allow", required=True, metavar="SITE[,SITE...]",
                    help="the sites that may connect ('*': every member)")
    sp.add_argument("--update", action="store_true",
                    help="replace an existing exposure (connections no longer allowed are cut)")
    sp = add("unexpose", cmd_unexpose, "stop exposing a service (its open connections are cut)")
    sp.add_argument("name")
    sp = add("services", cmd_services, "list the services this site exposes")
    sp.add_argument("--remote", action="store_true",
                    help="list the services other members expose to this site instead")
    sp = add("connect", cmd_connect, "listen locally for a service another site exposes")
    sp.add_argument("ref", metavar="SITE/NAME")
    sp.add_argument("--listen", metavar="[ADDR:]PORT",
                    help="where local clients connect (default 127.0.0.1 and a free port)")
    sp = add("disconnect", cmd_disconnect, "stop a tunnel made by connect")
    sp.add_argument("ref", metavar="SITE/NAME")
    add("tunnels", cmd_tunnels, "list this site's tunnels: service, listen address, path,"
        " connections, bytes, rate")
