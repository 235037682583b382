"""Store persistence in SQLite (WAL) in the data dir: the file and the queries on it.

Rules:
- One file, `store.db`, opened by meshd/sqlitefile.py (application id and schema checked,
  never overwritten, WAL with synchronous=FULL, 0600 with its side files).
- A commit is on disk when it returns. The shell acknowledges
  a local write only after the commit that holds it (group commit: all writes that queued
  while the previous commit ran share the next one).
- A row holds the whole CRDT state of a key as CBOR, its hash (as a signed 64-bit
  integer), and what records.columns derives from it (bucket, until, tomb, wall, count),
  so anti-entropy narrows a bucket to its keys through an index (db, tbl, bucket, hash),
  tombstone GC finds old tombstones through a partial index on tomb, and listings skip
  dead keys without decoding them. Schema 1 (state only) is upgraded in place when opened:
  the columns are added, then filled in batches (a crash part way resumes where it was).
  The stored hashes are records.key_hash's: changing that function needs a schema upgrade
  that recomputes them.
- Two connections: `save` (the writer) runs in a worker thread; every read goes through
  the reader, on the event loop's thread only. WAL lets the reader see the last commit
  while a commit runs; what is not committed yet the caller keeps in memory
  (diskrecords.py).
- The file holds the auth database (accounts, rules, revocations): it is mode 0600 before
  SQLite first opens it, so its -wal and -shm files (which SQLite creates with the mode of
  the database file) are 0600 too; a file left wider by an older meshd is tightened, with
  its -wal/-shm/-journal, when opened.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import cbor2

from meshd.sqlitefile import open_private, transaction

from .records import columns, key_hash

log = logging.getLogger("meshd.store")
SCHEMA_VERSION = 2
FILE = "store.db"
CHUNK = 500  # host parameters in one IN (...) list
BACKFILL = 10_000  # rows per transaction when upgrading from schema 1
READER_CACHE_KIB = 8192  # the reader's page cache (SQLite's default is 2 MiB)
BUSY_MS = 5000  # how long the reader waits on a lock (WAL recovery after a kill -9)

SCHEMA = """
    CREATE TABLE IF NOT EXISTS records (
        db TEXT NOT NULL, tbl TEXT NOT NULL, key TEXT NOT NULL, state BLOB NOT NULL,
        hash INTEGER, bucket INTEGER, until INTEGER, tomb INTEGER, wall INTEGER,
        cnt INTEGER,
        PRIMARY KEY (db, tbl, key)) WITHOUT ROWID;
""" + "\n"
INDEXES = """
    CREATE INDEX IF NOT EXISTS records_bucket ON records (db, tbl, bucket, hash);
    CREATE INDEX IF NOT EXISTS records_tomb ON records (tomb) WHERE tomb IS NOT NULL;
"""
UPGRADES = {1: """
    ALTER TABLE records ADD COLUMN hash INTEGER;
    ALTER TABLE records ADD COLUMN bucket INTEGER;
    ALTER TABLE records ADD COLUMN until INTEGER;
    ALTER TABLE records ADD COLUMN tomb INTEGER;
    ALTER TABLE records ADD COLUMN wall INTEGER;
    ALTER TABLE records ADD COLUMN cnt INTEGER;
