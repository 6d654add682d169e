"""Channel names and the control payloads a sender puts in its channel's first and last frames.

Pure: the glue of both ends uses these to open and close a channel, never its own byte layout.
"""

from __future__ import annotations

from meshd.errors import LocalError

MAX_NAME = 128
"""Longest channel name, in UTF-8 bytes."""

CTRL_OPEN = 0x10
"""Sender -> receiver control payload: ``0x10`` + the channel name (UTF-8); the first frame."""
CTRL_CLOSE = 0x11
"""Sender -> receiver: the application closed the channel; nothing more will come."""


def check_name(name: object) -> str:
    """``name`` if it is a valid channel name, else LocalError (reason ``bad-name``)."""
    if not isinstance(name, str) or not 0 < len(name.encode()) <= MAX_NAME \
            or not name.isprintable():
        raise LocalError(f"a channel name is 1-{MAX_NAME} bytes of printable text",
                         reason="bad-name")
    return name
