"""Store state (sans-IO): databases of tables of CRDT records, with Merkle-style digests.

Rules:
- `apply` merges a remote or local state into a key; it reports whether anything changed.
- The entries (state and hash per key) live in a records.Records backend: on disk behind a
  bounded cache in the daemon (diskrecords.py), in memory in the simulator and tests
  (memrecords.py). What is kept here in memory per table does not grow with its keys
  beyond counts: BUCKETS bucket digests (xor of the hashes of the keys in the bucket) and
  key counts per bucket, the root (count, xor), and how many keys are live whatever the
  time (`steady`: reads ask the backend whether a table exists only when none is).
- Two replicas hold the same table iff its root matches; a differing root narrows to the
  differing buckets, then (asking the backend for the keys of those buckets) to the
  differing keys, so repair traffic grows with the difference, not with the data.
- Reads never return expired or deleted records. Deleted LWW records (tombstones) are dropped
  once older than the grace period; until then they win against older writes everywhere.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import crdt
from .memrecords import MemoryRecords
from .records import BUCKETS, FOREVER, Entry, Records, bucket_of, key_hash, live_until

PAGE = 500  # states a table's iteration reads at once
COLLECT_MAX = 5000  # tombstones one collection drops at most (the next tick drops more)

__all__ = ["BUCKETS", "StoreState", "Table", "bucket_of", "key_hash", "live", "split_name",
           "view"]


@dataclass
class Table:
    """What memory holds of one table (its entries are in the backend: `records`)."""

    records: Mapping[str, crdt.State]
    # unboxed: 48 kB per table (lists of ints took 67 kB)
    buckets: array[int] = field(default_factory=lambda: array("Q", bytes(8 * BUCKETS)))
    sizes: array[int] = field(default_factory=lambda: array("I", bytes(4 * BUCKETS)))
    count: int = 0
    xor: int = 0
    steady: int = 0

    def root(self) -> list[int]:
        return [self.count, self.xor]

    def add(self, bucket: int, h: int, until: int, sign: int) -> None:
        """Count an entry in (sign 1) or out (sign -1)."""
        self.buckets[bucket] ^= h
        self.xor ^= h
        self.sizes[bucket] += sign
        self.count += sign
        self.steady += sign * (until >= FOREVER)


class TableView(Mapping[str, crdt.State]):
    """A table's states by key, read from the backend (iterating lists the keys first and
    reads their states page by page, without filling the cache)."""

    def __init__(self, state: StoreState, db: str, tbl: str) -> None:
        self._state, self._db, self._tbl = state, db, tbl

    def __getitem__(self, key: str) -> crdt.State:
        e = self._state.records.get(self._db, self._tbl, key)
        if e is None:
            raise KeyError(key)
        return e.state

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and \
            self._state.records.get(self._db, self._tbl, key) is not None

    def __len__(self) -> int:
        t = self._state.tables.get((self._db, self._tbl))
        return 0 if t is None else t.count

    def __iter__(self) -> Iterator[str]:
        return iter(self._state.records.keys(self._db, self._tbl))

    def items(self) -> Iterator[tuple[str, crdt.State]]:  # type: ignore[override]
        keys = self._state.records.keys(self._db, self._tbl)
        for i in range(0, len(keys), PAGE):
            for k, e in self._state.records.rows(self._db, self._tbl, keys[i:i + PAGE]):
                yield k, e.state

    def values(self) -> Iterator[crdt.State]:  # type: ignore[override]
        return (s for _, s in self.items())


def live(state: crdt.State | None, now_ms: int) -> bool:
    if not state:
        return False
    reg = state.get("lww")
    if reg is not None and reg[1] is not None and (reg[3] is None or reg[3] > now_ms):
        return True
    return crdt.counter_live(state.get("counter")) or crdt.set_live(state.get("set"))


def view(key: str, state: crdt.State, now_ms: int) -> dict[str, Any]:
    """A record as the API shows it."""
    out: dict[str, Any] = {"key": key}
    reg = state.get("lww")
    if reg is not None and reg[1] is not None and (reg[3] is None or reg[3] > now_ms):
        out.update({"value": reg[1], "metadata": reg[2], "expiry": reg[3],
                    "written_by": reg[0][2], "version": [reg[0][0], reg[0][1]]})
    if crdt.counter_live(state.get("counter")):
        out["counter"] = crdt.counter_value(state.get("counter"))
    members = crdt.set_members(state.get("set"))
    if members:
        out["members"] = members
    return out


class StoreState:
    def __init__(self, records: Records | None = None) -> None:
        self.records: Records = records if records is not None else MemoryRecords()
        self.tables: dict[tuple[str, str], Table] = {}
        for db, tbl, bucket, h, until in self.records.summary():
            self._table(db, tbl).add(bucket, h, until, 1)

    def _table(self, db: str, tbl: str) -> Table:
        t = self.tables.get((db, tbl))
        if t is None:
            t = self.tables[(db, tbl)] = Table(TableView(self, db, tbl))
        return t

    def table(self, db: str, tbl: str) -> Table | None:
        return self.tables.get((db, tbl))

    def get(self, db: str, tbl: str, key: str) -> crdt.State | None:
        if (db, tbl) not in self.tables:
            return None
        e = self.records.get(db, tbl, key)
        return None if e is None else e.state

    def apply(self, db: str, tbl: str, key: str, state: crdt.State) -> crdt.State | None:
        """Merge `state` into the key; the merged state if it changed, else None."""
        old = self.records.get(db, tbl, key, fill=False) if (db, tbl) in self.tables \
            else None
        merged = crdt.merge(None if old is None else old.state, state)
        if old is not None and merged == old.state:
            return None  # (cheaper than hashing it to find the same)
        new_hash = key_hash(key, merged)
        if old is not None and old.hash == new_hash:
            return None
        t = self._table(db, tbl)
        b = bucket_of(key)
        if old is not None:
            t.add(b, old.hash, _until(old), -1)
        until = live_until(merged)
        t.add(b, new_hash, until, 1)
        self.records.put(db, tbl, key, Entry(merged, new_hash, until))
        return merged

    def drop(self, db: str, tbl: str, key: str) -> None:
        t = self.tables.get((db, tbl))
        old = None if t is None else self.records.get(db, tbl, key, fill=False)
        if t is None or old is None:
            return
        t.add(bucket_of(key), old.hash, _until(old), -1)
        self.records.delete(db, tbl, key)
        if not t.count:
            del self.tables[(db, tbl)]

    # --- queries ---------------------------------------------------------------------------

    def table_live(self, db: str, tbl: str, now_ms: int) -> bool:
        """Whether the table holds a live record."""
        t = self.tables.get((db, tbl))
        return t is not None and (t.steady > 0 or self.records.any_live(db, tbl, now_ms))

    def databases(self, now_ms: int) -> list[str]:
        return sorted({db for (db, tbl) in self.tables if self.table_live(db, tbl, now_ms)})

    def table_names(self, db: str, now_ms: int) -> list[str]:
        return sorted(tbl for (d, tbl) in self.tables
                      if d == db and self.table_live(d, tbl, now_ms))

    def count_live(self, db: str, tbl: str, now_ms: int) -> int:
        return self.records.count_live(db, tbl, now_ms) if (db, tbl) in self.tables else 0

    def keys(self, db: str, tbl: str, now_ms: int, prefix: str | None = None,
             suffix: str | None = None, limit: int = 0, offset: int = 0,
             contains: str | None = None) -> list[str]:
        """Live keys, sorted, filtered, then paged."""
        if (db, tbl) not in self.tables:
            return []
        # a page reads no further than its end
        stop = offset + limit if limit > 0 and offset >= 0 else 0
        keys = self.records.keys(db, tbl, prefix, now_ms, stop, _matcher(suffix, contains))
        keys = keys[offset:]
        return keys[:limit] if limit else keys

    def read(self, db: str, tbl: str, now_ms: int, key: str | None = None,
             prefix: str | None = None, suffix: str | None = None, limit: int = 0,
             offset: int = 0, contains: str | None = None) -> list[tuple[str, crdt.State]]:
        if key is not None:
            s = self.get(db, tbl, key)
            return [(key, s)] if s is not None and live(s, now_ms) else []
        keys = self.keys(db, tbl, now_ms, prefix, suffix, limit, offset, contains)
        return [(k, e.state) for k, e in self.records.rows(db, tbl, keys)]

    # --- digests ---------------------------------------------------------------------------

    def roots(self) -> dict[str, list[int]]:
        return {f"{db}\x00{tbl}": t.root() for (db, tbl), t in self.tables.items()}

    def bucket_digests(self, name: str) -> list[int]:
        t = self.tables.get(split_name(name))
        return list(t.buckets) if t is not None else [0] * BUCKETS

    def bucket_sizes(self, name: str) -> list[int]:
        """How many keys each bucket of the table holds."""
        t = self.tables.get(split_name(name))
        return list(t.sizes) if t is not None else [0] * BUCKETS

    def bucket_chunks(self, name: str, buckets: list[Any], most: int) -> list[list[int]]:
        """The valid ones of `buckets`, each once, in runs holding at most `most` keys of
        the table (a bucket holding more is a run of its own). A peer naming one bucket
        many times gets it read once."""
        sizes = self.bucket_sizes(name)
        chunks: list[list[int]] = [[]]
        held = 0
        for b in dict.fromkeys(b for b in buckets if type(b) is int and 0 <= b < BUCKETS):
            if chunks[-1] and held + sizes[b] > most:
                chunks.append([])
                held = 0
            chunks[-1].append(b)
            held += sizes[b]
        return [c for c in chunks if c]

    def peek(self, db: str, tbl: str, keys: list[str]) -> list[tuple[str, crdt.State]]:
        """The states of those of `keys` the table holds, in their order, without filling
        the backend's cache (repair traffic must not push the hot records out)."""
        if (db, tbl) not in self.tables:
            return []
        return [(k, e.state) for k, e in self.records.rows(db, tbl, keys)]

    def key_hashes(self, name: str, buckets: list[int]) -> dict[str, int]:
        db, tbl = split_name(name)
        if (db, tbl) not in self.tables:
            return {}
        return self.records.hashes(db, tbl, [b for b in buckets
                                            if type(b) is int and 0 <= b < BUCKETS])

    def collect(self, now_ms: int, grace_ms: int, keep: frozenset[str] = frozenset(),
                dropped: list[tuple[str, str, str]] | None = None
                ) -> list[tuple[str, str, str]]:
        """Drop LWW tombstones older than the grace period (and nothing else on the key),
        except in the databases named in `keep`, at most COLLECT_MAX at once; returns (and
        appends to `dropped`, so a caller sees what was dropped before a backend failure)
        the keys dropped."""
        if dropped is None:
            dropped = []
        for db, tbl, key in self.records.tombstones(now_ms - grace_ms, keep, COLLECT_MAX):
            self.drop(db, tbl, key)
            dropped.append((db, tbl, key))
        return dropped


def _until(e: Entry) -> int:
    return live_until(e.state) if e.until is None else e.until


def _matcher(suffix: str | None, contains: str | None) -> Callable[[str], bool] | None:
    """The test of a key's suffix and contents, None when neither is asked."""
    if suffix is None and contains is None:
        return None

    def match(k: str) -> bool:
        return (suffix is None or k.endswith(suffix)) and (contains is None or contains in k)
    return match


def split_name(name: str) -> tuple[str, str]:
    db, _, tbl = name.partition("\x00")
    return db, tbl
