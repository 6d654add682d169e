"""A receiver's hand-over lease as the reader thread of :mod:`.direct_in` reads it: what the
daemon says (grants, leftovers, ``yield``, ``cut``), and the way back to a daemon that
restarted.

When the lease reaches its end of file the daemon went away (a crash, or a stop: a stopping
daemon lets its channels go without cutting them).  The links go on: their connections do not
need the daemon.  A link whose connection breaks meanwhile is kept as an *orphan*: what it holds
is still handed out, and its state waits for the daemon; so is a channel whose ``lost`` was
still queued here when the daemon went away.  A channel the daemon had back and had not handed
over again when it went away ends (``failed``): the daemon may have gone on with it.  Every
:data:`~meshd.app.handover.REJOIN_EVERY` seconds the reader thread asks the daemon of the same
home to open the receiver again (``rejoin``: never taking the name from a receiver opened since),
takes the new lease and offers it every channel it holds (``adopt-in``): the live links as
handed over (each with a descriptor of its socket, which the daemon keeps to cut it), the
orphans as waiting for their senders to resume.  The receiving call then moves
its ipc socket to the new receiver's endpoint.  An orphan whose daemon is not back within
:data:`~meshd.app.handover.REJOIN_FOR` seconds ends (``failed``), as does a channel the new
daemon refuses (with its reason).  A receiver whose name another receiver holds at the
daemon (replaced, or opened while the daemon was away) stops trying and ends every channel
it holds: no daemon would cut them.  The receiver's ``claim`` (a random token it opened
with) makes opening again idempotent: a try whose answer was lost finds its own port, not a
conflict.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from meshd.app.handover import REJOIN_EVERY, REJOIN_FOR, dial_lease
from meshd.app.in_link import Cut, InLink
from meshd.channel.reliable import ReceiverConfig
from meshd.errors import LocalError, MeshdError, ProtocolError
from meshd.local.handover import (MessageReader, decode_in_grant, encode_adopt_in,
                                  recv_messages, send_message)

log = logging.getLogger("meshd.app.streams")

__all__ = ["Rejoin", "Reopen", "read_lease"]

Reopen = Callable[[], dict[str, Any]]
"""Opens the receiver again at its daemon (``rejoin``): the control API's answer."""


class InLinks(Protocol):
    """What this module needs of :class:`~meshd.app.direct_in.InLinks` (typed here: that
    module imports this one)."""

    channel: str
    config: ReceiverConfig
    lock: threading.Lock
    links: dict[bytes, InLink]
    draining: list[InLink]
    deferred: dict[bytes, dict[str, Any]]
    lease: socket.socket | None
    reader: MessageReader
    fds: list[int]
    left: dict[bytes, bytes]
    rejoin: Rejoin

    def give_back(self, ln: InLink, why: str) -> None: ...

    def cut_here(self, cid: bytes, cut: Cut) -> None: ...

    def send(self, msg: dict[str, Any]) -> None: ...

    def send_when_taken(self, cid: bytes, msg: dict[str, Any]) -> None: ...


