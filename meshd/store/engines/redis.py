"""The Redis engine: databases bound to a Redis server (resp.py on trio; redis-py threads).

Theory of operation
-------------------
Data model. Every name meshd keeps in Redis starts with ``meshd:`` and a kind letter; the
(db, table, key) parts follow, each written as ``<length in UTF-8 bytes>:<bytes>``, so no
text in a part (":" "*" "[" "{" newlines, any unicode) can make two names collide and the
name is readable in redis-cli. With P(x) = len(x) ":" x:

  meshd:v:P(db)P(tbl)P(key)  hash, the key's value (its LWW register):
                             v = value bytes, m = metadata (JSON), w = version wall (ms),
                             c = version counter, b = written_by, e = expiry (ms, absent
                             when none). With an expiry the hash has PEXPIREAT e, so Redis
                             removes it; reads also hide it once e <= now_ms, as the
                             embedded store does.
  meshd:n:P(db)P(tbl)        hash, the table's counters: field = key, HINCRBY; a counter
                             back at 0 is removed (it holds nothing, as record() shows).
                             Apart from the value hash, so a value's expiry never takes
                             the counter with it (the embedded store expires values only).
  meshd:s:P(db)P(tbl)P(key)  set, the key's members.
  meshd:i:P(db)P(tbl)        sorted set, the table's index: every key that may hold
                             something, score 0, so ZRANGEBYLEX lists keys in byte order
                             (= code point order of the text, as the embedded store sorts)
                             and prefix scans never touch the rest of the keyspace.
  meshd:t:P(db)              set, the database's tables.

No operation uses KEYS or SCAN. An index entry whose value expired (or which holds nothing
any more) is skipped on read and removed lazily, by a script that removes it only if the key
still holds nothing; a table whose index empties leaves its database's set the same way.

Atomicity. Each change to a key is one Lua script: the value/counter/set change, its index
and table entries, and its change notification are applied together or not at all.
`copy_value` and `copy_delete` compare the held version (w, c) with theirs inside the script:
they apply unless Redis holds a newer version, so a migration never overwrites a newer write.

Watches (at most once, as Redis pub/sub promises). Each script also PUBLISHes the change on
one channel, ``meshd:changes:<redis db number>`` (pub/sub ignores db numbers; the suffix
keeps two meshd clusters on two db numbers of one server apart). The payload is compact: a
flag "1" (nothing left on the key) or "0", then the JSON list [db, tbl, key, written_by].
`run` subscribes on a connection of its own (resp.follow), reads the record back (only of
keys someone watches; the message's flag is not believed, since anyone who may connect can
PUBLISH) and reports it. Every node bound to the same Redis sees the changes made
through every other node. Changes made by other Redis clients (redis-cli, other programs)
are not seen, and a watcher disconnected while Redis is down misses the changes of that
time; `run` resubscribes with backoff once Redis is back.

Clients. Single-key operations (write, read of a key, delete, counters, sets) and the
watch run in the node's trio thread on resp.py while `run` runs: every node's calls share
one pipelined connection, and a read is one script (value, counter and members as one
snapshot). Scans, tables, drop and migration copies run on redis-py's blocking client in
worker threads (workers.py), as do single-key operations before `run` started. hiredis
parses replies for both (a dependency of meshd).

Errors and bounds. Every client error becomes `EngineDown` whose cause is redacted (never
the URL or its password). At most `pool` calls run at a time on the blocking client
(threads and a connection pool of that size); each round trip is bounded by `timeout`
(socket, connect and pool waits; a whole call on resp.py), and nothing is retried, so a
script is never applied twice (a NOSCRIPT reply means it did not run). A blocking
connection left over from before a restart of Redis is noticed when taken from the pool (and
by the health check) and replaced, and resp.py connects anew after a failure, so the same
engine object works again once Redis is back.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import Any, TypeVar

import trio

from meshd.errors import MeshError, bad_request
from meshd.wire import WireError, loads_json

from . import resp
from .base import EngineDown, OnChange, Query, Record, Wanted, live, record, redact
from .workers import Workers

log = logging.getLogger("meshd.store")

BACKEND = "redis"
T = TypeVar("T")
BATCH = 256  # index entries fetched per round trip by scans
HEALTH_CHECK = 10  # seconds idle before a pooled connection is pinged before use
BACKOFF_MIN, BACKOFF_MAX = 0.1, 2.0  # resubscribing after Redis went away
MAX_CHANGE = 16384  # bytes of a change message (db, table, key, node: bounded names)
WATCH_QUEUE = 10_000  # changes heard and not yet read back and reported


def _part(text: str) -> bytes:
    raw = text.encode()
    return str(len(raw)).encode() + b":" + raw


def name(kind: str, *parts: str) -> bytes:
    """The Redis name of a kind ("v", "n", "s", "i", "t") of thing for (db[, tbl[, key]])."""
    return b"meshd:" + kind.encode() + b":" + b"".join(_part(p) for p in parts)


@functools.lru_cache(maxsize=4096)
def _table_part(db: str, tbl: str) -> bytes:
    """P(db)P(tbl): the same few tables are named on every call."""
    return _part(db) + _part(tbl)


# Every per-key script gets KEYS = value hash, table counters, member set, table index,
# database tables; ARGV[1] = table, ARGV[2] = key, ARGV[3] = channel, ARGV[4] = payload.
_PRELUDE = """
local vkey, ckey, skey, ikey, tkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local tbl, key, chan, payload = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local function dead()
  return redis.call('EXISTS', vkey, skey) == 0 and redis.call('HEXISTS', ckey, key) == 0
