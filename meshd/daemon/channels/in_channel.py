"""One channel's receiving end in the daemon (asyncio glue): its core, its current data
connection, the feedback flush, and what the receiving application holds of it.

:class:`RSide` is what a receiving-end data connection is for, before and after it joins a
channel; :class:`InChannel` is the channel (:mod:`.inbound` makes them, :mod:`.handover_in`
hands them to the application and takes them on from one whose daemon restarted).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from meshd.channel import link
from meshd.channel.frames import Block
from meshd.channel.handshake import ChannelKeys
from meshd.channel.inbound import ReceivingEnd
from meshd.channel.reliable import ReceiverConfig
from meshd.daemon.channels.connection import DataConnection
from meshd.daemon.channels.handover_in import cut_socket
from meshd.state.config import Config
from meshd.state.view import MeshView
from meshd.trust.identity import site_id_of

if TYPE_CHECKING:
    from meshd.daemon.channels.handover_in import InLease


class RSide:
    """What a receiving-end data connection is for, before and after it joins a channel."""

    __slots__ = ("cid", "inc", "path", "pending", "relay", "sender")

    def __init__(self, cid: bytes, sender: bytes, path: str, relay: bytes | None) -> None:
        self.cid = cid
        self.sender = sender
        self.path = path
        self.relay = relay
        self.pending: ChannelKeys | None = None
        self.inc: InChannel | None = None


class InChannel:
    """The receiving end of one channel: its core, its current connection, the feedback flush."""

    def __init__(self, core: ReceivingEnd, side: RSide) -> None:
        self.core = core
        self.cid = core.cid
        self.sender = core.sender
        self.name = core.name
        self.conn: DataConnection | None = None
        self.path = side.path
        self.relay = side.relay
        self.created = time.time()
        self.lease: InLease | None = None
        """The receiving application's lease, once it was given this channel."""
        self.giving = False
        """A hand-over to the application is under way."""
        self.handed = False
        """The application holds the channel's connection and receiving end."""
        self.dup: socket.socket | None = None
        """The daemon's duplicate of the handed-over socket (to cut it)."""
        self.waiting_since: float | None = None
        """When :func:`overdue` first saw it without a connection (monotonic)."""
        self.waiting: tuple[DataConnection, RSide, Block] | None = None
        """A new connection the sender resumed on while the application held the channel,
        with its first frame, held until the application gives the channel back."""

    def drop_handed(self) -> None:
        """Cut what the application holds of this channel (it ended)."""
        cut_socket(self.dup)
        self.dup = None
        self.handed = self.giving = False
        if self.waiting is not None:
            self.waiting[0].abort("the channel ended")
            self.waiting = None

    def adopt(self, conn: DataConnection, side: RSide) -> None:
        self.conn = conn
        self.path, self.relay = side.path, side.relay
        side.inc = self
        self.core.connection_adopted()
        self.pump()

    def on_frame(self, conn: DataConnection, side: RSide, body: Block) -> bool:
        """Take a frame; whether ``conn`` became the channel's connection with it."""
        self.core.frame_received(body)  # ProtocolError: the connection is dropped, not the channel
        adopted = conn is not self.conn
        if adopted:
            self.adopt(conn, side)
        self.pump()
        return adopted

    def lost(self, conn: DataConnection) -> None:
        if conn is self.conn:
            self.conn = None
            self.core.connection_lost()

    def pump(self) -> None:
        """Run a feedback flush soon if the core wants one."""
        if self.core.take_flush():
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        frame = self.core.take_feedback()
        if frame is not None and self.conn is not None:
            self.conn.send(link.FRAME, frame)

    def describe(self, view: MeshView) -> dict[str, Any]:
        core = self.core
        elapsed = max(1e-9, time.time() - self.created)
        return {
            "id": self.cid.hex(), "name": self.name, "direction": "in",
            "peer": view.name_of(self.sender), "peer_id": site_id_of(self.sender),
            "path": self.path, "relay": view.name_of(self.relay) if self.relay else None,
            "state": "open" if self.handed else core.state, "bytes": core.bytes,
            "messages": core.messages, "rate_Bps": round(core.bytes / elapsed),
            "retransmits": None, **core.counters(), "handed_over": self.handed,
        }


def overdue(channels: Iterable[InChannel], now: float, limit: float) -> list[InChannel]:
    """The channels that waited more than ``limit`` seconds (0: no limit) for their senders to
    resume them: no connection, none handed to the application, not closed by the sender
    (which then waits for the receiving application, not the sender).  Each call notes when a
    channel started waiting, so calls a few seconds apart measure it to within that."""
    out = []
    for inc in channels:
        if inc.conn is not None or inc.handed or inc.giving or inc.core.closed_by_sender:
            inc.waiting_since = None
        elif inc.waiting_since is None:
            inc.waiting_since = now
        elif limit and now - inc.waiting_since > limit:
            out.append(inc)
    return out


def window_of(config: Config) -> ReceiverConfig:
    """The receiving window of this site's channels (its config)."""
    return ReceiverConfig(window_messages=config.channel_window_messages,
                          window_bytes=config.channel_window_bytes)
