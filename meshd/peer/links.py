"""The peer port: one CURVE-authenticated ZeroMQ ROUTER in, one DEALER per peer out (asyncio glue).

Every connection is encrypted and authenticated by site key: the server proves its key (the
dialer names the key it expects, from a signed record or an invitation token, and CurveZMQ's
handshake fails unless the far side holds the matching secret), and the dialer proves its own, which
the server reads back from each message's ``User-Id`` property.  What a key may ask is decided by
the daemon's handler, not here: this module only moves checked messages and says who sent them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from meshd.peer import wire
from meshd.errors import ProtocolError, RemoteError
from meshd.peer.portmux import OnOther, PortMux

log = logging.getLogger("meshd.peer.links")

ZAP_DOMAIN = "meshd"
HEARTBEAT_MS = 5_000


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """Who sent a message: its authenticated X25519 key and its network address."""

    curve_key: bytes
    address: str
    route: bytes = b""
    """The ROUTER routing id of the connection the message came on (the way back to it)."""


Handler = Callable[[dict[str, Any], PeerInfo], Awaitable[dict[str, Any] | None]]
"""Answers one request; None for a one-way message that gets no answer."""

OneWay = Callable[[dict[str, Any], bytes], None]
"""Takes a one-way message that arrived on a link we dialed, with the far side's X25519 key."""


def _tcp_endpoint(address: str) -> str:
    host, _, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        return f"tcp://{host}:{port}"
    if ":" in host:
        return f"tcp://[{host}]:{port}"
    return f"tcp://{host}:{port}"


def _close_other(transport: asyncio.Transport, first: bytes) -> None:
    return None


