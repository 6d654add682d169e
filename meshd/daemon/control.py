"""The local control API: a route table over a unix socket (mode 0600) in the state directory.

Only the site's own user can open the socket, so every caller is trusted to act for the site; the
routes validate their JSON input and turn meshd errors into ``{"error": {reason, message}}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web

from meshd.channel.control import check_name
from meshd.daemon.admin import Admin
from meshd.daemon.channels.listing import describe as describe_sender
from meshd.daemon.channels.service import ChannelService
from meshd.daemon.joins import Joins
from meshd.daemon.membership import MembershipService
from meshd.daemon.reports import Reports
from meshd.daemon.tunnels.routes import add_routes as add_tunnel_routes
from meshd.daemon.tunnels.service import TunnelService
from meshd.errors import ChannelClosed, LocalError, MeshdError, RemoteError
from meshd.state.files import file_id, stale_socket, unlink_if_same
from meshd.local import api
from meshd.state.admission import PendingJoin
from meshd.state.store import Redemption
from meshd.state.view import MeshView
from meshd.trust import tokens
from meshd.trust.identity import fingerprint_of, site_id_of

log = logging.getLogger("meshd.daemon.control")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_CONNECTIONS = 256
"""Control connections held at once; beyond, the oldest that is not carrying out a complete
request (idle, or still sending its request) is closed for the new one."""
MAX_STREAMS = 64
"""``/v1/events`` streams at once (each may queue 10,000 events); beyond, 503 ``busy``."""


class _OneLinePerMinute(logging.Filter):
    """For aiohttp's own log of requests it could not parse: a line (without the traceback) at
    most once a minute, and a count in ``control_bad_http``, not a traceback per request."""

    def __init__(self, count: Callable[[], None]) -> None:
        super().__init__()
        self.count = count
        self.last = -60.0

    def filter(self, record: logging.LogRecord) -> bool:
        self.count()
        exc = record.exc_info[1] if record.exc_info else None
        record.exc_info, record.exc_text = None, None
        if exc is not None:
            record.msg, record.args = "%s: %s", (record.getMessage(), str(exc).splitlines()[0])
        if record.created - self.last < 60.0:
            return False
        self.last = record.created
        return True


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type="application/json")


async def _body(request: web.Request) -> dict[str, Any]:
    if request.content_length and request.content_length > 1 << 20:
        raise LocalError("request body too large", reason="usage")
    try:
        data = await request.json()
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deep
        raise LocalError("request body is not JSON", reason="usage") from None
    except RuntimeError:  # "Connection closed." before the body was complete
        raise ConnectionResetError("the client went away before its request was complete") \
            from None
    if not isinstance(data, dict):
        raise LocalError("request body must be a JSON object", reason="usage")
    return data


def _field(data: dict[str, Any], name: str, typ: type, default: Any = ...) -> Any:
    if name not in data or data[name] is None:
        if default is ...:
            raise LocalError(f"missing field {name!r}", reason="usage")
        return default
    value = data[name]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, typ) or (typ is not bool and isinstance(value, bool)):
        raise LocalError(f"field {name!r} must be {typ.__name__}", reason="usage")
    return value


def _channel_id(request: web.Request) -> bytes:
    """The channel id a route names (hex)."""
    try:
        return bytes.fromhex(request.match_info["id"])
    except ValueError:
        raise LocalError("a channel id is hex", reason="usage") from None


class ControlServer:
    """Serves the daemon's control routes on its unix socket, each by the service it concerns.

    ``rotate`` is the key rotation (``Rotation.rotate``)."""

    def __init__(self, *, view: MeshView, reports: Reports, admin: Admin, joins: Joins,
                 membership: MembershipService, channels: ChannelService,
                 rotate: Callable[[], Awaitable[tuple[bytes, bytes, tuple[int, int]]]],
                 tunnels: TunnelService | None = None) -> None:
        self.view = view
        self.reports = reports
        self.admin = admin
        self.joins = joins
        self.membership = membership
        self.channels = channels
        self.rotate_key = rotate
        self.counters = reports.counters.scoped("control_")
        self.app = web.Application(middlewares=[self._errors], client_max_size=1 << 20)
        self._http_log = logging.getLogger("meshd.daemon.control.http")
        self._http_log.filters[:] = [_OneLinePerMinute(lambda: self.counters.count("bad_http"))]
        self.app.add_routes([
            web.get(api.STATUS, self.status),
            web.post(api.INVITES, self.invite),
            web.post(api.JOINS, self.join),
            web.get(api.JOINS + "/{id}", self.join_state),
            web.get(api.PENDING, self.pending),
            web.post(api.APPROVE, self.approve),
            web.post(api.DENY, self.deny),
            web.get(api.PEERS, self.peers),
            web.post(api.REVOKE, self.revoke),
            web.post(api.ROTATE, self.rotate),
            web.get(api.METRICS, self.metrics),
            web.get(api.EVENTS, self.events),
            web.get(api.CHANNELS, self.list_channels),
            web.post(api.CHANNELS, self.open_sender),
            web.delete(api.CHANNELS + "/{id}", self.close_sender),
            web.post(api.CHANNELS + "/{id}/flush", self.flush),
            web.post(api.CHANNELS + "/{id}/ring", self.attach_ring),
            web.post(api.RECEIVERS, self.open_receiver),
            web.delete(api.RECEIVERS + "/{name}", self.close_receiver),
        ])
        self.tunnels = tunnels
        if tunnels is not None:
            add_tunnel_routes(self.app, tunnels, admin.find_site, _body, _field, _json)
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None
        self._path: Path | None = None
        self._path_id: tuple[int, int] | None = None
        self._streams: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self._requests: dict[Any, web.Request] = {}  # connection (its protocol) -> request
        self._internal_seen: set[str] = set()
        self.stopping = False
        """Set when the daemon begins to stop: from then on every call but the status (which
        says ``stopping``) is answered 503 ``stopping``.  (A receiving application whose lease
        ended would otherwise open its receiver again at the daemon going away and never come
        back to the next one.)"""

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """meshd errors become ``{"error"}`` answers; anything else (a bug) a 500, its traceback
        logged once per kind, not once per request."""
        if self.stopping and request.path not in (api.STATUS, api.METRICS):
            return _json(api.error_body("stopping", "the daemon is stopping"), 503)
        self._requests[request.protocol] = request
        try:
            return await handler(request)
        except LocalError as exc:
            return _json(api.error_body(exc.reason, exc.message), 400)
        except ChannelClosed as exc:
            return _json(api.error_body(exc.reason, exc.message), api.GONE)
        except RemoteError as exc:
            return _json(api.error_body(exc.reason, exc.message), 502)
        except MeshdError as exc:
            return _json(api.error_body(exc.reason, exc.message), 500)
        except (web.HTTPException, asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:
            self.counters.count("internal_errors")
            kind = f"{request.path}:{type(exc).__name__}"
            if kind not in self._internal_seen:
                self._internal_seen.add(kind)
                log.exception("internal error in %s %s", request.method, request.path)
            return _json(api.error_body("internal", f"internal error: {type(exc).__name__}"), 500)
        finally:
            if self._requests.get(request.protocol) is request:
                del self._requests[request.protocol]

    def _connection(self) -> Any:
        """The protocol of a new control connection; MAX_CONNECTIONS is enforced once it is made
        (asyncio accepts a backlog of connections before it makes any of them)."""
        assert self._runner is not None and self._runner.server is not None
        server = self._runner.server
        asyncio.get_running_loop().call_soon(lambda: self._make_room(server.connections))
        return server()

    def _make_room(self, held: list[Any]) -> None:
        """Over MAX_CONNECTIONS, close the oldest connections that are idle or still sending
        their request (a slow client cannot lock others out; one being answered stays)."""
        live = [h for h in held if h.transport is not None and not h.transport.is_closing()]
        excess = len(live) - MAX_CONNECTIONS
        for old in live:  # oldest first
            if excess <= 0:
                return
            request = self._requests.get(old)
            if request is None or not request.content.is_eof():
                self.counters.count("evicted")
                transport = old.transport
                old.force_close()
                transport.close()
                excess -= 1

    async def start(self, path: Path) -> None:
        await _make_way(path)
        self._runner = web.AppRunner(self.app, access_log=None, keepalive_timeout=30.0,
                                     logger=self._http_log, shutdown_timeout=2.0)
        await self._runner.setup()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.get_running_loop().create_unix_server(
                self._connection, str(path), backlog=1024)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._path, self._path_id = path, file_id(path)

    async def stop(self) -> None:
        for queue in list(self._streams):
            queue.put_nowait(None)  # end every event stream, so that shutdown need not wait
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._path is not None:
            unlink_if_same(self._path, self._path_id)

    async def status(self, request: web.Request) -> web.Response:
        status = {**self.reports.status(), "stopping": self.stopping}
        if self.tunnels is not None:
            status.update(self.tunnels.status())
        return _json(status)

    async def invite(self, request: web.Request) -> web.Response:
        data = await _body(request)
        inv = self.admin.invite(
            name_hint=_field(data, "name", str, ""),
            expires=_field(data, "expires", float, None),
            uses=_field(data, "uses", int, 1),
            role=_field(data, "role", str, "member"),
            approve=_field(data, "approve", bool, False))
        return _json({"token": tokens.armor(inv), "invite_id": inv.invite_id.hex(),
                      "expires": inv.expires, "approve": inv.approve,
                      "addrs": [str(a) for a in inv.addrs]})

    async def join(self, request: web.Request) -> web.Response:
        data = await _body(request)
        attempt = self.joins.start(_field(data, "text", str))
        return _json(self.reports.join_view(attempt))

    async def join_state(self, request: web.Request) -> web.Response:
        attempt = self.joins.attempts.get(request.match_info["id"])
        if attempt is None:
            raise LocalError("no such join", reason="not-found")
        try:
            wait = min(float(request.query.get("wait", "0")), 60.0)
        except ValueError:
            raise LocalError("wait must be a number of seconds", reason="usage") from None
        state = attempt.state
        if wait > 0 and state == request.query.get("state", state):
            try:
                await asyncio.wait_for(attempt.changed.wait(), wait)
            except asyncio.TimeoutError:
                pass
        return _json(self.reports.join_view(attempt))

    async def pending(self, request: web.Request) -> web.Response:
        return _json([{**_pending(p), "state": "pending"}
                      for p in self.admin.pending()])

    async def approve(self, request: web.Request) -> web.Response:
        data = await _body(request)
        done = self.admin.approve(_field(data, "fingerprint", str))
        return _json(_decided(done))

    async def deny(self, request: web.Request) -> web.Response:
        data = await _body(request)
        done = self.admin.deny(_field(data, "fingerprint", str))
        return _json(_decided(done))

    async def peers(self, request: web.Request) -> web.Response:
        if request.query.get("discovered") in ("1", "true", "yes"):
            return _json(self.reports.discovered())
        return _json(self.reports.peers(revoked=request.query.get("revoked") in ("1", "true")))

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Membership events as JSON lines: the recent history (unless ``history=0``), then each
        new one as it happens, until the client goes away.  At most MAX_STREAMS at once."""
        if len(self._streams) >= MAX_STREAMS:
            self.counters.count("refused_streams")
            return _json(api.error_body("busy", f"at most {MAX_STREAMS} event streams at once"),
                         503)
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=10_000)

        def listener(event: dict[str, Any]) -> None:
            if queue.qsize() < queue.maxsize - 1:  # keep room for the end-of-stream marker
                queue.put_nowait(event)

        membership = self.membership
        unsubscribe = membership.subscribe(listener)
        self._streams.add(queue)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        try:
            await resp.prepare(request)
            if request.query.get("history", "1") not in ("0", "false", "no"):
                for past in list(membership.history):
                    await resp.write(json.dumps(past).encode() + b"\n")
            while (live := await queue.get()) is not None:
                await resp.write(json.dumps(live).encode() + b"\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            unsubscribe()
            self._streams.discard(queue)
        return resp

    async def revoke(self, request: web.Request) -> web.Response:
        data = await _body(request)
        subject = self.admin.revoke(_field(data, "site", str), _field(data, "reason", str, ""))
        return _json({"revoked": site_id_of(subject), "name": self.view.name_of(subject),
                      "fingerprint": fingerprint_of(subject)})

    async def rotate(self, request: web.Request) -> web.Response:
        old, new, (told, others) = await self.rotate_key()
        return _json({"old_site_id": site_id_of(old), "site_id": site_id_of(new),
                      "fingerprint": fingerprint_of(new), "told": told, "members": others})

    # -- channels ---------------------------------------------------------------------------------

    async def list_channels(self, request: web.Request) -> web.Response:
        return _json(self.channels.describe())

    async def open_sender(self, request: web.Request) -> web.Response:
        data = await _body(request)
        to = self.admin.find_site(_field(data, "to", str))
        paths = _field(data, "paths", list, None)
        if paths is not None and not all(isinstance(p, str) for p in paths):
            raise LocalError("paths must be a list of strings", reason="usage")
        ch = self.channels.open_sender(_field(data, "name", str), to, paths,
                                       _field(data, "handover", bool, False))
        return _json({"id": ch.cid.hex(), "endpoint": ch.endpoint, "name": ch.name,
                      "peer": self.view.name_of(to), "peer_id": site_id_of(to),
                      "handover": str(self.channels.handovers.path) if ch.handover else None})

    async def attach_ring(self, request: web.Request) -> web.Response:
        ch = self._out_channel(request)
        data = await _body(request)
        return _json({"ring": self.channels.attach_ring(ch, _field(data, "ring", str))})

    def _out_channel(self, request: web.Request) -> Any:
        """The sending end the request names (ChannelClosed if it ended on its own)."""
        return self.channels.sender(_channel_id(request))

    async def close_sender(self, request: web.Request) -> web.Response:
        cid = _channel_id(request)
        ch = self.channels.out.get(cid)
        self.channels.close_sender(cid)
        return _json(describe_sender(ch) if ch is not None else {"id": cid.hex(), "state": "ended"})

    async def flush(self, request: web.Request) -> web.Response:
        ch = self._out_channel(request)
        data = await _body(request)
        messages = _field(data, "messages", int)
        timeout = _field(data, "timeout", float, None)
        acked = await ch.flush(messages, timeout)
        return _json({"acked_messages": acked})

    async def open_receiver(self, request: web.Request) -> web.Response:
        data = await _body(request)
        allow = _field(data, "allow", list, None)
        if allow is not None and not all(isinstance(a, str) for a in allow):
            raise LocalError("allow must be a list of site names or ids", reason="usage")
        keys = None if allow is None else [self.admin.find_site(a) for a in allow]
        name = check_name(_field(data, "name", str))  # before any ring is made for it
        ring = await self.channels.make_ring(_field(data, "ring_bytes", int, 0), name)
        port = self.channels.open_receiver(name, keys, ring,
                                           replace=not _field(data, "rejoin", bool, False),
                                           claim=_field(data, "claim", str, None))
        handover = self.channels.handover_path(_field(data, "handover", bool, False))
        return _json({"name": port.name, "endpoint": port.endpoint, "handover": handover,
                      "ring": None if port.ring is None else str(port.ring.path),
                      "port": port.token if handover else None})

    async def close_receiver(self, request: web.Request) -> web.Response:
        self.channels.close_receiver(request.match_info["name"])
        return _json({"closed": request.match_info["name"]})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=_prometheus(self.reports.status()), content_type="text/plain")


