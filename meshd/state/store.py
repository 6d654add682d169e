"""The trust store: what this site has verified and promised, in SQLite (WAL, synchronous=FULL).

Everything is written in one transaction per change and committed before the daemon answers, so a
crash never loses anything already acknowledged, and a refused input never leaves a partial
write behind.  The store keeps *verified* signed objects as their raw wire bytes: whoever reads
them back decodes and verifies them again, so a tampered file cannot smuggle a record in.
"""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from meshd.errors import StateError
from meshd.state.files import file_id, write_refused

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB);
CREATE TABLE IF NOT EXISTS site_records (key BLOB PRIMARY KEY, seq INTEGER NOT NULL,
    raw BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS vouches (digest BLOB PRIMARY KEY, subject BLOB NOT NULL,
    raw BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS revocations (digest BLOB PRIMARY KEY, subject BLOB NOT NULL,
    raw BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS rotations (digest BLOB PRIMARY KEY, old BLOB NOT NULL,
    raw BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS invitations (
    id BLOB PRIMARY KEY, mesh_id BLOB NOT NULL, secret BLOB NOT NULL, created INTEGER NOT NULL,
    expires INTEGER NOT NULL, uses INTEGER NOT NULL, used INTEGER NOT NULL DEFAULT 0,
    role TEXT NOT NULL, approve INTEGER NOT NULL, name_hint TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS redemptions (
    invite_id BLOB NOT NULL, joiner BLOB NOT NULL, name TEXT NOT NULL, state TEXT NOT NULL,
    record BLOB NOT NULL, vouch BLOB, created INTEGER NOT NULL, decided INTEGER,
    PRIMARY KEY (invite_id, joiner));
"""


@dataclass(frozen=True, slots=True)
class InvitationRow:
    """An invitation this site issued (its secret never leaves the store but in the token)."""

    id: bytes
    mesh_id: bytes
    secret: bytes
    created: int
    expires: int
    uses: int
    used: int
    role: str
    approve: bool
    name_hint: str


@dataclass(frozen=True, slots=True)
class Redemption:
    """One joiner's use of an invitation: ``pending``, ``admitted`` or ``denied``."""

    invite_id: bytes
    joiner: bytes
    name: str
    state: str
    record: bytes
    vouch: bytes | None
    created: int
    decided: int | None


class Store:
    """One SQLite database per site; every public method is its own transaction."""

    def __init__(self, path: Path) -> None:
        """Opens (or creates) the store; a StateError in one line if the file is damaged or
        not a database (``store-damaged``, the file left as it is) or cannot be opened."""
        self.path = path
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise write_refused("the state store", path, str(exc), full=False,
                                reason="store") from None
        self._ident = file_id(path, follow=True)  # sqlite3 made the file, if there was none
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            if isinstance(exc, sqlite3.OperationalError):  # locked, full, read-only, no access
                raise write_refused("the state store", path, str(exc), full="full" in str(exc),
                                    reason="store") from None
            raise StateError(f"the state store {path} is damaged ({exc}); it was left as it is:"
                             " restore it from a backup (site.key and config.toml are separate"
                             " files)", reason="store-damaged") from None
        path.chmod(0o600)

    def _open(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        for statement in _SCHEMA.strip().split(";"):
            if statement.strip():
                self._db.execute(statement)
        if self.get_meta("schema") is None:
            self.set_meta("schema", SCHEMA_VERSION)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction: committed whole, or rolled back whole.  A write the disk refuses (it
        is full, or read-only) is a :class:`~meshd.errors.StateError` (``disk-full`` or
        ``store``) that says so; nothing of the change stays, and the store works again once
        the disk does."""
        # A store deleted or replaced under us would take writes no restart finds (an
        # invitation's secret, a vouch): they are refused instead.
        if file_id(self.path, follow=True) != self._ident:
            raise StateError(f"the state store {self.path} was removed or replaced while the"
                             " daemon ran; nothing more is written: stop the daemon and put"
                             " the store back from a backup", reason="store-gone")
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._rollback()
                raise
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            self._rollback()
            raise write_refused("the state store", self.path, str(exc), full="full" in str(exc),
                                reason="store") from None

    def _rollback(self) -> None:
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite rolled back already

    # -- site settings -------------------------------------------------------------------------

    def get_int(self, key: str, default: int = 0) -> int:
        """An integer setting, or ``default`` when unset."""
        value = self.get_meta(key)
        return value if isinstance(value, int) else default

    def get_meta(self, key: str) -> object:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: object, **more: object) -> None:
        """Set one or more settings in a single transaction."""
        with self._tx() as db:
            for k, v in ((key, value), *more.items()):
                db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (k, v))

    # -- verified signed objects -----------------------------------------------------------------

    def put_record(self, key: bytes, seq: int, raw: bytes) -> bool:
        """Keep a verified site record if its sequence is higher than the one held; True if kept."""
        with self._tx() as db:
            row = db.execute("SELECT seq FROM site_records WHERE key = ?", (key,)).fetchone()
            if row is not None and row[0] >= seq:
                return False
            db.execute("INSERT OR REPLACE INTO site_records (key, seq, raw) VALUES (?, ?, ?)",
                       (key, seq, raw))
            return True

    def record_seq(self, key: bytes) -> int | None:
        row = self._db.execute("SELECT seq FROM site_records WHERE key = ?", (key,)).fetchone()
        return None if row is None else int(row[0])

    def records(self) -> list[bytes]:
        return [r[0] for r in self._db.execute("SELECT raw FROM site_records ORDER BY key")]

    def put_vouch(self, digest: bytes, subject: bytes, raw: bytes) -> bool:
        with self._tx() as db:
            cur = db.execute("INSERT OR IGNORE INTO vouches (digest, subject, raw) VALUES (?, ?, ?)",
                             (digest, subject, raw))
            return cur.rowcount == 1

    def vouches(self) -> list[bytes]:
        return [r[0] for r in self._db.execute("SELECT raw FROM vouches ORDER BY digest")]

    def put_revocation(self, digest: bytes, subject: bytes, raw: bytes) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO revocations (digest, subject, raw) VALUES (?, ?, ?)",
                (digest, subject, raw))
            return cur.rowcount == 1

    def revocations(self) -> list[bytes]:
        return [r[0] for r in self._db.execute("SELECT raw FROM revocations ORDER BY digest")]

    def put_rotation(self, digest: bytes, old: bytes, raw: bytes) -> bool:
        with self._tx() as db:
            cur = db.execute("INSERT OR IGNORE INTO rotations (digest, old, raw) VALUES (?, ?, ?)",
                             (digest, old, raw))
            return cur.rowcount == 1

    def rotations(self) -> list[bytes]:
        return [r[0] for r in self._db.execute("SELECT raw FROM rotations ORDER BY digest")]

    def adopt_mesh(self, genesis: bytes, mesh_id: bytes, mesh_name: str, role: str,
                   records: list[tuple[bytes, int, bytes]], vouches: list[tuple[bytes, bytes, bytes]],
                   revocations: list[tuple[bytes, bytes, bytes]],
                   rotations: list[tuple[bytes, bytes, bytes]] | None = None) -> None:
        """Switch this site to a mesh it was admitted to, with the verified snapshot, atomically."""
        with self._tx() as db:
            for table in ("site_records", "vouches", "revocations", "rotations"):
                db.execute(f"DELETE FROM {table}")
            for k, v in (("genesis", genesis), ("mesh_id", mesh_id), ("mesh_name", mesh_name),
                         ("role", role)):
                db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (k, v))
            db.executemany("INSERT OR REPLACE INTO site_records (key, seq, raw) VALUES (?, ?, ?)",
                           records)
            db.executemany("INSERT OR IGNORE INTO vouches (digest, subject, raw) VALUES (?, ?, ?)",
                           vouches)
            db.executemany(
                "INSERT OR IGNORE INTO revocations (digest, subject, raw) VALUES (?, ?, ?)",
                revocations)
            db.executemany("INSERT OR IGNORE INTO rotations (digest, old, raw) VALUES (?, ?, ?)",
                           rotations or [])

    # -- invitations issued by this site ------------------------------------------------------------

    def add_invitation(self, row: InvitationRow) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO invitations (id, mesh_id, secret, created, expires, uses, used, role,"
                " approve, name_hint) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (row.id, row.mesh_id, row.secret, row.created, row.expires, row.uses, row.used,
                 row.role, int(row.approve), row.name_hint))

    def invitation(self, invite_id: bytes) -> InvitationRow | None:
        row = self._db.execute(
            "SELECT id, mesh_id, secret, created, expires, uses, used, role, approve, name_hint"
            " FROM invitations WHERE id = ?", (invite_id,)).fetchone()
        if row is None:
            return None
        return InvitationRow(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7],
                             bool(row[8]), row[9])

    def redemption(self, invite_id: bytes, joiner: bytes) -> Redemption | None:
        row = self._db.execute(
            "SELECT invite_id, joiner, name, state, record, vouch, created, decided"
            " FROM redemptions WHERE invite_id = ? AND joiner = ?", (invite_id, joiner)).fetchone()
        return None if row is None else Redemption(*row)

    def redemptions(self, state: str | None = None) -> list[Redemption]:
        query = ("SELECT invite_id, joiner, name, state, record, vouch, created, decided"
                 " FROM redemptions")
        args: tuple[object, ...] = ()
        if state is not None:
            query += " WHERE state = ?"
            args = (state,)
        return [Redemption(*row) for row in self._db.execute(query + " ORDER BY created", args)]

    def redeem(self, invite_id: bytes, joiner: bytes, name: str, record: bytes, now: int,
               *, state: str, vouch: bytes | None) -> bool:
        """Take one use of an invitation for ``joiner`` and note the redemption, atomically.

        False (and nothing written) when no use is left."""
        with self._tx() as db:
            cur = db.execute("UPDATE invitations SET used = used + 1 WHERE id = ? AND used < uses",
                             (invite_id,))
            if cur.rowcount != 1:
                return False
            db.execute(
                "INSERT INTO redemptions (invite_id, joiner, name, state, record, vouch, created,"
                " decided) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (invite_id, joiner, name, state, record, vouch, now,
                 None if state == "pending" else now))
            return True

    def decide(self, invite_id: bytes, joiner: bytes, now: int, *, state: str,
               vouch: bytes | None) -> None:
        """Settle a pending redemption; a denial gives the use back to the invitation."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE redemptions SET state = ?, vouch = ?, decided = ?"
                " WHERE invite_id = ? AND joiner = ? AND state = 'pending'",
                (state, vouch, now, invite_id, joiner))
            if cur.rowcount == 1 and state == "denied":
                db.execute("UPDATE invitations SET used = used - 1 WHERE id = ? AND used > 0",
                           (invite_id,))
