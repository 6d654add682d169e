"""A site's Ed25519 key: generation, the key file, signing, and names derived from the public key.

The site id (``site_id_of``) is the machine name of a site: lower-case RFC 4648 base32 of a
20-byte BLAKE2b of its public key.  The fingerprint (``fingerprint_of``) is the human name two
admins compare by phone: 12 Crockford base32 symbols (60 bits) grouped ``XXXX-XXXX-XXXX``.

Key file: the text ``meshd-site-key-v1\\n<32-byte seed as 64 lower-case hex digits>\\n``, mode 0600,
owned by the user running meshd.  ``load`` refuses a file any group/other bit is set on.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import secrets
import stat
from pathlib import Path
from typing import NoReturn

import nacl.bindings
import nacl.exceptions
import nacl.signing

from meshd.trust import base32
from meshd.errors import KeyFileError

__all__ = [
    "KEY_FILE_HEADER",
    "SiteKey",
    "curve_public_of",
    "fingerprint_of",
    "site_id_of",
    "verify_signature",
]

KEY_FILE_HEADER = "meshd-site-key-v1"
_SEED_HEX_LEN = 64
_MAX_KEY_FILE = 4096
_HEX = frozenset("0123456789abcdefABCDEF")


def site_id_of(public: bytes) -> str:
    """The 32-character lower-case base32 site id of an Ed25519 public key."""
    digest = hashlib.blake2b(public, digest_size=20, person=b"meshd-site-id").digest()
    return base64.b32encode(digest).decode("ascii").lower()


def fingerprint_of(public: bytes) -> str:
    """A short fingerprint to read aloud: the first 60 bits of a BLAKE2b of the key, as
    12 Crockford base32 symbols grouped ``XXXX-XXXX-XXXX``."""
    digest = hashlib.blake2b(public, digest_size=8, person=b"meshd-fingerprnt").digest()
    symbols = base32.encode(digest)[:12]
    return "-".join(symbols[i : i + 4] for i in range(0, 12, 4))


def curve_public_of(public: bytes) -> bytes:
    """The X25519 public key of an Ed25519 public key; ``ValueError`` if it is not a valid key."""
    if not isinstance(public, bytes) or len(public) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    try:
        return nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(public)
    except nacl.exceptions.RuntimeError as exc:
        raise ValueError("not a valid Ed25519 public key") from exc


def verify_signature(public: bytes, message: bytes, signature: bytes) -> bool:
    """True if ``signature`` is a valid Ed25519 signature of ``message`` by ``public``.

    Returns False on any bad input (wrong types or lengths, invalid key); never raises.
    """
    if not (
        isinstance(public, bytes)
        and isinstance(message, bytes)
        and isinstance(signature, bytes)
        and len(public) == 32
        and len(signature) == 64
    ):
        return False
    try:
        nacl.signing.VerifyKey(public).verify(message, signature)
    except Exception:  # BadSignatureError, or libsodium refusing a malformed key
        return False
    return True


class SiteKey:
    """The secret Ed25519 key of this site.  ``repr`` shows only public names."""

    __slots__ = ("_signing", "public", "site_id", "fingerprint")

    public: bytes
    site_id: str
    fingerprint: str

    def __init__(self, seed: bytes) -> None:
        if not isinstance(seed, bytes) or len(seed) != 32:
            raise ValueError("an Ed25519 seed is 32 bytes")
        self._signing = nacl.signing.SigningKey(seed)
        self.public = bytes(self._signing.verify_key)
        self.site_id = site_id_of(self.public)
        self.fingerprint = fingerprint_of(self.public)

    @classmethod
    def generate(cls) -> SiteKey:
        """A new key from the operating system's random source."""
        return cls(secrets.token_bytes(32))

    @classmethod
    def load(cls, path: Path) -> SiteKey:
        """Read a key file.

        ``KeyFileError`` reasons: ``missing``; ``permissions`` (a group/other bit is set, or the
        file belongs to another user); ``unreadable`` (any other OS error, e.g. a directory);
        ``malformed``.
        """
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise KeyFileError(
                f"no site key at {path}; create one with: meshd init", reason="missing"
            ) from None
        except OSError as exc:
            raise KeyFileError(
                f"cannot read site key {path}: {exc.strerror}", reason="unreadable"
            ) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise KeyFileError(f"site key {path} is not a regular file", reason="unreadable")
            mode = stat.S_IMODE(st.st_mode)
            if st.st_uid != os.getuid():
                raise KeyFileError(
                    f"site key {path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()});"
                    f" it must be yours and private: chown it, then run: chmod 600 {path}",
                    reason="permissions",
                )
            if mode & 0o077:
                raise KeyFileError(
                    f"site key {path} has mode {mode:04o}, so other users may read it;"
                    f" run: chmod 600 {path}",
                    reason="permissions",
                )
            try:
                data = os.read(fd, _MAX_KEY_FILE + 1)
            except OSError as exc:
                raise KeyFileError(
                    f"cannot read site key {path}: {exc.strerror}", reason="unreadable"
                ) from None
        finally:
            os.close(fd)
        return cls(_parse_key_file(data, path))

    def save(self, path: Path) -> None:
        """Write the key file atomically, mode 0600 from creation; never overwrite.

        ``KeyFileError`` reasons: ``exists`` (something is already at ``path``), ``unwritable``.
        """
        path = Path(path)
        if os.path.lexists(path):
            raise KeyFileError(
                f"{path} already exists; refusing to overwrite a site key", reason="exists"
            )
        directory = path.parent
        tmp = directory / f".{path.name}.tmp-{secrets.token_hex(8)}"
        data = f"{KEY_FILE_HEADER}\n{self._signing.encode().hex()}\n".encode("ascii")
        try:
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                0o600,
            )
            try:
                os.fchmod(fd, 0o600)  # a umask can only remove bits, but be explicit
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            _install_no_clobber(tmp, path)
            _fsync_dir(directory)
        except KeyFileError:
            tmp.unlink(missing_ok=True)
            raise
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise KeyFileError(
                f"cannot write site key {path}: {exc.strerror or exc}"
                + ("; free some space" if full else ""),
                reason="disk-full" if full else "unwritable",
            ) from None
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def sign(self, message: bytes) -> bytes:
        """A 64-byte detached Ed25519 signature of ``message``."""
        return bytes(self._signing.sign(message).signature)

    def curve_keypair(self) -> tuple[bytes, bytes]:
        """(public, secret): this key as raw 32-byte X25519 keys, for key exchange."""
        pk = self._signing.verify_key.to_curve25519_public_key()
        sk = self._signing.to_curve25519_private_key()
        return bytes(pk), bytes(sk)

    def __repr__(self) -> str:
        return f"SiteKey(site_id={self.site_id!r}, fingerprint={self.fingerprint!r})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("SiteKey is not picklable; save it with SiteKey.save")


