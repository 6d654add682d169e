"""The frames of one tunnel data connection: the multiplexer's plaintext sealed with the
channel AEAD (pure).

A tunnel's data connection is set up exactly as a channel's (path race, preamble, the signed
Hello/Accept handshake giving :class:`~meshd.channel.handshake.ChannelKeys`); the consumer is
the initiator.  Then, in :class:`~meshd.channel.frames.Sealer` / ``Opener`` frames::

    consumer -> owner   control frame: CTRL_TUNNEL | service name    (asks for the service)
    owner -> consumer   control frame: CTRL_TUNNEL | service name    (accepted; or a REFUSE record)
    both ways           data frames, seq 0, 1, 2 ... per direction: one or more mux messages

Data frames must arrive with exactly the next sequence number (``unexpected-seq`` otherwise):
the connection is TCP, so a gap or a repeat can only be tampering.  Nothing is resent: a lost
connection resets its streams (:meth:`.mux.Mux.lost`).  Each direction has its own key and
sequence space, so no nonce repeats; a new data connection runs a new handshake (new keys).
"""

from __future__ import annotations

from meshd.channel.control import CTRL_TUNNEL, tunnel_payload
from meshd.channel.frames import (
    BIG_BLOCK,
    FRAME_OVERHEAD,
    KIND_CONTROL,
    KIND_DATA,
    Block,
    Buffer,
    Opener,
    Sealer,
    byte_view,
    frame_size,
    new_block,
)
from meshd.channel.handshake import ChannelKeys
from meshd.errors import ProtocolError

from .mux import CONSUMER, OWNER, Mux


class TunnelEnd:
    """One end of one tunnel data connection: the multiplexer plus its sealing.

    The consumer makes it right after the handshake and sends :meth:`first_frame`; the owner
    makes it once the consumer's first frame was checked (``opener`` is the one that opened it)
    and answers with :meth:`first_frame` (the acceptance)."""

    def __init__(self, keys: ChannelKeys, service: str, *, opener: Opener | None = None,
                 window: int | None = None) -> None:
        self.role = CONSUMER if keys.initiator else OWNER
        self.service = service
        self.peer = keys.peer
        self.mux = Mux(self.role) if window is None else Mux(self.role, window=window)
        self._sealer = Sealer.for_channel(keys)
        self._opener = opener or Opener.for_channel(keys)
        self._send_seq = 0
        self._recv_seq = 0
        self._plain: Block | None = None
        self.accepted = self.role == OWNER
        """Consumer: True once the owner accepted the tunnel."""

    def first_frame(self) -> Block:
        """The consumer's request, or the owner's acceptance."""
        return self._sealer.seal_control(tunnel_payload(self.service))

    def frame_received(self, body: Buffer, *, reuse: bool = False) -> None:
        """A frame from the far end; ProtocolError if it is not authentic, out of order, or
        breaks the multiplexer's protocol.  ``reuse``: decrypt into a buffer that the next
        call overwrites (the caller takes every ``Received`` event before it)."""
        out = None
        if reuse:
            need = max(byte_view(body).nbytes - FRAME_OVERHEAD, 0)
            if self._plain is None or len(self._plain) < need:
                self._plain = new_block(max(need, BIG_BLOCK))
            out = self._plain
        frame = self._opener.open(body, expect_seq=self._recv_seq, out=out)
        if frame.kind == KIND_CONTROL:
            if self.accepted or bytes(frame.payload) != tunnel_payload(self.service):
                raise ProtocolError("an unexpected control frame on a tunnel",
                                    reason="unexpected")
            self.accepted = True
            return
        if not self.accepted:
            raise ProtocolError("tunnel data before the acceptance", reason="unexpected")
        assert frame.kind == KIND_DATA
        self._recv_seq += 1
        self.mux.receive(frame.payload)

    def drop_buffer(self) -> None:
        """Forget the reused plaintext buffer (an idle tunnel holds none)."""
        self._plain = None

    def frames(self, room: int = 0) -> list[Block]:
        """The multiplexer's queued messages, sealed (and forgotten); each frame starts
        ``room`` bytes into its buffer (for a record header the caller writes there).  DATA
        bodies are sealed where they lie, unjoined (:meth:`~meshd.channel.frames.Sealer.seal_into`)."""
        out = []
        for parts in self.mux.take_parts():
            n = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
            if n < BIG_BLOCK and len(parts) > 1:
                parts = [b"".join(parts)]  # one AEAD call beats many small ones
            block = new_block(room + frame_size(n))
            self._sealer.seal_into(self._send_seq, list(parts), memoryview(block)[room:])
            out.append(block)
            self._send_seq += 1
        return out


__all__ = ["CTRL_TUNNEL", "TunnelEnd"]
