"""One public TCP port for two protocols: ZeroMQ peers and our own data connections (asyncio glue).

Theory of operation.  ``PortMux`` owns the public listening socket.  Each accepted connection
starts in the *sniff* phase (``_Sniffer``): nothing is read into any protocol until the first
bytes arrive.  A ZMTP 2/3 greeting starts with 0xFF, so

- first byte 0xFF: the connection is *spliced* byte-for-byte to the internal ZeroMQ ROUTER
  (``zmq_target``, on loopback).  The splice connects from a loopback alias ``127.x.y.z`` that
  stands for the remote IP, so the ROUTER's ``Peer-Address`` tells remote IPs apart and
  ``real_address`` maps it back.  Two ``_Pipe`` protocols copy chunks across with
  :mod:`meshd.peer.splice`, each pausing the other's reading while its own write buffer is above
  the high-water mark;
- anything else: ``on_other(transport, first_bytes)`` returns the protocol that takes the
  connection over (or None to close it).

A connection that sends nothing for ``sniff_timeout`` seconds is dropped.  Strangers are bounded
(:mod:`meshd.peer.limits`): at most ``max_pending`` connections may be in the sniff phase, and
``max_pending_per_source`` from one address; at most ``max_splices`` ZeroMQ splices may be open
(each costs three file descriptors until ZeroMQ's CURVE handshake admits or drops it), and
``max_splices_per_source`` from one address.  A connection over a bound is closed on arrival and
counted.  Nothing per connection is logged above DEBUG, and refusals make one WARNING line a
minute at most, so a port scan or a flood cannot fill the log.

Linux routes all of 127.0.0.0/8 to ``lo``, so the aliases need no setup.  A freed alias keeps its
mapping (a *lingering* alias) until its slot is reused, which happens only after the allocation
cursor has gone round the 16.5 million aliases or the linger list overflows: messages ZeroMQ
queued before a splice closed still map back to the right remote IP.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections import OrderedDict
from typing import Callable

from meshd.peer.limits import RateLimitedLog, SourceLimit, fd_budget
from meshd.peer.splice import SpliceEnd, pair

log = logging.getLogger("meshd.peer.portmux")

ZMTP_FIRST_BYTE = 0xFF
FLUSH_GRACE = 10.0
"""Seconds a closing side may take to flush what it still has to write before it is aborted."""

OnOther = Callable[[asyncio.Transport, bytes], asyncio.BaseProtocol | None]
"""Takes a non-ZeroMQ connection and its first bytes; returns the protocol that takes it over."""

STAT_KEYS = ("accepted", "zmtp", "other", "sniff_timeouts", "refused_busy",
             "refused_busy_source", "refused_splices", "refused_splices_source")
"""Counters of the peer port (cumulative): accepted connections, how each was sniffed, and the
connections refused because a bound (total, or per source address) was reached."""

SPLICE_FDS = 3
"""Descriptors one splice holds in this process: the remote's socket, ours to the ROUTER and
the ROUTER's end of it."""


class AliasPool:
    """Loopback aliases 127.x.y.z, one per remote IP while it has splices open (ref-counted).

    Skips 127.0.0.0, 127.0.0.1 and every address whose last octet is 0 or 255.  A freed alias
    lingers (still maps back) until its slot is needed again; at most ``linger`` do."""

    _BASE = 0x7F000000

    def __init__(self, linger: int = 4096) -> None:
        self._linger_max = linger
        self._cursor = 2
        self._active: dict[str, tuple[str, int]] = {}  # remote -> (alias, refs)
        self._remote_of: dict[str, str] = {}  # alias -> remote, active and lingering
        self._lingering: OrderedDict[str, str] = OrderedDict()  # remote -> alias, oldest first

    def acquire(self, remote: str) -> str:
        """The alias for ``remote`` (the same while any splice from it is open)."""
        held = self._active.get(remote)
        if held is not None:
            self._active[remote] = (held[0], held[1] + 1)
            return held[0]
        alias = self._lingering.pop(remote, None)
        if alias is None:
            alias = self._next_free()
            old = self._remote_of.get(alias)
            if old is not None:  # a lingering alias of another remote: forget it
                del self._lingering[old]
            self._remote_of[alias] = remote
        self._active[remote] = (alias, 1)
        return alias

    def release(self, remote: str) -> None:
        """One splice from ``remote`` ended."""
        alias, refs = self._active[remote]
        if refs > 1:
            self._active[remote] = (alias, refs - 1)
            return
        del self._active[remote]
        self._lingering[remote] = alias
        if len(self._lingering) > self._linger_max:
            _, oldest = self._lingering.popitem(last=False)
            del self._remote_of[oldest]

    def remote_of(self, alias: str) -> str | None:
        return self._remote_of.get(alias)

    def _next_free(self) -> str:
        for _ in range(1 << 24):
            low = self._cursor
            self._cursor = low + 1 if low < 0xFFFFFE else 2
            if low < 2 or low & 0xFF in (0, 0xFF):
                continue
            alias = str(ipaddress.IPv4Address(self._BASE | low))
            remote = self._remote_of.get(alias)
            if remote is None or remote not in self._active:
                return alias
        raise OSError("no free loopback alias left for a splice")


