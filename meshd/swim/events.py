"""Events the membership core reports to its owner, and the member snapshot.

All frozen and slotted; drained with :meth:`Membership.events`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Status(enum.Enum):
    """What the local node believes about a member."""

    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


@dataclass(frozen=True, slots=True)
class MemberInfo:
    """Snapshot of one member as the local node sees it."""

    node: bytes
    status: Status
    incarnation: int
    meta: bytes
    reachable: bool
    last_heard: float | None
    """When a message from this member last arrived directly (None: never)."""
    since: float
    """When ``status`` last changed."""


@dataclass(frozen=True, slots=True)
class MemberJoined:
    """A member became known, or came back after being dead or having left."""

    node: bytes
    incarnation: int
    meta: bytes
    reachable: bool


@dataclass(frozen=True, slots=True)
class MemberUpdated:
    """A live member changed its metadata or reachability."""

    node: bytes
    incarnation: int
    meta: bytes
    reachable: bool


@dataclass(frozen=True, slots=True)
class MemberSuspect:
    """A member is suspected of having failed (``source`` accused it first here)."""

    node: bytes
    incarnation: int
    source: bytes


@dataclass(frozen=True, slots=True)
class MemberAlive:
    """A suspected member refuted the suspicion."""

    node: bytes
    incarnation: int


@dataclass(frozen=True, slots=True)
class MemberDead:
    """A member is declared dead (``source`` declared it)."""

    node: bytes
    incarnation: int
    source: bytes


@dataclass(frozen=True, slots=True)
class MemberLeft:
    """A member left gracefully."""

    node: bytes
    incarnation: int


@dataclass(frozen=True, slots=True)
class Refuted:
    """The local node refuted a suspicion or death of itself by moving to ``incarnation``."""

    incarnation: int


@dataclass(frozen=True, slots=True)
class BlobAccepted:
    """An opaque blob from push-pull passed ``verify_blob``; ``key`` is what the hook returned."""

    key: bytes
    blob: bytes


Event = (
    MemberJoined | MemberUpdated | MemberSuspect | MemberAlive | MemberDead | MemberLeft | Refuted | BlobAccepted
)
