"""Store entries kept in memory (records.Records): the simulator's and the tests' backend.

Rules:
- Plain dicts per table; nothing is durable. Tombstones are indexed apart (by table, key:
  the time written), so a collection looks at them alone, not at every record. Each key's
  bucket is kept beside it (a bucket's hashes are read by anti-entropy without hashing
  every key of the table again).
- Answers exactly what diskrecords.DiskRecords answers for the same puts and deletes
  (tests/unit/store/test_records.py runs both).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from .records import Entry, bucket_of, live_until, tombstone_wall


class MemoryRecords:
    def __init__(self) -> None:
        self._tables: dict[tuple[str, str], dict[str, Entry]] = {}
        self._tombs: dict[tuple[str, str], dict[str, int]] = {}
        self._buckets: dict[tuple[str, str], dict[str, int]] = {}

    def copy(self) -> MemoryRecords:
        """Another backend holding the same entries (the simulator's disk, read back by a
        node that restarts)."""
        out = MemoryRecords()
        out._tables = {k: dict(t) for k, t in self._tables.items()}
        out._tombs = {k: dict(t) for k, t in self._tombs.items()}
        out._buckets = {k: dict(t) for k, t in self._buckets.items()}
        return out

    def get(self, db: str, tbl: str, key: str, fill: bool = True) -> Entry | None:
        t = self._tables.get((db, tbl))
        return None if t is None else t.get(key)

    def put(self, db: str, tbl: str, key: str, entry: Entry) -> None:
        t = self._tables.setdefault((db, tbl), {})
        if key not in t:
            self._buckets.setdefault((db, tbl), {})[key] = bucket_of(key)
        t[key] = entry
        wall = tombstone_wall(entry.state)
        if wall is not None:
            self._tombs.setdefault((db, tbl), {})[key] = wall
        else:
            self._untomb(db, tbl, key)

    def _untomb(self, db: str, tbl: str, key: str) -> None:
        tombs = self._tombs.get((db, tbl))
        if tombs is not None and tombs.pop(key, None) is not None and not tombs:
            del self._tombs[(db, tbl)]

    def delete(self, db: str, tbl: str, key: str) -> None:
        t = self._tables.get((db, tbl))
        if t is not None:
            if t.pop(key, None) is not None:
                del self._buckets[(db, tbl)][key]
            self._untomb(db, tbl, key)
            if not t:
                del self._tables[(db, tbl)]
                del self._buckets[(db, tbl)]

    def newest(self, max_wall: int) -> tuple[int, int] | None:
        """The newest (wall, count) of a register at or before `max_wall` (a scan)."""
        best: tuple[int, int] | None = None
        for t in self._tables.values():
            for e in t.values():
                reg = e.state.get("lww")
                if reg is not None and reg[0][0] <= max_wall:
                    ts = (reg[0][0], reg[0][1])
                    if best is None or ts > best:
                        best = ts
        return best

    def summary(self) -> Iterator[tuple[str, str, int, int, int]]:
        for (db, tbl), t in self._tables.items():
            of = self._buckets[(db, tbl)]
            for key, e in t.items():
                yield db, tbl, of[key], e.hash, live_until(e.state)

    def keys(self, db: str, tbl: str, prefix: str | None = None,
             live_at: int | None = None, stop: int = 0,
             match: Callable[[str], bool] | None = None) -> list[str]:
        t = self._tables.get((db, tbl), {})
        out = sorted(k for k, e in t.items()
                     if (prefix is None or k.startswith(prefix))
                     and (live_at is None or live_until(e.state) > live_at)
                     and (match is None or match(k)))
        return out[:stop] if stop else out

    def rows(self, db: str, tbl: str, keys: Iterable[str]) -> list[tuple[str, Entry]]:
        t = self._tables.get((db, tbl), {})
        return [(k, t[k]) for k in keys if k in t]

    def hashes(self, db: str, tbl: str, buckets: Iterable[int]) -> dict[str, int]:
        wanted = set(buckets)
        of = self._buckets.get((db, tbl), {})
        return {k: e.hash for k, e in self._tables.get((db, tbl), {}).items()
                if of[k] in wanted}

    def any_live(self, db: str, tbl: str, now: int) -> bool:
        return any(live_until(e.state) > now for e in self._tables.get((db, tbl), {}).values())

    def count_live(self, db: str, tbl: str, now: int) -> int:
        return sum(1 for e in self._tables.get((db, tbl), {}).values()
                   if live_until(e.state) > now)

    def tombstones(self, before: int, skip: frozenset[str] = frozenset(),
                   limit: int = 0) -> list[tuple[str, str, str]]:
        out = []
        for (db, tbl), t in self._tombs.items():
            if db in skip:
                continue
            for key, wall in t.items():
                if wall < before:
                    out.append((db, tbl, key))
                    if len(out) == limit:
                        return out
        return out
