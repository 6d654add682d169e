"""How this daemon reaches one member: where to dial it, and one way to send it a message.

Every service that talks to a member goes through :class:`MemberLinks` (membership gossip,
anti-entropy, joins, channel control messages), so "send to a member" exists once.  The app sets
``server``, ``dialer`` and ``sightings`` when it starts the transport, and again after a key
rotation restarts it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meshd.daemon.discovery import Sighting
from meshd.peer.dialer import Dialer, Unreachable
from meshd.peer.server import PeerServer
from meshd.state.view import MeshView
from meshd.trust.identity import curve_public_of


class MemberLinks:
    """Dial addresses of members, one-way sends and requests to them (see the module docstring)."""

    def __init__(self, view: MeshView) -> None:
        self.view = view
        self.server: PeerServer | None = None
        self.dialer: Dialer | None = None
        self.sightings: Mapping[bytes, Sighting] = {}
        """LAN sightings by key (from discovery), dialed before a record's addresses."""

    def dial_addresses(self, key: bytes) -> list[str]:
        """Where to dial a member: LAN addresses seen by discovery first, then its record's."""
        out: list[str] = []
        if (s := self.sightings.get(key)) is not None:
            out += list(s.addrs)
        rec = self.view.record_of(key)
        if rec is not None:
            out += [a for a in rec.addrs if a not in out]
        return out

    async def send(self, key: bytes, msg: dict[str, Any]) -> bool:
        """A one-way message to a member: over the connection it keeps to us if there is one,
        else over a link we dial.  False when there is no way to send it."""
        curve = curve_public_of(key)
        if self.server is not None and await self.server.push(curve, msg):
            return True
        addrs = self.dial_addresses(key)
        if self.dialer is not None and addrs:
            return await self.dialer.send(curve, addrs, msg)
        return False

    async def request(self, key: bytes, msg: dict[str, Any], timeout: float,
                      addrs: list[str] | None = None) -> dict[str, Any]:
        """Ask a member (at ``addrs``, or where :meth:`dial_addresses` says) and return its
        answer; ``Unreachable`` if none of the addresses answered."""
        if self.dialer is None:
            raise Unreachable("the daemon is not started")
        reply, _ = await self.dialer.request(curve_public_of(key),
                                             self.dial_addresses(key) if addrs is None else addrs,
                                             msg, timeout)
        return reply

    def forget(self, key: bytes) -> None:
        """Drop every link to a member that is one no more (revoked, or its key retired)."""
        curve = curve_public_of(key)
        if self.dialer is not None:
            self.dialer.forget(curve)
        if self.server is not None:
            self.server.routes.pop(curve, None)

    def remember_route(self, curve_key: bytes, route: bytes) -> None:
        """A member's latest connection to our peer port: the way back to it for :meth:`send`."""
        if self.server is not None:
            self.server.routes[curve_key] = route

    def rtt(self, key: bytes) -> float | None:
        """The last round trip of a request to a member over a dialed link, in seconds."""
        if self.dialer is None:
            return None
        return self.dialer.rtt.get(curve_public_of(key))

    def inbound(self, key: bytes) -> bool:
        """True if the member keeps a connection to our peer port (our way back to it)."""
        return self.server is not None and curve_public_of(key) in self.server.routes
