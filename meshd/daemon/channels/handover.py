"""Handing a sending channel's data connection to its application (asyncio glue).

The daemon stays the control plane: it races the paths, runs the handshake and resumes a
channel after a broken connection; the application seals and writes the frames itself
(:mod:`meshd.channel.stream`).  :class:`Handovers` serves ``<home>/handover.sock`` (the
messages are in :mod:`meshd.local.handover`); one :class:`Lease` per channel whose application
took it.  Every connection the channel adopts (the first, and each resumed one) goes to the
application with a grant; the application's ``lost`` gives the channel back to race again; its
end of file (the application died) closes the channel once a new connection lets the daemon tell
the receiver (CTRL_CLOSE).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from pathlib import Path as FsPath
from typing import Any, Protocol

from meshd.state.files import file_id, stale_socket, unlink_if_same
from meshd.channel.control import check_name
from meshd.channel.handshake import ChannelKeys
from meshd.channel.outbound import SendingEnd
from meshd.channel.paths import Path, PathKind
from meshd.channel.stream import LEASE, Grant
from meshd.daemon.channels.connection import DataConnection, detach
from meshd.daemon.channels.handover_in import (InLease, cut_socket, forget_socket, keep,
                                               path_refusal, recv_with_fds, refuse,
                                               serve_messages, tcp_socket)
from meshd.daemon.tasks import TaskSet
from meshd.errors import LocalError, ProtocolError
from meshd.local.handover import (MessageReader, as_bytes, as_count, encode_grant, pack,
                                  send_message)

log = logging.getLogger("meshd.daemon.channels.handover")


class OutChannel(Protocol):
    """What this module needs of :class:`.outbound.OutChannel` (typed here: that module
    imports this one)."""

    name: str
    cid: bytes
    peer: bytes
    core: SendingEnd
    conn: DataConnection | None
    owner: Any
    handover: bool
    lease: Lease | None
    app_gone: bool
    reported: dict[str, int] | None

    def pump(self) -> None: ...


class Lease:
    """One application's hold on one handed-over sending channel."""

    def __init__(self, owner: Handovers, sock: socket.socket, ch: OutChannel) -> None:
        self.owner = owner
        self.sock = sock
        self.ch = ch
        self.task: asyncio.Task[None] | None = None
        """:meth:`run`, while it serves the application."""
        self.closed = False
        self.dup: socket.socket | None = None
        """The daemon's duplicate of the connection it handed over, never read: to cut the
        connection when the application gives it back, dies, or the channel ends (a
        relay revoked, say), whatever the application does."""

    def cut(self) -> None:
        """Cut the handed-over connection (for the application too)."""
        cut_socket(self.dup)
        self.dup = None

    def give(self, conn: DataConnection) -> None:
        """Hand ``conn`` (the channel's connection, no longer the daemon's) to the app."""
        self.owner.tasks.spawn(self._give(conn), f"handover-{self.ch.name}")

    async def _give(self, conn: DataConnection) -> None:
        ch = self.ch
        detached = await detach(conn)
        if detached is None or self.closed or ch.core.ended:
            if detached is not None:
                detached[0].close()
            elif not ch.core.ended:
                ch.core.connection_lost(time.monotonic())
                ch.pump()
            return
        sock, left = detached
        core = ch.core
        keys = core.keys
        assert keys is not None and core.path is not None
        ctl_seal, ctl_open, feedback = core.hand_over()
        max_seq, max_bytes = core.sender.credit
        grant = Grant(keys.channel_id, keys.cipher, keys.send_key, keys.recv_key,
                      keys.send_direction, keys.recv_direction, ctl_seal, ctl_open, max_seq,
                      max_bytes, feedback, core.path.kind.value, ch.peer, left, core.path.relay)
        if self.dup is not None:
            self.dup.close()
        self.dup = sock  # kept unread, to cut the connection (see cut_socket)
        try:
            send_message(self.sock, encode_grant(grant), sock.fileno())
            self.owner.counters.count("handovers")
        except OSError as exc:
            log.info("channel %r: cannot hand the connection over: %s", ch.name, exc)
            self.close()

    async def run(self, reader: MessageReader, early: list[dict[str, Any]]) -> None:
        """Serve the application's messages until it goes away (see :func:`serve_messages`)."""
        self.task = asyncio.current_task()
        try:
            await serve_messages(self, self._on_message, f"channel {self.ch.name!r}", reader,
                                 early)
        finally:
            self.task = None
            if not self.closed:
                self.closed = True
                forget_socket(self.sock)
                self.cut()
                app_left(self.ch)

    def _on_message(self, msg: dict[str, Any]) -> None:
        t, ch = msg["t"], self.ch
        if t == "lost":
            co = as_count(msg.get("co", 0))  # first (a malformed one ends the lease)
            self.cut()
            taken_back(ch, co)
        elif t == "count":
            ch.reported = {k: int(msg[k]) for k in ("messages", "bytes", "acked", "retransmits",
                                                    "buffered") if isinstance(msg.get(k), int)}
            ch.core.acked_messages = max(ch.core.acked_messages, ch.reported.get("acked", 0))
            ch.core.messages = max(ch.core.messages, ch.reported.get("messages", 0))
            ch.core.bytes = max(ch.core.bytes, ch.reported.get("bytes", 0))

    def ended(self, reason: str, message: str) -> None:
        """The channel ended on its own: tell the application, then close."""
        if not self.closed:
            try:
                self.sock.send(pack({"t": "ended", "reason": reason, "message": message}))
            except OSError:
                pass
        self.cut()
        self.close()

    def close(self) -> None:
        """Let go of the application (the daemon stops: the connection goes on with it)."""
        if not self.closed:
            self.closed = True
            forget_socket(self.sock)
            if self.dup is not None:
                self.dup.close()
                self.dup = None
            if self.task is not None and self.task is not asyncio.current_task():
                self.task.cancel()


