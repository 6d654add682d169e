"""What the tunnel multiplexer tells its glue (:meth:`.mux.Mux.events`).  Frozen and slotted."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """Owner side: the consumer opened ``stream`` for ``service`` (check the allow-list, then
    connect to the target or :meth:`~.mux.Mux.reset` it)."""

    stream: int
    service: str


@dataclass(frozen=True, slots=True)
class Received:
    """Bytes of ``stream`` for the local TCP connection; report them with
    :meth:`~.mux.Mux.consumed` once they have left this process."""

    stream: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class Ended:
    """The far end half-closed ``stream``: shut down the local connection's write side."""

    stream: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """``stream`` is gone (``reason`` as in :data:`.codec.REASONS`): abort the local connection."""

    stream: int
    reason: str


@dataclass(frozen=True, slots=True)
class Writable:
    """Credit came back and everything queued for ``stream`` went out: read the local
    connection again."""

    stream: int


@dataclass(frozen=True, slots=True)
class Finished:
    """``stream`` was half-closed both ways and is forgotten: close the local connection."""

    stream: int


Event = StreamOpened | Received | Ended | StreamReset | Writable | Finished
