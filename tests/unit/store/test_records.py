"""Issue 22: store records on disk behind a bounded cache answer exactly what records in
memory answer, before, during and after commits, after eviction and after a restart; and
memory holds no per-key state of a table (only the digests and the bounded cache)."""

from __future__ import annotations

import gc
import random
import sqlite3
import tracemalloc
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.store import crdt
from meshd.store.diskrecords import DiskRecords
from meshd.store.memrecords import MemoryRecords
from meshd.store.persist import FILE, StoreDB, signed
from meshd.store.records import BUCKETS, FOREVER, bucket_of, key_hash, live_until
from meshd.store.state import StoreState

NOW = 1_000_000


def _value(i: int, size: int = 100) -> bytes:
    return (b"%08d" % i) * (size // 8) + b"v" * (size % 8)


def _lww(i: int, value: bytes | None, expiry: int | None = None) -> crdt.State:
    return {"lww": crdt.lww((NOW - 5000 + i, 0, "a"), value, None, expiry)}


def _states(i: int) -> crdt.State:
    """A mix of record kinds: values, expiring values, expired ones, tombstones, counters,
    sets."""
    kind = i % 6
    if kind == 0:
        return _lww(i, _value(i))
    if kind == 1:
        return _lww(i, _value(i), expiry=NOW + 60_000)
    if kind == 2:
        return _lww(i, _value(i), expiry=NOW - 1)
    if kind == 3:
        return _lww(i, None)
    if kind == 4:
        return {"counter": crdt.counter_add(None, "a", i)}
    return {"set": crdt.set_add(None, f"m{i}", f"a:{i}")}


class Pair:
    """The same StoreState operations on both backends; the disk one commits when asked."""

    def __init__(self, path: Path, cache_bytes: int) -> None:
        self.path = path
        self.db = StoreDB(path / FILE)
        self.disk = DiskRecords(self.db, cache_bytes)
        self.on_disk = StoreState(self.disk)
        self.in_memory = StoreState(MemoryRecords())

    def apply(self, db: str, tbl: str, key: str, state: crdt.State) -> None:
        a = self.on_disk.apply(db, tbl, key, state)
        b = self.in_memory.apply(db, tbl, key, state)
        assert a == b

    def drop(self, db: str, tbl: str, key: str) -> None:
        self.on_disk.drop(db, tbl, key)
        self.in_memory.drop(db, tbl, key)

    def commit(self) -> None:
        rows, deleted = self.disk.begin_commit()
        self.db.save(rows, deleted)
        self.disk.end_commit()

    def reopen(self, cache_bytes: int) -> None:
        self.commit()
        self.db.close()
        self.db = StoreDB(self.path / FILE)
        self.disk = DiskRecords(self.db, cache_bytes)
        self.on_disk = StoreState(self.disk)

    def check(self, now: int = NOW) -> None:
        d, m = self.on_disk, self.in_memory
        assert d.roots() == m.roots()
        assert d.databases(now) == m.databases(now)
        for (db, tbl), t in m.tables.items():
            name = f"{db}\x00{tbl}"
            assert d.bucket_digests(name) == m.bucket_digests(name)
            assert d.bucket_sizes(name) == m.bucket_sizes(name)
            assert d.table_names(db, now) == m.table_names(db, now)
            assert d.table_live(db, tbl, now) == m.table_live(db, tbl, now)
            assert d.count_live(db, tbl, now) == m.count_live(db, tbl, now)
            for prefix in (None, "k1", "k2", "k10", "zz"):
                assert d.read(db, tbl, now, prefix=prefix) == m.read(db, tbl, now,
                                                                    prefix=prefix)
            assert d.keys(db, tbl, now, suffix="7", limit=5, offset=2) == \
                m.keys(db, tbl, now, suffix="7", limit=5, offset=2)
            for page in ({"limit": 7, "offset": 3}, {"limit": 1}, {"prefix": "k1", "limit": 4},
                         {"contains": "2", "limit": 3, "offset": 1}, {"offset": 5}):
                assert d.keys(db, tbl, now, **page) == m.keys(db, tbl, now, **page)
                assert d.read(db, tbl, now, **page) == m.read(db, tbl, now, **page)
            some = sorted(random.Random(len(t.records)).sample(range(BUCKETS), 300))
            assert d.key_hashes(name, some) == m.key_hashes(name, some)
            for key in list(t.records)[:50]:
                assert d.get(db, tbl, key) == m.get(db, tbl, key)
                assert d.read(db, tbl, now, key=key) == m.read(db, tbl, now, key=key)
            assert list(d.tables[(db, tbl)].records.items()) == list(t.records.items())
        assert sorted(d.records.tombstones(now)) == sorted(m.records.tombstones(now))
        if not self.disk.pending and not self.disk.committing:  # (newest reads the file)
            for bound in (NOW - 4990, NOW - 4000, NOW + 10**9):  # a restarted clock's start
                assert d.records.newest(bound) == m.records.newest(bound)


def test_disk_records_answer_as_memory_before_during_and_after_commits(tmp_path):
    pair = Pair(tmp_path, cache_bytes=20_000)  # a few dozen records: most are evicted
    for i in range(600):
        pair.apply("d", "t" if i % 3 else "u", f"k{i}", _states(i))
    pair.check()  # everything pending
    rows, deleted = pair.disk.begin_commit()
    for i in range(0, 600, 7):  # changes while a commit runs
        pair.apply("d", "t" if i % 3 else "u", f"k{i}", _lww(10_000 + i, b"newer"))
    pair.drop("d", "t", "k5")
    pair.check()  # some committing, some pending
    pair.db.save(rows, deleted)
    pair.disk.end_commit()
    pair.check()
    pair.commit()
    assert pair.disk.pending == {} and pair.disk.committing == {}
    pair.check()  # all from disk and the cache
    pair.drop("d", "u", "k3")
    pair.apply("d", "t", "k1000", _lww(1, _value(1)))
    pair.check()  # a delete and an insert pending over committed rows
    pair.reopen(cache_bytes=0)
    pair.check()  # a restart: digests rebuilt from the file, every read from SQLite


def test_a_failed_commit_keeps_its_changes_readable_and_pending(tmp_path):
    pair = Pair(tmp_path, cache_bytes=0)
    pair.apply("d", "t", "a", _lww(1, b"one"))
    pair.commit()
    pair.apply("d", "t", "a", _lww(2, b"two"))
    pair.disk.begin_commit()
    pair.apply("d", "t", "a", _lww(3, b"three"))  # newer than the failed commit's
    pair.apply("d", "t", "b", _lww(4, b"four"))
    pair.disk.abort_commit()
    pair.check()
    rows, _ = pair.disk.begin_commit()
    assert sorted((r[2], r[3]["lww"][1]) for r in rows) == [("a", b"three"), ("b", b"four")]
    pair.db.save(rows, [])
    pair.disk.end_commit()
    pair.reopen(cache_bytes=0)
    pair.check()


def test_the_cache_stays_within_its_bound_and_evicted_reads_equal_cached_ones(tmp_path):
    bound = 200_000
    pair = Pair(tmp_path, cache_bytes=bound)
    for i in range(3000):
        pair.apply("d", "t", f"k{i}", _lww(i, _value(i)))
        pair.on_disk.get("d", "t", f"k{i}")  # read while pending: cached once committed
        if i % 100 == 99:
            pair.commit()
            assert pair.disk.cache.bytes <= bound
    pair.commit()
    cache = pair.disk.cache
    assert 0 < len(cache) < 3000 / 5, "the cache must hold a bounded part of the records"
    assert cache.bytes <= bound and cache.evictions > 0
    before = {f"k{i}": pair.on_disk.get("d", "t", f"k{i}") for i in range(3000)}
    assert cache.bytes <= bound, "reads fill the cache within its bound too"
    again = {f"k{i}": pair.on_disk.get("d", "t", f"k{i}") for i in reversed(range(3000))}
    assert before == again
    assert all(before[f"k{i}"] == _lww(i, _value(i)) for i in range(3000))


def test_the_least_recently_used_entry_is_evicted_first(tmp_path):
    pair = Pair(tmp_path, cache_bytes=10_000)
    for i in range(100):
        pair.apply("d", "t", f"k{i}", _lww(i, _value(i)))
    pair.commit()
    for i in range(100):
        pair.on_disk.get("d", "t", f"k{i}")  # read from disk: cached
    cache = pair.disk.cache
    held = [f"k{i}" for i in range(100) if ("d", "t", f"k{i}") in cache]
    assert held and len(held) < 100
    oldest = held[0]
    pair.on_disk.get("d", "t", oldest)  # used again: now the newest
    fresh = next(f"k{i}" for i in range(100) if ("d", "t", f"k{i}") not in cache)
    pair.on_disk.get("d", "t", fresh)  # read from disk: cached, evicting the oldest
    assert ("d", "t", oldest) in cache and ("d", "t", fresh) in cache
    assert ("d", "t", held[1]) not in cache


def test_a_scan_does_not_push_hot_records_out_of_the_cache(tmp_path):
    pair = Pair(tmp_path, cache_bytes=30_000)
    for i in range(500):
        pair.apply("d", "t", f"k{i:03d}", _lww(i, _value(i)))
    pair.commit()
    for i in range(0, 500, 25):
        pair.on_disk.get("d", "t", f"k{i:03d}")
    hot = {k for k in [("d", "t", f"k{i:03d}") for i in range(500)] if k in pair.disk.cache}
    assert hot
    assert len(pair.on_disk.read("d", "t", NOW)) == 500
    assert {k for k in hot if k in pair.disk.cache} == hot


def test_bucket_to_key_narrowing_reads_the_keys_of_a_bucket_from_sqlite(tmp_path):
    pair = Pair(tmp_path, cache_bytes=0)
    for i in range(2000):
        pair.apply("d", "t", f"k{i}", _lww(i, _value(i)))
    pair.commit()
    name = "d\x00t"
    buckets = sorted({bucket_of(f"k{i}") for i in range(0, 2000, 97)})
    got = pair.on_disk.key_hashes(name, buckets)
    assert got == pair.in_memory.key_hashes(name, buckets)
    assert {f"k{i}" for i in range(0, 2000, 97)} <= set(got)
    # what SQLite holds is what answered: nothing was pending or cached
    conn = sqlite3.connect(tmp_path / FILE)
    try:
        marks = ",".join("?" * len(buckets))
        rows = conn.execute(f"SELECT key, hash FROM records WHERE bucket IN ({marks})",
                            buckets).fetchall()
    finally:
        conn.close()
    assert {k: signed(h) for k, h in got.items()} == dict(rows)
    assert pair.on_disk.key_hashes(name, ["x", -1, BUCKETS]) == {}, "bad buckets: none"


def test_anti_entropy_between_disk_replicas_converges(tmp_path):
    from meshd.hlc import HLC
    from meshd.store.replication import StoreReplicator

    clock = {"ms": NOW}
    reps, dbs = {}, {}
    for n in ("a", "b"):
        (tmp_path / n).mkdir()
        dbs[n] = StoreDB(tmp_path / n / FILE)
        reps[n] = StoreReplicator(n, HLC(n, lambda: clock["ms"]), lambda: [],
                                  random.Random(n), 0.0, repair_keys=300,
                                  records=DiskRecords(dbs[n], 0))
    for i in range(3000):
        state = _lww(i, _value(i))
        for r in reps.values():
            r.state.apply("db", "t", f"k{i:05d}", state)
    for i in range(0, 3000, 5):  # 600 keys differ: more than one round of 300 hashes
        reps["a"].state.apply("db", "t", f"k{i:05d}", _lww(20_000 + i, b"new"))
    reps["b"].state.apply("db", "t", "only-b", _lww(1, b"b"))
    for r in reps.values():
        rows, deleted = r.state.records.begin_commit()
        r.state.records.db.save(rows, deleted)
        r.state.records.end_commit()
    queue = [("a", "b", {"t": "roots", "roots": reps["a"].state.roots()})]
    rounds = 0
    while queue:
        src, dst, msg = queue.pop(0)
        rounds += msg["t"] == "roots"
        queue += [(dst, x, m) for x, m in reps[dst].receive(src, msg, 0.0)]
    assert reps["a"].state.roots() == reps["b"].state.roots()
    assert rounds >= 2, "the repair had to be split into bounded rounds"
    assert reps["b"].state.get("db", "t", "k00005")["lww"][1] == b"new"
    assert reps["a"].state.get("db", "t", "only-b")["lww"][1] == b"b"
    # the repairs are committed, and read back from the files alone after a restart
    roots = reps["a"].state.roots()
    expected = reps["a"].state.read("db", "t", NOW)
    hashes = reps["a"].state.key_hashes("db\x00t", list(range(BUCKETS)))
    for n in ("a", "b"):
        records = reps[n].state.records
        rows, deleted = records.begin_commit()
        dbs[n].save(rows, deleted)
        records.end_commit()
        dbs[n].close()
        dbs[n] = StoreDB(tmp_path / n / FILE)
        reopened = StoreState(DiskRecords(dbs[n], 0))
        assert reopened.roots() == roots
        assert reopened.read("db", "t", NOW) == expected
        assert reopened.key_hashes("db\x00t", list(range(BUCKETS))) == hashes
    for db in dbs.values():
        db.close()


def test_tombstones_are_collected_from_disk(tmp_path):
    pair = Pair(tmp_path, cache_bytes=0)
    for i in range(50):
        pair.apply("d", "t", f"k{i}", _lww(i, None if i % 2 else b"x"))
    pair.commit()
    for state in (pair.on_disk, pair.in_memory):
        dropped = state.collect(NOW + 10_000, 1000)
        assert sorted(dropped) == sorted(("d", "t", f"k{i}") for i in range(1, 50, 2))
    pair.check(NOW + 10_000)
    pair.reopen(cache_bytes=0)
    assert pair.on_disk.get("d", "t", "k1") is None and pair.on_disk.tables[("d", "t")].count == 25


def test_a_schema_1_file_is_upgraded_with_its_hashes_filled_in(tmp_path):
    path = tmp_path / FILE
    conn = sqlite3.connect(path)
    conn.executescript("""
        PRAGMA application_id=1835365224; PRAGMA user_version=1;
        CREATE TABLE records (db TEXT NOT NULL, tbl TEXT NOT NULL, key TEXT NOT NULL,
            state BLOB NOT NULL, PRIMARY KEY (db, tbl, key)) WITHOUT ROWID;""")
    states = {f"k{i}": _states(i) for i in range(25)}
    conn.executemany("INSERT INTO records VALUES ('d', 't', ?, ?)",
                     [(k, cbor2.dumps(s)) for k, s in states.items()])
    conn.commit()
    conn.close()
    db = StoreDB(path)
    try:
        state = StoreState(DiskRecords(db, 0))
        mem = StoreState()
        for k, s in states.items():
            mem.apply("d", "t", k, s)
        assert state.roots() == mem.roots()
        assert state.key_hashes("d\x00t", list(range(BUCKETS))) == \
            {k: key_hash(k, s) for k, s in states.items()}
        assert state.read("d", "t", NOW) == mem.read("d", "t", NOW)
    finally:
        db.close()


def test_live_until_matches_live():
    from meshd.store.state import live

    for i in range(60):
        s = _states(i)
        for now in (NOW - 10**7, NOW, NOW + 10**7):
            assert (live_until(s) > now) == live(s, now)
    assert live_until(_lww(1, b"x", expiry=1 << 70)) == FOREVER


def _footprint(tmp_path: Path, keys: int) -> int:
    """Bytes Python holds for a disk-backed state of `keys` records, with no cache."""
    path = tmp_path / str(keys)
    path.mkdir()
    db = StoreDB(path / FILE)
    disk = DiskRecords(db, 0)
    state = StoreState(disk)
    for start in range(0, keys, 1000):
        for i in range(start, min(keys, start + 1000)):
            state.apply("d", "t", f"key-{i:07d}", _lww(i, _value(i)))
        rows, deleted = disk.begin_commit()
        db.save(rows, deleted)
        disk.end_commit()
    del state
    gc.collect()
    tracemalloc.start()
    try:
        state = StoreState(DiskRecords(db, 0))  # rebuilt from the file, as at a start
        for i in range(0, keys, 7):
            state.get("d", "t", f"key-{i:07d}")
        gc.collect()
        size = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        db.close()
    return size


def test_memory_does_not_grow_with_the_keys_of_a_table(tmp_path):
    # both sizes fill every bucket digest (a constant per table); a record kept in memory
    # costs hundreds of bytes, a key in a dict alone more than 50
    small, large = _footprint(tmp_path, 12_000), _footprint(tmp_path, 30_000)
    per_key = (large - small) / 18_000
    assert per_key < 8, f"{per_key:.0f} bytes of memory per key: records are held in memory"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["put", "drop", "commit", "begin", "end", "abort",
                                           "read"]),
                          st.integers(0, 30), st.integers(0, 59)), max_size=60),
       st.sampled_from([0, 3000, 1 << 20]))