def offer(ch: OutChannel) -> None:
    """``ch`` has a connection (first or resumed): to its application if one holds a lease;
    if its application is gone, the channel closes now that it can tell the receiver."""
    if ch.core.ended or ch.conn is None or ch.core.keys is None:
        return
    if ch.app_gone:
        log.info("channel %r: its application is gone; closed", ch.name)
        ch.owner.counters.count("orphans_closed")
        ch.owner.close(ch.cid)
        return
    if ch.lease is not None and not ch.lease.closed:
        conn, ch.conn = ch.conn, None
        ch.lease.give(conn)


def taken_back(ch: OutChannel, ctl_open: int) -> None:
    """The application's connection broke: the daemon races again and resumes."""
    if ch.core.ended:
        return
    ch.core.taken_back(ctl_open, time.monotonic())
    ch.pump()


def app_left(ch: OutChannel) -> None:
    """The application closed its hand-over socket without closing the channel (it died):
    what it had not had acknowledged is gone with it; the channel resumes on a new connection
    only to tell the receiver it is closed (see :func:`offer`)."""
    ch.lease = None
    if ch.core.ended or ch.owner.out.get(ch.cid) is not ch:
        return
    ch.app_gone = True
    if ch.conn is not None:  # never handed over: close at once
        offer(ch)
    elif ch.core.handed_over:
        ch.core.taken_back(0, time.monotonic())
        ch.pump()


