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

The daemon holds no duplicate of an adopted channel's socket (a descriptor would have to come
back from the application): cutting it relies on the application's library (``cut`` on the
lease), and when the application dies the kernel closes the connection anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

from meshd.channel.inbound import ReceivingEnd
from meshd.channel.reliable import ReceiverConfig
from meshd.daemon.channels.handover_in import InLease
from meshd.daemon.channels.in_channel import InChannel, RSide
from meshd.daemon.counters import Counters
from meshd.errors import LocalError, ProtocolError
from meshd.local.handover import decode_adopt_in
from meshd.state.view import MeshView

log = logging.getLogger("meshd.daemon.channels.inbound")

MAX_ADOPTED = 1024
"""Most channels of one receiver a restarted daemon takes on from its application."""


class Receiving(Protocol):
    """What this module needs of :class:`.inbound.Receiving`."""

    counters: Counters
    view: MeshView

    @property
    def inc(self) -> Mapping[bytes, InChannel]: ...

    def window(self) -> ReceiverConfig: ...


def take_on(receiving: Receiving, lease: InLease, cid: bytes,
            msg: dict[str, Any]) -> InChannel | None:
    """The channel ``cid`` that the application holding ``lease`` offers (``msg``), taken on;
    None if refused (the application is told why)."""
    port = lease.port
    try:
        info, ctl_end, live = decode_adopt_in(msg)
        g = info.grant
        why = refusal(receiving, lease, cid, g.cid, g.name, g.sender)
        core = None if why is not None else ReceivingEnd.adopted(g, ctl_end, receiving.window())
    except (ProtocolError, LocalError) as exc:
        why, core = str(exc), None
    if why is not None or core is None:
        receiving.counters.count("adopt_in_refused")
        log.warning("receiver %r: refused to take on channel %s from its application: %s",
                    port.name, cid.hex()[:12], why)
        lease.refuse_adoption(cid, f"the daemon restarted and refused the channel: {why}")
        return None
    inc = InChannel(core, RSide(cid, g.sender, info.path, None))
    inc.lease, inc.handed = lease, live
    receiving.counters.count("adopted_in")
    log.info("channel %r from %s: taken on from its application (%s)", g.name,
             receiving.view.name_of(g.sender), "live" if live else "waiting for its sender")
    return inc


def refusal(receiving: Receiving, lease: InLease, cid: bytes, state_cid: bytes, name: str,
            sender: bytes) -> str | None:
    """Why the channel offered as ``cid`` (its state says ``state_cid``, ``name``, from
    ``sender``) cannot be taken on through ``lease``; None if it can."""
    port = lease.port
    if name != port.name or state_cid != cid:
        return f"it is channel {name!r} {state_cid.hex()[:12]}, not one of this receiver"
    if cid in receiving.inc:
        return "this site has that channel open"
    if not receiving.view.is_member(sender):
        return "the sender is no member of this mesh"
    if port.allow is not None and sender not in port.allow:
        return "the receiver does not take messages from the sender"
    if sum(1 for c in receiving.inc.values() if c.name == port.name) >= MAX_ADOPTED:
        return f"the receiver holds {MAX_ADOPTED} channels"
    return None