class Rejoin:
    """The reader thread's way back to a daemon that restarted (see the module docstring)."""

    def __init__(self, reopen: Reopen | None, channel: str) -> None:
        self._reopen = reopen
        self._channel = channel
        self.gone_since: float | None = None
        """When the daemon went away, while a daemon is awaited."""
        self._next_try = 0.0
        self._opened: dict[str, Any] | None = None
        """The control API's answer of the last try, while its lease is still to be dialed."""
        self.orphans: dict[bytes, InLink] = {}
        """Links whose connections broke while the daemon was away."""
        self.given: dict[bytes, InLink] = {}
        """Channels given back to the daemon (``lost``) and not handed over again, nor ended:
        orphans if it goes away."""
        self.senders: dict[bytes, str] = {}
        """Sender names of the channels offered to the last daemon that came back."""
        self.endpoint: str | None = None
        """The ipc endpoint of the receiver at the daemon that came back (the receiving call
        moves its socket there)."""

    def lost(self, links: InLinks, now: float) -> None:
        """The lease reached its end of file (under the lock).  A channel given back whose
        ``lost`` was still queued here becomes an orphan: the daemon never had it back.  One
        the daemon had back ends: it may have gone on with the sender (taken and acknowledged
        frames) before it went away, and a state from before that would stall the channel."""
        held = [ln for cid, ln in self.given.items() if cid not in links.deferred]
        for cid, ln in self.given.items():
            if links.deferred.pop(cid, None) is not None:
                self.orphans[cid] = ln
        self.given.clear()
        for ln in held:
            links.cut_here(ln.cid, Cut(ln.cid, ln.sender_name, "failed",
                                       "the daemon went away while it held the channel", True))
        if self._reopen is not None:
            self.gone_since, self._next_try, self._opened = now, now, None
        else:
            self._end_orphans(links, "the daemon went away", True)

    def gave(self, ln: InLink) -> None:
        """(Under the lock.)  ``ln``'s channel went back to the daemon (``lost``)."""
        self.given[ln.cid] = ln

    def orphan(self, ln: InLink, why: str) -> Cut | None:
        """(Under the lock.)  ``ln``'s connection broke while the daemon was away: kept for the
        daemon that comes back (None), or, if none is awaited, the end to tell once what it
        holds is handed out."""
        if self.gone_since is None:
            return Cut(ln.cid, ln.sender_name, "failed",
                       f"the connection broke ({why}) while the daemon was away", True)
        self.orphans[ln.cid] = ln
        return None

    def wait(self, now: float) -> float | None:
        """Seconds until the next try; None while no daemon is awaited."""
        return None if self.gone_since is None else max(0.0, self._next_try - now)

    def step(self, links: InLinks, now: float) -> bool:
        """(The reader thread, outside the lock.)  Try to come back to the daemon if a try is
        due; whether the receiving call has something new (a new endpoint, ended orphans)."""
        if self._reopen is None or self.gone_since is None or now < self._next_try:
            return False
        self._next_try = now + REJOIN_EVERY
        woke = False
        if now - self.gone_since > REJOIN_FOR and self.orphans:
            self._end_orphans(links, f"the connection broke while the daemon was away, and it"
                                     f" was not back within {REJOIN_FOR:.0f} s")
            woke = True
        try:
            # A receiver opened at the last try whose lease could not be dialed is dialed
            # again: opening it again would find the name taken (by this receiver).
            info = self._opened if self._opened is not None else self._reopen()
            self._opened = info
            path, token = info.get("handover"), info.get("port")
            lease = (dial_lease(str(path), {"t": "receive", "port": str(token)})
                     if path and token else None)
            self._opened = None
        except LocalError as exc:
            if exc.reason != "conflict":
                return woke
            log.warning("receiver %r: another receiver of the name is open at the daemon;"
                        " the channels held here end", self._channel)
            self.gone_since = None
            with links.lock:
                why = "another receiver of the name is open at the daemon"
                self.orphans.update(links.links)
                self._end_orphans(links, why, True)
            return True
        except (MeshdError, OSError):
            return woke  # not back yet
        self._adopt_all(links, lease, str(info.get("endpoint", "")))
        return True

    def _adopt_all(self, links: InLinks, lease: socket.socket | None, endpoint: str) -> None:
        """Offer every channel held here to the daemon that came back (``lease``: its hand-over
        lease; None if it hands nothing over any more: the orphans end)."""
        with links.lock:
            self.gone_since = None
            self.endpoint = endpoint or None
            if lease is None:
                log.warning("receiver %r: its daemon came back without hand-over; the channels"
                            " held here end as their connections do", self._channel)
                self._end_orphans(links, "the daemon came back without hand-over", locked=True)
                return
            links.lease = lease
            self.senders = {}
            for ln in links.links.values():
                self.senders[ln.cid] = ln.sender_name
                try:  # with a descriptor of its socket: the daemon keeps it to cut it
                    send_message(lease, encode_adopt_in(ln.core.give_back(), ln.core.ctl_end or 0,
                                                        ln.sender_name, ln.path, True, ln.relay),
                                 ln.sock.fileno())
                except OSError:
                    break  # the daemon went away again: the reader thread sees the end of file
            for ln in self.orphans.values():
                self.senders[ln.cid] = ln.sender_name
                links.deferred.pop(ln.cid, None)
                links.send_when_taken(ln.cid, encode_adopt_in(
                    ln.core.give_back(), ln.core.ctl_end or 0, ln.sender_name, ln.path, False,
                    ln.relay))
            log.info("receiver %r: back with its daemon; offered it %d channel(s), %d of them"
                     " to resume", self._channel, len(self.senders), len(self.orphans))
            self.orphans.clear()

    def _end_orphans(self, links: InLinks, why: str, locked: bool = False) -> None:
        if not locked:
            with links.lock:
                self._end_orphans(links, why, True)
            return
        for ln in self.orphans.values():
            links.cut_here(ln.cid, Cut(ln.cid, ln.sender_name, "failed", why, True))
        self.orphans.clear()


