"""The peer port, outbound: one CURVE DEALER per peer key and address, requests and one-way sends.

The dialer names the key it expects (from a signed record or an invitation token); CurveZMQ's
handshake fails unless the far side holds the matching secret, so an answer proves who sent it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from typing import Any, Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from meshd.errors import ProtocolError, RemoteError
from meshd.peer import wire

log = logging.getLogger("meshd.peer.dialer")

HEARTBEAT_MS = 5_000
"""ZMTP heartbeats on every peer connection: a silent peer is noticed within three."""

OneWay = Callable[[dict[str, Any], bytes], None]
"""Takes a one-way message that arrived on a link we dialed, with the far side's X25519 key."""


def tcp_endpoint(address: str) -> str:
    host, _, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        return f"tcp://{host}:{port}"
    if ":" in host:
        return f"tcp://[{host}]:{port}"
    return f"tcp://{host}:{port}"


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
        # A unique address: pyzmq's default names it by the socket's descriptor, which a socket
        # opened right after this one closed may reuse.
        self._monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
            addr=f"inproc://meshd-dialer-monitor-{secrets.token_hex(8)}")
        sock.connect(tcp_endpoint(address))
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
            # One-way messages, and the peer's refusal of one of ours (an error for id 0: say,
            # `not-member` when it missed our key rotation), go to the owner.
            if msg["t"] not in ("ok", "error") or (msg["t"] == "error" and msg["id"] == 0):
                if self._on_message is not None:
                    self._on_message(msg, self.server_key)
                continue
            fut = self._waiting.pop(msg["id"], None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    async def _watch(self) -> None:
        """Keep the link's last event.  Whatever ends this stops the monitor: events nobody
        reads fill it (a retry every 100 ms to an address that refuses), and ZeroMQ's I/O
        thread then blocks in the next one, silencing every connection of the daemon."""
        try:
            while True:
                event = await recv_monitor_message(self._monitor)
                self.last_event = int(event["event"])
                if self.last_event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self.handshake_ok = True
        finally:
            if not self.sock.closed:
                self.sock.disable_monitor()  # before its reading end closes (see ipc.close_watched)
            self._monitor.close(0)

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
