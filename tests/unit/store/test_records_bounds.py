"""Issue 22, review of the store on disk: what one message, one timer tick or one failing
SQLite call may cost the node (bounded work per message, no fault past its connection),
and that commits do not push the hot records out of the cache."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from meshd.hlc import HLC
from meshd.store import crdt
from meshd.store.diskrecords import DiskRecords
from meshd.store.persist import FILE, StoreDB
from meshd.store.records import bucket_of
from meshd.store.replication import StoreReplicator
from meshd.store.state import StoreState

NOW = 1_000_000


def _lww(i: int, value: bytes | None, expiry: int | None = None) -> crdt.State:
    return {"lww": crdt.lww((NOW - 5000 + i, 0, "a"), value, None, expiry)}


def _disk(path: Path, cache_bytes: int = 0) -> tuple[StoreDB, DiskRecords, StoreState]:
    path.mkdir(exist_ok=True)
    db = StoreDB(path / FILE)
    disk = DiskRecords(db, cache_bytes)
    return db, disk, StoreState(disk)


def _commit(db: StoreDB, disk: DiskRecords) -> None:
    rows, deleted = disk.begin_commit()
    db.save(rows, deleted)
    disk.end_commit()


class _Counting:
    """Wraps a StoreDB method to count its calls."""

    def __init__(self, db: StoreDB, name: str) -> None:
        self.calls = 0
        real = getattr(db, name)

        def counted(*args: Any, **kw: Any) -> Any:
            self.calls += 1
            return real(*args, **kw)

        setattr(db, name, counted)


# --- finding 3: a bucket named many times is read once -------------------------------------

def test_a_bucket_named_many_times_is_chunked_once(tmp_path):
    db, disk, state = _disk(tmp_path)
    try:
        for i in range(200):
            state.apply("d", "t", f"k{i}", _lww(i, b"v"))
        _commit(db, disk)
        b = bucket_of("k1")
        chunks = state.bucket_chunks("d\x00t", [b] * 10_000 + ["x", -1, b], 1)
        assert chunks == [[b]]
    finally:
        db.close()


def test_a_keys_message_repeating_a_bucket_costs_one_query(tmp_path):
    db, disk, _ = _disk(tmp_path)
    rep = StoreReplicator("a", HLC("a", lambda: NOW), lambda: [], random.Random(1), 0.0,
                          records=disk)
    try:
        for i in range(2000):
            rep.state.apply("d", "t", f"k{i}", _lww(i, b"v" * 50))
        _commit(db, disk)
        counter = _Counting(db, "hashes")
        b = bucket_of("k1")
        rep.receive("b", {"t": "keys", "tables": {"d\x00t": {"b": [b] * 50_000, "k": {}}}},
                    0.0)
        assert counter.calls == 1, f"{counter.calls} SQL queries for one named bucket"
    finally:
        db.close()


# --- finding 8: a failing SQLite call ends one operation, not the store --------------------

def test_the_reader_waits_on_a_lock_instead_of_failing_at_once(tmp_path):
    db, _, _ = _disk(tmp_path)
    try:
        (ms,) = db.reader.execute("PRAGMA busy_timeout").fetchone()
        assert ms > 0
    finally:
        db.close()


def test_a_tick_survives_a_disk_error_in_tombstone_collection(tmp_path):
    import sqlite3

    db, disk, _ = _disk(tmp_path)
    rep = StoreReplicator("a", HLC("a", lambda: NOW + 10**9), lambda: ["b"],
                          random.Random(1), 0.0, records=disk, tombstone_grace=1.0)
    rep.backend_errors = (sqlite3.Error,)
    dropped: list[Any] = []
    rep.on_drop = lambda *k: dropped.append(k)
    try:
        for i in range(3):
            rep.state.apply("d", "t", f"k{i}", _lww(i, None))  # old tombstones
        _commit(db, disk)
        real_get, calls = db.get, []

        def failing_get(*args: Any) -> Any:
            calls.append(args)
            if len(calls) > 1:
                raise sqlite3.OperationalError("disk I/O error")
            return real_get(*args)

        rep.local("d", "t", "new", _lww(10, b"v"), 0.0)
        db.get = failing_get  # type: ignore[method-assign]
        sends = rep.tick(1e9)
        kinds = sorted(m["t"] for _, m in sends)
        assert kinds == ["batch", "roots"], "the flush and the sync still go out"
        assert len(dropped) == 1, "the key dropped before the failure is reported"
        assert rep.next_sync < float("inf") and rep.next_sync > 1e9
    finally:
        db.close()


# --- finding 1: commits and merges do not push the hot set out of the cache ----------------

def test_a_hot_set_survives_a_bulk_remote_catch_up(tmp_path):
    reps, dbs = {}, {}
    for n in ("a", "b"):
        db, disk, _ = _disk(tmp_path / n, cache_bytes=60_000)
        dbs[n] = db
        reps[n] = StoreReplicator(n, HLC(n, lambda: NOW), lambda: [], random.Random(n), 0.0,
                                  repair_keys=500, repair_bytes=40_000, records=disk)
    a, b = reps["a"], reps["b"]
    try:
        hot = [f"hot{i}" for i in range(20)]
        for i, key in enumerate(hot):
            for r in (a, b):
                r.state.apply("db", "t", key, _lww(i, b"h" * 100))
        for i in range(3000):
            a.state.apply("db", "t", f"k{i:05d}", _lww(i, b"c" * 100))
        a.state.apply("db", "t", "hot0", _lww(50_000, b"changed"))  # a hot key changes too
        for r in (a, b):
            _commit(r.state.records.db, r.state.records)
        for key in hot:
            b.state.get("db", "t", key)  # b's clients read these
        cache = b.state.records.cache
        assert all(("db", "t", k) in cache for k in hot)
        for _ in range(100):
            if b.state.roots() == a.state.roots():
                break
            queue = [("b", "a", m) for _, m in b.sync_with("a")]
            while queue:
                src, dst, msg = queue.pop(0)
                queue += [(dst, x, m) for x, m in reps[dst].receive(src, msg, 0.0)]
                _commit(dbs[dst], reps[dst].state.records)  # as the daemon's committer
        assert b.state.roots() == a.state.roots()
        assert [k for k in hot if ("db", "t", k) not in cache] == [], \
            "the catch-up pushed hot records out of the cache"
        assert cache.peek(("db", "t", "hot0")).state["lww"][1] == b"changed"
    finally:
        for db in dbs.values():
            db.close()


def test_merging_into_cold_keys_and_collecting_tombstones_evict_nothing(tmp_path):
    db, disk, state = _disk(tmp_path, cache_bytes=30_000)
    try:
        for i in range(300):
            state.apply("d", "t", f"k{i:03d}", _lww(i, b"v" * 100 if i % 2 else None))
        _commit(db, disk)
        for i in range(1, 300, 2):
            state.get("d", "t", f"k{i:03d}")  # fills the cache with live keys
        before = set(disk.cache._items)
        evictions = disk.cache.evictions
        for i in range(1, 300, 2):  # cold keys change (no commit yet)
            if ("d", "t", f"k{i:03d}") not in before:
                state.apply("d", "t", f"k{i:03d}", _lww(1000 + i, b"w" * 100))
        assert state.collect(NOW + 10**7, 1000), "the tombstones were collected"
        assert disk.cache.evictions == evictions
        assert set(disk.cache._items) == before
    finally:
        db.close()


# --- finding 2: answering a key list stops reading once the records are full ---------------

def test_a_key_list_naming_every_bucket_is_answered_with_bounded_reads(tmp_path, monkeypatch):
    from meshd.store import replication

    monkeypatch.setattr(replication, "CHUNK_KEYS", 100)
    db, disk, _ = _disk(tmp_path / "a")
    rep = StoreReplicator("a", HLC("a", lambda: NOW), lambda: [], random.Random(1), 0.0,
                          records=disk, repair_bytes=4000)
    try:
        for i in range(3000):
            rep.state.apply("d", "t", f"k{i:05d}", _lww(i, b"v" * 100))
        rep.state.apply("e", "t", "other", _lww(1, b"v"))
        _commit(db, disk)
        counter = _Counting(db, "hashes")
        # a far-behind peer names every bucket of both tables, and holds one key we lack
        lacking = "zz-theirs"
        msg = {"t": "keys", "tables": {
            "d\x00t": {"b": list(range(4096)), "k": {lacking: 5}},
            "e\x00t": {"b": list(range(4096)), "k": {}}}}
        ((_, reply),) = rep.receive("b", msg, 0.0)
        assert reply.get("more") is True
        assert 0 < len(reply["e"]) < 100
        assert counter.calls <= 2, f"{counter.calls} chunks of hashes read for one message"
        # what we asked for lies in the buckets compared, none beyond
        assert all(k == lacking for k in reply["want"].get("d\x00t", []))
    finally:
        db.close()


# --- finding 4: a page of a large table reads a page ---------------------------------------

def test_a_page_of_keys_reads_no_further_than_its_end(tmp_path):
    db, disk, state = _disk(tmp_path)
    try:
        for i in range(3000):
            state.apply("d", "t", f"k{i:05d}", _lww(i, b"v"))
        _commit(db, disk)
        state.apply("d", "t", "k00001", _lww(9000, None))  # pending: a delete, an insert
        state.apply("d", "t", "k00002x", _lww(9001, b"v"))
        got: list[int] = []
        real = db.keys

        def counted(*args: Any) -> list[str]:
            out = real(*args)
            got.append(len(out))
            return out

        db.keys = counted  # type: ignore[method-assign]
        assert state.keys("d", "t", NOW, limit=3, offset=1) == \
            ["k00002", "k00002x", "k00003"]
        assert state.keys("d", "t", NOW, suffix="7", limit=2) == ["k00007", "k00017"]
        assert [k for k, _ in state.read("d", "t", NOW, contains="99", limit=2)] == \
            ["k00099", "k00199"]
        assert max(got) <= 10, f"{max(got)} keys read for a page of at most 4"
    finally:
        db.close()


def test_tombstone_collection_skips_kept_databases_in_sql_and_drops_a_bounded_number(
        tmp_path, monkeypatch):
    from meshd.store import state as state_mod
    from meshd.store.memrecords import MemoryRecords

    monkeypatch.setattr(state_mod, "COLLECT_MAX", 7)
    db, disk, state = _disk(tmp_path)
    mem = StoreState(MemoryRecords())
    try:
        for s in (state, mem):
            for i in range(40):
                s.apply("auth", "t", f"a{i}", _lww(i, None))  # kept for ever
            for i in range(20):
                s.apply("d", "t", f"k{i}", _lww(i, None))
        _commit(db, disk)
        state.apply("d", "t", "pending", _lww(100, None))  # not committed yet
        mem.apply("d", "t", "pending", _lww(100, None))
        returned: list[int] = []
        real = db.tombstones

        def counted(*args: Any) -> Any:
            out = real(*args)
            returned.append(len(out))
            return out

        db.tombstones = counted  # type: ignore[method-assign]
        keep = frozenset({"auth"})
        for s in (state, mem):
            total: list[Any] = []
            while True:
                dropped = s.collect(NOW + 10**7, 1000, keep)
                assert len(dropped) <= 7
                if not dropped:
                    break
                total += dropped
                if s is state:
                    _commit(db, disk)  # as the daemon's committer between ticks
            assert sorted(total) == sorted([("d", "t", f"k{i}") for i in range(20)]
                                           + [("d", "t", "pending")])
            assert s.tables[("auth", "t")].count == 40
        assert max(returned) <= 8, "tombstones of kept databases or past the limit were read"
    finally:
        db.close()


def test_the_newest_timestamp_at_start_comes_from_the_digest_scan(tmp_path):
    db, disk, state = _disk(tmp_path)
    for i in range(50):
        state.apply("d", "t", f"k{i}", {"lww": crdt.lww((NOW + i, 3, "a"), b"v")})
    state.apply("d", "t", "future", {"lww": crdt.lww((NOW + 10**9, 0, "a"), b"v")})
    state.apply("d", "t", "c", {"counter": crdt.counter_add(None, "a", 1)})
    _commit(db, disk)
    db.close()
    db = StoreDB(tmp_path / FILE)
    try:
        disk = DiskRecords(db, 0)
        disk.newest_bound = NOW + 1000
        StoreState(disk)

        def no_scan(*args: Any) -> Any:
            raise AssertionError("a second scan of the file for the newest timestamp")

        expected = db.newest(NOW + 1000)
        db.newest = no_scan  # type: ignore[method-assign]
        assert disk.newest(NOW + 1000) == expected == (NOW + 49, 3)
    finally:
        db.close()


# --- finding 5: what a table costs in memory ------------------------------------------------

def test_a_table_holds_its_digests_and_counts_unboxed(tmp_path):
    import gc
    import tracemalloc

    db, _, state = _disk(tmp_path)
    try:
        state.apply("d", "t0", "k", _lww(1, b"v"))  # the first table: code paths warmed
        gc.collect()
        tracemalloc.start()
        try:
            for i in range(1, 41):
                state.apply("d", f"t{i}", "k", _lww(1, b"v"))
            gc.collect()
            per_table = tracemalloc.get_traced_memory()[0] / 40
        finally:
            tracemalloc.stop()
        # 4096 digests of 8 bytes and 4096 counts of 4: 48 kB; lists of ints took ~67 kB
        assert per_table < 56_000, f"{per_table:.0f} bytes per table"
    finally:
        db.close()


def test_a_hot_key_written_again_during_its_commit_is_cached_with_its_newest_value(tmp_path):
    db, disk, state = _disk(tmp_path, cache_bytes=100_000)
    try:
        state.apply("d", "t", "k", _lww(1, b"one"))
        _commit(db, disk)
        state.get("d", "t", "k")  # in use: cached
        state.apply("d", "t", "k", _lww(2, b"two"))
        rows, deleted = disk.begin_commit()
        state.apply("d", "t", "k", _lww(3, b"three"))  # written again while "two" commits
        db.save(rows, deleted)
        disk.end_commit()
        assert disk.get("d", "t", "k", fill=False).state["lww"][1] == b"three"
        _commit(db, disk)
        assert disk.cache.peek(("d", "t", "k")).state["lww"][1] == b"three", \
            "the hot key is cached again once its newest value is on disk"
        assert state.get("d", "t", "k")["lww"][1] == b"three"
    finally:
        db.close()


# --- finding 4: the schema 1 upgrade --------------------------------------------------------

def _schema_1(path: Path, states: dict[tuple[str, str], crdt.State]) -> None:
    import sqlite3

    import cbor2

    conn = sqlite3.connect(path)
    conn.executescript("""
        PRAGMA application_id=1835365224; PRAGMA user_version=1;
        CREATE TABLE records (db TEXT NOT NULL, tbl TEXT NOT NULL, key TEXT NOT NULL,
            state BLOB NOT NULL, PRIMARY KEY (db, tbl, key)) WITHOUT ROWID;""")
    conn.executemany("INSERT INTO records VALUES ('d', ?, ?, ?)",
                     [(t, k, cbor2.dumps(s)) for (t, k), s in states.items()])
    conn.commit()
    conn.close()


def test_a_schema_1_upgrade_interrupted_part_way_resumes(tmp_path, monkeypatch):
    import sqlite3

    from meshd.store import persist

    states = {(f"t{i % 2}", f"k{i:02d}"): _lww(i, b"v%d" % i if i % 3 else None)
              for i in range(23)}
    path = tmp_path / FILE
    _schema_1(path, states)
    monkeypatch.setattr(persist, "BACKFILL", 5)
    real_hash, calls = persist.key_hash, []

    def crashing_hash(key: str, state: crdt.State) -> int:
        calls.append(key)
        if len(calls) > 7:  # in the second batch: the first is committed
            raise KeyboardInterrupt
        return real_hash(key, state)

    monkeypatch.setattr(persist, "key_hash", crashing_hash)
    try:
        StoreDB(path)
        raise AssertionError("the upgrade should have been interrupted")
    except KeyboardInterrupt:
        pass
    conn = sqlite3.connect(path)
    (filled,) = conn.execute("SELECT count(*) FROM records WHERE hash IS NOT NULL").fetchone()
    conn.close()
    assert filled == 5
    monkeypatch.setattr(persist, "key_hash", real_hash)
    decoded = []
    real_loads = persist.cbor2.loads

    class Counting:
        @staticmethod
        def loads(blob: bytes) -> Any:
            decoded.append(blob)
            return real_loads(blob)

        dumps = staticmethod(persist.cbor2.dumps)

    monkeypatch.setattr(persist, "cbor2", Counting)
    db = StoreDB(path)
    monkeypatch.undo()
    try:
        assert len(decoded) == 18, "each row left is decoded once"
        state = StoreState(DiskRecords(db, 0))
        mem = StoreState()
        for (tbl, key), s in states.items():
            mem.apply("d", tbl, key, s)
        assert state.roots() == mem.roots()
        for tbl in ("t0", "t1"):
            assert state.read("d", tbl, NOW) == mem.read("d", tbl, NOW)
    finally:
        db.close()


# --- finding 6: counting live keys reads one snapshot, in a bounded number of queries -------

def test_counting_live_keys_with_changes_pending_reads_one_snapshot(tmp_path):
    db, disk, state = _disk(tmp_path)
    try:
        for i in range(1200):
            state.apply("d", "t", f"k{i:05d}", _lww(i, b"v" if i % 2 else None))
        _commit(db, disk)
        for i in range(0, 1200, 2):  # 600 changes pending: tombstones come back to life
            state.apply("d", "t", f"k{i:05d}", _lww(5000 + i, b"w"))
        state.apply("d", "t", "new", _lww(9000, b"n"))
        statements: list[str] = []
        db.reader.set_trace_callback(statements.append)
        assert state.count_live("d", "t", NOW) == 1201
        db.reader.set_trace_callback(None)
        assert statements[0] == "BEGIN" and statements[-1] == "COMMIT"
        assert len(statements) <= 6, f"{len(statements)} statements to count one table"
    finally:
        db.close()