end
local function keep()
  if redis.call('ZADD', ikey, 0, key) == 1 then redis.call('SADD', tkey, tbl) end
end
local function tidy()
  if dead() then
    redis.call('ZREM', ikey, key)
    if redis.call('ZCARD', ikey) == 0 then redis.call('SREM', tkey, tbl) end
  end
end
local function tell()
  redis.call('PUBLISH', chan, (dead() and '1' or '0') .. payload)
end
local function newer(wall, counter)
  local held = redis.call('HMGET', vkey, 'w', 'c')
  if not held[1] then return false end
  local w, c = tonumber(held[1]), tonumber(held[2])
  return w > wall or (w == wall and c > counter)
end
local function put(value, meta, wall, counter, by, expiry)
  redis.call('DEL', vkey)
  redis.call('HSET', vkey, 'v', value, 'm', meta, 'w', wall, 'c', counter, 'b', by)
  keep()
  if expiry ~= '' then
    redis.call('HSET', vkey, 'e', expiry)
    redis.call('PEXPIREAT', vkey, expiry)
    tidy()  -- a value already expired leaves nothing
    tell()
  else
    redis.call('PUBLISH', chan, '0' .. payload)  -- the key holds a value
  end
end
"""

# A key's value hash (flat), counter and members, as one snapshot. KEYS = value hash, table
# counters, member set; ARGV[1] = key.
_READ = """
return {redis.call('HGETALL', KEYS[1]), redis.call('HGET', KEYS[2], ARGV[1]),
        redis.call('SMEMBERS', KEYS[3])}
"""

# ARGV[5..10] = value, metadata, wall, counter, by, expiry ("" = none)
_WRITE = _PRELUDE + """
put(ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10])
return {redis.call('HGET', ckey, key), redis.call('SMEMBERS', skey)}
"""

_COPY_VALUE = _PRELUDE + """
if newer(tonumber(ARGV[7]), tonumber(ARGV[8])) then return 0 end
put(ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10])
return 1
"""

# ARGV[5..6] = wall, counter
_COPY_DELETE = _PRELUDE + """
if redis.call('EXISTS', vkey) == 0 or newer(tonumber(ARGV[5]), tonumber(ARGV[6])) then
  return 0