""" + INDEXES}

Row = tuple[str, str, str, Any, int]  # db, tbl, key, state, hash


class StoreFileError(RuntimeError):
    """The store file cannot be used; str() names it and says what to do."""


def signed(h: int) -> int:
    return h - (1 << 64) if h >= 1 << 63 else h


def unsigned(h: int) -> int:
    return h + (1 << 64) if h < 0 else h


class StoreDB:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = open_private(path, SCHEMA_VERSION, SCHEMA + INDEXES, "store",
                                 StoreFileError, upgrades=UPGRADES)
        self._backfill()
        try:
            self.reader = sqlite3.connect(str(path), check_same_thread=False,
                                          isolation_level=None)
            self.reader.execute(f"PRAGMA busy_timeout={BUSY_MS}")
            self.reader.execute(f"PRAGMA cache_size=-{READER_CACHE_KIB}")
            self.reader.execute("PRAGMA query_only=1")
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            raise StoreFileError(f"{path} cannot be read ({exc})") from None

    def _backfill(self) -> None:
        """Fill the derived columns of rows an older meshd wrote (schema 1), in primary key
        order a batch at a time (each batch goes on from where the last one ended: no row
        is read twice; after a crash, the rows filled already are skipped once)."""
        after: tuple[str, str, str] | None = None
        filled = 0
        while True:
            if after is None:
                todo = self.conn.execute(
                    "SELECT db, tbl, key, state FROM records WHERE hash IS NULL "
                    "ORDER BY db, tbl, key LIMIT ?", (BACKFILL,)).fetchall()
            else:
                todo = self.conn.execute(
                    "SELECT db, tbl, key, state FROM records WHERE (db, tbl, key) > (?, ?, ?) "
                    "AND hash IS NULL ORDER BY db, tbl, key LIMIT ?",
                    (*after, BACKFILL)).fetchall()
            if not todo:
                if filled:
                    log.info("%s: %d records upgraded to schema %d", self.path, filled,
                             SCHEMA_VERSION)
                return
            values = []
            for db, tbl, key, blob in todo:
                state = cbor2.loads(blob)
                values.append((signed(key_hash(key, state)), *columns(key, state), db, tbl,
                               key))
            with transaction(self.conn) as cur:
                cur.executemany(
                    "UPDATE records SET hash=?, bucket=?, until=?, tomb=?, wall=?, cnt=? "
                    "WHERE db=? AND tbl=? AND key=?", values)
            after = todo[-1][:3]
            filled += len(todo)
            if filled % (10 * BACKFILL) < len(todo):
                log.info("%s: %d records upgraded to schema %d so far", self.path, filled,
                         SCHEMA_VERSION)

    # --- the writer (a worker thread) --------------------------------------------------------

    def save(self, rows: list[Row], deleted: Iterable[tuple[str, str, str]] = ()) -> None:
        """One durable transaction."""
        values = [(db, tbl, key, cbor2.dumps(state), signed(h), *columns(key, state))
                  for db, tbl, key, state, h in rows]
        deleted = list(deleted)
        with transaction(self.conn) as cur:
            if deleted:
                cur.executemany("DELETE FROM records WHERE db=? AND tbl=? AND key=?", deleted)
            cur.executemany("INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, "
                            "?)", values)

    # --- the reader (the event loop's thread) ------------------------------------------------

    def get(self, db: str, tbl: str, key: str) -> tuple[bytes, int] | None:
        row = self.reader.execute("SELECT state, hash FROM records WHERE db=? AND tbl=? "
                                  "AND key=?", (db, tbl, key)).fetchall()
        return (row[0][0], unsigned(row[0][1])) if row else None

    def summary(self) -> Iterator[tuple[str, str, int, int, int]]:
        for db, tbl, bucket, h, until in self.reader.execute(
                "SELECT db, tbl, bucket, hash, until FROM records"):
            yield db, tbl, bucket, unsigned(h), until

    def summary_times(self) -> Iterator[tuple[str, str, int, int, int, Any, Any]]:
        """`summary` with each row's register timestamp (wall, count), or Nones."""
        for db, tbl, bucket, h, until, wall, cnt in self.reader.execute(
                "SELECT db, tbl, bucket, hash, until, wall, cnt FROM records"):
            yield db, tbl, bucket, unsigned(h), until, wall, cnt

    def keys(self, db: str, tbl: str, prefix: str | None, live_at: int | None,
             stop: int = 0, match: Callable[[str], bool] | None = None) -> list[str]:
        """Sorted keys (text sorts as its UTF-8 bytes: by code point), from `prefix` on
        while they start with it, only those `match` accepts if given; the first `stop`
        of them if not 0 (the cursor stops there: a page of a large table reads a page)."""
        sql = "SELECT key FROM records WHERE db=? AND tbl=?"
        args: list[Any] = [db, tbl]
        if prefix:
            sql += " AND key >= ?"
            args.append(prefix)
        if live_at is not None:
            sql += " AND until > ?"
            args.append(live_at)
        sql += " ORDER BY key"
        if stop and not prefix and match is None:
            sql += " LIMIT ?"
            args.append(stop)
        cur = self.reader.execute(sql, args)
        try:
            if not prefix and match is None:
                return [k for (k,) in cur]
            out = []
            for (k,) in cur:
                if prefix and not k.startswith(prefix):
                    break
                if match is None or match(k):
                    out.append(k)
                    if len(out) == stop:
                        break
            return out
        finally:
            cur.close()

    def many(self, db: str, tbl: str, keys: list[str]) -> dict[str, tuple[bytes, int]]:
        """key -> (state, hash) of those of `keys` on disk."""
        out: dict[str, tuple[bytes, int]] = {}
        for i in range(0, len(keys), CHUNK):
            part = keys[i:i + CHUNK]
            out.update((k, (blob, unsigned(h))) for k, blob, h in self.reader.execute(
                f"SELECT key, state, hash FROM records WHERE db=? AND tbl=? AND key IN "
                f"({','.join('?' * len(part))})", [db, tbl, *part]).fetchall())
        return out

    def hashes(self, db: str, tbl: str, buckets: list[int]) -> dict[str, int]:
        out: dict[str, int] = {}
        for i in range(0, len(buckets), CHUNK):
            part = buckets[i:i + CHUNK]
            out.update((k, unsigned(h)) for k, h in self.reader.execute(
                f"SELECT key, hash FROM records WHERE db=? AND tbl=? AND bucket IN "
                f"({','.join('?' * len(part))})", [db, tbl, *part]).fetchall())
        return out

    def live_keys(self, db: str, tbl: str, now: int, limit: int) -> list[str]:
        """Up to `limit` keys of the table live at `now`."""
        return [k for (k,) in self.reader.execute(
            "SELECT key FROM records WHERE db=? AND tbl=? AND until > ? LIMIT ?",
            (db, tbl, now, limit)).fetchall()]

    def count_live(self, db: str, tbl: str, now: int) -> int:
        (n,) = self.reader.execute("SELECT count(*) FROM records WHERE db=? AND tbl=? "
                                   "AND until > ?", (db, tbl, now)).fetchone()
        return int(n)

    def count_live_except(self, db: str, tbl: str, now: int, keys: list[str]
                          ) -> tuple[int, dict[str, int]]:
        """`count_live`, and key -> until of those of `keys` on disk, from one snapshot (a
        commit landing in between would count a key twice or not at all)."""
        self.reader.execute("BEGIN")
        try:
            n = self.count_live(db, tbl, now)
            untils: dict[str, int] = {}
            for i in range(0, len(keys), CHUNK):
                part = keys[i:i + CHUNK]
                untils.update(self.reader.execute(
                    f"SELECT key, until FROM records WHERE db=? AND tbl=? AND key IN "
                    f"({','.join('?' * len(part))})", [db, tbl, *part]).fetchall())
        finally:
            self.reader.execute("COMMIT")
        return n, untils

    def until(self, db: str, tbl: str, key: str) -> int | None:
        """The key's `until` on disk; None if the key is not on disk."""
        row = self.reader.execute("SELECT until FROM records WHERE db=? AND tbl=? AND key=?",
                                  (db, tbl, key)).fetchall()
        return row[0][0] if row else None

    def tombstones(self, before: int, skip: Iterable[str] = (),
                   limit: int = 0) -> list[tuple[str, str, str]]:
        """Keys of tombstones written before `before`, none in the databases `skip` names,
        at most `limit` if not 0."""
        skip = sorted(skip)
        sql = "SELECT db, tbl, key FROM records WHERE tomb IS NOT NULL AND tomb < ?"
        if skip:
            sql += f" AND db NOT IN ({','.join('?' * len(skip))})"
        args: list[Any] = [before, *skip]
        if limit:
            sql += " LIMIT ?"
            args.append(limit)
        return [(db, tbl, key) for db, tbl, key in self.reader.execute(sql, args).fetchall()]

    def newest(self, max_wall: int) -> tuple[int, int] | None:
        """The newest (wall, count) of a register at or before `max_wall`."""
        row = self.reader.execute(
            "SELECT wall, cnt FROM records WHERE wall IS NOT NULL AND wall <= ? "
            "ORDER BY wall DESC, cnt DESC LIMIT 1", (max_wall,)).fetchall()
        return (row[0][0], row[0][1]) if row else None

    def load(self) -> Iterator[tuple[str, str, str, Any]]:
        """Every row decoded (for tools and tests; the daemon reads on demand)."""
        for db, tbl, key, blob in self.reader.execute(
                "SELECT db, tbl, key, state FROM records").fetchall():
            yield db, tbl, key, cbor2.loads(blob)

    def close(self) -> None:
        self.reader.close()
        self.conn.close()
