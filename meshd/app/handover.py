"""The application's side of a channel's hand-over lease (the messages are in
:mod:`meshd.local.handover`), shared by the sync link (:mod:`meshd.app.direct`) and the asyncio
link (:mod:`meshd.app.aio_direct`), which differ only in how they wait on their sockets.

:class:`HandoverEnd` holds the lease (a connection to ``<home>/handover.sock`` kept for the
channel's life: its end of file tells the daemon the application is gone), the data socket once
granted and the :class:`~meshd.channel.stream.StreamSender` core.  It takes grants and ``ended``
notices, gives a broken connection back (``lost``), notices the daemon going away and offers the
channel to the daemon that comes back (``adopt``), and reports the counters (``count``).
"""

from __future__ import annotations

import socket
import time
from typing import Any

from meshd.channel.stream import StreamSender
from meshd.errors import ChannelClosed, LocalError, ProtocolError
from meshd.local.handover import MessageReader, recv_messages, send_message

__all__ = ["REJOIN_EVERY", "REJOIN_FOR", "REPORT_EVERY", "HandoverEnd", "count_message",
           "dial_lease"]

REPORT_EVERY = 0.5
"""Seconds between counter reports to the daemon (for ``meshd channels``)."""
REJOIN_EVERY = 0.2
"""Seconds between tries to reach a daemon that went away (to give it the channel back)."""
REJOIN_FOR = 120.0
"""Seconds a daemon may stay away before a channel that needs it fails."""


