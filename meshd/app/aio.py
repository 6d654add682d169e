"""The asyncio flavour of the application API: :func:`aconnect`, :class:`AsyncMesh`,
:class:`AsyncSender`, :class:`AsyncReceiver` (see :mod:`meshd.app.streams`).

A sender's batching is :class:`~meshd.app.batching.Batcher` with one loop timer, re-armed after
each call; control calls run in a thread.  A handed-over channel's data connection is run by
the loop too (:mod:`meshd.app.aio_direct`)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any

import zmq
import zmq.asyncio

from meshd.app.aio_direct import AsyncDirectLink
from meshd.app.batching import RING_BYTES, Batch
from meshd.app.client import Client
from meshd.app.ends import (STALL_CHECK, FlushWait, MeshEnd, ReceiverEnd, SenderEnd,
                            TimeoutLater, open_receiver, start_ring)
from meshd.app.direct import DirectLink
from meshd.app.message import Message, encode
from meshd.channel.batch import pack_parts
from meshd.errors import ChannelClosed, LocalError

__all__ = ["AsyncMesh", "AsyncReceiver", "AsyncSender", "aconnect"]


class AsyncMesh(MeshEnd):
    """The asyncio flavour of :class:`~meshd.app.sync.Mesh` (see :func:`aconnect`)."""

    def __init__(self, home: str | os.PathLike[str] | None = None) -> None:
        super().__init__(Client(home), zmq.asyncio.Context())

    async def __aenter__(self) -> AsyncMesh:
        await asyncio.to_thread(self.client.status)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def sender(self, name: str, *, to: str, paths: list[str] | None = None,
                     linger: float = 0.002, ring_bytes: int = RING_BYTES,
                     via_daemon: bool = False) -> AsyncSender:
        """As :meth:`~meshd.app.sync.Mesh.sender`: where the site's ``channel_handover``
        allows, the event loop runs the data connection (no thread); ``via_daemon``: let the
        daemon carry the data."""
        info = await asyncio.to_thread(self.client.open_sender, name, to, paths,
                                       not via_daemon)
        tx = AsyncSender(self, info, linger, ring_bytes)
        self._open.append(tx)
        return tx

    async def receiver(self, name: str, *, allow: list[str] | None = None,
                       ring_bytes: int = RING_BYTES, via_daemon: bool = False) -> AsyncReceiver:
        """As :meth:`~meshd.app.sync.Mesh.receiver`."""
        info, ring = await asyncio.to_thread(open_receiver, self.client, name, allow, ring_bytes,
                                             not via_daemon)
        rx = AsyncReceiver(self, info, ring, allow)
        self._open.append(rx)
        return rx

    async def channels(self) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.client.channels)

    async def close(self, *, flush: bool = True, timeout: float | None = None) -> None:
        """As :meth:`~meshd.app.sync.Mesh.close`."""
        later = TimeoutLater()
        for item in list(self._open):
            if isinstance(item, AsyncSender):
                with later:
                    await item.close(flush=flush, timeout=timeout)
            else:
                await item.close()
        self._closed_all(later)


class AsyncSender(SenderEnd):
    """The asyncio flavour of :class:`~meshd.app.sync.Sender`."""

    def __init__(self, mesh: AsyncMesh, info: dict[str, Any], linger: float,
                 ring_bytes: int = RING_BYTES) -> None:
        super().__init__(mesh, info, linger, ring_bytes)
        self._timer: asyncio.TimerHandle | None = None
        self._sending = asyncio.Lock()
        self._direct = (AsyncDirectLink(info["handover"], self.id, self.name)
                        if info.get("handover") else None)
        """The data connection, when this process holds it (:mod:`meshd.app.aio_direct`)."""

    def _open_link(self, info: dict[str, Any]) -> DirectLink | None:
        return None  # the loop runs this flavour's link: self._direct

    def _check_link(self) -> None:
        """ChannelClosed if the channel ended (a handed-over channel's daemon says so on the
        lease, between calls)."""
        if self.ended is None and self._direct is not None and self._direct.ended is not None:
            self._ended(self._direct.ended)
        if self.ended is not None:
            raise self.ended

    async def send(self, obj: Any, meta: Mapping[str, Any] | None = None) -> None:
        """As :meth:`~meshd.app.sync.Sender.send`."""
        self._check_link()
        head, body = encode(obj, meta)
        batches = self._core.add(head, body, asyncio.get_running_loop().time())
        self._rearm()
        for b in batches:
            await self._ship(b)
        self._core.added()

    def _rearm(self) -> None:
        """Keep the one timer on the batcher's deadline."""
        deadline = self._core.deadline
        if deadline is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_at(
                deadline, lambda: asyncio.ensure_future(self._push()))

    async def _push(self) -> None:
        b = self._core.take()
        self._rearm()
        if b is not None:
            try:
                await self._ship(b)
            except ChannelClosed:
                if self.ended is None:
                    raise

    async def _ship(self, b: Batch) -> None:
        async with self._sending:
            if self._direct is not None:
                parts, nbytes = pack_parts(b.messages)
                try:
                    await self._direct.send(parts, nbytes, len(b.messages))
                except ChannelClosed as exc:
                    raise self._ended(exc) from None
                return
            wanted = self._core.ring_wanted(b)
            if wanted:
                self._core.ring = await asyncio.to_thread(start_ring, self._mesh.client, self.id,
                                                          wanted)
            while not await self._sock.poll(int(STALL_CHECK * 1000), zmq.POLLOUT):
                await asyncio.to_thread(self._check_ended)  # a long wait: did it end?
            await self._sock.send_multipart(self._core.frames(b), copy=False)

    async def flush(self, timeout: float | None = None) -> None:
        """As :meth:`~meshd.app.sync.Sender.flush`."""
        self._check_link()
        await self._push()
        if self._direct is not None:
            try:
                await self._direct.flush(timeout)
            except ChannelClosed as exc:
                raise self._ended(exc) from None
            return
        target = self.sent
        loop = asyncio.get_running_loop()
        wait = FlushWait(timeout, loop.time())
        while True:
            try:
                await asyncio.to_thread(self._mesh.client.flush_sender, self.id, target,
                                        wait.slice(loop.time()))
                return
            except ChannelClosed as exc:
                raise self._ended(exc) from None
            except LocalError as exc:
                if wait.ends(exc, loop.time()):
                    raise

    async def close(self, *, flush: bool = True, timeout: float | None = None) -> None:
        """As :meth:`~meshd.app.sync.Sender.close`."""
        if self.ended is None:
            try:
                await self._push()
            except ChannelClosed:
                pass  # noted: the flush below raises it
        later = TimeoutLater()
        if flush:
            with later:
                await self.flush(timeout)
        if self._direct is not None:
            await self._direct.close()
        self._release()
        try:
            await asyncio.to_thread(self._mesh.client.close_sender, self.id)
        except LocalError:
            pass
        self._forget()
        later.raise_kept()


