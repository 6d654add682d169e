"""Peer messages to the service that handles each type, once for both ways they arrive.

A message comes either to our peer port (a request, or a one-way ``id`` 0 message, through
:meth:`PeerRouter.on_request`) or back on a link we dialed (always one-way, through
:meth:`PeerRouter.on_link_message`).  Either way only a member of the mesh gets through, but
for two requests a stranger may send to our peer port: a ``join``, and a ``rekey`` (a member
whose new key we missed, see :mod:`meshd.daemon.rekeys`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from meshd.daemon.contacts import Contacts
from meshd.daemon.counters import Counters
from meshd.daemon.links import MemberLinks
from meshd.errors import RemoteError
from meshd.peer.server import PeerInfo
from meshd.state.view import MeshView

log = logging.getLogger("meshd.daemon.router")

MemberHandler = Callable[[bytes, dict[str, Any]],
                         "dict[str, Any] | None | Awaitable[dict[str, Any] | None]"]
"""Handles one message from a member (its key, the message); returns the answer to a request,
or None, or an awaitable of it (work done off the loop).  Raises ``RemoteError`` to refuse it
(the sender of a request is told why)."""

StrangerHandler = Callable[[dict[str, Any], PeerInfo], Awaitable[dict[str, Any]]]
"""Answers one request that a key not in the mesh may send (``join``, ``rekey``)."""


class PeerRouter:
    """Checks who sent a peer message and hands it to the handler of its type."""

    def __init__(self, *, view: MeshView, links: MemberLinks, contacts: Contacts,
                 counters: Counters, members: Mapping[str, MemberHandler],
                 strangers: Mapping[str, StrangerHandler],
                 refused_us: Callable[[bytes], None] | None = None) -> None:
        self.view = view
        self.links = links
        self.contacts = contacts
        self.counters = counters
        self.members = dict(members)
        self.strangers = dict(strangers)
        self.refused_us = refused_us
        """Called with a member's key when it refused a one-way message of ours as from a
        stranger (``MeshSync.on_refused``)."""

    def _member(self, curve_key: bytes) -> bytes | None:
        """The site key of a sender that is a member, and note the exchange; None otherwise."""
        key = self.view.by_curve.get(curve_key)
        if key is None:
            self.counters.count("peer_refused_not_member")
            return None
        self.contacts.ok(key)
        return key

    async def on_request(self, msg: dict[str, Any], info: PeerInfo) -> dict[str, Any] | None:
        """The peer port's handler: the answer to a request, or None for a one-way message."""
        kind = msg["t"]
        self.counters.count(f"peer_requests_{kind}")
        stranger = self.strangers.get(kind)
        if stranger is not None:
            return await stranger(msg, info)
        key = self._member(info.curve_key)
        if key is None:
            raise RemoteError("this site does not know you as a member of its mesh",
                              reason="not-member")
        self.links.remember_route(info.curve_key, info.route)
        handler = self.members.get(kind)
        if handler is None:
            raise RemoteError(f"unsupported request {kind!r}", reason="type")
        answer = handler(key, msg)
        if inspect.isawaitable(answer):
            return await answer
        return answer

    def on_link_message(self, msg: dict[str, Any], server_curve: bytes) -> None:
        """The dialer's handler: a one-way message that came back on a link we dialed, or the
        peer's refusal of a one-way message of ours."""
        if msg["t"] == "error":
            key = self.view.by_curve.get(server_curve)
            if key is not None and msg["reason"] == "not-member" and self.refused_us is not None:
                self.refused_us(key)  # a member that does not know our key (a missed rotation)
            return
        handler = self.members.get(msg["t"])
        if handler is None:
            unknown = server_curve not in self.view.by_curve
            self.counters.count("peer_refused_not_member" if unknown else "peer_unexpected")
            return
        key = self._member(server_curve)
        if key is None:
            return
        try:
            handler(key, msg)
        except RemoteError as exc:  # nobody waits for an answer: drop it
            log.debug("dropped a one-way %s message from a member: %s", msg["t"], exc.message)
