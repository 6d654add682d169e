"""Splicing two connected sockets in the kernel (asyncio glue): what one side sends reaches the
other through a pipe with ``splice(2)``, and never enters this process's memory.

A relay passes ciphertext it cannot read (:mod:`meshd.daemon.channels.relay`); copying it
through Python cost the relay daemon a read, a write and a Python call per chunk of every
relayed byte.  Here each direction moves up to :data:`CHUNK` bytes from its source socket into
its own pipe and from the pipe to the other socket, both without a copy to user space.

Each direction waits on its own readiness: the source readable (a reader on it), or the
destination writable (a writer on it) while the pipe still holds what the destination did not
take.  So a slow destination stops its source being read: flow control is TCP's, and at most a
pipe (:data:`PIPE_BYTES`) is held per direction.  An end of file from one side shuts the other
side's writing (half-close passes through).  A side that breaks (a reset) ends both directions
it is in: what it sent before still reaches the other side, followed by an end of file, never
by a reset, which would make the other side's kernel drop what it had not read yet (a refusal
sent just before a close, say).  Once both directions ended, both sockets close and
``on_done`` is called once.  At most :data:`CHUNKS_PER_TURN` chunks move per turn of the loop,
so one busy relay does not starve the rest of the daemon.
Linux only (:data:`AVAILABLE`); elsewhere the relay copies (:mod:`meshd.peer.splice`).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import struct
from collections.abc import Callable

AVAILABLE = hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")
"""Whether this system has ``splice(2)`` (Linux, Python 3.10 and later)."""
CHUNK = 1 << 20
"""Most bytes one ``splice`` call moves."""
PIPE_BYTES = 1 << 20
"""The pipe size asked for per direction (the system may give less: its pipe-max-size)."""
CHUNKS_PER_TURN = 8
"""Most chunks one direction moves before it lets the loop run other work."""
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


class _Direction:
    """One way of the splice: from ``src`` through a pipe to ``dst``."""

    __slots__ = ("done", "dst", "eof", "first", "in_pipe", "moved", "pipe_r", "pipe_w", "src",
                 "waits")

    def __init__(self, src: socket.socket, dst: socket.socket, first: bytes) -> None:
        self.src, self.dst = src, dst
        self.first = memoryview(first)
        """Bytes read from ``src`` before the splice began: written to ``dst`` before any
        other."""
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.pipe_w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass  # the default size (64 KiB) works, in smaller steps
        self.in_pipe = 0
        self.moved = 0
        """Bytes written to ``dst``."""
        self.eof = False
        """``src`` ended (or broke): once the pipe is empty, ``dst`` is told."""
        self.done = False
        self.waits: str | None = None
        """What this direction waits for: "r" (``src`` readable), "w" (``dst`` writable) or
        None (running, or done)."""


class KernelSplice:
    """Two connected sockets spliced to each other (see the module docstring).  ``a_first`` and
    ``b_first``: bytes already read from ``a`` (for ``b``) and from ``b`` (for ``a``)."""

    def __init__(self, a: socket.socket, b: socket.socket,
                 on_done: Callable[[KernelSplice], None], *, a_first: bytes = b"",
                 b_first: bytes = b"") -> None:
        self._loop = asyncio.get_running_loop()
        self._on_done: Callable[[KernelSplice], None] | None = on_done
        self.closed = False
        self.error: str | None = None
        """Why the splice ended, if not by both sides closing in order."""
        a.setblocking(False)
        b.setblocking(False)
        self._socks = (a, b)
        self._ways = (_Direction(a, b, a_first), _Direction(b, a, b_first))
        for way in self._ways:
            self._loop.call_soon(self._turn, way)

    @property
    def bytes(self) -> int:
        """Bytes passed on, both ways."""
        return sum(w.moved for w in self._ways)

    def _turn(self, way: _Direction) -> None:
        """Move what can move now one way, then wait for what blocks it."""
        if self.closed:
            return
        self._unwait(way)
        if way.done:
            return
        writing = False
        try:
            for _ in range(CHUNKS_PER_TURN):
                writing = bool(way.first or way.in_pipe)
                if way.first:
                    n = way.dst.send(way.first)
                    way.first, way.moved = way.first[n:], way.moved + n
                elif way.in_pipe:
                    n = os.splice(way.pipe_r, way.dst.fileno(), way.in_pipe, flags=_FLAGS)
                    way.in_pipe, way.moved = way.in_pipe - n, way.moved + n
                elif way.eof:
                    self._finish(way, shut=True)
                    return
                else:
                    n = os.splice(way.src.fileno(), way.pipe_w, CHUNK, flags=_FLAGS)
                    if n == 0:
                        way.eof = True
                    way.in_pipe += n
        except BlockingIOError:
            self._wait(way)
            return
        except OSError as exc:
            self.error = self.error or str(exc.strerror or exc)
            if writing:  # the destination is gone: what is left for it is dropped
                self._finish(way, shut=False)
                return
            # The source broke: what it sent before still goes, then the end; nothing more
            # goes to it.
            way.eof = True
            back = self._ways[1] if way is self._ways[0] else self._ways[0]
            if not back.done:
                self._unwait(back)
                self._finish(back, shut=False)
        self._loop.call_soon(self._turn, way)  # more may move: after the others' turn

    def _finish(self, way: _Direction, *, shut: bool) -> None:
        """This way is over: its destination hears the end (``shut``); once both ways are
        over, the splice closes."""
        way.done = True
        if shut:
            try:
                way.dst.shutdown(socket.SHUT_WR)  # the half-close passes through
            except OSError:
                pass
        if all(w.done for w in self._ways):
            self.close(self.error)

    def _wait(self, way: _Direction) -> None:
        if way.first or way.in_pipe:
            way.waits = "w"
            self._loop.add_writer(way.dst.fileno(), self._turn, way)
        else:
            way.waits = "r"
            self._loop.add_reader(way.src.fileno(), self._turn, way)

    def _unwait(self, way: _Direction) -> None:
        if way.waits == "r":
            self._loop.remove_reader(way.src.fileno())
        elif way.waits == "w":
            self._loop.remove_writer(way.dst.fileno())
        way.waits = None

    def close(self, error: str | None = None, *, reset: bool = False) -> None:
        """End the splice now: both sockets close (``reset``: with a reset, as when a site of
        the relayed channel is revoked); ``on_done`` is called once."""
        if self.closed:
            return
        self.closed = True
        self.error = error or self.error
        for way in self._ways:
            self._unwait(way)
            os.close(way.pipe_r)
            os.close(way.pipe_w)
        for sock in self._socks:
            if reset:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            sock.close()
        done, self._on_done = self._on_done, None
        if done is not None:
            done(self)
