"""Byte splicing between two asyncio transports, with flow control (asyncio glue).

One :class:`SpliceEnd` per connection, paired with :func:`pair`.  What one end's protocol reads
it hands to :meth:`SpliceEnd.received`, which writes it to the other end's transport.  When an
end's own write buffer fills (its protocol's ``pause_writing``), the *other* end stops reading
until it drains (``resume_writing``): a slow reader on one side slows the fast writer on the
other, and no buffer grows without bound.  Used by the port multiplexer (ZeroMQ connections to
the internal ROUTER) and by relay legs of data connections.
"""

from __future__ import annotations

import asyncio
import sys

WRITE_COPIES_REST = sys.version_info < (3, 12)
"""Up to 3.11 an asyncio socket transport sends what it can at once and copies the rest into
its own buffer, so a view of a reused buffer may be written as is; from 3.12 on it keeps a
reference to the view, which must then be copied first."""


class SpliceEnd:
    """One side of a splice (see the module docstring)."""

    __slots__ = ("bytes_out", "partner", "transport")

    def __init__(self, transport: asyncio.Transport | None = None) -> None:
        self.transport = transport
        self.partner: SpliceEnd | None = None
        self.bytes_out = 0
        """Bytes written to this end's transport by the splice."""

    @property
    def spliced(self) -> bool:
        return self.partner is not None

    def received(self, data: bytes | bytearray | memoryview, *, reused: bool = False) -> None:
        """This end read ``data``: pass it to the partner.  ``reused``: ``data`` views a buffer
        the caller reuses (copied first where the transport would keep the view)."""
        if self.partner is not None:
            self.partner.write(bytes(data) if reused and not WRITE_COPIES_REST else data)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)
            self.bytes_out += len(data)

    def pause_writing(self) -> None:
        """This end's write buffer is full: the partner stops reading."""
        t = self.partner.transport if self.partner is not None else None
        if t is not None:
            t.pause_reading()

    def resume_writing(self) -> None:
        """This end's write buffer drained: the partner reads again."""
        t = self.partner.transport if self.partner is not None else None
        if t is not None and not t.is_closing():
            t.resume_reading()


def pair(a: SpliceEnd, b: SpliceEnd) -> None:
    """Splice ``a`` and ``b``: each passes what it reads to the other."""
    a.partner, b.partner = b, a