class Handovers:
    """The hand-over socket of this daemon (see the module docstring)."""

    def __init__(self, path: FsPath, sending: Any, receiving: Any, tasks: TaskSet,
                 counters: Any) -> None:
        """``sending``, ``receiving``: the :class:`.outbound.Sending` and
        :class:`.inbound.Receiving` whose channels are handed over."""
        self.path = path
        self.sending = sending
        self.receiving = receiving
        self.tasks = tasks
        self.counters = counters
        self._listener: socket.socket | None = None
        self._path_id: tuple[int, int] | None = None

    @property
    def available(self) -> bool:
        return self._listener is not None

    def start(self) -> None:
        """Serve the hand-over socket (a stale one is replaced); StateError if something that
        is not a socket is at its path (it stays), a warning if the socket cannot be made."""
        if stale_socket(self.path, "hand-over socket"):
            self.path.unlink()
        try:
            lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o177)
            try:
                lsock.bind(str(self.path))
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
            self._path_id = file_id(self.path)
            lsock.listen(64)
            lsock.setblocking(False)
        except OSError as exc:
            log.warning("no hand-over socket (%s): channels carry their data through the"
                        " daemon", exc)
            return
        self._listener = lsock
        self.tasks.spawn(self._accept(), "handover-accept")

    async def _accept(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self._listener)
            sock.setblocking(False)
            self.tasks.spawn(self._serve(sock), "handover-serve")

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        reader = MessageReader()
        fds: list[int] = []  # a receiver's adopt-in right behind its first message brings one
        try:
            msgs: list[dict[str, Any]] = []
            while not msgs:
                data, got = await asyncio.wait_for(recv_with_fds(loop, sock), 10.0)
                keep(fds, got)
                if not data:
                    keep(None, fds)
                    sock.close()
                    return
                msgs = reader.feed(data)
            first = msgs[0]
            cid = (bytes.fromhex(str(first.get("id", ""))) if first["t"] not in ("adopt",
                                                                                "receive")
                   else b"")
        except (OSError, ProtocolError, ValueError, asyncio.TimeoutError):
            keep(None, fds)
            forget_socket(sock)  # a timed-out read may still have its reader registered
            return
        if first["t"] == "receive":
            await self._serve_receiver(sock, str(first.get("port", "")), reader, msgs[1:], fds)
            return
        dup = None  # a live adopted channel's socket: kept to cut it (revocations)
        refused = None
        try:
            if first["t"] == "adopt":
                try:
                    dup = tcp_socket(fds) if first.get("live") else None
                    ch = self._adopt(first)
                except (KeyError, TypeError, ValueError, OverflowError, LocalError) as exc:
                    log.info("refused to adopt a channel: %s", exc)
                    ch, refused = None, exc.reason if isinstance(exc, LocalError) else "malformed"
                cid = ch.cid if ch is not None else b""
        finally:
            keep(None, fds)  # whatever else came with the first message
        ch = self.sending.out.get(cid)
        why = (refused or "not-found" if ch is None else "not-handover" if not ch.handover
               else "taken" if ch.lease is not None else None)
        if why is not None or ch is None:
            if dup is not None:
                dup.close()
            refuse(sock, str(why))
            return
        lease = ch.lease = Lease(self, sock, ch)
        lease.dup = dup
        if first["t"] == "adopt" and not first.get("live"):
            taken_back(ch, int(first["co"]))
        offer(ch)
        await lease.run(reader, msgs[1:])

    async def _serve_receiver(self, sock: socket.socket, token: str, reader: MessageReader,
                              early: list[dict[str, Any]], fds: list[int]) -> None:
        """A receiving application takes its receiver's channels (:mod:`.handover_in`)."""
        given = token.encode("utf-8", "replace")  # compare_digest takes no non-ASCII str
        port = next((p for p in self.receiving.ports.values()
                     if secrets.compare_digest(p.token.encode(), given)), None)
        why = "not-found" if port is None else "taken" if port.lease is not None else None
        if why is not None or port is None:
            keep(None, fds)
            refuse(sock, str(why))
            return
        lease = port.lease = InLease(self.receiving, port, sock)
        lease.fds += fds
        self.receiving.offer_all(port)
        await lease.run(reader, early)

    def _adopt(self, m: dict[str, Any]) -> Any:
        """A channel this daemon does not know from an application that holds its keys (the
        daemon restarted under it); LocalError if it cannot be taken on."""
        cid, peer, name = bytes.fromhex(str(m["id"])), as_bytes(m["peer"]), str(m["name"])
        if cid in self.sending.out:
            raise LocalError("that channel is open here", reason="conflict")
        if not self.sending.view.is_member(peer):
            raise LocalError("the receiver is no member", reason="not-member")
        check_name(name)
        keys = ChannelKeys(cid, True, peer, as_count(m["cipher"]), as_count(m["sd"]),
                           as_count(m["rd"]), b"", as_bytes(m["sk"]), as_bytes(m["rk"]))
        ce, co = as_count(m["ce"]), as_count(m["co"])
        if ce + LEASE >= 1 << 64:
            raise LocalError("a control-seq lease that ends beyond 2**64", reason="usage")
        path, relay = str(m["path"]), m.get("relay")
        relay = None if relay is None else as_bytes(relay)
        bad_path = path_refusal(self.sending.view, (peer, self.sending.site.public), path, relay)
        if bad_path is not None:
            raise LocalError(bad_path, reason="bad-path")
        ch = self.sending.adopt(name, peer, cid, keys, ce + LEASE, co, Path(PathKind(path), relay))
        self.counters.count("adopted")
        log.info("channel %r to %s: taken on from its application", name,
                 self.sending.name(peer))
        return ch

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            try:
                unlink_if_same(self.path, self._path_id)
            except OSError:
                pass
