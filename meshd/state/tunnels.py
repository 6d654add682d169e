"""The tunnel registry on disk: the services this site exposes and the tunnels it consumes.

One JSON file, ``tunnels.json`` in the state directory (mode 0600), written whole and atomically
(a temporary file, fsync, rename, fsync of the directory) on every change, read at start::

    {"v": 1,
     "exposed":   [{"name", "host", "port", "allow": ["*"] | [site key hex, ...]}],
     "connected": [{"site": site key hex, "name", "host", "port"}]}

Sites are stored by key, not by name (a name is only what a record says).  A file that does not
parse, or an entry of the wrong shape, is refused with a :class:`~meshd.errors.StateError`
naming the file: the daemon does not start on a registry it would silently lose.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshd.errors import StateError
from meshd.state.files import write_atomic

EVERYONE = "*"


@dataclass(frozen=True, slots=True)
class Exposure:
    name: str
    host: str
    port: int
    allow: tuple[str, ...]
    """``("*",)`` for every member, else site keys in hex."""

    def allows(self, key: bytes) -> bool:
        return EVERYONE in self.allow or key.hex() in self.allow


@dataclass(frozen=True, slots=True)
class Consumed:
    site: str
    """The owning site's key, hex."""
    name: str
    host: str
    port: int
    """The listen address; port 0 until the first start picked one (then kept)."""


@dataclass
class TunnelBook:
    path: Path
    exposed: dict[str, Exposure]
    connected: dict[tuple[str, str], Consumed]

    @classmethod
    def load(cls, path: Path) -> TunnelBook:
        book = cls(path, {}, {})
        if not path.exists():
            return book
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or data.get("v") != 1:
                raise ValueError("not a version 1 registry")
            for e in _list(data, "exposed"):
                x = Exposure(_name(e), _host(e), _i(e, "port"),
                             tuple(a if a == EVERYONE else _key({"allow": a}, "allow")
                                   for a in _list(e, "allow", required=True)))
                if x.name in book.exposed:
                    raise ValueError(f"{x.name!r} is exposed twice")
                book.exposed[x.name] = x
            for c in _list(data, "connected"):
                y = Consumed(_key(c, "site"), _name(c), _host(c), _i(c, "port"))
                if (y.site, y.name) in book.connected:
                    raise ValueError(f"a tunnel to {y.name!r} is listed twice")
                book.connected[(y.site, y.name)] = y
        except OSError as exc:  # a directory, no permission...
            raise StateError(f"cannot read the tunnel registry {path}:"
                             f" {exc.strerror or exc}", reason="tunnels") from None
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise StateError(f"{path} is not a valid tunnel registry ({exc}); fix or remove it",
                             reason="tunnels") from None
        return book

    @contextmanager
    def change(self) -> Iterator[None]:
        """Change the registry in the block, then save it; if the save fails (a full disk),
        the registry in memory is put back as it was and the StateError goes on: memory and
        disk never disagree."""
        exposed, connected = dict(self.exposed), dict(self.connected)
        try:
            yield
            self.save()
        except BaseException:
            self.exposed.clear()
            self.exposed.update(exposed)
            self.connected.clear()
            self.connected.update(connected)
            raise

    def save(self) -> None:
        """Write the registry (StateError ``disk-full`` or ``state-write`` if the disk refuses:
        the file on disk stays as it was)."""
        data = {"v": 1,
                "exposed": [{"name": e.name, "host": e.host, "port": e.port,
                             "allow": list(e.allow)} for e in self.exposed.values()],
                "connected": [{"site": c.site, "name": c.name, "host": c.host, "port": c.port}
                              for c in self.connected.values()]}
        write_atomic(self.path, json.dumps(data, indent=1).encode(), "the tunnel registry")


def _host(d: Any) -> str:
    """A host as ``meshd expose`` and ``meshd connect`` store it: printable ASCII, no spaces
    (they check the rest)."""
    v = _s(d, "host")
    if len(v) > 253 or not v.isascii() or not v.isprintable() or " " in v:
        raise ValueError(f"host {v!r} is not a host name or address")
    return v


def _s(d: Any, k: str) -> str:
    v = d[k]
    if not isinstance(v, str) or not v:
        raise ValueError(f"{k} must be a non-empty string")
    return v


def _list(d: Any, k: str, *, required: bool = False) -> list[Any]:
    v = (d[k] if required else d.get(k, [])) if isinstance(d, dict) else None
    if not isinstance(v, list):
        raise ValueError(f"{k} must be a list")
    return v


def _key(d: Any, k: str) -> str:
    """A site key: 64 lower-case hex digits, as :meth:`bytes.hex` writes it."""
    v = d[k]
    if not isinstance(v, str) or not _KEY.fullmatch(v):
        raise ValueError(f"{k} must be a site key (64 lower-case hex digits), not {v!r:.80}")
    return v


def _name(d: Any) -> str:
    """A service name, as the tunnel codec checks it (1-128 bytes, printable, no '/')."""
    v = _s(d, "name")
    if not 0 < len(v.encode()) <= 128 or not v.isprintable() or "/" in v:
        raise ValueError(f"bad service name {v!r:.80}")
    return v


_KEY = re.compile("[0-9a-f]{64}")


def _i(d: Any, k: str) -> int:
    v = d[k]
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 65535:
        raise ValueError(f"{k} must be a port number")
    return v