end
redis.call('DEL', vkey)
tidy()
tell()
return 1
"""

_DELETE = _PRELUDE + """
local had = redis.call('EXISTS', vkey, skey) + redis.call('HEXISTS', ckey, key)
redis.call('DEL', vkey, skey)
redis.call('HDEL', ckey, key)
tidy()
if had > 0 then tell() end
return had
"""

# ARGV[5] = delta (not 0)
_COUNTER = _PRELUDE + """
local n = redis.call('HINCRBY', ckey, key, ARGV[5])
if n == 0 then redis.call('HDEL', ckey, key); tidy() else keep() end
tell()
return n
"""

# ARGV[5] = how many removals, then the removals, then the additions
_SET_CHANGE = _PRELUDE + """
local nrem = tonumber(ARGV[5])
local changed = 0
for i = 6, 5 + nrem do changed = changed + redis.call('SREM', skey, ARGV[i]) end
for i = 6 + nrem, #ARGV do changed = changed + redis.call('SADD', skey, ARGV[i]) end
if redis.call('EXISTS', skey) == 1 then keep() else tidy() end
if changed > 0 then tell() end
return redis.call('SMEMBERS', skey)
"""

# Lazy removal of index entries that hold nothing. KEYS = table index, table counters,
# database tables, then (value hash, member set) per key; ARGV = table, then the keys.
_TIDY = """
local ikey, ckey, tkey = KEYS[1], KEYS[2], KEYS[3]
local removed = 0
for i = 2, #ARGV do
  local v, s = KEYS[2 + 2 * (i - 1)], KEYS[3 + 2 * (i - 1)]
  if redis.call('EXISTS', v, s) == 0 and redis.call('HEXISTS', ckey, ARGV[i]) == 0 then
    removed = removed + redis.call('ZREM', ikey, ARGV[i])
  end
