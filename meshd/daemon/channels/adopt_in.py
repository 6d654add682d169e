"""A daemon that restarted under a receiving application takes on the channels it holds
(``adopt-in``, asyncio glue; the application's side is :mod:`meshd.app.lease_in`).

A receiving application goes on with its handed-over channels while its daemon is away (their
connections do not need it).  When the daemon is back, the application opens its receiver
again and offers every channel it holds: the daemon checks each (the receiver's own name, a
channel it does not know, a sender that is a member and that the receiver takes messages from, a
state a channel can have) and takes it on, as handed over if the application still holds a
working connection, else as waiting for the sender to resume it (as after ``lost``).  Its
control seqs start a whole lease beyond the application's
(:meth:`~meshd.channel.inbound.ReceivingEnd.adopted`).  A refusal goes back to the application
with its reason, and the application ends that channel.

A live channel's offer carries a descriptor of its socket, which the daemon keeps (never read)
to cut the connection when the channel ends from outside, as for a channel it handed over.
A channel taken on as waiting ends if its sender does not resume it within
``channel_wait_limit``, as any channel waiting for its sender.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from typing import Any, Protocol

from meshd.channel.inbound import ReceivingEnd
from meshd.daemon.channels.handover_in import InLease, path_refusal, tcp_socket
from meshd.daemon.channels.in_channel import InChannel, RSide, window_of
from meshd.daemon.counters import Counters
from meshd.daemon.site import LocalSite
from meshd.errors import LocalError, ProtocolError
from meshd.local.handover import decode_adopt_in
from meshd.state.config import Config
from meshd.state.view import MeshView

log = logging.getLogger("meshd.daemon.channels.inbound")

MAX_ADOPTED = 1024
"""Most channels of one receiver a restarted daemon takes on from its application."""
MAX_WAITING = 1024
"""Most channels of the site waiting for their senders to resume, beyond which no waiting
channel is taken on (nothing proves an offered sender will come: they end after
``channel_wait_limit``)."""


class Receiving(Protocol):
    """What this module needs of :class:`.inbound.Receiving`."""

    counters: Counters
    view: MeshView
    config: Config
    site: LocalSite

    @property
    def inc(self) -> Mapping[bytes, InChannel]: ...


def take_on(receiving: Receiving, lease: InLease, cid: bytes,
            msg: dict[str, Any]) -> InChannel | None:
    """The channel ``cid`` that the application holding ``lease`` offers (``msg``), taken on;
    None if refused (the application is told why).  A live channel takes the next descriptor
    the application sent (its connection's socket, kept to cut it)."""
    port = lease.port
    dup: socket.socket | None = None
    try:
        if msg.get("live") is True:
            dup = tcp_socket(lease.fds)
        info, ctl_end, live = decode_adopt_in(msg)
        g = info.grant
        why = refusal(receiving, lease, cid, g.cid, g.name, g.sender, info.path, info.relay,
                      live)
        core = None if why is not None else ReceivingEnd.adopted(g, ctl_end, window_of(receiving.config))
    except (ProtocolError, LocalError) as exc:
        why, core = str(exc), None
    if why is not None or core is None:
        if dup is not None:
            dup.close()
        receiving.counters.count("adopt_in_refused")
        log.warning("receiver %r: refused to take on channel %s from its application: %s",
                    port.name, cid.hex()[:12], why)
        lease.refuse_adoption(cid, f"the daemon restarted and refused the channel: {why}")
        return None
    inc = InChannel(core, RSide(cid, g.sender, info.path, info.relay))
    inc.lease, inc.handed, inc.dup = lease, live, dup
    receiving.counters.count("adopted_in")
    log.info("channel %r from %s: taken on from its application (%s)", g.name,
             receiving.view.name_of(g.sender), "live" if live else "waiting for its sender")
    return inc


def refusal(receiving: Receiving, lease: InLease, cid: bytes, state_cid: bytes, name: str,
            sender: bytes, path: str, relay: bytes | None, live: bool) -> str | None:
    """Why the channel offered as ``cid`` (its state says ``state_cid``, ``name``, from
    ``sender``, over ``path`` and ``relay``; ``live`` or waiting) cannot be taken on through
    ``lease``; None if it can."""
    port = lease.port
    if name != port.name or state_cid != cid:
        return f"it is channel {name!r} {state_cid.hex()[:12]}, not one of this receiver"
    bad_path = path_refusal(receiving.view, (sender, receiving.site.public), path, relay)
    if bad_path is not None:
        return bad_path
    if cid in receiving.inc:
        return "this site has that channel open"
    if not receiving.view.is_member(sender):
        return "the sender is no member of this mesh"
    if port.allow is not None and sender not in port.allow:
        return "the receiver does not take messages from the sender"
    if sum(1 for c in receiving.inc.values() if c.name == port.name) >= MAX_ADOPTED:
        return f"the receiver holds {MAX_ADOPTED} channels"
    if not live and sum(1 for c in receiving.inc.values()
                        if c.conn is None and not (c.handed or c.giving)) >= MAX_WAITING:
        return f"this site has {MAX_WAITING} channels waiting for their senders"
    return None