def test_any_sequence_of_changes_and_commits_reads_the_same(ops: list[Any], cache: int):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        pair = Pair(Path(tmp), cache_bytes=cache)
        started: tuple[Any, Any] | None = None
        for op, k, i in ops:
            key = f"k{k}"
            if op == "put":
                pair.apply("d", "t", key, _states(i))
            elif op == "drop":
                pair.drop("d", "t", key)
            elif op == "commit" and started is None:
                pair.commit()
            elif op == "begin" and started is None:
                started = pair.disk.begin_commit()
            elif op == "end" and started is not None:
                pair.db.save(*started)
                pair.disk.end_commit()
                started = None
            elif op == "abort" and started is not None:  # the save failed
                pair.disk.abort_commit()
                started = None
            elif op == "read":  # a client read: fills the cache
                pair.on_disk.get("d", "t", key)
            pair.check()
            for (db, tbl, ckey), (entry, _) in pair.disk.cache._items.items():
                on_disk = pair.db.get(db, tbl, ckey)  # the cache holds what is on disk
                assert on_disk is not None and cbor2.loads(on_disk[0]) == entry.state \
                    and on_disk[1] == entry.hash
        if started is not None:
            pair.db.save(*started)
            pair.disk.end_commit()
        pair.reopen(cache)
        pair.check()
        pair.db.close()