end
if redis.call('ZCARD', ikey) == 0 then redis.call('SREM', tkey, ARGV[1]) end
return removed
"""

# drop(db), one batch of a table: KEYS as for _TIDY; ARGV = table, channel, then per key
# (key, payload). Removes everything of each key; how many held anything.
_DROP = """
local ikey, ckey, tkey = KEYS[1], KEYS[2], KEYS[3]
local chan = ARGV[2]
local n = 0
for i = 1, (#ARGV - 2) / 2 do
  local key, payload = ARGV[1 + 2 * i], ARGV[2 + 2 * i]
  local v, s = KEYS[2 + 2 * i], KEYS[3 + 2 * i]
  if redis.call('EXISTS', v, s) + redis.call('HEXISTS', ckey, key) > 0 then
    n = n + 1
    redis.call('PUBLISH', chan, '1' .. payload)
  end
  redis.call('DEL', v, s)
  redis.call('HDEL', ckey, key)
  redis.call('ZREM', ikey, key)
end
if redis.call('ZCARD', ikey) == 0 then
  redis.call('DEL', ikey, ckey)
  redis.call('SREM', tkey, ARGV[1])
end
return n
"""


_SOURCES = {"write": _WRITE, "copy_value": _COPY_VALUE, "copy_delete": _COPY_DELETE,
            "delete": _DELETE, "counter": _COUNTER, "set_change": _SET_CHANGE, "tidy": _TIDY,
            "drop": _DROP}


def _fetched(reply: Any) -> tuple[dict[bytes, bytes], Any, Any]:
    """The _READ script's reply as the (value hash, counter, members) `_record` takes."""
    flat, counter, members = reply
    return dict(zip(flat[::2], flat[1::2], strict=True)), counter, members


def _readable(convert: Callable[[], T]) -> T:
    """`convert()` of what Redis answered; data another client put in meshd's names that
    does not convert is a 503 naming it, never a crash of the request."""
    try:
        return convert()
    except (ValueError, TypeError, AttributeError) as exc:
        raise EngineDown(BACKEND, f"an unreadable record: {type(exc).__name__}") from None


def _now_ms() -> int:
    return int(time.time() * 1000)


def _queue_fetch(pipe: Any, db: str, tbl: str, keys: list[str]) -> Any:
    """Queue on `pipe` (sync or asyncio) the reads of each key's value hash, counter and
    members, three replies per key."""
    ckey = name("n", db, tbl)
    for key in keys:
        pipe.hgetall(name("v", db, tbl, key))
        pipe.hget(ckey, key)
        pipe.smembers(name("s", db, tbl, key))
    return pipe


def _payload(db: str, tbl: str, key: str, by: str) -> bytes:
    return json.dumps([db, tbl, key, by], separators=(",", ":")).encode()


def _metadata(metadata: dict[str, Any]) -> bytes:
    try:
        return json.dumps(metadata, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError):
        raise bad_request("metadata of a database on the redis engine must be JSON (text, "
                          "numbers, booleans, null, lists and maps)", id="meshd.store") from None


class RedisEngine:
    """A Redis server serving the databases bound to it (see the module docstring)."""

    backend = BACKEND
    bad_changes = 0  # malformed messages on the change channel (any client can publish)
    dropped_changes = 0  # changes not reported: WATCH_QUEUE full (watchers behind)

    def __init__(self, url: str, *, pool: int = 16, timeout: float = 5.0) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = url
        self.pool_size = pool
        self.timeout = timeout
        self._redis = redis
        self._workers = Workers(pool, "meshd-redis")
        self._mux: resp.Multiplexer | None = None  # while run() runs
        opts: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                                "health_check_interval": HEALTH_CHECK,
                                "retry": Retry(NoBackoff(), 0)}
        try:
            self._addr = resp.address(url)
            self._pool = redis.BlockingConnectionPool.from_url(
                url, max_connections=pool, timeout=timeout, **opts)
        except (ValueError, OSError, redis.RedisError) as exc:
            raise self._down(exc) from None
        self._r = redis.Redis(connection_pool=self._pool)
        number = self._pool.connection_kwargs.get("db", 0)
        self.channel = f"meshd:changes:{number}".encode()
        self._scripts = {n: self._r.register_script(src) for n, src in _SOURCES.items()}

    # --- plumbing --------------------------------------------------------------------------

    def _down(self, exc: BaseException) -> EngineDown:
        cause = str(exc) or type(exc).__name__
        return EngineDown(BACKEND, redact(cause, self.url))

    def _failure(self, exc: Exception) -> Exception:
        """What a failed call raises: redis-py's errors and any other failure (a record
        written by another client, a DSN option redis-py refuses, ...) as EngineDown with a
        redacted cause; meshd's own errors as they are."""
        if isinstance(exc, EngineDown | MeshError):
            return exc
        if isinstance(exc, self._redis.RedisError | OSError | resp.ReplyFailed
                      | resp.hiredis.HiredisError):
            return self._down(exc)
        return EngineDown(BACKEND, f"{type(exc).__name__}: "
                                   f"{redact(str(exc)[:200], self.url)}")

    def _guard(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            failure = self._failure(exc)
            if failure is exc:
                raise
            raise failure from None

    # --- the multiplexed connection (hot paths) ----------------------------------------------

    async def _ascript(self, which: str, db: str, tbl: str, key: str, by: str,
                       *extra: Any) -> Any:
        assert self._mux is not None
        return await self._mux.script(
            _SOURCES[which], self._keys(db, tbl, key),
            [tbl, key, self.channel, _payload(db, tbl, key, by), *extra])

    def _fetch1(self, db: str, tbl: str, key: str) -> tuple[Any, Any, Any]:
        return self._fetch(db, tbl, [key])[0]

    async def _afetch(self, db: str, tbl: str, key: str) -> tuple[Any, Any, Any]:
        assert self._mux is not None
        return _fetched(await self._mux.script(_READ, self._keys(db, tbl, key)[:3], [key]))

    async def _aone(self, *command: Any) -> Any:
        assert self._mux is not None
        reply = (await self._mux.call(command))[0]
        if isinstance(reply, resp.ReplyFailed):
            raise reply
        return reply

    async def _ahget(self, hkey: bytes, field: str) -> Any:
        return await self._aone("HGET", hkey, field)

    async def _asmembers(self, skey: bytes) -> Any:
        return await self._aone("SMEMBERS", skey)

    async def _hot(self, fn: Callable[..., Any], sync: Callable[..., Any], *args: Any) -> Any:
        """`await fn(*args)` on the multiplexed connection (single-key operations: no
        thread per call), or `sync(*args)` in a worker thread while `run` is not running
        (before it started, or without it, as some of the engine's own tests use it);
        errors as `_guard` maps them."""
        if self._mux is None:
            return await self._call(sync, *args)
        try:
            return await fn(*args)
        except Exception as exc:
            failure = self._failure(exc)
            if failure is exc:
                raise
            raise failure from None

    async def _call(self, fn: Callable[..., Any], *args: Any,
                    limiter: trio.CapacityLimiter | None = None) -> Any:
        if limiter is None:
            return await self._workers.run(self._guard, fn, args)
        return await trio.to_thread.run_sync(self._guard, fn, args, limiter=limiter)

    def _keys(self, db: str, tbl: str, key: str) -> list[bytes]:
        dt = _table_part(db, tbl)
        k = _part(key)
        return [b"meshd:v:" + dt + k, b"meshd:n:" + dt, b"meshd:s:" + dt + k, b"meshd:i:" + dt,
                name("t", db)]

    def _script(self, which: str, db: str, tbl: str, key: str, by: str, *extra: Any) -> Any:
        return self._scripts[which](keys=self._keys(db, tbl, key),
                                    args=[tbl, key, self.channel, _payload(db, tbl, key, by),
                                          *extra])

    def _fetch(self, db: str, tbl: str, keys: list[str]) -> list[tuple[Any, Any, Any]]:
        """(value hash, counter, members) of each key, as one snapshot (MULTI)."""
        pipe = _queue_fetch(self._r.pipeline(transaction=True), db, tbl, keys)
        out = pipe.execute() if keys else []
        return [tuple(out[i:i + 3]) for i in range(0, len(out), 3)]  # type: ignore[misc]

    def _probe(self, db: str, tbl: str, keys: list[str]) -> list[tuple[Any, Any, Any]]:
        """(value wall and expiry, counter, member set exists) of each key: liveness only."""
        pipe = self._r.pipeline(transaction=False)
        ckey = name("n", db, tbl)
        for key in keys:
            pipe.hmget(name("v", db, tbl, key), "w", "e")
            pipe.hget(ckey, key)
            pipe.exists(name("s", db, tbl, key))
        out = pipe.execute() if keys else []
        return [tuple(out[i:i + 3]) for i in range(0, len(out), 3)]  # type: ignore[misc]

    @staticmethod
    def _record(key: str, got: tuple[Any, Any, Any], now_ms: int) -> Record:
        h, counter, members = got
        value = metadata = expiry = version = by = None
        if h and b"w" in h:
            value, version = h.get(b"v", b""), (int(h[b"w"]), int(h[b"c"]))
            metadata = loads_json(h.get(b"m") or b"{}", max_bytes=MAX_CHANGE * 64)
            if not isinstance(metadata, dict):
                raise ValueError("metadata is not an object")
            expiry = int(h[b"e"]) if b"e" in h else None
            by = (h.get(b"b") or b"").decode()
        return record(key, value, metadata, expiry, version, by,
                      int(counter) if counter is not None else None,
                      [m.decode() for m in members or ()], now_ms)

    @staticmethod
    def _state(got: tuple[Any, Any, Any], now_ms: int) -> tuple[bool, bool]:
        """(live, dead) of a probe: live as reads show it; dead = holds nothing in Redis."""
        (wall, expiry), counter, has_set = got
        value = wall is not None and (expiry is None or int(expiry) > now_ms)
        counted = counter is not None and int(counter) != 0
        return value or counted or bool(has_set), wall is None and counter is None \
            and not has_set

    def _tidy(self, db: str, tbl: str, keys: list[str]) -> None:
        if not keys:
            return
        names = [name("i", db, tbl), name("n", db, tbl), name("t", db)]
        for key in keys:
            names += [name("v", db, tbl, key), name("s", db, tbl, key)]
        self._scripts["tidy"](keys=names, args=[tbl, *keys])

    def _index(self, db: str, tbl: str, prefix: str | None) -> Iterable[list[str]]:
        """The table's index entries (under `prefix`) in key order, in batches."""
        ikey = name("i", db, tbl)
        raw = (prefix or "").encode()
        lo, hi = (b"[" + raw, b"(" + raw + b"\xff") if raw else (b"-", b"+")
        while True:
            batch = self._r.zrangebylex(ikey, lo, hi, start=0, num=BATCH)
            if not batch:
                return
            yield [k.decode() for k in batch]
            if len(batch) < BATCH:
                return
            lo = b"(" + batch[-1]

    def _scan(self, db: str, tbl: str, q: Query, now_ms: int, full: bool) -> list[Any]:
        """Live keys matching `q` in key order after q.offset, at most q.limit: records when
        `full`, else keys."""
        out: list[Any] = []
        skip = q.offset
        for batch in self._index(db, tbl, q.prefix):
            keys = [k for k in batch if q.matches(k)]
            dead = []
            for key, got in zip(keys, self._probe(db, tbl, keys), strict=True):
                alive, gone = self._state(got, now_ms)
                if gone:
                    dead.append(key)
                elif alive:
                    if skip:
                        skip -= 1
                    else:
                        out.append(key)
            self._tidy(db, tbl, dead)
            if q.limit and len(out) >= q.limit:
                break
        out = out[:q.limit] if q.limit else out
        if not full:
            return out
        recs = [self._record(k, got, now_ms) for k, got in
                zip(out, self._fetch(db, tbl, out), strict=True)]
        return [r for r in recs if live(r)]  # (changed between probe and fetch: hidden)

    def _read(self, db: str, tbl: str, q: Query, now_ms: int) -> list[Record]:
        if q.key is None:
            return self._scan(db, tbl, q, now_ms, True)
        rec = self._record(q.key, self._fetch(db, tbl, [q.key])[0], now_ms)
        return [rec] if live(rec) else []

    def _any_live(self, db: str, tbl: str, now_ms: int) -> bool:
        for batch in self._index(db, tbl, None):
            dead, found = [], False
            for key, got in zip(batch, self._probe(db, tbl, batch), strict=True):
                alive, gone = self._state(got, now_ms)
                if gone:
                    dead.append(key)
                found = found or alive
                if found:
                    break
            self._tidy(db, tbl, dead)
            if found:
                return True
        return False

    def _tables(self, db: str) -> list[str]:
        now = _now_ms()
        names = sorted(t.decode() for t in self._r.smembers(name("t", db)))
        return [t for t in names if self._any_live(db, t, now)]

    def _drop(self, db: str) -> int:
        n = 0
        for raw in self._r.smembers(name("t", db)):
            tbl = raw.decode()
            while True:
                batch = next(iter(self._index(db, tbl, None)), [])
                names = [name("i", db, tbl), name("n", db, tbl), name("t", db)]
                args: list[Any] = [tbl, self.channel]
                for key in batch:
                    names += [name("v", db, tbl, key), name("s", db, tbl, key)]
                    args += [key, _payload(db, tbl, key, "")]
                n += self._scripts["drop"](keys=names, args=args)
                if not batch:
                    break
        return n

    # --- the Engine protocol ---------------------------------------------------------------

    async def write(self, db: str, tbl: str, key: str, value: bytes, metadata: dict[str, Any],
                    expiry: int | None, version: tuple[int, int], by: str) -> Record:
        meta = _metadata(metadata)
        counter, members = await self._hot(
            self._ascript, self._script, "write", db, tbl, key, by, value, meta, version[0],
            version[1], by, "" if expiry is None else expiry)
        return _readable(lambda: record(key, value, metadata, expiry, version, by,
                                        int(counter) if counter is not None else None,
                                        [m.decode() for m in members or ()], _now_ms()))

    def write_fast(self, db: str, tbl: str, key: str, value: bytes, metadata: dict[str, Any],
                   expiry: int | None, version: tuple[int, int], by: str,
                   done: Callable[[Any, MeshError | None], None]) -> bool:
        """`write` answered through `done(record, None)` or `done(None, error)` without a
        task (the control connection's fast path); False when it cannot be (no open
        connection, odd metadata): the caller awaits `write` instead."""
        mux = self._mux
        if mux is None:
            return False
        try:
            meta = _metadata(metadata)
        except MeshError:
            return False

        def written(reply: Any) -> Record:
            counter, members = reply
            return record(key, value, metadata, expiry, version, by,
                          int(counter) if counter is not None else None,
                          [m.decode() for m in members or ()], _now_ms())
        then = self._answering(done, written)
        return mux.script_soon(
            _SOURCES["write"], self._keys(db, tbl, key),
            [tbl, key, self.channel, _payload(db, tbl, key, by), value, meta, version[0],
             version[1], by, "" if expiry is None else expiry], then)

    def read_fast(self, db: str, tbl: str, key: str, now_ms: int,
                  done: Callable[[Any, MeshError | None], None]) -> bool:
        """`read` of one key answered through `done(rows, error)` (as write_fast)."""
        mux = self._mux
        if mux is None:
            return False

        def rows(reply: Any) -> list[Record]:
            rec = self._record(key, _fetched(reply), now_ms)
            return [rec] if live(rec) else []
        then = self._answering(done, rows)
        return mux.script_soon(_READ, self._keys(db, tbl, key)[:3], [key], then)

    def _answering(self, done: Callable[[Any, MeshError | None], None],
                   convert: Callable[[Any], Any]) -> Callable[[Any, BaseException | None], None]:
        """A fast path's callback: `done(convert(reply), None)`, or `done(None, error)` with
        the failure as an answer (meshd's own errors as they are; a reply that does not
        convert is an unreadable record; anything else EngineDown with a redacted cause)."""
        def then(reply: Any, error: BaseException | None) -> None:
            if error is None:
                try:
                    result = convert(reply)
                except MeshError as exc:
                    error = exc
                except Exception as exc:
                    error = EngineDown(BACKEND, f"an unreadable record: {type(exc).__name__}")
                else:
                    done(result, None)
                    return
            if not isinstance(error, MeshError):
                failure = self._failure(error) if isinstance(error, Exception) else None
                error = failure if isinstance(failure, MeshError) else self._down(error)
            done(None, error)
        return then

    async def read(self, db: str, tbl: str, q: Query, now_ms: int) -> list[Record]:
        if q.key is None:
            return await self._call(self._read, db, tbl, q, now_ms)
        got = await self._hot(self._afetch, self._fetch1, db, tbl, q.key)
        try:
            rec = self._record(q.key, got, now_ms)
        except Exception as exc:
            raise EngineDown(BACKEND, f"an unreadable record: {type(exc).__name__}") from None
        return [rec] if live(rec) else []

    async def delete(self, db: str, tbl: str, key: str, by: str) -> bool:
        return bool(await self._hot(self._ascript, self._script, "delete", db, tbl, key, by))

    async def list_keys(self, db: str, tbl: str, q: Query, now_ms: int) -> list[str]:
        if q.key is not None:
            return [r["key"] for r in await self.read(db, tbl, q, now_ms)]
        return await self._call(self._scan, db, tbl, q, now_ms, False)

    async def tables(self, db: str) -> list[str]:
        return await self._call(self._tables, db)

    async def counter(self, db: str, tbl: str, key: str, delta: int, by: str) -> int:
        if delta == 0:
            got = await self._hot(self._ahget, self._r.hget, name("n", db, tbl), key)
            return _readable(lambda: int(got or 0))
        got = await self._hot(self._ascript, self._script, "counter", db, tbl, key, by, delta)
        return _readable(lambda: int(got))

    async def members(self, db: str, tbl: str, key: str) -> list[str]:
        got = await self._hot(self._asmembers, self._r.smembers, name("s", db, tbl, key))
        return _readable(lambda: sorted(m.decode() for m in got))

    async def set_change(self, db: str, tbl: str, key: str, add: list[str], remove: list[str],
                         by: str) -> list[str]:
        got = await self._hot(self._ascript, self._script, "set_change", db, tbl, key, by,
                              len(remove), *remove, *add)
        return _readable(lambda: sorted(m.decode() for m in got))

    async def copy_value(self, db: str, tbl: str, key: str, value: bytes,
                         metadata: dict[str, Any], expiry: int | None,
                         version: tuple[int, int], by: str) -> bool:
        meta = _metadata(metadata)
        return bool(await self._call(
            self._script, "copy_value", db, tbl, key, by, value, meta, version[0], version[1],
            by, "" if expiry is None else expiry))

    async def copy_delete(self, db: str, tbl: str, key: str, version: tuple[int, int]) -> bool:
        return bool(await self._call(self._script, "copy_delete", db, tbl, key, "",
                                     version[0], version[1]))

    async def drop(self, db: str) -> int:
        return int(await self._call(self._drop, db))

    async def close(self) -> None:
        await trio.to_thread.run_sync(self._pool.disconnect)
        self._workers.close()

    # --- watches ---------------------------------------------------------------------------

    async def run(self, on_change: OnChange, wanted: Wanted,
                  task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Own the multiplexed connection of the hot paths, and serve watches, until
        cancelled."""
        mux = resp.Multiplexer(self._addr, self.timeout)
        async with trio.open_nursery() as nursery:
            await nursery.start(mux.run)
            self._mux = mux
            try:
                await self._watch(on_change, wanted, task_status)
            finally:
                self._mux = None
                nursery.cancel_scope.cancel()

    async def _watch(self, on_change: OnChange, wanted: Wanted, task_status: Any) -> None:
        """Report every change published by meshd's writers (module docstring: Watches).
        The subscription only queues what it hears; a task of its own reads back and
        reports, so a slow read never stops the subscriber socket being read."""
        send, recv = trio.open_memory_channel[tuple[str, str, str, str]](WATCH_QUEUE)

        def heard(data: bytes) -> None:
            change = self._parse(data)
            if change is None or not wanted(*change[:3]):  # nobody watches it: no read
                return
            try:
                send.send_nowait(change)
            except trio.WouldBlock:
                self.dropped_changes += 1
                log.warning("a redis change was dropped: watchers are behind")

        started = False

        def subscribed(_: Any = None) -> None:
            nonlocal started, backoff
            backoff = BACKOFF_MIN
            if not started:
                started = True
                task_status.started()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._report, recv, on_change)
            backoff = BACKOFF_MIN
            while True:
                try:
                    await resp.follow(self._addr, self.channel, self.timeout, heard,
                                      task_status=SimpleNamespace(started=subscribed))
                except (*resp.ERRORS, trio.TooSlowError, resp.ReplyFailed) as exc:
                    cause = redact(str(exc) or type(exc).__name__, self.url)
                    log.warning("redis watch lost (%s); resubscribing in %.1f s", cause,
                                backoff)
                subscribed()  # never hold meshd's start on a down engine
                await trio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    def _parse(self, data: bytes) -> tuple[str, str, str, str] | None:
        """(db, tbl, key, written_by) of a change message, None if malformed. Anyone who
        may connect can PUBLISH on the channel: the message is untrusted, and only says
        which key to read back (its "nothing left" flag is not believed)."""
        try:
            db, tbl, key, by = loads_json(data[1:], max_bytes=MAX_CHANGE)
        except (WireError, ValueError, TypeError):
            db = None
        if db is None or not all(isinstance(x, str) for x in (db, tbl, key, by)):
            self.bad_changes += 1
            log.debug("malformed redis change message: %r", data[:200])
            return None
        return db, tbl, key, by

    async def _report(self, recv: Any, on_change: OnChange) -> None:
        async for db, tbl, key, by in recv:
            try:
                rows = await self.read(db, tbl, Query(key=key), _now_ms())
            except EngineDown as exc:  # the change is lost: at most once
                log.debug("redis watch could not read %r/%r/%r: %s", db, tbl, key,
                          exc.detail)
                continue
            try:
                on_change(db, tbl, key, rows[0] if rows else None, by)
            except Exception:
                log.exception("a store watcher failed on a redis change")
