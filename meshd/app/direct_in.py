"""A receiver's handed-over channels in the application: a reader thread, and what the
receiving call takes from it (the sync and the asyncio receiver share this).

The receiving daemon answers each channel's Hello and opens its first frame, then hands the
connected data socket and the channel's receiving end over (:mod:`meshd.local.handover`,
``grant-in``); :class:`~meshd.app.in_link.InLink` runs one such channel with the daemon's own
pure core (:class:`~meshd.channel.inbound.ReceivingEnd`).

Two threads share the links, under one lock.  The *reader thread* (one per receiver) waits on
the hand-over socket and every link's socket: it reads each record into one buffer it reuses,
opens the frame into a new block (which the messages' arrays will view), feeds the core, takes
up to :data:`~meshd.app.in_link.AHEAD_BYTES` of what it holds ahead of the application and
acknowledges at once: a sender's ``flush`` returns while the application is busy, and the
buffering is what it was when the daemon carried the data (a window in the core, as much again
taken ahead).  The *receiving call* (:meth:`InLinks.take`) hands out what the links hold, in
order, decodes the messages and writes the credit that this frees.

A broken connection, or one the daemon asks back (``yield``: the sender resumed on a new
connection), goes back to the daemon at once with the end's state (``lost``); what its core held
counts as taken ahead and is still handed out.  A channel the sender closed is reported
``finished`` once all of it is here; its end notice comes over ipc, after what is held of it.
Messages that the daemon delivered over the ipc socket before a hand-over come first: a link is
handed out only once the ipc socket delivered up to its first message.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

from meshd.app.handover import dial_lease
from meshd.app.in_link import AHEAD_BYTES, Broken, Cut, InLink
from meshd.app.lease_in import Rejoin, Reopen, read_lease
from meshd.app.message import Message
from meshd.channel.reliable import ReceiverConfig
from meshd.errors import LocalError
from meshd.local.handover import MessageReader, encode_state, pack

log = logging.getLogger("meshd.app.streams")

__all__ = ["Cut", "InLink", "InLinks"]

REPORT_EVERY = 0.5
"""Seconds between counter reports to the daemon (for ``meshd channels``) while data flows."""
REPORT_GAP = 0.05
"""Fewest seconds between two reports (see :func:`_report`): a receiver that keeps up would
otherwise report 100 times a second, which cost its daemon 0.03-0.06 CPU-s/GB at 64 KiB."""
FRAMES_PER_WAKE = 8
"""Most records the reader thread takes from one link before it looks at the others."""


class InLinks:
    """A receiver's hand-over lease, the channels it was given and their reader thread (see
    the module docstring)."""

    def __init__(self, path: str, token: str, channel: str,
                 config: ReceiverConfig = ReceiverConfig(), reopen: Reopen | None = None) -> None:
        """``reopen``: opens this receiver again at a daemon that restarted (see
        :mod:`.lease_in`); None: the channels end when their connections break after the
        daemon went away."""
        self.channel = channel
        self.config = config
        try:
            self.lease: socket.socket | None = dial_lease(path, {"t": "receive", "port": token})
        except OSError as exc:
            raise LocalError(f"cannot reach the daemon's hand-over socket: {exc}",
                             reason="handover") from None
        self.lock = threading.Lock()
        self.links: dict[bytes, InLink] = {}
        self.next_message: dict[bytes, int] = {}
        """Per channel, the number of the next message to hand out (from either source)."""
        self.ended: list[Cut] = []
        self.draining: list[InLink] = []  # given back, with messages still to hand out
        self.deferred: dict[bytes, dict[str, Any]] = {}
        """Per channel, a ``lost`` held back until the receiving call takes what is ahead."""
        self._retired: list[socket.socket] = []  # closed by the reader thread only
        self.wake, self._wake_w = socket.socketpair()
        """Readable when the receiving call has something to take (:meth:`take`)."""
        self._poke_r, self._poke_w = socket.socketpair()
        for s in (self.wake, self._wake_w, self._poke_r, self._poke_w):
            s.setblocking(False)
        self._closed = False
        self._poke_pending = False
        self.reader = MessageReader()
        self.fds: list[int] = []
        self.left: dict[bytes, bytes] = {}  # leftovers ahead of their grant
        self.rejoin = Rejoin(reopen, channel)
        self._reported, self.owed = 0.0, False  # see _report
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"meshd-rx-{channel}")
        self._thread.start()

    # -- the receiving call ----------------------------------------------------------------------

    def note_delivery(self, cid: bytes, first: int, count: int) -> None:
        """The ipc socket delivered messages ``first`` to ``first+count-1`` of ``cid``."""
        with self.lock:
            self.next_message[cid] = max(self.next_message.get(cid, 0), first + count)

    def take(self) -> tuple[list[Message], list[Cut]]:
        """The messages the links hold, in order, and the channels that ended here."""
        _drain(self.wake)
        out: list[Message] = []
        with self.lock:
            for ln in [*self.draining, *self.links.values()]:
                if self.next_message.get(ln.cid, 0) < ln.wait_for:
                    continue  # the daemon's (or a given-back link's) deliveries come first
                got = ln.pop()
                if got:
                    out += got
                self.next_message[ln.cid] = max(self.next_message.get(ln.cid, 0),
                                                ln.core.messages)
                if ln.broken is not None:
                    self.draining.remove(ln)
                    if ln.cut_after is not None:
                        self.ended.append(ln.cut_after)
                    continue
                ln.write_feedback()
                if ln.core.finished:
                    self._finished(ln)
            for cid in [c for c in self.deferred if self._ahead(c) <= AHEAD_BYTES]:
                self.send(self.deferred.pop(cid))
            cut, self.ended = self.ended, []
            _report(self)
        return out, cut

    def take_channel(self, cid: bytes) -> list[Message]:
        """What is held of channel ``cid`` (its end notice came: it goes before it)."""
        out: list[Message] = []
        with self.lock:
            for ln in [*self.draining, *self.links.values()]:
                if ln.cid == cid:
                    out += ln.pop()
                    if ln in self.draining:
                        self.draining.remove(ln)
        return out

    def drop(self, cid: bytes) -> None:
        """Forget channel ``cid`` (it ended): nothing more of it is read or handed out."""
        with self.lock:
            ln = self.links.pop(cid, None)
            if ln is not None:
                self._retired.append(ln.sock)
            self.draining = [d for d in self.draining if d.cid != cid]
            self.deferred.pop(cid, None)
            self.rejoin.given.pop(cid, None)
            self._poke()

    def close(self) -> None:
        """Give every channel back to the daemon (what was received and not handed out is
        dropped) and stop the reader thread."""
        with self.lock:
            self._closed = True
            self._poke()
        self._thread.join(5.0)  # then nothing is read any more: what it granted is here
        with self.lock:
            for ln in list(self.links.values()):
                self.give_back(ln, "the receiver closed")
            self.draining.clear()
            for msg in self.deferred.values():
                self.send(msg)
            self.deferred.clear()
            # A grant still unread on the lease was never used: the daemon takes it back as it
            # gave it.  Without this word, the lease's end means the application died.
            self.send({"t": "bye"})
            for s in self._retired:
                s.close()
            self._retired.clear()
            if self.lease is not None:
                self.lease.close()
                self.lease = None
        for s in (self.wake, self._wake_w, self._poke_r, self._poke_w):
            s.close()

    def _finished(self, ln: InLink) -> None:
        """(Under the lock.)  The sender closed ``ln`` and all of it is in :attr:`pending`:
        the daemon forgets the channel and sends its end notice over ipc (the receiving call
        hands out what is pending first: :meth:`take_channel`)."""
        ln.broken = "finished"
        self.links.pop(ln.cid, None)
        self._retired.append(ln.sock)
        self.draining.append(ln)
        self._poke()
        core = ln.core
        if self.lease is None:
            ln.cut_after = Cut(ln.cid, ln.sender_name, "closed",
                               "the sender closed the channel", True)
        else:
            self.send({"t": "finished", "id": ln.cid.hex(), "m": core.messages,
                        "b": core.bytes})

    def give_back(self, ln: InLink, why: str) -> None:
        """(Under the lock.)  ``ln``'s connection cannot go on, or the daemon asked for it: the
        channel goes back to the daemon, which resumes it on the sender's next connection;
        what the core held is still handed out (:meth:`take`).  Without a daemon the channel
        ends here."""
        ln.pending_bytes += ln.drain_core()
        ln.broken = why
        self.links.pop(ln.cid, None)
        self._retired.append(ln.sock)
        self.draining.append(ln)
        self._poke()
        if self.lease is None:  # kept for a daemon that comes back, or ended here
            ln.cut_after = self.rejoin.orphan(ln, why)
        else:
            self.rejoin.gave(ln)
            self.send_when_taken(ln.cid, {"t": "lost", "why": why[:200],
                                          **encode_state(ln.core.give_back())})

    def _ahead(self, cid: bytes) -> int:  # under the lock; see _ahead_of
        return _ahead_of([*self.draining, *self.links.values()], cid)

    def send(self, msg: dict[str, Any]) -> None:
        if self.lease is None:
            return
        try:
            self.lease.sendall(pack(msg))
        except OSError:
            pass  # the daemon went away: the reader thread sees its end of file

    # -- the reader thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.lock:
                if self._closed:
                    return
                for s in self._retired:
                    s.close()
                self._retired.clear()
                self._poke_pending = False
                _report(self)
                socks = {ln.sock: ln for ln in self.links.values()}
                lease = self.lease
            watch = [self._poke_r, *socks, *([lease] if lease is not None else [])]
            # Bytes the daemon read past the last record come with the grant: no readiness of
            # the socket announces them.
            buffered = [s for s, ln in socks.items() if ln.records.buffered]
            wait = 0 if buffered else REPORT_GAP if self.owed else REPORT_EVERY
            if (again := self.rejoin.wait(time.monotonic())) is not None:
                wait = min(wait, again)
            ready, _, _ = select.select(watch, [], [], wait)
            woke = False
            for s in [*ready, *(b for b in buffered if b not in ready)]:
                if s is self._poke_r:
                    _drain(s)
                elif s is lease:
                    woke |= read_lease(self, lease)
                else:
                    woke |= self._read_link(socks[s])
            woke |= self._give_back_stalled(socks.values())
            woke |= self.rejoin.step(self, time.monotonic())
            if woke:
                try:
                    self._wake_w.send(b"\0")
                except (BlockingIOError, InterruptedError):
                    pass  # a wake is pending already

    def _read_link(self, ln: InLink) -> bool:
        """Take up to :data:`FRAMES_PER_WAKE` records of ``ln``; whether the receiving call
        has something new to take."""
        for n in range(FRAMES_PER_WAKE):
            try:
                rec = ln.records.next(time.monotonic())  # outside the lock: only we read it
            except Broken as exc:
                with self.lock:
                    if self.links.get(ln.cid) is ln:
                        self.give_back(ln, str(exc))
                return True
            if rec is None:
                return n > 0
            with self.lock:
                if self.links.get(ln.cid) is not ln:
                    return False
                try:
                    ln.frame(*rec)
                    if ln.core.closed_by_sender:  # all of it is here: the daemon may forget it
                        ln.pending_bytes += ln.drain_core()
                        self._finished(ln)
                        return True
                    room = AHEAD_BYTES - self._ahead(ln.cid)
                    if room > 0:
                        ln.pending_bytes += ln.drain_core(room)
                    ln.write_feedback()
                except Broken as exc:
                    self.give_back(ln, str(exc))
                    return True
                if ln.broken is not None:  # the Feedback could not be written
                    self.give_back(ln, ln.broken)
                    return True
        return True

    def _give_back_stalled(self, links: Iterable[InLink]) -> bool:
        """Give back the links whose sender stalled in the middle of a record (see
        :meth:`~meshd.app.in_link._Records.stalled`)."""
        with self.lock:
            stalled = [(ln, why) for ln, why in _stalled(links) if self.links.get(ln.cid) is ln]
            for ln, why in stalled:
                self.give_back(ln, why)
        return bool(stalled)

    def cut_here(self, cid: bytes, cut: Cut) -> None:
        """(Under the lock.)  Channel ``cid`` ended: what is held of it is dropped (the daemon
        cut it and its end notice follows on ipc), or, with ``cut.tell`` (no daemon tells this
        end), handed out first and the end told after it."""
        self.rejoin.given.pop(cid, None)
        if (ln := self.links.pop(cid, None)) is not None:
            self._retired.append(ln.sock)
            self._poke()
            if cut.tell:
                ln.pending_bytes += ln.drain_core()
                ln.broken = cut.message
                self.draining.append(ln)
        held = [d for d in self.draining if d.cid == cid]
        if cut.tell and held:
            held[-1].cut_after = cut
            return
        self.draining = [d for d in self.draining if d.cid != cid]
        self.deferred.pop(cid, None)
        self.ended.append(cut)

    def send_when_taken(self, cid: bytes, msg: dict[str, Any]) -> None:
        """(Under the lock.)  Send ``msg`` now, or once the receiving call took what is ahead
        of channel ``cid`` down to :data:`AHEAD_BYTES` (a channel given to the daemon gets a
        window more from it)."""
        if self._ahead(cid) > AHEAD_BYTES:
            self.deferred[cid] = msg
        else:
            self.send(msg)

    def _poke(self) -> None:
        """Make the reader thread look at the links again (under the lock)."""
        if self._poke_pending:
            return
        self._poke_pending = True
        try:
            self._poke_w.send(b"\0")
        except OSError:
            pass


def _ahead_of(links: Iterable[InLink], cid: bytes) -> int:
    """Payload bytes of channel ``cid`` taken ahead of the receiving call on ``links``: at most
    :data:`AHEAD_BYTES` beyond the window in the core.  A link given back while more is ahead
    goes back to the daemon (which would grant the sender a whole window again) only once the
    receiving call took the rest down to it."""
    return sum(ln.pending_bytes for ln in links if ln.cid == cid)


def _stalled(links: Iterable[InLink]) -> list[tuple[InLink, str]]:
    """The links whose sender stalled in the middle of a record (what it announced would
    otherwise stay allocated, and the channel stuck, for ever), and why."""
    now = time.monotonic()
    return [(ln, why) for ln in links if (why := ln.records.stalled(now)) is not None]


def _report(links: InLinks) -> None:
    """(Under the lock.)  Tell the daemon the counters that changed (for ``meshd channels``):
    at once when every link has handed out all it holds (a listing after the last message
    shows it), else at most every :data:`REPORT_EVERY` seconds; never more often than every
    :data:`REPORT_GAP` seconds (a change within it is *owed*, and the reader thread, which
    calls this too, sends it that much later)."""
    t = time.monotonic()
    changed = [ln for ln in links.links.values() if ln.core.messages != ln.reported]
    if links.lease is None or not changed:
        links.owed = False
        return
    caught_up = all(not ln.pending and not ln.core.rx.held_messages for ln in changed)
    since = t - links._reported
    if since < REPORT_GAP or (since < REPORT_EVERY and not caught_up):
        links.owed = caught_up
        return
    links._reported = t
    links.owed = False
    for ln in changed:
        core = ln.core
        ln.reported = core.messages
        links.send({"t": "count", "id": ln.cid.hex(), "m": core.messages, "b": core.bytes,
                     "dup": core.rx.duplicates})


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except (BlockingIOError, InterruptedError, OSError):
        pass