class _Pipe(asyncio.Protocol):
    """One side of a splice: what it reads, the other side writes (:mod:`meshd.peer.splice`)."""

    def __init__(self, splice: _Splice) -> None:
        self.splice = splice
        self.end = SpliceEnd()
        self.other: _Pipe | None = None

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.end.transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.end.transport = transport

    def data_received(self, data: bytes) -> None:
        self.end.received(data)

    def eof_received(self) -> bool | None:
        self.splice.finish(self.other, aborted=False)
        return None  # close this side too, after it has flushed

    def pause_writing(self) -> None:
        self.end.pause_writing()

    def resume_writing(self) -> None:
        self.end.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.end.transport = None
        self.splice.lost(self, exc)


class _Splice:
    """A remote connection and its connection to the internal ROUTER, glued by two pipes."""

    def __init__(self, mux: PortMux, remote: str) -> None:
        self.mux = mux
        self.remote = remote
        self.outer = _Pipe(self)
        self.inner = _Pipe(self)
        self.outer.other, self.inner.other = self.inner, self.outer
        pair(self.outer.end, self.inner.end)
        self._open = 2

    def finish(self, pipe: _Pipe | None, *, aborted: bool) -> None:
        """Close ``pipe``'s side: abort it, or let it flush for at most FLUSH_GRACE."""
        t = pipe.transport if pipe is not None else None
        if t is None:
            return
        if aborted:
            t.abort()
        elif not t.is_closing():
            t.close()
            if t.get_write_buffer_size():
                asyncio.get_running_loop().call_later(FLUSH_GRACE, t.abort)

    def lost(self, pipe: _Pipe, exc: Exception | None) -> None:
        self.finish(pipe.other, aborted=exc is not None)
        self._open -= 1
        if self._open == 0:
            self.mux._splice_done(self)

    def abort(self) -> None:
        self.finish(self.outer, aborted=True)
        self.finish(self.inner, aborted=True)


class _Sniffer(asyncio.Protocol):
    """A new connection until its first bytes say which protocol it speaks."""

    def __init__(self, mux: PortMux) -> None:
        self.mux = mux
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.source = "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        mux = self.mux
        mux.stats["accepted"] += 1
        peer = transport.get_extra_info("peername")
        self.source = str(peer[0]) if peer else "?"
        why = "total" if mux._closed else mux._sniffing.admit(self.source)
        if why is not None:
            mux._refused("refused_busy" if why == "total" else "refused_busy_source",
                         self.source, "connections waiting for their first bytes")
            transport.abort()
            return
        self.transport = transport
        mux._pending.add(self)
        self._timer = asyncio.get_running_loop().call_later(mux.sniff_timeout, self._timed_out)

    def _end_sniff(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self in self.mux._pending:
            self.mux._pending.discard(self)
            self.mux._sniffing.release(self.source)

    def _timed_out(self) -> None:
        self._timer = None
        self.mux.stats["sniff_timeouts"] += 1
        self.abort()

    def abort(self) -> None:
        self._end_sniff()
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.task is not None:
            return
        self._end_sniff()
        if data[0] == ZMTP_FIRST_BYTE:
            self.transport.pause_reading()
            self.task = self.mux._start_splice(self.transport, data)
        else:
            self.mux._hand_over(self.transport, data)

    def eof_received(self) -> bool | None:
        self._end_sniff()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_sniff()
        self.transport = None
        if self.task is not None:
            self.task.cancel()


def _host_port(address: str) -> tuple[str, int]:
    address = address.removeprefix("tcp://")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} must be HOST:PORT")
    host = host.removeprefix("[").removesuffix("]")
    return ("0.0.0.0" if host in ("", "*") else host), int(port)


def _refuse(transport: asyncio.Transport, first: bytes) -> None:
    return None