class PeerServer:
    """Accepts peer requests on the one inbound port and answers each through ``handler``.

    The ROUTER listens on loopback only; a ``PortMux`` owns the public port and splices ZeroMQ
    connections to it, handing every other connection to ``on_other`` (default: closed)."""

    def __init__(self, ctx: zmq.asyncio.Context, curve: tuple[bytes, bytes], handler: Handler,
                 auth: AsyncioAuthenticator | None = None, *,
                 on_other: OnOther | None = None) -> None:
        self._ctx = ctx
        self._on_other: OnOther = on_other or _close_other
        self._mux: PortMux | None = None
        self._public, self._secret = curve
        self._handler = handler
        self._auth: AsyncioAuthenticator | None = auth
        self._sock: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self.address: str | None = None
        self.dropped = 0
        self.routes: dict[bytes, bytes] = {}
        """X25519 key -> ROUTER routing id of its latest connection to us: the way back to a
        peer that dialed us, which is the only way to reach a site that cannot be dialed.  The
        owner fills it, for members only, so strangers cannot grow it."""

    async def start(self, listen: str) -> str:
        """Bind ``HOST:PORT`` (port 0 picks one) and return the bound ``HOST:PORT``; OSError
        when it cannot be bound."""
        if self._auth is None:
            self._auth = AsyncioAuthenticator(self._ctx, log=logging.getLogger("meshd.zap"))
            self._auth.start()
            self._auth.configure_curve(domain=ZAP_DOMAIN, location=zmq.auth.CURVE_ALLOW_ANY)
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * HEARTBEAT_MS)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a gone peer fails, not vanishes
        sock.curve_server = True
        sock.curve_secretkey = self._secret
        sock.curve_publickey = self._public
        sock.zap_domain = ZAP_DOMAIN.encode()
        try:
            sock.bind("tcp://127.0.0.1:0")
        except zmq.ZMQError as exc:
            sock.close(0)
            raise OSError(f"cannot bind the internal ZeroMQ port: {exc}") from None
        internal = sock.getsockopt_string(zmq.LAST_ENDPOINT).removeprefix("tcp://")
        mux = PortMux(zmq_target=internal, on_other=self._on_other)
        try:
            self.address = await mux.start(listen)
        except OSError:
            sock.close(0)
            raise
        self._sock, self._mux = sock, mux
        self._task = asyncio.create_task(self._serve(), name="peer-server")
        return self.address

    async def _serve(self) -> None:
        assert self._sock is not None and self._mux is not None
        mux = self._mux
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            if len(frames) != 2:
                self.dropped += 1
                continue
            ident, frame = frames
            try:
                curve_key = z85.decode(str(frame.get("User-Id")).encode())
                info = PeerInfo(curve_key, mux.real_address(str(frame.get("Peer-Address"))),
                                ident.bytes)
            except (ValueError, zmq.ZMQError):
                self.dropped += 1
                continue
            task = asyncio.create_task(self._answer(ident.bytes, frame.bytes, info))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _answer(self, ident: bytes, data: bytes, info: PeerInfo) -> None:
        try:
            msg = wire.decode(data)
        except ProtocolError as exc:
            self.dropped += 1
            log.info("dropped a bad message from %s: %s", info.address, exc)
            return
        if msg["t"] in ("ok", "error"):
            self.dropped += 1
            return
        try:
            reply = await self._handler(msg, info)
        except RemoteError as exc:
            reply = wire.error(msg["id"], exc.reason, exc.message,
                               getattr(exc, "retry_after", None))
        except Exception:
            log.exception("handler failed on a %s request from %s", msg["t"], info.address)
            reply = wire.error(msg["id"], "internal", "the peer failed to handle the request")
        if reply is None:
            return
        reply["id"] = msg["id"]
        await self._send(ident, wire.encode(reply))

    async def _send(self, ident: bytes, data: bytes) -> bool:
        if self._sock is None:
            return False
        try:
            await self._sock.send_multipart([ident, data])
            return True
        except zmq.ZMQError:  # EHOSTUNREACH: that connection is gone
            return False

    async def push(self, curve_key: bytes, msg: dict[str, Any]) -> bool:
        """Send a one-way message back over the latest connection ``curve_key`` made to us."""
        ident = self.routes.get(curve_key)
        if ident is None:
            return False
        if await self._send(ident, wire.encode({**msg, "id": 0})):
            return True
        if self.routes.get(curve_key) == ident:
            del self.routes[curve_key]
        return False

    async def close(self, *, keep_auth: bool = False) -> None:
        """Stop serving; with ``keep_auth`` the ZAP handler stays for a successor server."""
        if self._task is not None:
            self._task.cancel()
        for task in list(self._inflight):
            task.cancel()
        if self._mux is not None:
            await self._mux.close()
            self._mux = None
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        if self._auth is not None and not keep_auth:
            self._auth.stop()


_FAILED_AUTH = {zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL}


