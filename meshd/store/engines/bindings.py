"""Which databases live on which engine (replicated), and each node's engine per binding.

Rules:
- A binding is a record of the system database "engines", table "databases", keyed by the
  database's kept name (meshd.store.ops.stored_name), holding JSON {"backend", "dsn",
  "state", "by", "at"}. It is replicated like every record, so every node serves the
  database from the same engine; it is written by meshd only (`meshd store databases
  create`, `meshd store migrate`: admin acts) and read by admins only (it holds the DSN,
  a credential: never logged, never shown, never in an error).
- State "active": the engine is the database (every operation goes there). State
  "copying": a migration is copying the embedded database; the embedded store stays the
  database until the migration switches the binding to "active".
- Each node keeps one engine per (backend, DSN), made on first use and started in this
  component's nursery (its watch listener); an engine whose binding is gone is closed.
- System databases (auth, routing, broker, runtime, bot, engines) and config are never
  bound.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from meshd.errors import MeshError

from .base import BACKENDS, Engine, OnChange, Wanted

log = logging.getLogger("meshd.store.engines")
ENGINES_DB = "engines"
TABLE = "databases"
ACTIVE, COPYING = "active", "copying"
MAX_DSN = 4096


def make_engine(backend: str, dsn: str, node: str, settings: Any) -> Engine:
    pool = int(getattr(settings, "engine_pool", 16))
    timeout = float(getattr(settings, "engine_timeout", 5.0))
    if backend == "postgres":
        from .postgres import PostgresEngine

        return PostgresEngine(dsn, node, pool=pool, timeout=timeout)
    if backend == "redis":
        from .redis import RedisEngine

        return RedisEngine(dsn, pool=pool, timeout=timeout)
    raise MeshError(400, f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}",
                    id="meshd.store")


def check_binding(backend: Any, dsn: Any) -> tuple[str, str]:
    """A backend and DSN as given by a caller; 400 naming what is wrong (never the DSN)."""
    if backend not in BACKENDS:
        raise MeshError(400, f"backend must be one of {', '.join(BACKENDS)}", id="meshd.store")
    if not isinstance(dsn, str) or not dsn.strip() or len(dsn) > MAX_DSN or "\n" in dsn.strip():
        raise MeshError(400, f"the DSN must be one line of 1..{MAX_DSN} characters",
                        id="meshd.store")
    dsn = dsn.strip()
    if backend == "redis" and not dsn.startswith(("redis://", "rediss://", "unix://")):
        raise MeshError(400, "a redis DSN is a URL: redis://HOST:PORT/DB (or rediss://)",
                        id="meshd.store")
    if backend == "postgres" and not (dsn.startswith(("postgresql://", "postgres://"))
                                      or "=" in dsn):
        raise MeshError(400, "a postgres DSN is a URL (postgresql://USER@HOST:PORT/DB) or "
                             "key=value pairs (host=... dbname=...)", id="meshd.store")
    _parse(backend, dsn)
    return backend, dsn


def _parse(backend: str, dsn: str) -> None:
    """Parse the DSN with the engine's own client, refusing what it would refuse later; the
    client's message is not shown (it may quote a piece of the password)."""
    try:
        if backend == "postgres":
            from psycopg.conninfo import conninfo_to_dict

            conninfo_to_dict(dsn)
        else:
            import redis

            redis.ConnectionPool.from_url(dsn).make_connection()  # no I/O: checks options
    except Exception as exc:
        raise MeshError(400, f"the {backend} DSN cannot be used ({type(exc).__name__}): check "
                             "its syntax and options; characters such as % # @ / in a "
                             "password must be percent-encoded", id="meshd.store") from None


