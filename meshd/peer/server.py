"""The peer port, inbound: one CURVE-authenticated ZeroMQ ROUTER behind the port multiplexer.

Every connection is encrypted and authenticated by site key: the dialer proves its key, which the
server reads back from each message's ``User-Id`` property.  What a key may ask is decided by the
daemon's router, not here: this module only moves checked messages and says who sent them.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils import z85

from meshd.errors import ProtocolError, RemoteError, StateError
from meshd.peer import wire
from meshd.peer.dialer import HEARTBEAT_MS
from meshd.peer.portmux import OnOther, PortMux

log = logging.getLogger("meshd.peer.server")

ZAP_DOMAIN = "meshd"


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """Who sent a message: its authenticated X25519 key and its network address."""

    curve_key: bytes
    address: str
    route: bytes = b""
    """The ROUTER routing id of the connection the message came on (the way back to it)."""


Handler = Callable[[dict[str, Any], PeerInfo], Awaitable[dict[str, Any] | None]]
"""Answers one request; None for a one-way message that gets no answer."""

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

    def port_stats(self) -> tuple[dict[str, int], dict[str, int]]:
        """The public port's counters (cumulative) and gauges (open now), see
        :mod:`meshd.peer.portmux`."""
        if self._mux is None:
            return {}, {}
        return dict(self._mux.stats), self._mux.gauges()

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
            log.debug("dropped a bad message from %s: %s", info.address, exc)
            return
        if msg["t"] in ("ok", "error"):
            self.dropped += 1
            return
        try:
            reply = await self._handler(msg, info)
        except RemoteError as exc:
            reply = wire.error(msg["id"], exc.reason, exc.message,
                               getattr(exc, "retry_after", None))
        except StateError as exc:  # this site cannot store now (a full disk): one line
            log.warning("cannot answer a %s request from %s: %s", msg["t"], info.address, exc)
            reply = wire.error(msg["id"], "unavailable",
                               "the peer cannot store anything now; try again later")
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
