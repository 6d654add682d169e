"""meshd: a peer-to-peer mesh of scientific sites, in user space.

The public API: :class:`Client`, the typed caller of a site daemon's control socket, and the
error hierarchy (every error meshd raises on purpose is a :class:`MeshdError`).
"""

__version__ = "0.1.0"

from .client import Client
from .errors import (
    DaemonNotRunning,
    JoinRefused,
    KeyFileError,
    LocalError,
    MeshdError,
    ProtocolError,
    RecordError,
    RemoteError,
    StateError,
    TokenError,
)

__all__ = [
    "Client",
    "DaemonNotRunning",
    "JoinRefused",
    "KeyFileError",
    "LocalError",
    "MeshdError",
    "ProtocolError",
    "RecordError",
    "RemoteError",
    "StateError",
    "TokenError",
    "__version__",
]
