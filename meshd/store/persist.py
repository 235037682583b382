"""Store persistence in SQLite (WAL) in the data dir.

Rules:
- One file, `store.db`, marked with our application id. A file that is not SQLite, is
  corrupt, or belongs to something else is refused with its path: never overwritten.
- synchronous=FULL in WAL mode: a commit is on disk when it returns. The shell acknowledges
  a local write only after the commit that holds it (group commit: all writes that queued
  while the previous commit ran share the next one).
- Rows hold the whole CRDT state of a key as CBOR, so loading is replaying the rows.
- The file holds the auth database (accounts, rules, revocations): it is mode 0600 before
  SQLite first opens it, so its -wal and -shm files (which SQLite creates with the mode of
  the database file) are 0600 too; a file left wider by an older meshd is tightened, with
  its -wal/-shm/-journal, when opened.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2

APPLICATION_ID = 0x6D657368  # "mesh"
SCHEMA_VERSION = 1
FILE = "store.db"
MODE = 0o600
SIDE_FILES = ("-wal", "-shm", "-journal")


class StoreFileError(RuntimeError):
    """The store file cannot be used; str() names it and says what to do."""


class StoreDB:
    def __init__(self, path: Path) -> None:
        self.path = path
        existed = _has_data(path)  # an empty file is ours, left by a crash right after creation
        _private(path)
        try:
            self.conn = sqlite3.connect(str(path), check_same_thread=False,
                                        isolation_level=None)
            if existed:
                self._check()
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            if not existed:
                self._create()
        except sqlite3.DatabaseError as exc:
            raise StoreFileError(f"{path} is not a usable meshd store ({exc}); move it away "
                                 "or restore it from a backup — meshd will not overwrite it"
                                 ) from None

    def _check(self) -> None:
        (app_id,) = self.conn.execute("PRAGMA application_id").fetchone()
        if app_id != APPLICATION_ID:
            raise StoreFileError(f"{self.path} is an SQLite file that does not belong to "
                                 "meshd; move it away — meshd will not overwrite it")
        (result,) = self.conn.execute("PRAGMA quick_check").fetchone()
        if result != "ok":
            raise StoreFileError(f"{self.path} is corrupt ({result}); restore it from a "
                                 "backup or move it away")
        (version,) = self.conn.execute("PRAGMA user_version").fetchone()
        if version != SCHEMA_VERSION:
            raise StoreFileError(f"{self.path} has schema version {version}; this meshd "
                                 f"reads version {SCHEMA_VERSION}")

    def _create(self) -> None:
        self.conn.executescript(f"""
            PRAGMA application_id={APPLICATION_ID};
            PRAGMA user_version={SCHEMA_VERSION};
            CREATE TABLE IF NOT EXISTS records (
                db TEXT NOT NULL, tbl TEXT NOT NULL, key TEXT NOT NULL, state BLOB NOT NULL,
                PRIMARY KEY (db, tbl, key)) WITHOUT ROWID;
        """)

    def load(self) -> Iterator[tuple[str, str, str, Any]]:
        for db, tbl, key, blob in self.conn.execute("SELECT db, tbl, key, state FROM records"):
            yield db, tbl, key, cbor2.loads(blob)

    def save(self, rows: list[tuple[str, str, str, Any]],
             deleted: list[tuple[str, str, str]] = ()) -> None:  # type: ignore[assignment]
        """One durable transaction."""
        cur = self.conn.cursor()
        cur.execute("BEGIN")
        try:
            cur.executemany("INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?)",
                            [(db, tbl, key, cbor2.dumps(state)) for db, tbl, key, state in rows])
            if deleted:
                cur.executemany("DELETE FROM records WHERE db=? AND tbl=? AND key=?", deleted)
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.conn.close()


def _has_data(path: Path) -> bool:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    return size > 0 or path.with_name(path.name + "-wal").exists()


def _private(path: Path) -> None:
    """Make the store file (and the side files SQLite keeps next to it) owner-only."""
    try:
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, MODE)
            os.close(fd)
        for p in [path, *(path.with_name(path.name + s) for s in SIDE_FILES)]:
            try:
                if p.stat().st_mode & 0o777 != MODE:
                    os.chmod(p, MODE)
            except FileNotFoundError:
                continue
    except OSError as exc:
        raise StoreFileError(f"cannot make {path} private to this user ({exc.strerror}); "
                             "check who owns it and the data dir") from None
