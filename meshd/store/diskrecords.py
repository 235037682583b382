"""Store entries on disk (records.Records): SQLite holds them, memory holds a bounded part.

Rules:
- Memory holds three things only: changes not committed yet (`pending`: a put or a delete
  per key, newest wins), the changes the running commit is writing (`committing`), and a
  bounded LRU cache (cache.py) of entries equal to what is on disk. A read looks in that
  order, then in SQLite (and caches what it found there, unless asked not to: `fill`
  False, for the reads of merges and tombstone GC, which are no use of the record).
- The owner commits: `begin_commit` hands over the pending changes (they stay readable as
  `committing`), the owner writes them with StoreDB.save in a worker thread, then calls
  `end_commit`, which puts back in the cache those that were in use: keys cached when
  written, or read while pending (`hot`); the rest only leave memory, so a bulk write, a
  catch-up or a repair does not push the hot records out. If the save failed,
  `abort_commit` puts them back in front of anything newer. Nothing is acknowledged before
  its commit, as before: a kill -9 loses only what no one was told is stored.
- Every query that SQLite answers is corrected by the changes in memory (pending, then
  committing shadow the disk), so reads see every write at once, committed or not.
- All of it runs on the event loop's thread except StoreDB.save (its own connection).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import cbor2

from .cache import RecordCache
from .persist import Row, StoreDB
from .records import Entry, bucket_of, live_until, tombstone_wall

Change = Entry | None  # None: deleted
Changes = dict[tuple[str, str], dict[str, Change]]
PAGE = 500  # keys whose rows are read with one query in `rows`


class DiskRecords:
    def __init__(self, db: StoreDB, cache_bytes: int) -> None:
        self.db = db
        self.cache = RecordCache(cache_bytes)
        self.pending: Changes = {}
        self.committing: Changes = {}
        # keys of uncommitted changes to cache once committed: they were in use
        self.hot: set[tuple[str, str, str]] = set()
        # set before the summary scan at start: the scan also finds `newest(newest_bound)`
        # (no second scan of the whole file)
        self.newest_bound: int | None = None
        self._newest: tuple[int | None, tuple[int, int] | None] = (None, None)

    # --- reads and writes -----------------------------------------------------------------

    def _change(self, db: str, tbl: str, key: str) -> tuple[bool, Change]:
        """(found, change) of the newest uncommitted change of the key."""
        for layer in (self.pending, self.committing):
            t = layer.get((db, tbl))
            if t is not None and key in t:
                return True, t[key]
        return False, None

    def get(self, db: str, tbl: str, key: str, fill: bool = True) -> Entry | None:
        ck = (db, tbl, key)
        if self.pending or self.committing:
            found, change = self._change(db, tbl, key)
            if found:
                if fill and change is not None:
                    self.hot.add(ck)
                return change
        entry = self.cache.get(ck) if fill else self.cache.peek(ck)
        if entry is not None:
            return entry
        row = self.db.get(db, tbl, key)
        if row is None:
            return None
        entry = Entry(cbor2.loads(row[0]), row[1])
        if fill:
            self.cache.add(ck, entry)
        return entry

    def put(self, db: str, tbl: str, key: str, entry: Entry) -> None:
        ck = (db, tbl, key)
        if ck in self.cache:
            self.cache.discard(ck)
            self.hot.add(ck)
        self.pending.setdefault((db, tbl), {})[key] = entry

    def delete(self, db: str, tbl: str, key: str) -> None:
        ck = (db, tbl, key)
        self.cache.discard(ck)
        self.hot.discard(ck)
        self.pending.setdefault((db, tbl), {})[key] = None

    # --- commits --------------------------------------------------------------------------

    def dirty(self) -> bool:
        return bool(self.pending)

    def begin_commit(self) -> tuple[list[Row], list[tuple[str, str, str]]]:
        """The pending changes as (rows to write, keys to delete), now `committing`."""
        for name, t in self.pending.items():
            self.committing.setdefault(name, {}).update(t)
        self.pending = {}
        rows, deleted = [], []
        for (db, tbl), t in self.committing.items():
            for key, change in t.items():
                if change is None:
                    deleted.append((db, tbl, key))
                else:
                    rows.append((db, tbl, key, change.state, change.hash))
        return rows, deleted

    def end_commit(self) -> None:
        """The commit of what `begin_commit` handed over is on disk: the changed keys that
        were in use go back in the cache (unless changed again since)."""
        done, self.committing = self.committing, {}
        hot = self.hot
        if not hot:
            return
        for (db, tbl), t in done.items():
            newer = self.pending.get((db, tbl), {})
            for key, change in t.items():
                ck = (db, tbl, key)
                if ck in hot and key not in newer:
                    hot.discard(ck)
                    if change is not None:
                        self.cache.add(ck, change)

    def abort_commit(self) -> None:
        """The commit failed: its changes are pending again (behind newer ones)."""
        failed, self.committing = self.committing, {}
        for name, t in failed.items():
            self.pending[name] = {**t, **self.pending.get(name, {})}

    # --- queries --------------------------------------------------------------------------

    def _changes(self, db: str, tbl: str) -> dict[str, Change]:
        """The table's uncommitted changes, newest winning."""
        out = dict(self.committing.get((db, tbl), {}))
        out.update(self.pending.get((db, tbl), {}))
        return out

    def summary(self) -> Iterator[tuple[str, str, int, int, int]]:
        if self.pending or self.committing:
            raise RuntimeError("summary is for a freshly opened store")
        if self.newest_bound is None:
            return self.db.summary()
        return self._summary(self.newest_bound)

    def _summary(self, bound: int) -> Iterator[tuple[str, str, int, int, int]]:
        best: tuple[int, int] | None = None
        for db, tbl, bucket, h, until, wall, cnt in self.db.summary_times():
            if wall is not None and wall <= bound and (best is None or (wall, cnt) > best):
                best = (wall, cnt)
            yield db, tbl, bucket, h, until
        self._newest = (bound, best)

    def keys(self, db: str, tbl: str, prefix: str | None = None,
             live_at: int | None = None, stop: int = 0,
             match: Callable[[str], bool] | None = None) -> list[str]:
        changes = {k: c for k, c in self._changes(db, tbl).items()
                   if (prefix is None or k.startswith(prefix))
                   and (match is None or match(k))}
        # each change hides at most one key on disk: the first stop + len(changes) on disk
        # hold the first `stop` of what is left of them
        found = self.db.keys(db, tbl, prefix, live_at, stop + len(changes) if stop else 0,
                             match)
        if not changes:
            return found
        keep = set(found)
        for key, change in changes.items():
            if change is None or (live_at is not None and live_until(change.state) <= live_at):
                keep.discard(key)
            else:
                keep.add(key)
        out = sorted(keep)
        return out[:stop] if stop else out

    def rows(self, db: str, tbl: str, keys: Iterable[str]) -> list[tuple[str, Entry]]:
        keys = list(keys)
        changes = self._changes(db, tbl)
        out = []
        for i in range(0, len(keys), PAGE):
            page = keys[i:i + PAGE]
            stored = self.db.many(db, tbl, [k for k in page if k not in changes
                                            and (db, tbl, k) not in self.cache])
            for key in page:
                if key in changes:
                    change = changes[key]
                else:
                    change = self.cache.peek((db, tbl, key))
                    if change is None and key in stored:
                        blob, h = stored[key]
                        change = Entry(cbor2.loads(blob), h)
                if change is not None:
                    out.append((key, change))
        return out

    def hashes(self, db: str, tbl: str, buckets: Iterable[int]) -> dict[str, int]:
        wanted = sorted(set(buckets))
        out = self.db.hashes(db, tbl, wanted)
        chosen = set(wanted)
        for key, change in self._changes(db, tbl).items():
            if bucket_of(key) not in chosen:
                continue
            if change is None:
                out.pop(key, None)
            else:
                out[key] = change.hash
        return out

    def any_live(self, db: str, tbl: str, now: int) -> bool:
        changes = self._changes(db, tbl)
        if any(c is not None and live_until(c.state) > now for c in changes.values()):
            return True
        # more live keys on disk than changes: one of them is not shadowed by a change
        return any(k not in changes for k in self.db.live_keys(db, tbl, now, len(changes) + 1))

    def count_live(self, db: str, tbl: str, now: int) -> int:
        changes = self._changes(db, tbl)
        if not changes:
            return self.db.count_live(db, tbl, now)
        n, untils = self.db.count_live_except(db, tbl, now, list(changes))
        for key, change in changes.items():
            on_disk = untils.get(key)
            n -= on_disk is not None and on_disk > now
            n += change is not None and live_until(change.state) > now
        return n

    def tombstones(self, before: int, skip: frozenset[str] = frozenset(),
                   limit: int = 0) -> list[tuple[str, str, str]]:
        changed: set[tuple[str, str, str]] = set()
        out = []
        for (db, tbl) in {*self.pending, *self.committing}:
            if db in skip:
                continue
            for key, change in self._changes(db, tbl).items():
                changed.add((db, tbl, key))
                wall = None if change is None else tombstone_wall(change.state)
                if wall is not None and wall < before:
                    out.append((db, tbl, key))
        # each change hides at most one of those on disk
        out += [k for k in self.db.tombstones(before, skip,
                                              limit + len(changed) if limit else 0)
                if k not in changed]
        return out[:limit] if limit else out

    def newest(self, max_wall: int) -> tuple[int, int] | None:
        """The newest register timestamp on disk at or before `max_wall` (see StoreDB)."""
        bound, found = self._newest
        if bound == max_wall and not self.pending and not self.committing:
            return found  # the summary scan found it
        return self.db.newest(max_wall)
