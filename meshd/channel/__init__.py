"""Channels: end-to-end keys, AEAD frames, ordered exactly-once delivery.

All three parts are pure: bytes and messages in, bytes, messages and events out; time passed in.

- :mod:`.handshake` — :class:`Initiator` / :class:`Responder`: signed ephemeral key exchange
  giving :class:`ChannelKeys` (one key per direction, bound to the transcript, cipher agreed).
- :mod:`.frames` — :class:`Sealer` / :class:`Opener`: AEAD frames with channel, direction and
  sequence number authenticated and bound into the nonce.
- :mod:`.reliable` — :class:`Sender` / :class:`Receiver`: sequence numbers, cumulative acks,
  resend buffer, credit flow control; events in :mod:`.events`.
"""

from .events import AllAcked, Feedback, Message, Probe, Transmit, Writable
from .frames import (
    AES256GCM,
    CHACHA20POLY1305,
    DIR_I2R,
    DIR_R2I,
    FRAME_OVERHEAD,
    KIND_CONTROL,
    KIND_DATA,
    MAX_PAYLOAD,
    Frame,
    Opener,
    Sealer,
    aes_accelerated,
    local_cipher_preference,
)
from .handshake import ChannelKeys, Initiator, Responder, choose_cipher
from .reliable import (
    Receiver,
    ReceiverConfig,
    Sender,
    SenderConfig,
    WouldBlock,
    decode_control,
    encode_control,
)

__all__ = [
    "AES256GCM",
    "CHACHA20POLY1305",
    "DIR_I2R",
    "DIR_R2I",
    "FRAME_OVERHEAD",
    "KIND_CONTROL",
    "KIND_DATA",
    "MAX_PAYLOAD",
    "AllAcked",
    "ChannelKeys",
    "Feedback",
    "Frame",
    "Initiator",
    "Message",
    "Opener",
    "Probe",
    "Receiver",
    "ReceiverConfig",
    "Responder",
    "Sealer",
    "Sender",
    "SenderConfig",
    "Transmit",
    "WouldBlock",
    "Writable",
    "aes_accelerated",
    "choose_cipher",
    "decode_control",
    "encode_control",
    "local_cipher_preference",
]
