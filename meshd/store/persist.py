"""Store persistence in SQLite (WAL) in the data dir.

Rules:
- One file, `store.db`, opened by meshd/sqlitefile.py (application id and schema checked,
  never overwritten, WAL with synchronous=FULL, 0600 with its side files).
- A commit is on disk when it returns. The shell acknowledges
  a local write only after the commit that holds it (group commit: all writes that queued
  while the previous commit ran share the next one).
- Rows hold the whole CRDT state of a key as CBOR, so loading is replaying the rows.
- The file holds the auth database (accounts, rules, revocations): it is mode 0600 before
  SQLite first opens it, so its -wal and -shm files (which SQLite creates with the mode of
  the database file) are 0600 too; a file left wider by an older meshd is tightened, with
  its -wal/-shm/-journal, when opened.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2

from meshd.sqlitefile import open_private, transaction

SCHEMA_VERSION = 1
FILE = "store.db"


class StoreFileError(RuntimeError):
    """The store file cannot be used; str() names it and says what to do."""


class StoreDB:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = open_private(path, SCHEMA_VERSION, """
            CREATE TABLE IF NOT EXISTS records (
                db TEXT NOT NULL, tbl TEXT NOT NULL, key TEXT NOT NULL, state BLOB NOT NULL,
                PRIMARY KEY (db, tbl, key)) WITHOUT ROWID;
        """, "store", StoreFileError)

    def load(self) -> Iterator[tuple[str, str, str, Any]]:
        for db, tbl, key, blob in self.conn.execute("SELECT db, tbl, key, state FROM records"):
            yield db, tbl, key, cbor2.loads(blob)

    def save(self, rows: list[tuple[str, str, str, Any]],
             deleted: list[tuple[str, str, str]] = ()) -> None:  # type: ignore[assignment]
        """One durable transaction."""
        with transaction(self.conn) as cur:
            cur.executemany("INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?)",
                            [(db, tbl, key, cbor2.dumps(state)) for db, tbl, key, state in rows])
            if deleted:
                cur.executemany("DELETE FROM records WHERE db=? AND tbl=? AND key=?", deleted)

    def close(self) -> None:
        self.conn.close()