class Engines:
    def __init__(self, store: Any, node: str, settings: Any, on_change: OnChange,
                 wanted: Wanted) -> None:
        self.store = store
        self.node = node
        self.settings = settings
        self.on_change = on_change
        self.wanted = wanted
        self._engines: dict[tuple[str, str], Engine] = {}
        self._scopes: dict[tuple[str, str], trio.CancelScope] = {}
        self._cache: tuple[Any, dict[str, dict[str, Any]]] = (None, {})
        self._nursery: trio.Nursery | None = None
        # set by the auth service: bindings are signed records (a member must not redirect
        # a database); without it (a store alone, in unit tests) they are plain records
        self.sign: Callable[[str, str, str, bytes | None], Awaitable[None]] | None = None
        self.verify: Callable[[str, str, str, Any], str | None] | None = None

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._closer)
                task_status.started()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                for engine in self._engines.values():
                    await engine.close()

    # --- bindings ----------------------------------------------------------------------------

    def bindings(self) -> dict[str, dict[str, Any]]:
        """Every binding by kept database name (cached until the table changes)."""
        table = self.store.rep.state.table(ENGINES_DB, TABLE)
        mark = None if table is None else (len(table.records), table.xor)
        if mark != self._cache[0] or mark is None:
            found = {}
            for db, b in self.store.json_records(ENGINES_DB, TABLE).items():
                if not (isinstance(b, dict) and b.get("backend") in BACKENDS
                        and isinstance(b.get("dsn"), str)):
                    continue
                if self.verify is not None and table is not None and self.verify(
                        ENGINES_DB, TABLE, db, table.records.get(db, {})) is not None:
                    continue  # unsigned or not by a trusted key: never followed
                found[db] = b
            self._cache = (mark, found)
        return self._cache[1]

    def binding(self, db: str) -> dict[str, Any] | None:
        return self.bindings().get(db)

    async def bind(self, db: str, backend: str, dsn: str, state: str, by: str) -> None:
        record = {"backend": backend, "dsn": dsn, "state": state, "by": by,
                  "at": round(time.time(), 3)}
        raw = json.dumps(record).encode()
        if self.sign is not None:
            await self.sign(ENGINES_DB, TABLE, db, raw)
        else:
            await self.store.write({"database": ENGINES_DB, "table": TABLE, "key": db,
                                    "value": raw})
        self._cache = (None, {})

    # --- engines -----------------------------------------------------------------------------

    def engine_for(self, db: str) -> Engine | None:
        """The engine serving `db` now (None: the embedded store does)."""
        b = self.binding(db)
        if b is None or b.get("state") != ACTIVE:
            return None
        return self.engine(b["backend"], b["dsn"])

    def engine(self, backend: str, dsn: str) -> Engine:
        """This node's engine for (backend, DSN), made and started on first use."""
        key = (backend, dsn)
        engine = self._engines.get(key)
        if engine is None:
            if self._nursery is None:
                raise MeshError(503, "the store is not running", id="meshd.store")
            try:
                engine = make_engine(backend, dsn, self.node, self.settings)
            except MeshError:
                raise
            except Exception as exc:  # a DSN the client refuses (its text may quote it)
                raise MeshError(400, f"the {backend} DSN cannot be used "
                                     f"({type(exc).__name__})", id="meshd.store") from None
            self._engines[key] = engine
            self._scopes[key] = trio.CancelScope()
            self._nursery.start_soon(self._serve, engine, self._scopes[key])
        return engine

    async def probe(self, backend: str, dsn: str, db: str) -> None:
        """Reach the engine (and make its schema) before binding `db` to it; an engine made
        only for this and failing is closed again."""
        fresh = (backend, dsn) not in self._engines
        engine = self.engine(backend, dsn)
        try:
            await engine.tables(db)
        except MeshError:
            if fresh and (backend, dsn) not in {(b["backend"], b["dsn"])
                                                 for b in self.bindings().values()}:
                self._scopes.pop((backend, dsn)).cancel()
                await self._engines.pop((backend, dsn)).close()
            raise

    async def _serve(self, engine: Engine, scope: trio.CancelScope) -> None:
        """Run the engine's watches until its scope is cancelled; a failure (whatever an
        engine or a hostile peer of it caused) is logged and the watches start again after
        a pause, never taking the node down."""
        pause = 1.0
        with scope:
            while True:
                try:
                    await engine.run(self.on_change, self.wanted)
                except MeshError as exc:
                    log.warning("%s engine stopped serving watches: %s", engine.backend,
                                exc.detail)
                except Exception:
                    log.exception("%s engine watches failed; starting them again",
                                  engine.backend)
                await trio.sleep(pause)
                pause = min(pause * 2, 30.0)

    async def _closer(self) -> None:
        """Close engines no binding names any more (a binding moved or was removed)."""
        while True:
            await trio.sleep(30)
            wanted = {(b["backend"], b["dsn"]) for b in self.bindings().values()}
            for key in [k for k in self._engines if k not in wanted]:
                self._scopes.pop(key).cancel()
                await self._engines.pop(key).close()

    def rows(self) -> dict[str, dict[str, str]]:
        """What may be shown of each binding: backend and state, never the DSN."""
        return {db: {"backend": b["backend"], "state": b.get("state", ACTIVE)}
                for db, b in self.bindings().items()}