class PortMux:
    """Owns the public listening socket; sends ZeroMQ connections to ``zmq_target`` and every
    other connection to ``on_other`` (see the module docstring)."""

    def __init__(self, *, zmq_target: str, on_other: OnOther = _refuse,
                 sniff_timeout: float = 10.0, max_pending: int = 256,
                 max_pending_per_source: int = 32, max_splices: int | None = None,
                 max_splices_per_source: int = 64) -> None:
        self._target = _host_port(zmq_target)
        self._on_other = on_other
        self.sniff_timeout = sniff_timeout
        self._sniffing = SourceLimit(total=max_pending, per_source=max_pending_per_source)
        self._splicing = SourceLimit(
            total=max_splices if max_splices is not None else fd_budget(SPLICE_FDS + 1, 4096),
            per_source=max_splices_per_source)
        self._refusals = RateLimitedLog(log)
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self.address: str | None = None
        self._server: asyncio.Server | None = None
        self._aliases = AliasPool()
        self._pending: set[_Sniffer] = set()
        self._connecting: set[asyncio.Task[None]] = set()
        self._splices: set[_Splice] = set()
        self._closed = False

    async def start(self, listen: str) -> str:
        """Bind ``HOST:PORT`` (port 0 picks one) and return the bound ``HOST:PORT``; OSError
        naming the address when it cannot be bound."""
        host, port = _host_port(listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(lambda: _Sniffer(self), host, port, family=family)
        except OSError as exc:
            err = OSError(f"cannot listen on {listen}: {exc.strerror or exc}")
            err.errno = exc.errno
            raise err from None
        self._server = server
        name = server.sockets[0].getsockname()
        self.address = f"[{name[0]}]:{name[1]}" if family == socket.AF_INET6 \
            else f"{name[0]}:{name[1]}"
        return self.address

    def real_address(self, peer_ip: str) -> str:
        """The remote IP behind a loopback alias that ZeroMQ reports; others unchanged."""
        return self._aliases.remote_of(peer_ip) or peer_ip

    @property
    def open_splices(self) -> int:
        return len(self._splices)

    def gauges(self) -> dict[str, int]:
        """What is open now: connections in the sniff phase, splices, and their bounds."""
        return {"sniffing": len(self._pending), "splices": len(self._splicing),
                "splice_sources": self._splicing.sources, "max_splices": self._splicing.total}

    def _refused(self, counter: str, source: str, what: str) -> None:
        self.stats[counter] += 1
        log.debug("busy: dropped a connection from %s (%s)", source, counter)
        self._refusals.warning("peer port busy: refusing connections over the bound on %s "
                               "(latest from %s)", what, source)

    async def close(self) -> None:
        """Stop listening; abort every spliced and pending connection.  Connections handed to
        ``on_other`` belong to their protocol and stay open."""
        self._closed = True
        if self._server is not None:
            self._server.close()
            self._server = None
        for sniffer in list(self._pending):
            sniffer.abort()
        tasks = list(self._connecting)
        for task in tasks:
            task.cancel()
        for splice in list(self._splices):
            splice.abort()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- the two outcomes of a sniff ----------------------------------------------------------

    def _start_splice(self, client: asyncio.Transport, first: bytes) -> asyncio.Task[None]:
        self.stats["zmtp"] += 1
        task = asyncio.create_task(self._splice(client, first))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)
        return task

    async def _splice(self, client: asyncio.Transport, first: bytes) -> None:
        peer = client.get_extra_info("peername")
        if not peer:
            client.abort()
            return
        remote = str(peer[0])
        why = self._splicing.admit(remote)
        if why is not None:
            self._refused("refused_splices" if why == "total" else "refused_splices_source",
                          remote, "ZeroMQ connections")
            client.abort()
            return
        splice = _Splice(self, remote)
        loop = asyncio.get_running_loop()
        try:
            alias = self._aliases.acquire(remote)
        except OSError as exc:
            self._splicing.release(remote)
            log.debug("cannot splice %s to the ZeroMQ port: %s", remote, exc)
            client.abort()
            return
        try:
            inner, _ = await loop.create_connection(
                lambda: splice.inner, *self._target, local_addr=(alias, 0))
        except OSError as exc:
            self._aliases.release(remote)
            self._splicing.release(remote)
            log.debug("cannot splice %s to the ZeroMQ port: %s", remote, exc)
            client.abort()
            return
        except asyncio.CancelledError:
            self._aliases.release(remote)
            self._splicing.release(remote)
            client.abort()
            raise
        self._splices.add(splice)
        client.set_protocol(splice.outer)
        splice.outer.connection_made(client)
        client.resume_reading()  # before the write: a full inner buffer pauses it again
        inner.write(first)

    def _splice_done(self, splice: _Splice) -> None:
        self._splices.discard(splice)
        self._aliases.release(splice.remote)
        self._splicing.release(splice.remote)

    def _hand_over(self, transport: asyncio.Transport, first: bytes) -> None:
        self.stats["other"] += 1
        try:
            proto = self._on_other(transport, first)
            if proto is None:
                transport.close()
                return
            transport.set_protocol(proto)
            proto.connection_made(transport)
            if not transport.is_closing():
                _deliver(proto, transport, first)
        except Exception:
            log.debug("the protocol for a data connection failed on its first bytes",
                      exc_info=True)
            transport.abort()


def _deliver(proto: asyncio.BaseProtocol, transport: asyncio.Transport, data: bytes) -> None:
    """Feed bytes already read to a freshly connected Protocol or BufferedProtocol."""
    if isinstance(proto, asyncio.BufferedProtocol):
        rest = memoryview(data)
        while rest and not transport.is_closing():
            buf = memoryview(proto.get_buffer(len(rest))).cast("B")
            n = min(len(buf), len(rest))
            if n == 0:
                raise RuntimeError("get_buffer() returned an empty buffer")
            buf[:n] = rest[:n]
            proto.buffer_updated(n)
            rest = rest[n:]
    elif isinstance(proto, asyncio.Protocol):
        proto.data_received(data)
    else:
        raise TypeError(f"{type(proto).__name__} is neither a Protocol nor a BufferedProtocol")
