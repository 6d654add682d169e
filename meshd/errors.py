"""The one root error of meshd, split by who is at fault.

``LocalError``: the caller (a user at the CLI, an application, a config file) asked for something
that cannot be done.  ``RemoteError``: a peer sent something invalid, or refused us.  Every error
carries a short machine-readable ``reason`` (kebab-case) next to its human message, so that the
control API and ``--json`` output can report it and tests can assert it.
"""

from __future__ import annotations


class MeshdError(Exception):
    """Root of every error meshd raises on purpose."""

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.reason


class LocalError(MeshdError):
    """The caller asked for something invalid; fix the call, the input or the local state."""


class RemoteError(MeshdError):
    """A peer misbehaved, sent invalid data, or refused the request."""


class TokenError(LocalError):
    """An invitation token cannot be used.

    Reasons: ``too-large`` (more input than the parser reads), ``not-found`` (no token in the
    text), ``truncated``, ``checksum`` (a typo: the check code does not match), ``version``
    (made by a newer meshd), ``malformed``, ``expired``, ``used``, ``wrong-mesh``, ``unknown``
    (the inviter does not know this invitation).
    """


class KeyFileError(LocalError):
    """The site key file is missing, unreadable, malformed or readable by others."""


class StateError(LocalError):
    """The state directory is missing, not initialised, or in a state that forbids the request."""


class RecordError(RemoteError):
    """A signed record, vouch, revocation or genesis failed verification.

    Reasons: ``malformed``, ``oversized``, ``type``, ``mesh``, ``signature``, ``future`` (issued
    too far ahead of our clock), ``expired``, ``stale`` (an older sequence than the one we hold), ``revoked``, ``unauthorized``.
    """


class ProtocolError(RemoteError):
    """A peer sent a frame that does not follow the wire protocol."""


class JoinRefused(RemoteError):
    """The inviter refused a join (bad secret, used or expired invitation, denied, throttled).

    ``retry_after``: seconds the joiner's address must wait before it is heard again, if any."""

    def __init__(self, message: str, *, reason: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, reason=reason)
        self.retry_after = retry_after


class ChannelClosed(MeshdError):
    """A channel ended: nothing more goes through it.

    Reasons: ``closed`` (the sender closed it, and every message it sent was handed out),
    ``revoked`` (the other site was revoked: the channel was cut at once), ``no-path`` (no path
    to the receiver for ``channel_give_up`` seconds), ``failed`` (the daemon could not go on
    with it).  ``channel``: the channel id (hex), ``peer``: the other site's name, when known."""

    def __init__(self, message: str, *, reason: str | None = None, channel: str | None = None,
                 peer: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.channel = channel
        self.peer = peer


class DaemonNotRunning(LocalError):
    """No daemon answers on the control socket of this state directory."""
