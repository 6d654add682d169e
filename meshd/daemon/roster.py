"""Following changes of the member set: who was admitted, who was revoked, who is gone.

Whatever changed the mesh view (an exchange, gossip, an admission, a join, a revocation, a
lapsed vouch) ends in :meth:`Roster.changed`, which tells the membership core and the channel
service, and cuts off members that are members no more.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from meshd.daemon.links import MemberLinks
from meshd.daemon.membership import MembershipService
from meshd.state.view import MeshView
from meshd.trust.identity import site_id_of

log = logging.getLogger("meshd")


class Roster:
    """The member set as last seen, and what to do when the mesh view moves on from it."""

    def __init__(self, *, view: MeshView, membership: MembershipService, links: MemberLinks,
                 on_members_changed: Callable[[], None],
                 on_revoked: Callable[[bytes, str], None] = lambda key, reason: None) -> None:
        """``on_revoked(key, "revoked")``: cut what still carries data to or from ``key``
        (its channels, relay legs and tunnels)."""
        self.view = view
        self.membership = membership
        self.links = links
        self.on_members_changed = on_members_changed
        self.on_revoked = on_revoked
        self._members: frozenset[bytes] = frozenset()
        self._revoked: frozenset[bytes] = frozenset()

    def reset(self) -> None:
        """Take the view's member set as known (at start, and after a key rotation)."""
        self._members, self._revoked = frozenset(self.view.members), self.view.revoked

    def changed(self) -> None:
        """Follow changes of the member set: new members to the membership core, revoked ones
        cut off (their links, channels and relay legs closed, their connections to us refused
        from now on)."""
        members, revoked = frozenset(self.view.members), self.view.revoked
        if members == self._members and revoked == self._revoked:
            self.membership.sync_blobs()  # a newer record, say: the core carries it from now on
            self.on_members_changed()  # maybe with new addresses
            return
        for key in members - self._members:
            self.membership.emit("admitted", key)
        for key in revoked - self._revoked:
            log.info("%s (%s) is revoked; cutting it off", self.view.name_of(key),
                     site_id_of(key))
            self.membership.emit("revoked", key)
            self.on_revoked(key, "revoked")
        for key in self._members - members:  # revoked, or its key retired by a rotation
            if key not in revoked and key not in self.view.retired:
                # dropped out with a revoked introducer (the cascade): cut off like it
                log.info("%s (%s) is no member any more; cutting it off",
                         self.view.name_of(key), site_id_of(key))
                self.on_revoked(key, "revoked")
            self.links.forget(key)
        self._members, self._revoked = members, revoked
        self.membership.sync_members()
        self.on_members_changed()
