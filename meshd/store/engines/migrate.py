"""`meshd store migrate`: copy an embedded database to an engine and switch it over, losing
no write made during the copy.

Theory of operation (docs/store.md "Migrating a database"):
1. The engine is reached and anything an earlier, unfinished migration of the database left
   there is removed (until the switch, the embedded store is the database).
2. This node starts following every change of the database that lands here (local writes
   and writes replicated from other nodes), then binds the database in state "copying"
   (replicated; every node goes on serving it from the embedded store).
3. A pass copies every record; then the changes followed are copied as they come.
4. The binding is switched to "active": each node, as soon as the binding reaches it, serves
   the database from the engine. A node the switch has not reached yet still writes to the
   embedded store; those writes replicate to this node, which keeps copying for `grace`
   seconds after the switch and then makes a last full pass.
5. The embedded copy is deleted (tombstones, which expire after store.tombstone_grace).
Copies never lose or double a change, whenever it arrives:
- values are copied with their hybrid-clock version, guarded (base.Engine.copy_value): an
  older copy never overwrites a newer write, whichever node made it and when; a deleted
  value is copied as a guarded delete;
- counters and sets are copied as differences from what this migration already copied
  (INCRBY the difference, add and remove the members that changed), so increments and set
  changes made on the engine after the switch add up with those still arriving from the
  embedded store.
If this node dies mid-migration the binding stays "copying" (the embedded store stays the
database): run the migration again (step 1 starts it over).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from meshd.errors import MeshError
from meshd.store import crdt

from .base import Engine
from .bindings import ACTIVE, COPYING

log = logging.getLogger("meshd.store.migrate")
Emit = Callable[[dict[str, Any]], Awaitable[None]]


class Migration:
    def __init__(self, store: Any, db: str, shown: str, backend: str, dsn: str, by: str,
                 grace: float, emit: Emit) -> None:
        self.store = store
        self.engines = store.engines
        self.db = db
        self.shown = shown  # the caller's name of the database
        self.backend = backend
        self.dsn = dsn
        self.by = by
        self.grace = grace
        self.emit = emit
        self.counters: dict[tuple[str, str], int] = {}
        self.sets: dict[tuple[str, str], set[str]] = {}
        self.copied = 0

    async def run(self) -> dict[str, Any]:
        st = self.store
        b = self.engines.binding(self.db)
        if b is not None and b.get("state") == ACTIVE:
            raise MeshError(409, f"database {self.shown!r} is already on {b['backend']}",
                            id="meshd.store")
        if self.db not in st.rep.state.databases(_now_ms()):
            raise MeshError(404, f"no embedded database {self.shown!r} to migrate (to put a "
                                 "new database on an engine: meshd store databases create)",
                            id="meshd.store")
        await self.engines.probe(self.backend, self.dsn, self.db)  # else 503 with the cause
        engine = self.engines.engine(self.backend, self.dsn)
        leftover = await engine.drop(self.db)
        started = time.monotonic()
        with st.follow(self.db) as changes:
            await self.engines.bind(self.db, self.backend, self.dsn, COPYING, self.by)
            await self.emit({"phase": "copying", "database": self.shown,
                             "backend": self.backend, "removed_leftover": leftover})
            await self._pass(engine)
            await self._drain(engine, changes, 0)
            await self.engines.bind(self.db, self.backend, self.dsn, ACTIVE, self.by)
            await self.emit({"phase": "switched", "copied": self.copied})
            await self._drain(engine, changes, self.grace)
            await self._pass(engine)
            await self._drain(engine, changes, 0)
        purged = await self._purge()
        result = {"phase": "done", "database": self.shown, "backend": self.backend,
                  "copied": self.copied, "embedded_deleted": purged,
                  "seconds": round(time.monotonic() - started, 3)}
        log.info("database %s migrated to %s: %d copies", self.shown, self.backend,
                 self.copied)
        return result

    def _keys(self) -> list[tuple[str, str]]:
        state = self.store.rep.state
        return [(tbl, key) for (db, tbl), t in list(state.tables.items()) if db == self.db
                for key in list(t.records)]

    async def _pass(self, engine: Engine) -> None:
        keys = self._keys()
        for n, (tbl, key) in enumerate(keys, start=1):
            await self._copy(engine, tbl, key)
            if n % 1000 == 0:
                await self.emit({"phase": "copying", "done": n, "of": len(keys)})

    async def _drain(self, engine: Engine, changes: trio.MemoryReceiveChannel[Any],
                     seconds: float) -> None:
        """Copy the changes followed: those waiting now, and for `seconds` more."""
        deadline = trio.current_time() + seconds
        while True:
            ev = None
            try:
                ev = changes.receive_nowait()
            except trio.WouldBlock:
                with trio.move_on_at(deadline):
                    ev = await changes.receive()
            if ev is None:
                return
            await self._copy(engine, ev["table"], ev["key"])

    async def _copy(self, engine: Engine, tbl: str, key: str) -> None:
        state = self.store.rep.state.get(self.db, tbl, key)
        if state is None:
            return
        reg = state.get("lww")
        if reg is not None:
            ts = reg[0]
            if reg[1] is None:
                await engine.copy_delete(self.db, tbl, key, (ts[0], ts[1]))
            elif reg[3] is None or reg[3] > _now_ms():
                await engine.copy_value(self.db, tbl, key, reg[1], reg[2] or {}, reg[3],
                                        (ts[0], ts[1]), ts[2])
        at = (tbl, key)
        value = crdt.counter_value(state.get("counter"))
        if value != self.counters.get(at, 0):
            await engine.counter(self.db, tbl, key, value - self.counters.get(at, 0), self.by)
            self.counters[at] = value
        members = set(crdt.set_members(state.get("set")))
        before = self.sets.get(at, set())
        if members != before:
            await engine.set_change(self.db, tbl, key, sorted(members - before),
                                    sorted(before - members), self.by)
            self.sets[at] = members
        self.copied += 1

    async def _purge(self) -> int:
        """Delete the embedded copy (it is served from the engine now)."""
        n = 0
        for tbl, key in self._keys():
            if await self.store.forget(self.db, tbl, key):
                n += 1
        return n


def _now_ms() -> int:
    return int(time.time() * 1000)
