"""Writing a state file whole or not at all (the config, the tunnel registry)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from meshd.errors import StateError


def write_atomic(path: Path, data: bytes, what: str) -> None:
    """Write ``data`` to ``path`` (mode 0600) through a temporary file: fsync, rename, fsync of
    the directory.  If the disk refuses (full, read-only), StateError ``disk-full`` or
    ``state-write`` naming ``what``; ``path`` is then as it was and no temporary file stays."""
    tmp = path.with_suffix(".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_refused(what, path, str(exc.strerror or exc),
                            full=exc.errno in (errno.ENOSPC, errno.EDQUOT)) from None


def write_refused(what: str, path: Path, detail: str, *, full: bool,
                  reason: str = "state-write") -> StateError:
    """The error for a state file the disk would not take (``full``: ``disk-full``, and the
    message says to free some space)."""
    return StateError(f"cannot write {what} {path}: {detail}"
                      + ("; free some space" if full else ""),
                      reason="disk-full" if full else reason)


def stale_socket(path: Path, what: str) -> bool:
    """Whether a socket is at ``path`` (one a daemon of this home left, for the caller to
    remove before it binds its own); False if nothing is.  StateError ``state`` if something
    else is there (a file, a directory, a symlink): not ours to delete, so it stays."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StateError(f"cannot look at {path}: {exc.strerror or exc}", reason="state") from None
    if not stat.S_ISSOCK(mode):
        raise StateError(f"{path} is there and is not a socket; move it away (the daemon makes"
                         f" its {what} there)", reason="state")
    return True


def file_id(path: Path, *, follow: bool = False) -> tuple[int, int] | None:
    """The identity (device, inode) of what is at ``path`` now (through a symlink if
    ``follow``); None if nothing is there."""
    try:
        st = os.stat(path, follow_symlinks=follow)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def unlink_if_same(path: Path, ident: tuple[int, int] | None) -> None:
    """Remove ``path`` only if it is still the file ``ident`` names (made by this process): a
    home renamed under a running daemon must not lose another daemon's socket or pid file that
    now has the same name."""
    if ident is not None and file_id(path) == ident:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