class AsyncReceiver(ReceiverEnd):
    """The asyncio flavour of :class:`~meshd.app.sync.Receiver`."""

    async def recv(self, timeout: float | None = None) -> Message:
        """As :meth:`~meshd.app.sync.Receiver.recv`."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            msg = self._next()
            if msg is not None:
                return msg
            self._collect()
            if self._links is None:
                try:
                    parts = await asyncio.wait_for(self._sock.recv_multipart(copy=False),
                                                   timeout)
                except asyncio.TimeoutError:
                    raise self._timed_out(timeout) from None
                self._take(parts)
                continue
            self._ready_now(False)  # what the links took meanwhile
            if self._ready:
                continue
            wait = None if deadline is None else max(0.0, deadline - loop.time())
            await self._wait_either(wait)
            # Checked whether or not something woke it: a link that wakes the call with
            # nothing it may hand out yet must not hold it past its timeout.
            if deadline is not None and loop.time() >= deadline:
                self._ready_now(False)
                if not self._ready:
                    raise self._timed_out(timeout)

    async def _wait_either(self, wait: float | None) -> bool:
        """Wait at most ``wait`` seconds for a delivery on the ipc socket (taken) or for the
        hand-over links to have something; whether either came."""
        assert self._links is not None
        loop = asyncio.get_running_loop()
        woke: asyncio.Future[None] = loop.create_future()
        fd = self._links.wake.fileno()
        loop.add_reader(fd, _settle, woke)
        polled = asyncio.ensure_future(self._sock.poll(None, zmq.POLLIN))
        try:
            done, _ = await asyncio.wait({woke, polled}, timeout=wait,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            loop.remove_reader(fd)
            if not polled.done():
                polled.cancel()
        if polled in done and polled.result():
            self._take(await self._sock.recv_multipart(copy=False))
        return bool(done)

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Message]:
        while True:
            try:
                msg = await self.recv()
            except ChannelClosed:
                return
            yield msg

    async def close(self) -> None:
        if not self._release():
            return
        try:
            await asyncio.to_thread(self._mesh.client.close_receiver, self.name)
        except LocalError:
            pass
        self._forget()


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def aconnect(home: str | os.PathLike[str] | None = None) -> AsyncMesh:
    """The asyncio flavour of :func:`~meshd.app.sync.connect`:
    ``async with meshd.aconnect() as mesh:``."""
    return AsyncMesh(home)
