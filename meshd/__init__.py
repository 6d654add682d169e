"""meshd: a peer-to-peer mesh of scientific sites, in user space.

The public API: :func:`connect` / :func:`aconnect` (stream arrays over channels, see
:mod:`meshd.app.streams`), :class:`Client`, the typed caller of a site daemon's control socket, and
the error hierarchy (every error meshd raises on purpose is a :class:`MeshdError`).
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from meshd.app.client import Client
    from meshd.app.streams import AsyncMesh, Mesh, Message, aconnect, connect

_LAZY = {"Client": "meshd.app.client", "AsyncMesh": "meshd.app.streams",
         "Mesh": "meshd.app.streams", "Message": "meshd.app.streams",
         "aconnect": "meshd.app.streams", "connect": "meshd.app.streams"}
"""The API imported on first use: ``import meshd`` (and so every ``meshd`` command, which
needs neither numpy nor the data path) stays cheap."""


if not TYPE_CHECKING:  # hidden from mypy, which then still refuses `meshd.conect`

    def __getattr__(name: str) -> Any:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'meshd' has no attribute {name!r}")
        import importlib

        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
