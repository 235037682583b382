"""The PostgreSQL engine's single-key statements, prepared on the pipelined connection.

Rules:
- Each is one statement with PostgreSQL's own $n placeholders, so the same text runs
  prepared on pgpipe.py's connection and through psycopg's RawCursor in a worker thread
  (before the engine's `run` started); both give the same Python values per column kind.
- A record's columns are `RECORD_COLUMNS` in `RECORD_KINDS`; members travel as JSON arrays
  both ways (`array_to_json`, `jsonb_array_elements_text`), so no array literal is ever
  built by hand. The bytea value is the only binary parameter.
- `live(now)`: the row holds something at time `now` (ms, a placeholder: "$4" here,
  "%(now)s" in postgres.py's scans): a value not expired, a counter, or members.
"""

from __future__ import annotations

from .pgpipe import Statement

RECORD_COLUMNS = ("key, value, metadata, expiry, ver_wall, ver_count, written_by, counter, "
                  "array_to_json(members)")
RECORD_KINDS = ("text", "bytea", "json", "int", "int", "int", "text", "int", "json")
KEY = "db = $1 AND tbl = $2 AND key = $3"


def live(now: str) -> str:
    return (f"((value IS NOT NULL AND (expiry IS NULL OR expiry > {now})) OR counter <> 0 "
            "OR cardinality(members) > 0)")


# $4 value (binary), $5 metadata (JSON text), $6 expiry, $7 wall, $8 count, $9 written_by
WRITE = Statement(
    "meshd_write",
    "INSERT INTO meshd_kv (db, tbl, key, value, metadata, expiry, ver_wall, ver_count, "
    "written_by) VALUES ($1, $2, $3, $4, $5::jsonb, $6::bigint, $7::bigint, $8::bigint, $9) "
    "ON CONFLICT (db, tbl, key) DO UPDATE SET value = excluded.value, "
    "metadata = excluded.metadata, expiry = excluded.expiry, ver_wall = excluded.ver_wall, "
    "ver_count = excluded.ver_count, written_by = excluded.written_by "
    f"RETURNING {RECORD_COLUMNS}",
    RECORD_KINDS, frozenset({3}))

# $4 now (ms)
READ_KEY = Statement(
    "meshd_read_key",
    f"SELECT {RECORD_COLUMNS} FROM meshd_kv WHERE {KEY} AND {live('$4')}", RECORD_KINDS)

# $4 now (ms): whether the row held anything
DELETE = Statement(
    "meshd_delete", f"DELETE FROM meshd_kv WHERE {KEY} RETURNING {live('$4')}", ("bool",))

COUNTER = Statement("meshd_counter", f"SELECT counter FROM meshd_kv WHERE {KEY}", ("int",))

# $4 delta
COUNTER_ADD = Statement(
    "meshd_counter_add",
    "INSERT INTO meshd_kv (db, tbl, key, counter) VALUES ($1, $2, $3, $4::bigint) "
    "ON CONFLICT (db, tbl, key) DO UPDATE SET counter = meshd_kv.counter + excluded.counter "
    "RETURNING counter", ("int",))

MEMBERS = Statement(
    "meshd_members", f"SELECT array_to_json(members) FROM meshd_kv WHERE {KEY}", ("json",))

# $4 members to remove (JSON array)
SET_REMOVE = Statement(
    "meshd_set_remove",
    "UPDATE meshd_kv SET members = ARRAY(SELECT m FROM unnest(members) m WHERE NOT m = "
    "ANY(ARRAY(SELECT jsonb_array_elements_text($4::jsonb))) ORDER BY m) "
    f"WHERE {KEY} RETURNING array_to_json(members)", ("json",))

# $4 members to add, $5 members to remove (JSON arrays)
SET_CHANGE = Statement(
    "meshd_set_change",
    "INSERT INTO meshd_kv (db, tbl, key, members) VALUES ($1, $2, $3, "
    "ARRAY(SELECT DISTINCT jsonb_array_elements_text($4::jsonb) ORDER BY 1)) "
    "ON CONFLICT (db, tbl, key) DO UPDATE SET members = ARRAY(SELECT m FROM "
    "unnest(meshd_kv.members) m WHERE NOT m = ANY(ARRAY(SELECT "
    "jsonb_array_elements_text($5::jsonb))) UNION SELECT jsonb_array_elements_text($4::jsonb) "
    "ORDER BY 1) RETURNING array_to_json(members)", ("json",))

ALL = (WRITE, READ_KEY, DELETE, COUNTER, COUNTER_ADD, MEMBERS, SET_REMOVE, SET_CHANGE)
