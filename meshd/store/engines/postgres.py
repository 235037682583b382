"""The PostgreSQL store engine: databases kept in one table of a PostgreSQL database.

Rules:
- Every record of every bound database is a row of `meshd_kv` (db, tbl, key: the primary
  key, collation "C" so prefix scans use it). The table, its trigger and function are made
  on first use, under an advisory lock (nodes starting together do not race); PostgreSQL 14
  or newer (CREATE OR REPLACE TRIGGER).
- Each operation is one autocommit statement: linearizable per key, acknowledged only after
  PostgreSQL committed it. Counters add in the statement (`counter = counter + delta`), set
  changes rewrite the array in the statement, so concurrent changes through any number of
  nodes never lose one another. A write replaces the value, metadata and expiry (last commit
  wins, as PostgreSQL orders them); counters and sets of the key are left as they are, as in
  the embedded store; a delete removes the row.
- TTL: `expiry` (ms since the epoch) is filtered on every read; a sweeper removes rows that
  expired more than a minute ago and hold nothing else, every SWEEP_EVERY seconds.
- Watches: a trigger NOTIFYs channel `meshd_kv` with (db, tbl, key, deleted, application
  name) for every row changed, whoever changed it (psql included); each node LISTENs on one
  connection of its own (driven from its trio thread, pgpipe.notifications), reads back what
  a watcher wants and reports it (the notice only names the key: anyone who may connect
  can NOTIFY). A node's sessions
  are named `meshd:NODE`, so an event says which node made the change. Notifications missed
  while the listening connection was down are lost (as LISTEN/NOTIFY promises); it
  reconnects with backoff.
- The single-key statements (pgsql.py) run prepared on pipelined connections driven from
  the node's trio thread (pgpipe.py) while `run` runs; scans, tables, copies and drops on
  the pool in worker threads.
- The pool (psycopg_pool) holds up to `pool` connections per node; every statement is
  bounded by `timeout` (statement_timeout, pool wait, connect timeout). A failure is an
  EngineDown naming the cause (never the DSN); a failure on a broken connection makes the
  pool check its idle connections, so after a restart of PostgreSQL service resumes
  without restarting meshd.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from meshd.errors import bad_request
from meshd.wire import WireError, loads_json

from . import pgsql
from .base import EngineDown, OnChange, Query, Record, Wanted, record, redact
from .pgpipe import BadParameter, Pipeline, Statement, StatementFailed, notifications
from .workers import Workers

log = logging.getLogger("meshd.store.postgres")
T = TypeVar("T")
CHANNEL = "meshd_kv"
SWEEP_EVERY = 60.0
MAX_NOTICE = 8000  # bytes: PostgreSQL's own limit on a NOTIFY payload
STALL_GRACE = 2.0  # seconds past the timeout before the watchdog ends a call
STALL_CHECK = 0.5  # how often it looks
PIPELINES = 4  # pipelined connections per node for the single-key statements (pgpipe.py)

TABLE_SQL = """
CREATE TABLE IF NOT EXISTS meshd_kv (
    db text COLLATE "C" NOT NULL,
    tbl text COLLATE "C" NOT NULL,
    key text COLLATE "C" NOT NULL,
    value bytea,
    metadata jsonb,
    expiry bigint,
    ver_wall bigint,
    ver_count bigint,
    written_by text,
    counter bigint NOT NULL DEFAULT 0,
    members text[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (db, tbl, key)
)"""
SCHEMA = TABLE_SQL + """;
CREATE OR REPLACE FUNCTION meshd_kv_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE r meshd_kv;
BEGIN
    IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
    PERFORM pg_notify('meshd_kv', json_build_array(r.db, r.tbl, r.key, TG_OP = 'DELETE',
                      current_setting('application_name'))::text);
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER meshd_kv_notify AFTER INSERT OR UPDATE OR DELETE ON meshd_kv
    FOR EACH ROW EXECUTE FUNCTION meshd_kv_notify();
"""

COLUMNS = "key, value, metadata, expiry, ver_wall, ver_count, written_by, counter, members"
LIVE = pgsql.live("%(now)s")
KEY = "db = %(db)s AND tbl = %(tbl)s AND key = %(key)s"


def _record(row: tuple[Any, ...], now_ms: int) -> Record:
    key, value, metadata, expiry, wall, count, by, counter, members = row
    version = (wall, count) if wall is not None else None
    return record(key, bytes(value) if value is not None else None, metadata, expiry,
                  version, by, counter, list(members or ()), now_ms)


def _shutdown(fd: int) -> None:
    """Shut the socket `fd` down both ways (the call blocked on it gets an error); the fd
    itself stays the client's to close."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


def _app_node(app: str) -> str:
    return app[len("meshd:"):] if app.startswith("meshd:") else ""


class PostgresEngine:
    backend = "postgres"
    bad_notices = 0  # malformed notices on the channel (anyone who may connect can send)

    def __init__(self, dsn: str, node: str, *, pool: int = 16, timeout: float = 5.0) -> None:
        import psycopg_pool

        self.dsn = dsn
        self.node = node
        self.timeout = timeout
        self._workers = Workers(pool, "meshd-postgres")
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        self._check_lock = threading.Lock()
        # calls in flight: deadline and socket (the watchdog ends those past it, since the
        # client has no read timeout of its own and statement_timeout needs a live server)
        self._calls: dict[object, tuple[float, int]] = {}
        self._checking = False
        self.pool = psycopg_pool.ConnectionPool(
            dsn, min_size=1, max_size=pool, open=False, timeout=timeout,
            kwargs=self._connect_args(), reconnect_timeout=0, name=f"meshd-{node}")
        self.pool.open(wait=False)
        self._pipeline: Pipeline | None = None  # while run() runs

    def _connect_args(self) -> dict[str, Any]:
        ms = int(self.timeout * 1000)
        return {"autocommit": True, "application_name": f"meshd:{self.node}"[:63],
                "connect_timeout": max(1, math.ceil(self.timeout)),
                "options": f"-c statement_timeout={ms} -c lock_timeout={ms}"}

    # --- plumbing ----------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._workers.run(self._guarded, fn, *args)

    async def _hot(self, statement: Statement, *params: Any) -> list[tuple[Any, ...]]:
        """A single-key statement: on the pipelined connection while `run` runs, else in a
        worker thread (psycopg's RawCursor runs the same $n text); failures as EngineDown
        naming the cause."""
        pipeline = self._pipeline
        if pipeline is None:
            return await self._run(_execute, statement.sql, params)
        try:
            return await pipeline.call(statement, params)
        except BadParameter as exc:
            raise bad_request(str(exc), id="meshd.store") from None
        except (StatementFailed, OSError, ValueError) as exc:
            cause = str(exc).strip() or type(exc).__name__
        except Exception as exc:  # psycopg's errors of the connect (in its thread)
            import psycopg

            if not isinstance(exc, psycopg.Error):
                raise
            cause = str(exc).strip() or type(exc).__name__
        raise EngineDown(self.backend, redact(cause, self.dsn))

    def _connect_pipelined(self) -> Any:
        """A connection for the pipeline (in a worker thread): the schema made, the hot
        statements prepared."""
        import psycopg

        conn = psycopg.connect(self.dsn, **self._connect_args())
        try:
            if not self._schema_ready:
                self._ensure_schema(conn)
            for st in pgsql.ALL:
                res = conn.pgconn.prepare(st.name.encode(), st.sql.encode())
                if res.status != psycopg.pq.ExecStatus.COMMAND_OK:
                    raise psycopg.OperationalError(
                        (res.error_message or b"").decode(errors="replace").strip())
        except BaseException:
            conn.close()
            raise
        return conn

    def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        import psycopg
        import psycopg_pool

        try:
            with self.pool.connection() as conn:
                if not self._schema_ready:
                    self._ensure_schema(conn)
                call = object()
                self._calls[call] = (time.monotonic() + self.timeout + STALL_GRACE,
                                     conn.pgconn.socket)
                try:
                    return fn(conn, *args)
                finally:
                    self._calls.pop(call, None)
        except psycopg_pool.PoolTimeout:
            raise EngineDown(self.backend, f"no connection within {self.timeout:g} s: "
                             f"{self._why_not()}") from None
        except psycopg.Error as exc:
            if isinstance(exc, psycopg.OperationalError):
                self._check_soon()  # drop every connection a restart broke, not one per call
            raise EngineDown(self.backend, redact(str(exc).strip(), self.dsn)) from None
        except EngineDown:
            raise
        except Exception as exc:  # a row this engine cannot read (written by hand?) and the like
            raise EngineDown(self.backend, f"{type(exc).__name__}: "
                                           f"{redact(str(exc)[:200], self.dsn)}") from None

    def _check_soon(self) -> None:
        """Have the pool check its idle connections, in a thread of its own (a check meets
        the same dead server and waits for it: never on a caller's time)."""
        with self._check_lock:
            if self._checking:
                return
            self._checking = True

        def check() -> None:
            try:
                self.pool.check()
            except Exception as exc:  # the pool closed meanwhile, and the like
                log.debug("postgres pool check failed: %s", redact(str(exc), self.dsn))
            finally:
                self._checking = False
        threading.Thread(target=check, name="meshd-postgres-check", daemon=True).start()

    def _why_not(self) -> str:
        """Why no connection can be had (the pool does not say): one direct attempt."""
        import psycopg

        try:
            psycopg.connect(self.dsn, **{**self._connect_args(), "connect_timeout": 2}).close()
        except psycopg.Error as exc:
            return redact(str(exc).strip().splitlines()[0], self.dsn)
        return "every connection is busy"

    def _ensure_schema(self, conn: Any) -> None:
        with self._schema_lock:
            if self._schema_ready:
                return
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('meshd_kv'))")
                conn.execute(SCHEMA)
            self._schema_ready = True

    async def close(self) -> None:
        await trio.to_thread.run_sync(self.pool.close)
        self._workers.close()

    # --- operations --------------------------------------------------------------------------

    async def write(self, db: str, tbl: str, key: str, value: bytes, metadata: dict[str, Any],
                    expiry: int | None, version: tuple[int, int], by: str) -> Record:
        rows = await self._hot(pgsql.WRITE, db, tbl, key, value, json.dumps(metadata), expiry,
                               version[0], version[1], by)
        return _record(rows[0], _now_ms())

    async def read(self, db: str, tbl: str, q: Query, now_ms: int) -> list[Record]:
        if q.key is not None and not q.offset:
            rows = await self._hot(pgsql.READ_KEY, db, tbl, q.key, now_ms)
            rows = [r for r in rows if q.matches(r[0])]
        else:
            rows = await self._run(self._select, COLUMNS, db, tbl, q, now_ms)
        return [_record(r, now_ms) for r in rows]

    async def list_keys(self, db: str, tbl: str, q: Query, now_ms: int) -> list[str]:
        return [r[0] for r in await self._run(self._select, "key", db, tbl, q, now_ms)]

    @staticmethod
    def _select(conn: Any, columns: str, db: str, tbl: str, q: Query,
                now_ms: int) -> list[tuple[Any, ...]]:
        where = ["db = %(db)s", "tbl = %(tbl)s", LIVE]
        params: dict[str, Any] = {"db": db, "tbl": tbl, "now": now_ms}
        if q.key is not None:
            where.append("key = %(key)s")
            params["key"] = q.key
        if q.prefix:
            where.append("key >= %(prefix)s AND starts_with(key, %(prefix)s)")
            params["prefix"] = q.prefix
        if q.suffix:
            where.append("right(key, char_length(%(suffix)s)) = %(suffix)s")
            params["suffix"] = q.suffix
        if q.contains:
            where.append("strpos(key, %(contains)s) > 0")
            params["contains"] = q.contains
        sql = f"SELECT {columns} FROM meshd_kv WHERE {' AND '.join(where)} ORDER BY key"
        if q.limit:
            sql += " LIMIT %(limit)s"
            params["limit"] = q.limit
        if q.offset:
            sql += " OFFSET %(offset)s"
            params["offset"] = q.offset
        return conn.execute(sql, params).fetchall()

    async def delete(self, db: str, tbl: str, key: str, by: str) -> bool:
        rows = await self._hot(pgsql.DELETE, db, tbl, key, _now_ms())
        return bool(rows and rows[0][0])

    async def tables(self, db: str) -> list[str]:
        def go(conn: Any) -> list[str]:
            return [r[0] for r in conn.execute(
                "SELECT DISTINCT tbl FROM meshd_kv WHERE db = %s ORDER BY tbl", (db,))]
        return await self._run(go)

    async def counter(self, db: str, tbl: str, key: str, delta: int, by: str) -> int:
        if delta == 0:
            rows = await self._hot(pgsql.COUNTER, db, tbl, key)
        else:
            rows = await self._hot(pgsql.COUNTER_ADD, db, tbl, key, delta)
        return int(rows[0][0]) if rows else 0

    async def members(self, db: str, tbl: str, key: str) -> list[str]:
        rows = await self._hot(pgsql.MEMBERS, db, tbl, key)
        return sorted(rows[0][0]) if rows else []

    async def set_change(self, db: str, tbl: str, key: str, add: list[str], remove: list[str],
                         by: str) -> list[str]:
        if add:
            rows = await self._hot(pgsql.SET_CHANGE, db, tbl, key, json.dumps(sorted(set(add))),
                                   json.dumps(remove))
        else:
            rows = await self._hot(pgsql.SET_REMOVE, db, tbl, key, json.dumps(remove))
        return sorted(rows[0][0]) if rows else []

    async def copy_value(self, db: str, tbl: str, key: str, value: bytes,
                         metadata: dict[str, Any], expiry: int | None,
                         version: tuple[int, int], by: str) -> bool:
        def go(conn: Any) -> bool:
            return conn.execute(
                "INSERT INTO meshd_kv (db, tbl, key, value, metadata, expiry, ver_wall, "
                "ver_count, written_by) VALUES (%(db)s, %(tbl)s, %(key)s, %(value)s, "
                "%(meta)s, %(expiry)s, %(wall)s, %(count)s, %(by)s) "
                "ON CONFLICT (db, tbl, key) DO UPDATE SET value = excluded.value, "
                "metadata = excluded.metadata, expiry = excluded.expiry, "
                "ver_wall = excluded.ver_wall, ver_count = excluded.ver_count, "
                "written_by = excluded.written_by WHERE meshd_kv.ver_wall IS NULL OR "
                "(meshd_kv.ver_wall, meshd_kv.ver_count) < (excluded.ver_wall, "
                "excluded.ver_count) RETURNING 1",
                {"db": db, "tbl": tbl, "key": key, "value": value,
                 "meta": json.dumps(metadata), "expiry": expiry, "wall": version[0],
                 "count": version[1], "by": by}).fetchone() is not None
        return await self._run(go)

    async def copy_delete(self, db: str, tbl: str, key: str, version: tuple[int, int]) -> bool:
        def go(conn: Any) -> bool:
            # keeps the version (a tombstone), so an older copy cannot bring the value back
            return conn.execute(
                "UPDATE meshd_kv SET value = NULL, metadata = NULL, expiry = NULL, "
                f"ver_wall = %(wall)s, ver_count = %(count)s WHERE {KEY} AND "
                "value IS NOT NULL AND (ver_wall IS NULL OR (ver_wall, ver_count) < "
                "(%(wall)s, %(count)s)) RETURNING 1",
                {"db": db, "tbl": tbl, "key": key, "wall": version[0],
                 "count": version[1]}).fetchone() is not None
        return await self._run(go)

    async def drop(self, db: str) -> int:
        def go(conn: Any) -> int:
            return conn.execute("DELETE FROM meshd_kv WHERE db = %s", (db,)).rowcount
        return await self._run(go)

    # --- watches and housekeeping ------------------------------------------------------------

    async def run(self, on_change: OnChange, wanted: Wanted,
                  task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        send, recv = trio.open_memory_channel[tuple[str, str, str, str]](10_000)

        def heard(payload: bytes) -> None:
            # anyone who may connect can NOTIFY this channel: the payload is untrusted, and
            # only says which key to read back (its "deleted" flag is not believed)
            try:
                db, tbl, key, deleted, app = loads_json(payload, max_bytes=MAX_NOTICE)
            except (WireError, ValueError, TypeError):
                self.bad_notices += 1
                return
            if not (all(isinstance(x, str) for x in (db, tbl, key, app))
                    and isinstance(deleted, bool)):
                self.bad_notices += 1
                return
            if wanted(db, tbl, key):
                try:
                    send.send_nowait((db, tbl, key, _app_node(app)))
                except trio.WouldBlock:
                    log.warning("watch events of %s dropped: watchers are behind", db)

        pipeline = Pipeline(self._connect_pipelined, self.timeout, PIPELINES)
        async with trio.open_nursery() as nursery:
            await nursery.start(pipeline.run)
            self._pipeline = pipeline
            nursery.start_soon(self._sweeper)
            nursery.start_soon(self._watchdog)
            nursery.start_soon(self._report, recv, on_change)
            try:
                # started once the first LISTEN is on (or failed: the engine may be down,
                # and the watch reconnects): a write made right after start is heard
                await self._listen(heard, task_status.started)
            finally:
                self._pipeline = None
                nursery.cancel_scope.cancel()

    def _connect_listening(self) -> Any:
        """The listening connection (in a worker thread): TCP keepalive on, so a connection
        that went silent is found within a minute or so, then LISTEN."""
        import psycopg

        conn = psycopg.connect(self.dsn, **self._connect_args(), keepalives=1,
                               keepalives_idle=30, keepalives_interval=10,
                               keepalives_count=3)
        try:
            conn.execute(f"LISTEN {CHANNEL}")
        except BaseException:
            conn.close()
            raise
        return conn

    async def _listen(self, heard: Callable[[bytes], None],
                      tried: Callable[[], None] = lambda: None) -> None:
        """LISTEN on a connection of its own, in this trio thread (pgpipe.notifications),
        handing each notification to `heard`; reconnect with backoff. Until cancelled.
        `tried` is called once, after the first attempt to LISTEN (whatever came of it)."""
        import psycopg

        backoff = 0.5
        first = True
        while True:
            try:
                try:
                    conn = await trio.to_thread.run_sync(self._connect_listening,
                                                         cancellable=True)
                finally:
                    if first:
                        first = False
                        tried()
                try:
                    backoff = 0.5
                    await notifications(conn, heard)
                finally:
                    conn.close()
            except (OSError, psycopg.Error) as exc:
                log.info("postgres watch connection lost (%s); reconnecting",
                         redact(str(exc).strip(), self.dsn))
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def _report(self, recv: Any, on_change: OnChange) -> None:
        async for db, tbl, key, by in recv:
            try:
                rows = await self.read(db, tbl, Query(key=key), _now_ms())
            except EngineDown:
                continue  # the change is lost: as LISTEN/NOTIFY, at most once
            on_change(db, tbl, key, rows[0] if rows else None, by)

    async def _watchdog(self) -> None:
        """Shut down the socket of a call that outlived its deadline (a server or a network
        that stopped answering mid-session): the blocked call then fails with an error,
        which answers 503, and its connection is discarded by the pool."""
        while True:
            await trio.sleep(STALL_CHECK)
            now = time.monotonic()
            for call, (deadline, fd) in list(self._calls.items()):
                if deadline <= now and self._calls.pop(call, None) is not None:
                    log.warning("a postgres call got no answer within %.0f s: its connection "
                                "is closed", self.timeout + STALL_GRACE)
                    _shutdown(fd)

    async def _sweeper(self) -> None:
        def go(conn: Any) -> int:
            return conn.execute(
                "DELETE FROM meshd_kv WHERE expiry < %s AND counter = 0 AND "
                "cardinality(members) = 0", (_now_ms() - 60_000,)).rowcount
        while True:
            await trio.sleep(SWEEP_EVERY)
            try:
                await self._run(go)
            except EngineDown as exc:
                log.debug("expired rows not swept: %s", exc.detail)


def _execute(conn: Any, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """A $n statement through psycopg (the hot statements before the pipeline runs)."""
    import psycopg

    cur = psycopg.RawCursor(conn).execute(sql, params)
    return cur.fetchall() if cur.description is not None else []


def _now_ms() -> int:
    return int(time.time() * 1000)
