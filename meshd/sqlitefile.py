"""The SQLite files meshd keeps in its data dir (store.db, broker.db): opened one way.

Rules:
- A file is marked with meshd's application id and a schema version. A file that is not
  SQLite, is corrupt, belongs to something else or has another schema version is refused
  with its path and what to do: never overwritten. An older version with an upgrade for
  each step (`upgrades`: version -> SQL bringing it to the next) is upgraded in place, each
  step one transaction.
- WAL with synchronous=FULL: a commit is on disk when it returns (a file opened with
  fsync=False: synchronous=NORMAL, in the OS when it returns; see broker.fsync).
- Mode 0600 before SQLite first opens it, so the -wal and -shm files (which SQLite creates
  with the mode of the database file) are 0600 too; a file left wider is tightened, with its
  side files, when opened. An empty file is ours (a crash right after creating it).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path

APPLICATION_ID = 0x6D657368  # "mesh"
MODE = 0o600
SIDE_FILES = ("-wal", "-shm", "-journal")


def open_private(path: Path, schema_version: int, create_sql: str, what: str,
                 error: type[Exception], fsync: bool = True,
                 upgrades: Mapping[int, str] | None = None) -> sqlite3.Connection:
    """A connection to the file at `path` (created with `create_sql` if new); `error` with
    one line naming the file if it cannot be used. `what` names it for people ("store").
    `fsync` False: synchronous=NORMAL (a commit is in the OS when it returns: it survives
    the process being killed, not the machine losing power)."""
    existed = _has_data(path)
    _private(path, error)
    try:
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        if existed:
            _check(conn, path, schema_version, what, error, upgrades or {})
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL" if fsync else "PRAGMA synchronous=NORMAL")
        if not existed:
            conn.executescript(f"PRAGMA application_id={APPLICATION_ID};\n"
                               f"PRAGMA user_version={schema_version};\n{create_sql}")
        return conn
    except sqlite3.DatabaseError as exc:
        raise error(f"{path} is not a usable meshd {what} ({exc}); move it away or restore "
                    "it from a backup — meshd will not overwrite it") from None


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Cursor]:
    """BEGIN ... COMMIT (on disk when it returns); ROLLBACK on any error."""
    cur = conn.cursor()
    cur.execute("BEGIN")
    try:
        yield cur
    except BaseException:
        cur.execute("ROLLBACK")
        raise
    cur.execute("COMMIT")


def _check(conn: sqlite3.Connection, path: Path, schema_version: int, what: str,
           error: type[Exception], upgrades: Mapping[int, str]) -> None:
    (app_id,) = conn.execute("PRAGMA application_id").fetchone()
    if app_id != APPLICATION_ID:
        raise error(f"{path} is an SQLite file that does not belong to meshd; move it away "
                    "— meshd will not overwrite it")
    (result,) = conn.execute("PRAGMA quick_check").fetchone()
    if result != "ok":
        raise error(f"{path} is corrupt ({result}); restore it from a backup or move it away")
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    while version < schema_version and version in upgrades:
        conn.executescript(f"BEGIN;\n{upgrades[version]}\nPRAGMA user_version={version + 1};"
                           "\nCOMMIT;")
        (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version != schema_version:
        raise error(f"{path} has schema version {version}; this meshd reads version "
                    f"{schema_version} of the {what}")


def _has_data(path: Path) -> bool:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    return size > 0 or path.with_name(path.name + "-wal").exists()


def _private(path: Path, error: type[Exception]) -> None:
    """Make the file (and the side files SQLite keeps next to it) owner-only."""
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
        raise error(f"cannot make {path} private to this user ({exc.strerror}); check who "
                    "owns it and the data dir") from None
