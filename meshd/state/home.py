"""Where a site keeps its state: the home directory and the files in it.

The home is chosen by ``--home DIR``, else ``$MESHD_HOME``, else the platform's per-user data
directory (``$XDG_DATA_HOME/meshd`` or ``~/.local/share/meshd``; ``~/Library/Application
Support/meshd`` on macOS).  It is created with mode 0700 and holds:

=================  ====================================================================
``site.key``       the Ed25519 site key, mode 0600 (refused if looser)
``config.toml``    the daemon's settings, every field documented in place
``state.db``       the trust store (SQLite, WAL): records, vouches, invitations
``control.sock``   the local control socket (HTTP+JSON), mode 0600, while the daemon runs
``daemon.pid``     the running daemon's process id
``daemon.lock``    held (``flock``) by the running daemon: one daemon per home
``tunnels.json``   the services this site exposes and the tunnels it consumes, mode 0600
=================  ====================================================================
"""

from __future__ import annotations

import fcntl
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from meshd.errors import StateError


def default_home() -> Path:
    """The per-user default state directory for this platform."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "meshd"
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "meshd"


MAX_SOCKET_PATH = 107
"""Bytes of a unix socket's path (Linux: 108 with the terminating NUL)."""
_LONGEST_SOCKET = "handover.sock"
"""The longest name of a socket the daemon binds in its home (the other: ``control.sock``)."""


def resolve_home(home: str | os.PathLike[str] | None = None) -> Path:
    """``home`` if given, else ``$MESHD_HOME`` (if set and not empty), else
    :func:`default_home`; made absolute.  An empty ``home`` is refused: it would be the current
    directory, whatever that happens to be."""
    if home is not None and not os.fspath(home):
        raise StateError("--home is empty; name the state directory", reason="usage")
    chosen = home if home is not None else os.environ.get("MESHD_HOME") or default_home()
    return Path(chosen).expanduser().absolute()


@dataclass(frozen=True, slots=True)
class Home:
    """The files of one site's state directory."""

    root: Path

    @property
    def key_path(self) -> Path:
        return self.root / "site.key"

    @property
    def config_path(self) -> Path:
        return self.root / "config.toml"

    @property
    def db_path(self) -> Path:
        return self.root / "state.db"

    @property
    def socket_path(self) -> Path:
        return self.root / "control.sock"

    @property
    def tunnels_path(self) -> Path:
        return self.root / "tunnels.json"

    @property
    def pid_path(self) -> Path:
        return self.root / "daemon.pid"

    @property
    def lock_path(self) -> Path:
        return self.root / "daemon.lock"

    def running_pid(self) -> int | None:
        """The pid the running daemon wrote (None if there is no pid file or it is unreadable)."""
        try:
            return int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None

    def exists(self) -> bool:
        return self.key_path.exists()

    def create(self) -> None:
        """Create the directory with mode 0700, or tighten an existing empty one.  A directory
        with anything in it is refused: its mode is not ours to change, nor its files to mix
        with a site's."""
        self.check_socket_room()
        try:
            if self.root.is_dir() and any(self.root.iterdir()):
                raise StateError(f"{self.root} is not empty; a site needs a directory of its own"
                                 " (a new or an empty one)", reason="exists")
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.root, 0o700)
        except OSError as exc:
            raise StateError(f"cannot make the state directory {self.root}:"
                             f" {exc.strerror or exc}", reason="state-write") from None

    def check_socket_room(self) -> None:
        """A StateError if the daemon's sockets in this directory would have paths longer than
        a unix socket's (``bind`` and ``connect`` would fail)."""
        longest = len(os.fsencode(self.root / _LONGEST_SOCKET))
        if longest > MAX_SOCKET_PATH:
            room = MAX_SOCKET_PATH - len(_LONGEST_SOCKET) - 1
            raise StateError(f"the state directory path {self.root} is too long for the daemon's"
                             f" unix sockets ({len(os.fsencode(self.root))} bytes; at most {room}):"
                             " choose a shorter --home", reason="usage")

    def require(self) -> None:
        """Raise a StateError that says what to run when the site is not initialised."""
        self.check_socket_room()
        if not self.key_path.exists():
            raise StateError(
                f"no meshd site in {self.root}; create one with: meshd init --name NAME"
                f" --home {self.root}",
                reason="not-initialised",
            )
        mode = stat.S_IMODE(self.root.stat().st_mode)
        if mode & 0o022:
            raise StateError(
                f"state directory {self.root} is writable by others (mode {mode:04o});"
                f" run: chmod 700 {self.root}",
                reason="permissions",
            )


class HomeLock:
    """One daemon per home: an exclusive ``flock`` on ``daemon.lock``, taken before the daemon
    reads or changes any state and held until it has stopped.  The kernel lets it go when the
    process ends, however it ends, so a crash leaves nothing to clean up."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if no other process holds it; False if one does."""
        if self._fd is not None:
            return True
        try:
            fd = os.open(self.home.lock_path,
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise StateError(f"cannot open {self.home.lock_path}: {exc.strerror}",
                             reason="lock") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def refusal(self) -> StateError:
        """The error for a daemon that finds the lock held."""
        pid = self.home.running_pid()
        return StateError(
            f"another meshd daemon{f' (pid {pid})' if pid else ''} is already running for"
            f" {self.home.root}; stop it with: meshd stop --home {self.home.root}",
            reason="running")
