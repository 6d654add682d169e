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
from meshd.channel.frames import KIND_CONTROL, KIND_DATA, Block, Buffer, Opener, Sealer
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
        self.accepted = self.role == OWNER
        """Consumer: True once the owner accepted the tunnel."""

    def first_frame(self) -> Block:
        """The consumer's request, or the owner's acceptance."""
        return self._sealer.seal_control(tunnel_payload(self.service))

    def frame_received(self, body: Buffer) -> None:
        """A frame from the far end; ProtocolError if it is not authentic, out of order, or
        breaks the multiplexer's protocol."""
        frame = self._opener.open(body, expect_seq=self._recv_seq)
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

    def frames(self) -> list[Block]:
        """The multiplexer's queued messages, sealed (and forgotten)."""
        out = []
        for payload in self.mux.take_payloads():
            out.append(self._sealer.seal(self._send_seq, payload, kind=KIND_DATA))
            self._send_seq += 1
        return out


__all__ = ["CTRL_TUNNEL", "TunnelEnd"]
