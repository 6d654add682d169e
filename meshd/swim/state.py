"""The member state machine: every transition in one table (memberlist ``state.go``).

States of a member other than ourselves: *unknown*, ALIVE, SUSPECT, DEAD, LEFT.  An update
carries an incarnation ``i``; the member's current incarnation is ``c``.  A rule applies when its
comparison holds, otherwise the update is stale and ignored::

    update \\ state   unknown   ALIVE          SUSPECT         DEAD          LEFT
    alive(i)          ADD       i>c UPDATE     i>c RECOVER     i>c REVIVE    i>c REVIVE
    suspect(i)        -         i>=c SUSPECT   i>=c CONFIRM    -             -
    dead(i)           -         i>=c DEAD      i>=c DEAD       -             -
    left(i)           -         i>=c LEFT      i>=c LEFT       i>=c LEFT     -

About ourselves (incarnation ``c``) while we have not left::

    alive(i)    i>c  REFUTE    (someone remembers a newer us: an earlier life)
    suspect(i)  i>=c REFUTE
    dead(i)     i>=c REFUTE
    left(i)     i>=c REFUTE

Before an update from anyone but its subject reaches this table, the core cuts ``i`` to at most
``c + max_incarnation_step`` (see :mod:`.core`, *Incarnations*).  Refuting moves our incarnation
past ``i`` (never above ``MAX_INCARNATION``) and gossips alive.  After we leave, nothing about us
changes anything.  ``DEAD`` and ``SUSPECT`` timeouts are not updates: the suspicion timer
produces ``dead(c)`` from ourselves, which then goes through this table like any other.
"""

from __future__ import annotations

import enum

from .events import Status
from .messages import Alive, Dead, Left, Suspect, Update


class Action(enum.Enum):
    """What to do with an update."""

    IGNORE = "ignore"
    ADD = "add"
    UPDATE = "update"
    RECOVER = "recover"
    REVIVE = "revive"
    SUSPECT = "suspect"
    CONFIRM = "confirm"
    DEAD = "dead"
    LEFT = "left"
    REFUTE = "refute"


_GT, _GE, _ANY = 0, 1, 2

TABLE: dict[tuple[type, Status | None], tuple[int, Action]] = {
    (Alive, None): (_ANY, Action.ADD),
    (Alive, Status.ALIVE): (_GT, Action.UPDATE),
    (Alive, Status.SUSPECT): (_GT, Action.RECOVER),
    (Alive, Status.DEAD): (_GT, Action.REVIVE),
    (Alive, Status.LEFT): (_GT, Action.REVIVE),
    (Suspect, Status.ALIVE): (_GE, Action.SUSPECT),
    (Suspect, Status.SUSPECT): (_GE, Action.CONFIRM),
    (Dead, Status.ALIVE): (_GE, Action.DEAD),
    (Dead, Status.SUSPECT): (_GE, Action.DEAD),
    (Left, Status.ALIVE): (_GE, Action.LEFT),
    (Left, Status.SUSPECT): (_GE, Action.LEFT),
    (Left, Status.DEAD): (_GE, Action.LEFT),
}
"""(update type, current state or None if unknown) -> (incarnation rule, action)."""

SELF_TABLE: dict[type, tuple[int, Action]] = {
    Alive: (_GT, Action.REFUTE),
    Suspect: (_GE, Action.REFUTE),
    Dead: (_GE, Action.REFUTE),
    Left: (_GE, Action.REFUTE),
}
"""Update type about ourselves -> (incarnation rule, action)."""


def decide(update: Update, status: Status | None, incarnation: int, is_self: bool, leaving: bool) -> Action:
    """The action the table prescribes for ``update`` given the member's current state."""
    if is_self:
        if leaving:
            return Action.IGNORE
        rule = SELF_TABLE.get(type(update))
    else:
        rule = TABLE.get((type(update), status))
    if rule is None:
        return Action.IGNORE
    cmp, action = rule
    i = update.incarnation
    if cmp == _ANY or (cmp == _GT and i > incarnation) or (cmp == _GE and i >= incarnation):
        return action
    return Action.IGNORE
