"""What the store keeps per key, and the interface of where it is kept (sans-IO).

Rules:
- An entry is a key's merged CRDT state and its 64-bit hash of (key, canonical state);
  the hash is what anti-entropy compares. Keys fall in one of BUCKETS buckets by a hash of
  the key alone.
- Derived per entry (`columns`), so a backend can answer without decoding states:
  `until`: the key is live (reads show it) iff until > now (ms) — FOREVER for a value
  without expiry, a live counter or a non-empty set; the expiry of a value that has one;
  DEAD (below any time) when nothing is live. `tomb`: the write time of a pure LWW
  tombstone (what tombstone GC drops), else None.
- A backend (`Records`) holds entries of every (database, table): in memory
  (memrecords.MemoryRecords: the simulator, tests) or in SQLite behind a bounded cache
  (diskrecords.DiskRecords: the daemon). Both answer every call identically; keys always
  come back sorted by code point (what SQLite's BINARY order of UTF-8 text is too).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, Protocol

import cbor2

from . import crdt

BUCKETS = 4096
FOREVER = 1 << 62  # an `until` no clock reaches
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
DEAD = INT64_MIN  # the `until` of a key with nothing live


class Entry(NamedTuple):
    state: crdt.State
    hash: int
    until: int | None = None  # live_until(state), when known (StoreState.apply keeps it)


class Columns(NamedTuple):
    bucket: int
    until: int
    tomb: int | None
    wall: int | None
    count: int | None


def key_hash(key: str, state: crdt.State) -> int:
    """blake2b-64 of the key and the canonical CBOR of its canonical state. A state with
    no LWW register (counters and sets: the big ones) is laid out in canonical order here
    and encoded plainly, which gives the same bytes faster (tests/unit/store/
    test_key_hash.py checks both ways agree); a register's metadata may hold anything, so
    a state with one goes the general way."""
    if "lww" in state:
        body = cbor2.dumps(crdt.canonical(state), canonical=True)
    else:
        body = cbor2.dumps(_ordered(state))
    data = key.encode() + b"\x00" + body
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _canonical_key(k: str) -> tuple[int, bytes]:
    """Canonical CBOR's order of text keys: shorter encoding first, then bytewise."""
    b = k.encode()
    return (len(b), b)


def _canonical_order(keys: Iterable[str]) -> list[str]:
    """`keys` in canonical CBOR's order. Keys all ASCII (node ids, the common case) are
    sorted plainly, then stably by length: their length is their encoding's, and code
    point order is byte order (no key function encodes each one)."""
    out = sorted(keys)
    if all(map(str.isascii, out)):
        out.sort(key=len)
    else:
        out.sort(key=_canonical_key)
    return out


def _ordered(state: crdt.State) -> dict[str, object]:
    """crdt.canonical(state) for a state without "lww", its maps in canonical key order."""
    out: dict[str, object] = {}
    s = state.get("set")
    if s is not None:  # ("set" sorts before "counter": shorter)
        adds = s["adds"]
        out["set"] = {"adds": {e: sorted(set(adds[e])) for e in _canonical_order(adds)},
                      "removed": sorted(set(s["removed"]))}
    c = state.get("counter")
    if c is not None:
        out["counter"] = {part: {n: m[n] for n in _canonical_order(m) if m[n]}
                          for part in ("n", "p", "bn", "bp") for m in (c[part],)}
    return out


def bucket_of(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(),
                          "big") % BUCKETS


def live_until(state: crdt.State) -> int:
    """The time (ms) until which `state` is live (see the rules)."""
    if crdt.counter_live(state.get("counter")) or crdt.set_live(state.get("set")):
        return FOREVER
    reg = state.get("lww")
    if reg is None or reg[1] is None:
        return DEAD
    return FOREVER if reg[3] is None else clamp(min(reg[3], FOREVER))


def tombstone_wall(state: crdt.State) -> int | None:
    """When a pure LWW tombstone was written (ms), else None."""
    reg = state.get("lww")
    if reg is not None and reg[1] is None and len(state) == 1:
        return clamp(reg[0][0])
    return None


def columns(key: str, state: crdt.State) -> Columns:
    reg = state.get("lww")
    return Columns(bucket_of(key), live_until(state), tombstone_wall(state),
                   None if reg is None else clamp(reg[0][0]),
                   None if reg is None else clamp(reg[0][1]))


def clamp(n: int) -> int:
    """An integer SQLite can hold (a peer may send any CBOR integer)."""
    return max(INT64_MIN, min(INT64_MAX, n))


class Records(Protocol):
    """Where a store's entries live. Writes (`put`, `delete`) are visible to every read at
    once; a disk backend makes them durable when its owner commits."""

    def get(self, db: str, tbl: str, key: str, fill: bool = True) -> Entry | None:
        """The key's entry (kept in a cache for the next read unless `fill` is False: the
        reads of merges and tombstone GC must not push the hot records out)."""

    def put(self, db: str, tbl: str, key: str, entry: Entry) -> None: ...

    def delete(self, db: str, tbl: str, key: str) -> None: ...

    def summary(self) -> Iterator[tuple[str, str, int, int, int]]:
        """(db, tbl, bucket, hash, until) of every entry, any order: what the digests and
        counts in memory are rebuilt from."""

    def keys(self, db: str, tbl: str, prefix: str | None = None,
             live_at: int | None = None, stop: int = 0,
             match: Callable[[str], bool] | None = None) -> list[str]:
        """The table's keys starting with `prefix`, sorted; only those live at `live_at`
        (ms) when given, and those `match` accepts; the first `stop` of them if not 0."""

    def rows(self, db: str, tbl: str, keys: Iterable[str]) -> list[tuple[str, Entry]]:
        """The entries of those of `keys` that exist, in that order, without filling the
        cache (a scan or a repair must not push the hot keys out)."""

    def hashes(self, db: str, tbl: str, buckets: Iterable[int]) -> dict[str, int]:
        """key -> hash of the table's keys in `buckets`."""

    def any_live(self, db: str, tbl: str, now: int) -> bool: ...

    def count_live(self, db: str, tbl: str, now: int) -> int: ...

    def tombstones(self, before: int, skip: frozenset[str] = frozenset(),
                   limit: int = 0) -> list[tuple[str, str, str]]:
        """(db, tbl, key) of pure LWW tombstones written before `before` (ms), none in the
        databases named in `skip`; at most `limit` of them if not 0."""
