"""Store state (sans-IO): databases of tables of CRDT records, with Merkle-style digests.

Rules:
- `apply` merges a remote or local state into a key; it reports whether anything changed.
- Each table keeps, per key, a 64-bit hash of (key, canonical state), and BUCKETS bucket
  digests (xor of the hashes of the keys in the bucket), updated incrementally. Two replicas
  hold the same table iff its root (count, xor) matches; a differing root narrows to the
  differing buckets, then to the differing keys, so repair traffic grows with the difference,
  not with the data.
- Reads never return expired or deleted records. Deleted LWW records (tombstones) are dropped
  once older than the grace period; until then they win against older writes everywhere.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import cbor2

from . import crdt

BUCKETS = 4096


def key_hash(key: str, state: crdt.State) -> int:
    data = key.encode() + b"\x00" + cbor2.dumps(crdt.canonical(state), canonical=True)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def bucket_of(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(),
                          "big") % BUCKETS


@dataclass
class Table:
    records: dict[str, crdt.State] = field(default_factory=dict)
    hashes: dict[str, int] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * BUCKETS)
    xor: int = 0

    def root(self) -> list[int]:
        return [len(self.records), self.xor]


def live(state: crdt.State | None, now_ms: int) -> bool:
    if not state:
        return False
    reg = state.get("lww")
    if reg is not None and reg[1] is not None and (reg[3] is None or reg[3] > now_ms):
        return True
    return crdt.counter_live(state.get("counter")) or bool(crdt.set_members(state.get("set")))


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
    def __init__(self) -> None:
        self.tables: dict[tuple[str, str], Table] = {}

    def table(self, db: str, tbl: str) -> Table | None:
        return self.tables.get((db, tbl))

    def get(self, db: str, tbl: str, key: str) -> crdt.State | None:
        t = self.tables.get((db, tbl))
        return None if t is None else t.records.get(key)

    def apply(self, db: str, tbl: str, key: str, state: crdt.State) -> crdt.State | None:
        """Merge `state` into the key; the merged state if it changed, else None."""
        t = self.tables.get((db, tbl))
        if t is None:
            t = self.tables[(db, tbl)] = Table()
        old = t.records.get(key)
        merged = crdt.merge(old, state)
        new_hash = key_hash(key, merged)
        old_hash = t.hashes.get(key)
        if old_hash == new_hash:
            return None
        b = bucket_of(key)
        if old_hash is not None:
            t.buckets[b] ^= old_hash
            t.xor ^= old_hash
        t.buckets[b] ^= new_hash
        t.xor ^= new_hash
        t.hashes[key] = new_hash
        t.records[key] = merged
        return merged

    def drop(self, db: str, tbl: str, key: str) -> None:
        t = self.tables.get((db, tbl))
        if t is None or key not in t.records:
            return
        h = t.hashes.pop(key)
        t.buckets[bucket_of(key)] ^= h
        t.xor ^= h
        del t.records[key]
        if not t.records:
            del self.tables[(db, tbl)]

    # --- queries ---------------------------------------------------------------------------

    def databases(self, now_ms: int) -> list[str]:
        return sorted({db for (db, tbl), t in self.tables.items()
                       if any(live(s, now_ms) for s in t.records.values())})

    def table_names(self, db: str, now_ms: int) -> list[str]:
        return sorted(tbl for (d, tbl), t in self.tables.items()
                      if d == db and any(live(s, now_ms) for s in t.records.values()))

    def read(self, db: str, tbl: str, now_ms: int, key: str | None = None,
             prefix: str | None = None, suffix: str | None = None, limit: int = 0,
             offset: int = 0, contains: str | None = None) -> list[tuple[str, crdt.State]]:
        t = self.tables.get((db, tbl))
        if t is None:
            return []
        if key is not None:
            s = t.records.get(key)
            return [(key, s)] if s is not None and live(s, now_ms) else []
        keys = sorted(k for k in t.records
                      if (prefix is None or k.startswith(prefix))
                      and (suffix is None or k.endswith(suffix))
                      and (contains is None or contains in k))
        rows = [(k, t.records[k]) for k in keys if live(t.records[k], now_ms)]
        rows = rows[offset:]
        return rows[:limit] if limit else rows

    # --- digests ---------------------------------------------------------------------------

    def roots(self) -> dict[str, list[int]]:
        return {f"{db}\x00{tbl}": t.root() for (db, tbl), t in self.tables.items()}

    def bucket_digests(self, name: str) -> list[int]:
        t = self.tables.get(split_name(name))
        return list(t.buckets) if t is not None else [0] * BUCKETS

    def key_hashes(self, name: str, buckets: list[int]) -> dict[str, int]:
        t = self.tables.get(split_name(name))
        if t is None:
            return {}
        wanted = set(buckets)
        return {k: h for k, h in t.hashes.items() if bucket_of(k) in wanted}

    def collect(self, now_ms: int, grace_ms: int,
                keep: frozenset[str] = frozenset()) -> list[tuple[str, str, str]]:
        """Drop LWW tombstones older than the grace period (and nothing else on the key),
        except in the databases named in `keep`."""
        dropped = []
        for (db, tbl), t in list(self.tables.items()):
            if db in keep:
                continue
            for key, s in list(t.records.items()):
                reg = s.get("lww")
                if reg is not None and reg[1] is None and len(s) == 1 \
                        and now_ms - reg[0][0] > grace_ms:
                    self.drop(db, tbl, key)
                    dropped.append((db, tbl, key))
        return dropped


def split_name(name: str) -> tuple[str, str]:
    db, _, tbl = name.partition("\x00")
    return db, tbl