def read_lease(links: InLinks, lease: socket.socket) -> bool:
    """Read what the daemon sent on ``lease`` and act on it (the reader thread); whether the
    receiving call has something new."""
    try:
        msgs = recv_messages(lease, links.reader, links.fds)
    except (OSError, LocalError, ProtocolError) as exc:
        # The daemon went away: the links go on (their connections do not need it).
        log.info("receiver %r: the daemon left the hand-over socket: %s", links.channel, exc)
        with links.lock:
            links.lease = None
            lease.close()
            links.rejoin.lost(links, time.monotonic())
        return True
    for msg in msgs:
        t = msg["t"]
        if t == "grant-in" and links.fds:
            granted(links, msg, links.fds.pop(0))
            continue
        cid = _cid(msg)
        if t == "left" and isinstance(msg.get("b"), bytes):
            links.left[cid] = links.left.get(cid, b"") + msg["b"]
            continue
        with links.lock:
            ln = links.links.get(cid)
            if t == "yield" and ln is not None:
                links.give_back(ln, "the sender resumed on a new connection")
            elif t == "cut":
                tell = msg.get("tell") is True  # an adopt-in refused: no end notice follows
                name = ln.sender_name if ln is not None else links.rejoin.senders.get(cid, "")
                links.cut_here(cid, Cut(cid, name if tell else "",
                                        str(msg.get("reason", "failed")),
                                        str(msg.get("message", "")), tell))
    return True


def granted(links: InLinks, msg: dict[str, Any], fd: int) -> None:
    """The daemon handed a channel over (``grant-in`` with its descriptor ``fd``)."""
    cid = msg.get("cid")
    ln = _link_of(msg, fd, links.channel, links.config,
                  links.left.pop(cid, b"") if isinstance(cid, bytes) else b"")
    if ln is not None:
        with links.lock:
            if (old := links.links.pop(ln.cid, None)) is not None:
                old.sock.close()
            links.rejoin.given.pop(ln.cid, None)
            ln.wait_for = _wait_for(ln, links.draining)
            links.links[ln.cid] = ln


def _wait_for(ln: InLink, draining: Iterable[InLink]) -> int:
    """The number of the message before which ``ln`` (just granted) waits: what this
    receiver's earlier links of the channel still hold goes out first, and what the daemon sent
    over its ipc socket; what an earlier receiver (closed since) took is never waited for."""
    return max([ln.wait_for, *(d.core.messages for d in draining if d.cid == ln.cid)])



def _link_of(msg: dict[str, Any], fd: int, channel: str, config: ReceiverConfig,
             left: bytes) -> InLink | None:
    """The link a ``grant-in`` message and its descriptor make (``left``: the leftover that
    came ahead of it in ``left`` messages); None (logged, the descriptor closed) if this end
    cannot take it."""
    sock = socket.socket(fileno=fd)
    try:
        info = decode_in_grant(msg)
        if info.window is not None:  # the site's window: the sender's credit was made by it
            config = ReceiverConfig(window_messages=info.window[0], window_bytes=info.window[1])
        return InLink(info._replace(leftover=left + info.leftover), sock, channel, config)
    except (ProtocolError, LocalError) as exc:
        log.warning("receiver %r: a grant this end cannot take: %s", channel, exc)
        sock.close()
        return None


def _cid(msg: dict[str, Any]) -> bytes:
    try:
        return bytes.fromhex(str(msg.get("id", "")))
    except ValueError:
        return b""
