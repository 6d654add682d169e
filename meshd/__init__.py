"""meshd: a peer-to-peer mesh of scientific sites, in user space.

The public API: :func:`connect` / :func:`aconnect` (stream arrays over channels, see
:mod:`meshd.app.streams`), :class:`Client`, the typed caller of a site daemon's control socket, and
the error hierarchy (every error meshd raises on purpose is a :class:`MeshdError`).
"""

__version__ = "0.1.0"

from meshd.app.client import Client
from meshd.app.streams import AsyncMesh, Mesh, Message, aconnect, connect
from .errors import (
    ChannelClosed,
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
    "AsyncMesh",
    "Client",
    "Mesh",
    "Message",
    "aconnect",
    "connect",
    "ChannelClosed",
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
