"""One local TCP connection of a tunnel: the client's at the consuming site, the target's at
the owning site (asyncio glue bridging a socket to a stream of a :class:`.carrier.Carrier`).

Flow control both ways.  The socket is read with ``recv_into`` straight into the carrier's
reused read buffer, at most as many bytes as the stream has credit for (:meth:`Carrier.read_buffer`),
and the bytes go to the multiplexer uncopied; when it says the credit is spent or some wait,
reading pauses until its ``Writable``.  Bytes for the socket are written at
once; the transport's buffer limit is 0, so asyncio tells us (``resume_writing``) as soon as
everything written has left the process, and only then is it reported consumed (credit goes
back to the far writer).  A slow reader therefore holds at most one window of its stream.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import sys
from typing import Protocol

from meshd.daemon.channels.connection import set_options

log = logging.getLogger("meshd.daemon.tunnels")

_LINGER_RESET = struct.pack("ii", 1, 0)
_DISCARD = memoryview(bytearray(16 << 10))
"""Where a stream with no carrier (or done) reads what it ignores."""
WRITE_COPIES = sys.version_info < (3, 12)
"""asyncio's socket transport copies what it cannot send at once (3.11: into a bytearray), so
a buffer written to it may be reused right after :meth:`LocalStream.write`; later versions may
keep a view, so the carrier then hands over buffers of their own."""


class Carrier(Protocol):
    """What a local stream tells the data connection that carries it (:class:`.carrier.Carrier`)."""

    def read_buffer(self, sid: int) -> memoryview: ...
    def read_done(self, sid: int, n: int) -> bool: ...
    def finish(self, sid: int) -> None: ...
    def consumed(self, sid: int, n: int, *, drained: bool) -> None: ...
    def local_gone(self, sid: int) -> None: ...
    def held(self, n: int) -> None: ...


class LocalStream(asyncio.BufferedProtocol):
    """A local TCP connection carried as stream ``sid`` (set once the stream exists)."""

    def __init__(self, carrier: Carrier | None = None, sid: int = 0) -> None:
        self.carrier = carrier
        self.sid = sid
        self.transport: asyncio.Transport | None = None
        self._early: list[bytes | memoryview] = []
        self._early_bytes = 0
        self._early_eof = False
        self._written = 0
        self._reported = 0
        self._read_paused = False
        self._carrier_paused = False
        self.done = False
        self.connected = asyncio.get_running_loop().create_future()
        self.connecting: asyncio.Task[None] | None = None
        """Owner: the connect to the target while it is under way (cancelled by :meth:`reset`)."""

    # -- asyncio callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.done:  # its stream went while the target connection was being made
            self.reset()
            return
        transport.set_write_buffer_limits(high=0, low=0)
        set_options(transport, (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1))
        if self.carrier is None:  # waits for its stream (the consumer's data connection)
            transport.pause_reading()
            self._read_paused = True
        early, self._early = self._early, []
        self._hold(-self._early_bytes)
        for data in early:
            self.write(data)
        if self._early_eof:
            self.write_eof()
        if not self.connected.done():
            self.connected.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.carrier is None or self.done:
            return _DISCARD
        return self.carrier.read_buffer(self.sid)

    def buffer_updated(self, nbytes: int) -> None:
        if self.carrier is None or self.done:
            return
        if not self.carrier.read_done(self.sid, nbytes):
            self.pause()

    def eof_received(self) -> bool:
        if self.carrier is not None and not self.done:
            self.carrier.finish(self.sid)
        return True  # keep the write side open (a half-close)

    def resume_writing(self) -> None:
        self._report()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connected.done():
            self.connected.set_exception(exc or ConnectionError("closed"))
        if not self.done:
            self.done = True
            if self.carrier is not None:
                self.carrier.local_gone(self.sid)

    # -- what the carrier asks ---------------------------------------------------------------

    def attach(self, carrier: Carrier, sid: int) -> None:
        """The stream exists now: start reading."""
        self.carrier, self.sid = carrier, sid
        self.resume()

    def write(self, data: bytes | memoryview) -> None:
        t = self.transport
        if t is None:  # the target connect is under way (bounded: window, and the carrier's MAX_HELD)
            self._early.append(bytes(data))
            self._hold(len(data))
            return
        if t.is_closing():
            return
        t.write(data)
        self._written += len(data)
        self._report()

    def write_eof(self) -> None:
        t = self.transport
        if t is None:
            self._early_eof = True
        elif not t.is_closing() and t.can_write_eof():
            t.write_eof()

    def pause(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._read_paused and not self._carrier_paused and self.transport is not None \
                and not self.transport.is_closing():
            self._read_paused = False
            self.transport.resume_reading()

    def carrier_paused(self, paused: bool) -> None:
        """The data connection's send buffer is over its mark (all streams wait) or below."""
        self._carrier_paused = paused
        if paused:
            self.pause()

    def reset(self) -> None:
        """End the local connection with a TCP reset (the far end reset, refused or was lost)."""
        self.done = True
        self._early.clear()
        self._hold(-self._early_bytes)
        t = self.transport
        if t is None:  # a target connect under way: stop it (its socket, its bytes held)
            if self.connecting is not None:
                self.connecting.cancel()
            return
        set_options(t, (socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET))
        t.abort()

    def close(self) -> None:
        """Both directions are done: close once everything written is sent."""
        self.done = True
        if self.transport is not None:
            self.transport.close()

    def _hold(self, n: int) -> None:
        self._early_bytes += n
        if n and self.carrier is not None:
            self.carrier.held(n)

    def _report(self) -> None:
        t = self.transport
        if t is None or self.carrier is None:
            return
        left = t.get_write_buffer_size()
        drained = self._written - left
        if drained > self._reported:
            self.carrier.consumed(self.sid, drained - self._reported, drained=left == 0)
            self._reported = drained
