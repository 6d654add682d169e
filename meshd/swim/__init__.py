"""Gossip membership: SWIM with Lifeguard, as a pure (sans-IO) core.

Modules, one concern each: :mod:`.config` (``SwimConfig``), :mod:`.messages` (wire messages and
codec), :mod:`.events` (events and member snapshots), :mod:`.state` (the transition table),
:mod:`.suspicion` (Lifeguard suspicion timer), :mod:`.awareness` (local health),
:mod:`.queue` (transmit-limited broadcasts), :mod:`.util` (formulas), :mod:`.core`
(``Membership``, the state machine that ties them together).
"""

from .config import SwimConfig
from .core import Membership, VerifyBlob
from .events import (
    BlobAccepted,
    Event,
    MemberAlive,
    MemberDead,
    MemberInfo,
    MemberJoined,
    MemberLeft,
    MemberSuspect,
    MemberUpdated,
    Refuted,
    Status,
)
from .messages import (
    MAX_INCARNATION,
    Ack,
    Alive,
    Dead,
    Gossip,
    Left,
    MemberState,
    Message,
    Nack,
    Ping,
    PingReq,
    PushPullRequest,
    PushPullResponse,
    Suspect,
    Update,
    decode_message,
    encode_message,
    from_bytes,
    to_bytes,
)

__all__ = [
    "MAX_INCARNATION", "Ack", "Alive", "BlobAccepted", "Dead", "Event", "Gossip", "Left", "MemberAlive", "MemberDead",
    "MemberInfo", "MemberJoined", "MemberLeft", "MemberState", "MemberSuspect", "MemberUpdated",
    "Membership", "Message", "Nack", "Ping", "PingReq", "PushPullRequest", "PushPullResponse",
    "Refuted", "Status", "Suspect", "SwimConfig", "Update", "VerifyBlob", "decode_message",
    "encode_message", "from_bytes", "to_bytes",
]