class HandoverEnd:
    """The lease side of one handed-over sending channel.  A link subclasses it and says how
    it watches and lets go of its sockets (:meth:`_set_lease`, :meth:`_drop_lease`,
    :meth:`_drop_sock`) and what it does with a grant (:meth:`_granted`)."""

    def __init__(self, path: str, channel_id: str, name: str, window_bytes: int) -> None:
        self.channel_id = channel_id
        self.name = name
        self.core: StreamSender | None = None
        self.sock: socket.socket | None = None
        self.ended: ChannelClosed | None = None
        self._path = path
        self._window = window_bytes
        self._lease: socket.socket | None = None
        self._reader = MessageReader()
        self._fds: list[int] = []
        self._reported = 0.0
        self._counts: dict[str, int] = {}  # the counters last reported
        self._gone_since: float | None = None  # the daemon went away (restarting?)
        self._next_rejoin = 0.0

    def _take(self) -> None:
        """Open the lease (``take``); LocalError (``handover``) if the daemon is not there."""
        try:
            self._set_lease(dial_lease(self._path, {"t": "take", "id": self.channel_id}))
        except OSError as exc:
            raise LocalError(f"cannot reach the daemon's hand-over socket: {exc}",
                             reason="handover") from None

    # -- what a link provides ------------------------------------------------------------------

    def _set_lease(self, lease: socket.socket) -> None:
        self._lease, self._reader, self._fds = lease, MessageReader(), []

    def _drop_lease(self) -> None:
        if self._lease is not None:
            self._lease.close()
            self._lease = None
        for fd in self._fds:  # descriptors of grants never read whole
            socket.socket(fileno=fd).close()
        self._fds = []

    def _drop_sock(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _granted(self, msg: dict[str, Any], fd: int) -> None:
        raise NotImplementedError

    # -- shared steps --------------------------------------------------------------------------

    def _read_lease_once(self) -> None:
        """Read once from the lease (as it blocks) and act on every whole message."""
        assert self._lease is not None
        try:
            msgs = recv_messages(self._lease, self._reader, self._fds)
        except BlockingIOError:
            return
        except (OSError, LocalError, ProtocolError) as exc:
            self._daemon_left(str(exc))
            return
        for msg in msgs:
            if msg["t"] == "grant" and self._fds:
                self._granted(msg, self._fds.pop(0))
            elif msg["t"] == "ended":
                self._end(str(msg.get("reason", "failed")), str(msg.get("message", "")))

    def _read_data(self, sock: socket.socket, core: StreamSender) -> bool:
        """Read the receiver's bytes once (as ``sock`` blocks) into ``core``; False if none
        were there yet or the connection broke (it is then given back to the daemon)."""
        try:
            data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
            if not data:
                raise OSError("the connection was closed")
            core.data_received(data, time.monotonic())
        except BlockingIOError:
            return False
        except (OSError, ProtocolError) as exc:
            self._broken(str(exc))
            return False
        return True

    def _end(self, reason: str, message: str) -> None:
        if self.ended is None:
            self.ended = ChannelClosed(f"the channel ended: {message}", reason=reason,
                                       channel=self.channel_id)
        self._drop_sock()

    def _broken(self, why: str) -> None:
        """The data connection broke: give the channel back to the daemon to resume."""
        self._drop_sock()
        if self.core is None or self.ended is not None:
            return
        ctl_seal, ctl_open = self.core.lost()
        if self._lease is None:
            return  # the daemon is away: it resumes the channel when it is back
        try:
            send_message(self._lease, {"t": "lost", "cs": ctl_seal, "co": ctl_open})
        except OSError as exc:
            self._daemon_left(str(exc))

    def _daemon_left(self, why: str) -> None:
        """The hand-over socket closed: the daemon stopped.  The connection, if any, goes on;
        the channel goes back to the daemon when it returns (:meth:`_rejoin`)."""
        self._drop_lease()
        if self.ended is not None:
            return
        if self.core is None:
            self._end("failed", f"lost the daemon before the channel opened: {why}")
        elif self._gone_since is None:
            self._gone_since = time.monotonic()

    def _rejoin(self) -> None:
        """Give the channel to the daemon that came back (``live`` if this end still holds a
        working connection; else the daemon resumes the channel at once); at most every
        :data:`REJOIN_EVERY` seconds, and the channel fails after :data:`REJOIN_FOR`."""
        now, core = time.monotonic(), self.core
        if core is None or self._gone_since is None or now < self._next_rejoin:
            return
        if now - self._gone_since > REJOIN_FOR:
            self._end("failed", f"the daemon did not come back within {REJOIN_FOR:.0f} s")
            return
        self._next_rejoin = now + REJOIN_EVERY
        try:
            # A live channel's socket goes with it: the daemon keeps it to cut it.
            lease = dial_lease(self._path, {"t": "adopt", "id": self.channel_id,
                                            "name": self.name, "live": self.sock is not None,
                                            **core.adoption()},
                               None if self.sock is None else self.sock.fileno())
        except OSError:
            return
        self._set_lease(lease)
        self._gone_since = None

    def _report(self, now_anyway: bool) -> None:
        """Tell the daemon the counters (for ``meshd channels``): when asked, else when they
        changed and :data:`REPORT_EVERY` has passed since the last report."""
        t, core = time.monotonic(), self.core
        if core is None or self._lease is None:
            return
        c = core.counters()
        if not now_anyway and (c == self._counts or t - self._reported < REPORT_EVERY):
            return
        self._reported, self._counts = t, c
        try:
            send_message(self._lease, count_message(c))
        except OSError:
            pass


def dial_lease(path: str, first: dict[str, Any], fd: int | None = None) -> socket.socket:
    """A new connection to the daemon's hand-over socket at ``path``, ``first`` sent on it
    (``take`` or ``adopt``; with the descriptor ``fd``, if any); OSError if the daemon is not
    there."""
    lease = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lease.connect(path)
        send_message(lease, first, fd)
    except OSError:
        lease.close()
        raise
    return lease


def count_message(c: dict[str, Any]) -> dict[str, Any]:
    """The ``count`` message that reports a sender core's counters ``c`` to the daemon."""
    return {"t": "count", "messages": c["messages"], "bytes": c["bytes"],
            "acked": c["acked_messages"], "retransmits": c["retransmits"],
            "buffered": c["buffered_bytes"]}
