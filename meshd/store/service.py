"""Store shell: durable local writes, replication over links, control operations, watches.

Rules:
- Records live in SQLite with a bounded cache in memory (diskrecords.py, store.cache_bytes);
  the digests anti-entropy compares stay in memory (state.py), rebuilt from the file when
  the node starts.
- A local write is applied (readable at once), then acknowledged only after the SQLite
  commit that holds it (group commit in a worker thread, so the event loop never waits on
  fsync).
  With `replicas` = N > 1 the write also waits until N-1 other nodes acknowledged it.
- A replica acknowledges only what is on its disk: acks the replicator returns are held
  until the commit that holds everything merged so far has completed.
- The HLC refuses remote timestamps more than `max_clock_drift` ahead of our clock (the
  replicator drops and counts such records). Records loaded from our own file are kept
  whatever their time, but do not push the clock past that bound either.
- Replication messages travel one per link channel "store"; malformed ones are dropped and
  counted. The replicator (sans-IO) decides what to send.
- Nothing leaves a node before it is on the node's disk: a store message waits for the
  commit of everything applied before it (when something is uncommitted). Otherwise a
  node killed after a push and before its commit restarts without the change its peers
  hold: its counter slot starts lower than theirs and swallows its next increments (the
  nemesis's review found this), and its clock may hand out timestamps it already used.
- An OR-set tag is `node:wall:count:life`: one HLC reading and this process's random life
  id, so a node restarted with its clock set back never makes a tag it made before.
- Watches get every change that lands on this node (local or replicated) under their prefix.
- Config is the "config" database: one table per namespace, one record per dot path holding
  JSON. A path's value is built from the records at, above and below it, in write order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2
import trio

from meshd import wire
from meshd.errors import MeshError, bad_request, not_found
from meshd.hlc import HLC
from meshd.membership.core import Membership
from meshd.ops import Finish
from meshd.transport.links import Channel, ChannelClosed, LinkError, LinkManager

from . import crdt, paths
from .diskrecords import DiskRecords
from .engines.base import Query
from .engines.bindings import ENGINES_DB, Engines
from .persist import FILE, StoreDB
from .replication import StoreReplicator, WireError, split_acks
from .state import live, view

log = logging.getLogger("meshd.store")
CHANNEL = "store"
CONFIG_DB = "config"
# Each namespace's config changes (path, value, who, when) are kept in the config database's
# table HISTORY + namespace (no namespace name holds "~"), replicated like the tree, each
# record for HISTORY_TTL seconds; `config.history` reads the newest HISTORY_MAX of them.
HISTORY = "~history/"
HISTORY_TTL = 30 * 86400
HISTORY_MAX = 200
SYSTEM_DBS = ("auth", "routing", "broker", "runtime", "bot", ENGINES_DB)


def _now_ms() -> int:
    return int(time.time() * 1000)


class StoreService:
    def __init__(self, core: Membership, links: LinkManager, data_dir: Path,
                 settings: Any) -> None:
        self.core = core
        self.links = links
        self.s = settings
        self.node = core.me.name
        self.hlc = HLC(self.node, _now_ms, max_drift_ms=int(settings.max_clock_drift * 1000))
        self.db = StoreDB(data_dir / FILE)
        self.records = DiskRecords(self.db, settings.cache_bytes)
        # records from our own file are kept whatever their time, but the clock moves only
        # to the newest one within the drift bound (found by the scan that rebuilds the
        # digests)
        bound = _now_ms() + self.hlc.max_drift_ms if self.hlc.max_drift_ms is not None \
            else 1 << 62
        self.records.newest_bound = bound
        self.rep = StoreReplicator(
            self.node, self.hlc, self._peers, random.Random(), trio.current_time(),
            batch_interval=settings.batch_interval, sync_interval=settings.sync_interval,
            fanout=settings.fanout, all_threshold=settings.all_threshold,
            tombstone_grace=settings.tombstone_grace, records=self.records)
        newest = self.records.newest(bound)
        if newest is not None:
            self.hlc.observe((newest[0], newest[1], self.node))
        loaded = sum(t.count for t in self.rep.state.tables.values())
        if loaded:
            log.info("%d records in %s", loaded, self.db.path)
        self.rep.backend_errors = (sqlite3.Error,)
        self.rep.on_change = self._changed
        self.rep.on_drop = self._drop
        self._committed = trio.Event()
        self._commit_wanted = trio.Event()
        self._watchers: list[tuple[str | None, str | None, str, trio.MemorySendChannel[Any]]] = []
        self._following: set[trio.MemorySendChannel[Any]] = set()
        self._kick = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._life = secrets.token_hex(4)  # in OR-set tags: unique to this process
        self.engines = Engines(self, self.node, settings, self._engine_changed, self._wanted)
        self.stats = {"store_bad_messages": 0, "store_commits": 0, "store_reads": 0,
                      "store_writes": 0, "store_fast_path": 0}
        links.handlers[CHANNEL] = self._serve_channel

    def _peers(self) -> list[str]:
        return self.core.alive_peers()

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._committer)
                nursery.start_soon(self._timer)
                await nursery.start(self.engines.run)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                if self.records.dirty():
                    await self._commit_now()
            self.db.close()

    # --- durability --------------------------------------------------------------------------

    def _changed(self, db: str, tbl: str, key: str, state: crdt.State, local: bool) -> None:
        self._commit_wanted.set()
        if self._watchers:
            self._notify(db, tbl, key, view(key, state, _now_ms()),
                         "local" if local else "replica")

    def _wanted(self, db: str, tbl: str, key: str) -> bool:
        """Whether some watcher follows this key."""
        return any((wdb is None or wdb == db) and (wtbl is None or wtbl == tbl)
                   and key.startswith(prefix) for wdb, wtbl, prefix, _ in self._watchers)

    def _engine_changed(self, db: str, tbl: str, key: str, rec: dict[str, Any] | None,
                        by: str) -> None:
        """A change an engine committed (through any node, or another client of it)."""
        self._notify(db, tbl, key, rec or {"key": key},
                     "local" if by == self.node else "replica", engine=True)

    def _notify(self, db: str, tbl: str, key: str, rec: dict[str, Any], origin: str,
                engine: bool = False) -> None:
        for wdb, wtbl, prefix, chan in list(self._watchers):
            if engine and chan in self._following:
                continue  # a migration follows the embedded store's changes only
            if (wdb is None or wdb == db) and (wtbl is None or wtbl == tbl) \
                    and key.startswith(prefix):
                event = {"database": db, "table": tbl, "key": key, "origin": origin,
                         "deleted": "value" not in rec and "counter" not in rec
                         and "members" not in rec, "record": rec}
                try:
                    chan.send_nowait(event)
                except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                    self._watchers.remove((wdb, wtbl, prefix, chan))

    async def _commit_now(self) -> int:
        """Commit what is pending (the committer's rounds, and at shutdown). Only the save
        runs in the worker thread: the records change on the event loop's thread, never
        while a task of another service reads them."""
        rows, dropped = self.records.begin_commit()
        try:
            await trio.to_thread.run_sync(self.db.save, rows, dropped)
        except BaseException:
            self.records.abort_commit()
            raise
        self.records.end_commit()
        return len(rows)

    async def _committer(self) -> None:
        while True:
            await self._commit_wanted.wait()
            self._commit_wanted = trio.Event()
            done, self._committed = self._committed, trio.Event()
            await self._commit_now()
            self.stats["store_commits"] += 1
            done.set()

    async def _durable(self) -> None:
        """Wait until everything applied so far is committed."""
        event = self._committed
        self._commit_wanted.set()
        await event.wait()

    def _drop(self, db: str, tbl: str, key: str) -> None:
        self._commit_wanted.set()  # the records hold the delete until it is committed

    # --- replication -----------------------------------------------------------------------

    async def _timer(self) -> None:
        while True:
            deadline = self.rep.next_deadline()
            with trio.move_on_at(deadline):
                await self._kick.wait()
            self._kick = trio.Event()
            try:
                sends = self.rep.tick(trio.current_time())
            except sqlite3.Error as exc:  # the disk failed: the store and the node go on
                log.warning("store timer: %s", exc)
                await trio.sleep(1)  # the deadline may not have moved
                continue
            self._send(sends)

    def _send(self, sends: list[tuple[str, dict[str, Any]]]) -> None:
        assert self._nursery is not None
        for addr, msg in sends:
            self._nursery.start_soon(self._send_one, addr, cbor2.dumps(msg))

    async def _send_one(self, addr: str, payload: bytes) -> None:
        try:
            with trio.fail_after(10):
                if self.records.pending or self.records.committing:  # on disk first: rules
                    await self._durable()
                async with await self.links.open_channel(addr, CHANNEL) as ch:
                    await ch.send(payload)
        except (LinkError, ChannelClosed, trio.TooSlowError) as exc:
            log.debug("store message to %s failed: %s", addr, exc)

    async def _serve_channel(self, ch: Channel) -> None:
        try:
            msg = wire.loads(await ch.receive(), max_depth=64)
            sends, acks = split_acks(self.rep.receive(ch.peer_addr, msg, trio.current_time()))
            self._send(sends)
            if acks:  # an ack promises the records are on disk here: commit first
                await self._durable()
                self._send(acks)
        except (WireError, ValueError, TypeError, KeyError, AttributeError) as exc:
            self.stats["store_bad_messages"] += 1
            log.debug("bad store message from %s: %s", ch.peer_addr, exc)
        except sqlite3.Error as exc:  # the disk failed: this message only is lost
            log.warning("store message from %s not handled: %s", ch.peer_addr, exc)

    # --- operations ------------------------------------------------------------------------

    def _names(self, args: dict[str, Any]) -> tuple[str, str]:
        db = args.get("database", "default")
        tbl = args.get("table", "store")
        for what, v in (("database", db), ("table", tbl)):
            if not isinstance(v, str) or not 0 < len(v) <= 128 or "\x00" in v:
                raise bad_request(f"{what} must be 1..128 characters", id="meshd.store")
        return db, tbl

    def _key(self, args: dict[str, Any]) -> str:
        key = args.get("key")
        if not isinstance(key, str) or not key or len(key.encode()) > self.s.max_key_bytes:
            raise bad_request(f"key must be 1..{self.s.max_key_bytes} bytes of text",
                              id="meshd.store")
        return key

    def _exists(self, db: str, tbl: str) -> None:
        now = _now_ms()
        if self.rep.state.table_live(db, tbl, now):
            return
        if db not in self.rep.state.databases(now):
            raise not_found(f"no database {db!r}", id="meshd.store")
        if tbl not in self.rep.state.table_names(db, now):
            raise not_found(f"database {db!r} has no table {tbl!r}", id="meshd.store")

    async def _commit_local(self, db: str, tbl: str, key: str, delta: crdt.State,
                            replicas: int) -> crdt.State:
        self.stats["store_writes"] += 1
        state, wid = self.rep.local(db, tbl, key, delta, trio.current_time(),
                                    want_acks=replicas > 1)
        self._kick.set()
        await self._durable()
        if wid is not None:
            try:
                with trio.fail_after(self.s.replica_timeout):
                    while len(self.rep.acks[wid]) + 1 < replicas:
                        await trio.sleep(0.005)
            except trio.TooSlowError:
                got = len(self.rep.acks[wid]) + 1
                raise MeshError(408, f"only {got} of {replicas} replicas confirmed the write "
                                     f"within {self.s.replica_timeout:g} s (it is durable "
                                     "here and will still spread)", id="meshd.store") from None
            finally:
                self.rep.acks.pop(wid, None)
        return state

    def _write_args(self, args: dict[str, Any]
                    ) -> tuple[str, str, str, bytes, dict[str, Any], int | None, int]:
        """A write's (db, tbl, key, value, metadata, expiry, replicas), checked."""
        db, tbl = self._names(args)
        key = self._key(args)
        value = args.get("value")
        if isinstance(value, str):
            value = value.encode()
        if not isinstance(value, bytes):
            raise bad_request("value must be bytes or text", id="meshd.store")
        if len(value) > self.s.max_value_bytes:
            raise bad_request(f"value of {len(value)} bytes exceeds the limit of "
                              f"{self.s.max_value_bytes} bytes (store.max_value_bytes)",
                              id="meshd.store")
        metadata = args.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise bad_request("metadata must be a map", id="meshd.store")
        ttl = args.get("ttl")
        if ttl is not None and not (isinstance(ttl, int | float) and ttl > 0):
            raise bad_request("ttl must be a positive number of seconds", id="meshd.store")
        if ttl is not None and not ttl * 1000 < MAX_TTL_MS:
            raise bad_request("ttl is too large", id="meshd.store")
        replicas = _int_arg(args, "replicas", 1)
        expiry = _now_ms() + int(ttl * 1000) if ttl else None
        return db, tbl, key, value, metadata, expiry, replicas

    def write_fast(self, args: dict[str, Any], finish: Finish) -> bool:
        """store.write on a database whose engine answers through a callback (the control
        connection's fast path, no task); False sends it the ordinary way (an embedded
        database, bad input, an engine not connected yet)."""
        try:
            db, tbl, key, value, metadata, expiry, _ = self._write_args(args)
        except MeshError:
            return False
        fast = getattr(self.engines.engine_for(db), "write_fast", None)
        wall, count, _ = self.hlc.now()
        return fast is not None and self._took("store_writes", fast(
            db, tbl, key, value, metadata, expiry, (wall, count), self.node, finish))

    def _took(self, stat: str, taken: bool) -> bool:
        """Count an operation a fast path took (`taken`); whether it did."""
        if taken:
            self.stats[stat] += 1
            self.stats["store_fast_path"] += 1
        return taken

    def read_fast(self, args: dict[str, Any], finish: Finish) -> bool:
        """store.read of one key on an engine database, answered through a callback (as
        write_fast); a scan, paging or filters go the ordinary way."""
        key = args.get("key")
        if not isinstance(key, str) or any(args.get(a) for a in (
                "prefix", "suffix", "contains", "limit", "offset")):
            return False
        try:
            db, tbl = self._names(args)
        except MeshError:
            return False
        fast = getattr(self.engines.engine_for(db), "read_fast", None)
        if fast is None:
            return False

        def found(rows: Any, error: MeshError | None) -> None:
            if error is None and not rows:
                error = not_found(f"no key {key!r} in {db}/{tbl}", id="meshd.store")
            finish(None if error is not None else rows, error)
        return self._took("store_reads", fast(db, tbl, key, _now_ms(), found))

    async def write(self, args: dict[str, Any]) -> Any:
        db, tbl, key, value, metadata, expiry, replicas = self._write_args(args)
        engine = self.engines.engine_for(db)
        if engine is not None:
            self.stats["store_writes"] += 1
            wall, count, _ = self.hlc.now()
            return await engine.write(db, tbl, key, value, metadata, expiry, (wall, count),
                                      self.node)
        delta = {"lww": crdt.lww(self.hlc.now(), value, metadata, expiry)}
        state = await self._commit_local(db, tbl, key, delta, replicas)
        return view(key, state, _now_ms())

    async def read(self, args: dict[str, Any]) -> Any:
        db, tbl = self._names(args)
        key = args.get("key")
        if key is not None and not isinstance(key, str):
            raise bad_request("key must be text", id="meshd.store")
        limit, offset = _int_arg(args, "limit", 0), _int_arg(args, "offset", 0)
        if limit < 0 or offset < 0:
            raise bad_request("limit and offset must not be negative", id="meshd.store")
        engine = self.engines.engine_for(db)
        if engine is not None:
            self.stats["store_reads"] += 1
            found = await engine.read(db, tbl, self._query(args, key), _now_ms())
            if key is not None and not found:
                raise not_found(f"no key {key!r} in {db}/{tbl}", id="meshd.store")
            return found
        self._exists(db, tbl)
        self.stats["store_reads"] += 1
        now = _now_ms()
        rows = self.rep.state.read(db, tbl, now, key=key, prefix=_text_arg(args, "prefix"),
                                   suffix=_text_arg(args, "suffix"), limit=limit, offset=offset,
                                   contains=_text_arg(args, "contains"))
        if key is not None and not rows:
            raise not_found(f"no key {key!r} in {db}/{tbl}", id="meshd.store")
        return [view(k, s, now) for k, s in rows]

    async def delete(self, args: dict[str, Any]) -> Any:
        db, tbl = self._names(args)
        key = self._key(args)
        engine = self.engines.engine_for(db)
        if engine is not None:
            if not await engine.delete(db, tbl, key, self.node):
                raise not_found(f"no key {key!r} in {db}/{tbl}", id="meshd.store")
            return {"deleted": key}
        self._exists(db, tbl)
        if not await self.forget(db, tbl, key, _int_arg(args, "replicas", 1)):
            raise not_found(f"no key {key!r} in {db}/{tbl}", id="meshd.store")
        return {"deleted": key}

    async def forget(self, db: str, tbl: str, key: str, replicas: int = 1) -> bool:
        """Delete a key of the embedded store (value, counter and set); False if it held
        nothing."""
        current = self.rep.state.get(db, tbl, key)
        if current is None or not self._live(current):
            return False
        delta: crdt.State = {"lww": crdt.lww(self.hlc.now(), None)}
        if "counter" in current:
            delta["counter"] = crdt.counter_reset(current["counter"])
        removed = crdt.set_remove_delta(current.get("set"))
        if removed is not None:
            delta["set"] = removed
        await self._commit_local(db, tbl, key, delta, replicas)
        return True

    def json_records(self, db: str, tbl: str) -> dict[str, Any]:
        """Live records of a table whose values are JSON, decoded (system databases such as
        auth and routing keep their state this way); undecodable values are skipped."""
        t = self.rep.state.table(db, tbl)
        if t is None:
            return {}
        now = _now_ms()
        out = {}
        for key, state in t.records.items():
            reg = state.get("lww")
            if reg is None or reg[1] is None or not self._live(state, now):
                continue
            try:
                out[key] = json.loads(reg[1])
            except (ValueError, UnicodeDecodeError):
                continue
        return out

    def _live(self, state: crdt.State, now: int | None = None) -> bool:
        from .state import live

        return live(state, _now_ms() if now is None else now)

    def _query(self, args: dict[str, Any], key: str | None = None) -> Query:
        limit, offset = _int_arg(args, "limit", 0), _int_arg(args, "offset", 0)
        if limit < 0 or offset < 0:
            raise bad_request("limit and offset must not be negative", id="meshd.store")
        return Query(key=key, prefix=_text_arg(args, "prefix"),
                     suffix=_text_arg(args, "suffix"), contains=_text_arg(args, "contains"),
                     limit=limit, offset=offset)

    async def list_keys(self, args: dict[str, Any]) -> Any:
        db, tbl = self._names(args)
        engine = self.engines.engine_for(db)
        if engine is not None:
            return await engine.list_keys(db, tbl, self._query(args), _now_ms())
        self._exists(db, tbl)
        return self.rep.state.keys(db, tbl, _now_ms(), prefix=_text_arg(args, "prefix"),
                                   suffix=_text_arg(args, "suffix"),
                                   limit=_int_arg(args, "limit", 0),
                                   offset=_int_arg(args, "offset", 0),
                                   contains=_text_arg(args, "contains"))

    async def databases(self, args: dict[str, Any]) -> Any:
        """User databases: not the system databases (auth, routing, broker: meshd's own,
        read by admins only) nor config (every namespace's config tree, reached through the
        config ops alone)."""
        names = set(self.rep.state.databases(_now_ms())) | set(self.engines.bindings())
        return sorted(db for db in names if db not in SYSTEM_DBS and db != CONFIG_DB)

    async def tables(self, args: dict[str, Any]) -> Any:
        db = args.get("database", "default")
        engine = self.engines.engine_for(db)
        if engine is not None:
            return await engine.tables(db)
        names = self.rep.state.table_names(db, _now_ms())
        if not names:
            raise not_found(f"no database {db!r}", id="meshd.store")
        return names

    async def counter(self, args: dict[str, Any]) -> Any:
        db, tbl = self._names(args)
        key = self._key(args)
        delta = args.get("delta", 0)
        if not isinstance(delta, int) or isinstance(delta, bool):
            raise bad_request("delta must be an integer", id="meshd.store")
        engine = self.engines.engine_for(db)
        if engine is not None:
            return {"key": key, "counter": await engine.counter(db, tbl, key, delta,
                                                                self.node)}
        current = self.rep.state.get(db, tbl, key) or {}
        if delta == 0:
            return {"key": key, "counter": crdt.counter_value(current.get("counter"))}
        change = {"counter": crdt.counter_add(current.get("counter"), self.node, delta)}
        state = await self._commit_local(db, tbl, key, change, _int_arg(args, "replicas", 1))
        return {"key": key, "counter": crdt.counter_value(state.get("counter"))}

    async def set_op(self, args: dict[str, Any]) -> Any:
        db, tbl = self._names(args)
        key = self._key(args)
        op, member = args.get("op"), args.get("member")
        engine = self.engines.engine_for(db)
        current = self.rep.state.get(db, tbl, key) or {}
        if op == "members":
            return {"key": key, "members": await engine.members(db, tbl, key)
                    if engine is not None else crdt.set_members(current.get("set"))}
        if not isinstance(member, str) or not member:
            raise bad_request("member must be non-empty text", id="meshd.store")
        if engine is not None and op in ("add", "remove"):
            add, remove = ([member], []) if op == "add" else ([], [member])
            return {"key": key, "members": await engine.set_change(db, tbl, key, add, remove,
                                                                   self.node)}
        if op == "add":
            ts = self.hlc.now()
            tag = f"{self.node}:{ts[0]}:{ts[1]}:{self._life}"  # (see the rules)
            change = {"set": crdt.set_add_delta(member, tag)}  # (a delta: see crdt)
        elif op == "remove":
            removed = crdt.set_remove_delta(current.get("set"), member)
            if removed is None:  # no tag of it here: nothing to remove
                return {"key": key, "members": crdt.set_members(current.get("set"))}
            change = {"set": removed}
        else:
            raise bad_request("op must be add, remove or members", id="meshd.store")
        state = await self._commit_local(db, tbl, key, change, _int_arg(args, "replicas", 1))
        return {"key": key, "members": crdt.set_members(state.get("set"))}

    @contextlib.contextmanager
    def follow(self, db: str) -> Iterator[trio.MemoryReceiveChannel[Any]]:
        """Every change of database `db` landing here while in the block (unbounded: a
        migration must not miss one)."""
        send, recv = trio.open_memory_channel[Any](math.inf)
        entry = (db, None, "", send)
        self._watchers.append(entry)
        self._following.add(send)
        try:
            yield recv
        finally:
            self._following.discard(send)
            with contextlib.suppress(ValueError):
                self._watchers.remove(entry)

    async def watch(self, args: dict[str, Any], emit: Any) -> None:
        db = args.get("database")
        tbl = args.get("table")
        if not isinstance(db, str | None) or not isinstance(tbl, str | None):
            raise bad_request("database and table must be text", id="meshd.store")
        prefix = _text_arg(args, "prefix") or ""
        send, recv = trio.open_memory_channel[Any](1000)
        entry = (db, tbl, prefix, send)
        self._watchers.append(entry)
        try:
            async for ev in recv:
                await emit(ev)
        finally:
            with contextlib.suppress(ValueError):
                self._watchers.remove(entry)

    # --- config ------------------------------------------------------------------------------

    def config_value(self, namespace: str, path: str) -> tuple[bool, Any]:
        """(found, value) of a dot path, built from records at, above and below it."""
        t = self.rep.state.table(CONFIG_DB, namespace)
        if t is None:
            return False, None
        related = []
        for key, state in t.records.items():
            reg = state.get("lww")
            if reg is None:
                continue
            if key == path or path.startswith(key + ".") or key.startswith(path + ".") \
                    or path == "":
                related.append((crdt.lww_ts(reg), key, reg[1]))
        tree: dict[str, Any] = {}
        for _, key, raw in sorted(related):
            _put(tree, key.split("."), None if raw is None else json.loads(raw))
        return paths.lookup(tree, path.split(".") if path else [])

    async def config_get(self, args: dict[str, Any]) -> Any:
        namespace, path = config_args(args)
        found, value = self.config_value(namespace, path)
        if not found:
            raise not_found(f"no config at {path!r} in namespace {namespace!r}",
                            id="meshd.config")
        return {"path": path, "value": value}

    async def config_set(self, args: dict[str, Any], by: str = "") -> Any:
        namespace, path = config_args(args)
        if not path:
            raise bad_request("set needs a path", id="meshd.config")
        if "value" not in args:
            raise bad_request("set needs a value", id="meshd.config")
        raw = json.dumps(args["value"]).encode()
        await self.write({"database": CONFIG_DB, "table": namespace, "key": path,
                          "value": raw})
        await self._remember(namespace, path, args["value"], False, by)
        return {"path": path, "value": args["value"]}

    async def config_del(self, args: dict[str, Any], by: str = "") -> Any:
        namespace, path = config_args(args)
        found, _ = self.config_value(namespace, path)
        if not found:
            raise not_found(f"no config at {path!r} in namespace {namespace!r}",
                            id="meshd.config")
        delta = {"lww": crdt.lww(self.hlc.now(), None)}
        await self._commit_local(CONFIG_DB, namespace, path, delta, 1)
        await self._remember(namespace, path, None, True, by)
        return {"deleted": path}

    async def _remember(self, namespace: str, path: str, value: Any, deleted: bool,
                        by: str) -> None:
        """One record of a config change in the namespace's history (see HISTORY)."""
        now = time.time()
        record = {"path": path, "value": value, "deleted": deleted, "by": by,
                  "time": round(now, 3), "node": self.node}
        await self.write({"database": CONFIG_DB, "table": HISTORY + namespace,
                          "key": f"{int(now * 1e6):020d}-{self.node}",
                          "value": json.dumps(record).encode(), "ttl": HISTORY_TTL})

    def config_history(self, namespace: str, path: str) -> list[dict[str, Any]]:
        """The newest HISTORY_MAX changes at, above or below `path` ("" = all), newest
        first."""
        t = self.rep.state.table(CONFIG_DB, HISTORY + namespace)
        if t is None:
            return []
        now = _now_ms()
        out: list[dict[str, Any]] = []
        for key in sorted(t.records, reverse=True):
            if not live(t.records[key], now):
                continue
            try:
                record = json.loads(view(key, t.records[key], now).get("value") or b"")
            except (ValueError, TypeError):
                continue
            at = record.get("path") if isinstance(record, dict) else None
            if not isinstance(at, str):
                continue
            if path and not (at == path or at.startswith(path + ".")
                             or path.startswith(at + ".")):
                continue
            out.append(record)
            if len(out) >= HISTORY_MAX:
                break
        return out

    async def config_watch(self, args: dict[str, Any], emit: Any,
                           shown: Callable[[Any], Any] | None = None) -> None:
        """Events of the value at a path as it changes; `shown` is what of a value the
        watcher may see (all of it when None): a change it cannot see is no event."""
        namespace, path = config_args(args)
        seen = shown or (lambda value: value)

        def current() -> tuple[bool, Any]:
            found, value = self.config_value(namespace, path)
            return found, seen(value)

        send, recv = trio.open_memory_channel[Any](1000)
        entry = (CONFIG_DB, namespace, "", send)
        self._watchers.append(entry)
        last = current()
        try:
            async for ev in recv:
                key = ev["key"]
                if not (key == path or path.startswith(key + ".")
                        or key.startswith(path + ".") or not path):
                    continue
                now = current()
                if now != last:
                    last = now
                    await emit({"path": path, "value": now[1], "deleted": not now[0],
                                "changed_key": key})
        finally:
            with contextlib.suppress(ValueError):
                self._watchers.remove(entry)


def config_args(args: dict[str, Any]) -> tuple[str, str]:
    namespace = args.get("namespace", "default")
    path = args.get("path", "")
    if not isinstance(namespace, str) or not namespace or len(namespace) > 128:
        raise bad_request("namespace must be 1..128 characters", id="meshd.config")
    if not isinstance(path, str) or len(path) > 512 or (path and (
            path.startswith(".") or path.endswith(".") or ".." in path)):
        raise bad_request(f"bad path {path!r}: use dot paths like db.host", id="meshd.config")
    return namespace, path


def _put(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    node = paths.parent(tree, parts)
    if value is None:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value


MAX_TTL_MS = 100 * 365 * 86400 * 1000  # a ttl beyond a century is a mistake (inf an error)


def _int_arg(args: dict[str, Any], name: str, default: int) -> int:
    """An optional integer argument (`default` when absent or 0); 400 when not a number."""
    try:
        return int(args.get(name) or default)
    except (TypeError, ValueError, OverflowError):
        raise bad_request(f"{name} must be an integer", id="meshd.store") from None


def _text_arg(args: dict[str, Any], name: str) -> str | None:
    """An optional text argument (a key filter): None when absent, 400 when not text."""
    value = args.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise bad_request(f"{name} must be text", id="meshd.store")
    return value