def _prometheus(status: dict[str, Any]) -> str:
    """The status's counters and gauges in Prometheus' text format."""
    lines = ["# TYPE meshd_members gauge", f"meshd_members {status['members']}"]
    for name, value in sorted(status["counters"].items()):
        lines += [f"# TYPE meshd_{name} counter", f"meshd_{name} {value}"]
    for name, value in sorted(status["peer_port"].items()):
        lines += [f"# TYPE meshd_peer_port_{name} gauge", f"meshd_peer_port_{name} {value}"]
    return "\n".join(lines) + "\n"


def _pending(p: PendingJoin) -> dict[str, Any]:
    return {"name": p.name, "site_id": p.site_id, "fingerprint": p.fingerprint,
            "invite": p.invite, "since": p.since, "addrs": list(p.addrs)}


def _decided(r: Redemption) -> dict[str, Any]:
    return {"name": r.name, "site_id": site_id_of(r.joiner), "fingerprint": fingerprint_of(r.joiner),
            "state": r.state}


async def _make_way(path: Path) -> None:
    """Remove a stale control socket at ``path``; LocalError if a daemon answers on it, or if
    what is there is not a socket (a file that is not ours to delete)."""
    if not stale_socket(path, "control socket"):
        return
    if await _socket_answers(path):
        raise LocalError(f"another meshd daemon is already running on {path}", reason="running")
    path.unlink()


async def _socket_answers(path: Path) -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 1.0)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True
