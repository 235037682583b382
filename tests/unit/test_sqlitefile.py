"""The data dir's SQLite files (meshd/sqlitefile.py): refused, never overwritten, private."""

from __future__ import annotations

import os
import sqlite3

import pytest

from meshd.sqlitefile import open_private

CREATE = "CREATE TABLE t (x INTEGER);"


class FileError(RuntimeError):
    pass


def test_a_new_file_is_created_0600_with_its_side_files(tmp_path):
    path = tmp_path / "x.db"
    conn = open_private(path, 3, CREATE, "thing", FileError)
    conn.execute("INSERT INTO t VALUES (1)")
    assert conn.execute("PRAGMA user_version").fetchone() == (3,)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    for p in (path, tmp_path / "x.db-wal"):
        assert p.stat().st_mode & 0o777 == 0o600, p
    conn.close()
    again = open_private(path, 3, CREATE, "thing", FileError)  # reopened, data kept
    assert again.execute("SELECT x FROM t").fetchall() == [(1,)]


def test_a_wider_file_is_tightened(tmp_path):
    path = tmp_path / "x.db"
    open_private(path, 1, CREATE, "thing", FileError).close()
    os.chmod(path, 0o644)
    open_private(path, 1, CREATE, "thing", FileError).close()
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("make, says", [
    (lambda p: p.write_bytes(b"not a database at all, but long enough" * 200),
     "is not a usable meshd thing"),
    (lambda p: sqlite3.connect(str(p)).executescript("CREATE TABLE other (y);"),
     "does not belong to meshd"),
])
def test_a_file_that_is_not_ours_is_refused_and_left_alone(tmp_path, make, says):
    path = tmp_path / "x.db"
    make(path)
    before = path.read_bytes()
    with pytest.raises(FileError, match=says) as err:
        open_private(path, 1, CREATE, "thing", FileError)
    assert str(path) in str(err.value)
    assert path.read_bytes() == before, "never overwritten"


def test_another_schema_version_is_refused(tmp_path):
    path = tmp_path / "x.db"
    open_private(path, 1, CREATE, "thing", FileError).close()
    with pytest.raises(FileError, match="schema version 1; this meshd reads version 2"):
        open_private(path, 2, CREATE, "thing", FileError)


def test_an_empty_file_left_by_a_crash_is_ours(tmp_path):
    path = tmp_path / "x.db"
    path.touch()
    conn = open_private(path, 1, CREATE, "thing", FileError)
    assert conn.execute("SELECT count(*) FROM t").fetchone() == (0,)
