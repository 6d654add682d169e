"""What the channel's delivery cores exchange and report.  All frozen and slotted.

Between the cores (carried in frames by the owner): :class:`Transmit` and :class:`Probe` go from
sender to receiver, :class:`Feedback` from receiver to sender.  To the owner: :class:`Message`
(the receiver's in-order delivery), :class:`AllAcked` and :class:`Writable` (the sender's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .paths import Path


@dataclass(frozen=True, slots=True)
class Transmit:
    """Send this data frame (as given by the sender's ``seal``; never re-sealed on resend)."""

    seq: int
    frame: bytes | bytearray | memoryview
    resend: bool


@dataclass(frozen=True, slots=True)
class Probe:
    """Sender → receiver control message: answer with your current :class:`Feedback`.
    Sent when the sender is blocked on credit and has heard nothing for a retransmit timeout."""


@dataclass(frozen=True, slots=True)
class Feedback:
    """Receiver → sender control message: cumulative ack and absolute credit.

    Every field only ever grows, so a lost, duplicated or reordered Feedback is harmless: the
    sender keeps the largest values it has seen."""

    ack: int
    """Every seq below this has been received (the next seq the receiver expects)."""
    max_seq: int
    """Credit in messages: the sender may send seqs below this."""
    max_bytes: int
    """Credit in bytes: the sender may send payloads while its cumulative payload bytes stay
    at or below this."""
    gap: bool
    """The receiver holds frames beyond a missing one (asks for a fast resend of ``ack``)."""


@dataclass(frozen=True, slots=True)
class Message:
    """One message delivered to the application, in order, exactly once."""

    seq: int
    payload: bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class AllAcked:
    """Every message sent so far (seqs below ``next_seq``) is acknowledged: a flush is done."""

    next_seq: int


@dataclass(frozen=True, slots=True)
class Writable:
    """A ``send`` that would have blocked may succeed now (credit arrived or buffer freed)."""


# -- the channel ends' cores (:mod:`.outbound`, :mod:`.inbound`) --------------------------------


@dataclass(frozen=True, slots=True)
class SendFrame:
    """Outbound action: write this sealed frame on the channel's current connection."""

    frame: bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class PathOpen:
    """Outbound event: the race chose ``path`` (a :class:`~.paths.Path`) after ``setup_s``."""

    path: Path
    setup_s: float


@dataclass(frozen=True, slots=True)
class PathLost:
    """Outbound event: the channel's connection was lost; a new race has begun."""


@dataclass(frozen=True, slots=True)
class NoPathLeft:
    """Outbound event: every path failed (``error`` says why each); the race runs again in
    ``retry_in`` seconds."""

    error: str
    retry_in: float


@dataclass(frozen=True, slots=True)
class Acked:
    """Outbound event: the receiver's daemon now has the first ``messages`` messages."""

    messages: int


@dataclass(frozen=True, slots=True)
class ChannelEnded:
    """Outbound event: the channel is closed or failed (nothing more is sent or started).
    ``reason``: ``closed`` (by the application), ``no-path``, ``revoked`` or ``failed``."""

    reason: str
    error: str | None = None