def test_a_negative_cache_size_is_refused():
    from meshd.settings import SettingsError, load_settings
    from meshd.store.cache import RecordCache

    with pytest.raises(ValueError, match="negative"):
        RecordCache(-1)
    with pytest.raises(SettingsError, match=r"store\.cache_bytes"):
        load_settings({"store": {"cache_bytes": -5}})


def test_a_far_behind_replica_catches_up_in_bounded_rounds_without_filling_the_cache(
        tmp_path, monkeypatch):
    from meshd.hlc import HLC
    from meshd.store import replication
    from meshd.store.replication import StoreReplicator

    monkeypatch.setattr(replication, "CHUNK_KEYS", 100)  # many chunks of our key hashes
    reps, dbs = {}, {}
    for n in ("a", "b"):
        (tmp_path / n).mkdir()
        dbs[n] = StoreDB(tmp_path / n / FILE)
        reps[n] = StoreReplicator(n, HLC(n, lambda: NOW), lambda: [], random.Random(n), 0.0,
                                  repair_keys=500, repair_bytes=40_000,
                                  records=DiskRecords(dbs[n], 60_000))
    a = reps["a"]
    for i in range(3000):
        a.state.apply("db", "t", f"k{i:05d}", _lww(i, _value(i)))
    rows, deleted = a.state.records.begin_commit()
    dbs["a"].save(rows, deleted)
    a.state.records.end_commit()
    hot = [("db", "t", f"k{i:05d}") for i in range(10)]
    for _, _, key in hot:
        a.state.get("db", "t", key)
    assert all(k in a.state.records.cache for k in hot)
    for _ in range(100):
        if reps["b"].state.roots() == a.state.roots():
            break
        queue = [("b", "a", m) for _, m in reps["b"].sync_with("a")]
        while queue:
            src, dst, msg = queue.pop(0)
            if msg["t"] == "keys":
                assert len(msg["tables"].get("db\x00t", {}).get("k", {})) <= 500
            assert sum(len(e[3]["lww"][1]) for e in msg.get("e", [])) <= 40_000
            queue += [(dst, x, m) for x, m in reps[dst].receive(src, msg, 0.0)]
    assert reps["b"].state.roots() == a.state.roots()
    assert reps["b"].state.read("db", "t", NOW) == a.state.read("db", "t", NOW)
    assert all(k in a.state.records.cache for k in hot), "repair reads filled the cache"
    for db in dbs.values():
        db.close()