def _parse_key_file(data: bytes, path: Path) -> bytes:
    def bad(why: str) -> KeyFileError:
        return KeyFileError(f"site key {path} is malformed: {why}", reason="malformed")

    if len(data) > _MAX_KEY_FILE:
        raise bad("file too large")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise bad("not ASCII text") from None
    lines = text.split("\n")
    if len(lines) != 3 or lines[2] != "":
        raise bad(f"expected 2 lines ({KEY_FILE_HEADER!r}, then the seed in hex)")
    header, seed_hex = lines[0], lines[1]
    if header != KEY_FILE_HEADER:
        raise bad(f"first line is not {KEY_FILE_HEADER!r}")
    if len(seed_hex) != _SEED_HEX_LEN or not set(seed_hex) <= _HEX:
        raise bad(f"second line is not {_SEED_HEX_LEN} hex digits")
    return bytes.fromhex(seed_hex)


def _install_no_clobber(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` atomically, failing if ``path`` exists.

    ``os.link`` fails atomically on an existing target; on a file system without hard links we
    fall back to ``os.replace`` after the existence check already made by the caller.
    """
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise KeyFileError(
            f"{path} already exists; refusing to overwrite a site key", reason="exists"
        ) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if os.path.lexists(path):
            raise KeyFileError(
                f"{path} already exists; refusing to overwrite a site key", reason="exists"
            ) from None
        os.replace(tmp, path)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