class _Link:
    """One DEALER to one peer address, with its answers matched to requests by id."""

    def __init__(self, ctx: zmq.asyncio.Context, curve: tuple[bytes, bytes], server_key: bytes,
                 address: str, on_message: OneWay | None = None) -> None:
        self.address = address
        self.server_key = server_key
        self._on_message = on_message
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * HEARTBEAT_MS)
        sock.curve_publickey, sock.curve_secretkey = curve
        sock.curve_serverkey = server_key
        self._monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        sock.connect(_tcp_endpoint(address))
        self.sock = sock
        self.last_event: int | None = None
        self.handshake_ok = False
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read(), name=f"link-{address}")
        self._watcher = asyncio.create_task(self._watch(), name=f"monitor-{address}")

    async def _read(self) -> None:
        while True:
            data = await self.sock.recv()
            try:
                msg = wire.decode(data)
            except ProtocolError as exc:
                log.info("dropped a bad answer from %s: %s", self.address, exc)
                continue
            if msg["t"] not in ("ok", "error"):
                if self._on_message is not None:
                    self._on_message(msg, self.server_key)
                continue
            fut = self._waiting.pop(msg["id"], None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    async def _watch(self) -> None:
        while True:
            event = await recv_monitor_message(self._monitor)
            self.last_event = int(event["event"])
            if self.last_event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.handshake_ok = True

    def explain_silence(self) -> str:
        """Why no answer came, as far as the connection's events tell."""
        if self.last_event in _FAILED_AUTH:
            return ("the site there did not prove the expected key (wrong address, or the key"
                    " in the token does not match the site at that address)")
        if self.last_event == zmq.EVENT_CONNECT_RETRIED:
            return "the connection was refused (nothing listening there, or a firewall)"
        if self.handshake_ok:
            return "connected, but the site did not answer in time"
        return "no connection could be made (unreachable, or a firewall drops the packets)"

    async def send(self, msg: dict[str, Any]) -> None:
        """Queue a one-way message (ZeroMQ sends it once the connection is up)."""
        await self.sock.send(wire.encode({**msg, "id": 0}))

    async def request(self, msg: dict[str, Any], rid: int, timeout: float) -> dict[str, Any]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        try:
            await self.sock.send(wire.encode(msg))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._waiting.pop(rid, None)

    def close(self) -> None:
        """Close the socket and its monitor; closing twice is harmless."""
        if self.sock.closed:
            return
        self._reader.cancel()
        self._watcher.cancel()
        self.sock.disable_monitor()
        self._monitor.close(0)
        self.sock.close(0)


class Unreachable(RemoteError):
    """No answer from a peer at any of the addresses tried."""

    reason = "unreachable"


class Dialer:
    """Sends requests to peers, keeping one link per (key, address) while it works."""

    def __init__(self, ctx: zmq.asyncio.Context, curve: tuple[bytes, bytes],
                 on_message: OneWay | None = None) -> None:
        self._ctx = ctx
        self._curve = curve
        self._on_message = on_message
        self._links: dict[tuple[bytes, str], _Link] = {}
        self._ids = itertools.count(1)
        self.rtt: dict[bytes, float] = {}
        """X25519 key -> seconds of the last request's round trip."""

    def _link(self, server_key: bytes, address: str) -> _Link:
        link = self._links.get((server_key, address))
        if link is None:
            link = self._links[(server_key, address)] = _Link(
                self._ctx, self._curve, server_key, address, self._on_message)
        return link

    async def send(self, server_key: bytes, addresses: list[str], msg: dict[str, Any]) -> bool:
        """One-way message to a peer: over a link that has worked, else over the first address.

        False when there is no address to dial; delivery is not confirmed (the membership
        protocol above notices losses)."""
        for address in addresses:
            link = self._links.get((server_key, address))
            if link is not None and link.handshake_ok:
                await link.send(msg)
                return True
        if not addresses:
            return False
        try:
            await self._link(server_key, addresses[0]).send(msg)
        except zmq.ZMQError:
            return False
        return True

    def forget(self, server_key: bytes) -> None:
        """Close every link to a peer (revoked, or its key retired)."""
        for k in [k for k in self._links if k[0] == server_key]:
            self._links.pop(k).close()

    async def request(self, server_key: bytes, addresses: list[str], msg: dict[str, Any],
                      timeout: float) -> tuple[dict[str, Any], str]:
        """Send ``msg`` to the peer holding ``server_key`` (X25519), trying each address in turn.

        Returns the answer and the address that gave it; raises Unreachable with the reason
        for each address tried."""
        if not addresses:
            raise Unreachable("the site has no address to dial (it can only dial out)")
        failures = []
        for address in addresses:
            try:
                link = self._link(server_key, address)
            except zmq.ZMQError as exc:
                failures.append(f"{address}: {exc}")
                continue
            rid = next(self._ids)
            started = time.monotonic()
            try:
                reply = await link.request({**msg, "id": rid}, rid, timeout)
                self.rtt[server_key] = time.monotonic() - started
                return reply, address
            except asyncio.TimeoutError:
                failures.append(f"{address}: {link.explain_silence()}")
                # Concurrent requests share the link: the first to time out closes it.
                if self._links.get((server_key, address)) is link:
                    del self._links[(server_key, address)]
                link.close()
        raise Unreachable("no answer from " + "; ".join(failures))

    def close(self) -> None:
        for link in self._links.values():
            link.close()
        self._links.clear()
