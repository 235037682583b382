"""Registry state (sans-IO): a last-writer-wins map of service instances.

Rules:
- A key is "<node>/<instance id>"; only that node writes it. Each entry carries an HLC
  timestamp; the entry with the greater timestamp wins, a delete is a tombstone entry. So
  merging is commutative, associative and idempotent, and every replica that has seen the
  same entries holds the same state.
- Entries also carry the writing daemon's boot id. An instance whose node is not alive in
  the membership, or whose boot id is not that node's current one (it restarted), is not
  served: a crashed node's instances vanish everywhere as soon as it is declared dead.
- Digest for anti-entropy: per owner node, (count, xor of entry hashes). Two replicas agree
  on an owner iff its digests match; only differing owners' entries are exchanged.
- Tombstones are dropped after `tombstone_ttl` seconds of local time. A heap of their
  write times finds the due ones (collect runs every tick: a scan of every tombstone each
  time cost more than anything else the registry does).
- Every served instance belongs to one namespace (its record's "namespace"; a record that
  names none, from before namespaces or from an old node, is in "default"). Reads select
  by service and namespace (`select`); replication does not look at namespaces at all, so
  every replica holds every namespace and old and new nodes merge the same entries.
"""

from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass, field
from typing import Any

from meshd import namespaces
from meshd.hlc import Timestamp


@dataclass(slots=True)
class Entry:
    key: str
    ts: Timestamp
    boot: str
    value: dict[str, Any] | None  # None = tombstone
    seen_at: float = 0.0
    owner: str = field(init=False, compare=False, repr=False)  # the node before the "/"
    # to_wire's answer, made once: repairs send every entry of an owner again and again
    wire: list[Any] | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.owner = self.key.split("/", 1)[0]

    def digest_part(self) -> int:
        h = hashlib.blake2b(f"{self.key}|{self.ts[0]}|{self.ts[1]}|{self.ts[2]}".encode(),
                            digest_size=8).digest()
        return int.from_bytes(h, "big")

    def to_wire(self) -> list[Any]:
        """The wire form (the same list each time: send it, never change it)."""
        if self.wire is None:
            self.wire = [self.key, list(self.ts), self.boot, self.value]
        return self.wire


class WireError(ValueError):
    pass


def entry_from_wire(raw: Any) -> Entry:
    if type(raw) is not list or len(raw) != 4:
        raise WireError("entry must be [key, ts, boot, value]")
    key, ts, boot, value = raw
    if type(key) is not str or "/" not in key or len(key) > 300:
        raise WireError("bad entry key")
    if type(ts) is not list or len(ts) != 3 or type(ts[0]) is not int \
            or type(ts[1]) is not int or type(ts[2]) is not str:
        raise WireError("bad entry timestamp")
    if type(boot) is not str or len(boot) > 64:
        raise WireError("bad boot id")
    if value is not None and type(value) is not dict:
        raise WireError("bad entry value")
    return Entry(key, (ts[0], ts[1], ts[2]), boot, value)


class RegistryState:
    def __init__(self, tombstone_ttl: float = 600.0) -> None:
        self.entries: dict[str, Entry] = {}
        self.tombstone_ttl = tombstone_ttl
        self._digest: dict[str, list[int]] = {}  # owner -> [count, xor]
        self._owned: dict[str, dict[str, Entry]] = {}  # owner -> its entries by key
        self._tombs: dict[str, Entry] = {}  # the tombstones, by key (what collect looks at)
        # (wall ms written, key) of each tombstone stored: an entry whose key holds another
        # entry by the time it comes up is passed over
        self._tomb_times: list[tuple[int, str]] = []

    def _account(self, e: Entry, sign: int) -> None:
        d = self._digest.setdefault(e.owner, [0, 0])
        d[0] += sign
        d[1] ^= e.digest_part()
        if d[0] == 0:
            del self._digest[e.owner]

    def apply(self, e: Entry, now: float) -> bool:
        """Merge one entry; True if it changed our state."""
        old = self.entries.get(e.key)
        if old is not None and old.ts >= e.ts:
            return False
        if old is not None:
            self._account(old, -1)
        e.seen_at = now
        self.entries[e.key] = e
        self._owned.setdefault(e.owner, {})[e.key] = e
        if e.value is None:
            self._tombs[e.key] = e
            heapq.heappush(self._tomb_times, (e.ts[0], e.key))
        else:
            self._tombs.pop(e.key, None)
        self._account(e, +1)
        return True

    def digest(self) -> dict[str, list[int]]:
        return {owner: list(v) for owner, v in self._digest.items()}

    def differing_owners(self, remote: dict[str, Any]) -> list[str]:
        owners = set(self._digest) | set(remote)
        return sorted(o for o in owners if self._digest.get(o) != remote.get(o))

    def entries_of(self, owners: list[str]) -> list[Entry]:
        return [e for o in dict.fromkeys(owners) for e in self._owned.get(o, {}).values()]

    def collect(self, now: float, wall_ms: int | None = None) -> int:
        """Drop tombstones written more than the ttl before `wall_ms` (the replicator's
        wall(): every node ages them alike), or without it seen more than the ttl before
        `now`; returns how many."""
        if wall_ms is None:
            old = {e.key: e for e in self._tombs.values()
                   if now - e.seen_at > self.tombstone_ttl}
        else:
            written_before = wall_ms - int(self.tombstone_ttl * 1000)
            old = {}  # (a key stored twice as a tombstone comes up twice: dropped once)
            times = self._tomb_times
            while times and times[0][0] < written_before:
                e = self._tombs.get(heapq.heappop(times)[1])
                if e is not None and e.ts[0] < written_before:
                    old[e.key] = e
        for e in old.values():
            self._account(e, -1)
            del self.entries[e.key]
            del self._tombs[e.key]
            owned = self._owned[e.owner]
            del owned[e.key]
            if not owned:
                del self._owned[e.owner]
        return len(old)

    def live(self, boots: dict[str, str]) -> list[Entry]:
        """Entries to serve: not deleted, owner alive (in `boots`) with the same boot id."""
        return [e for e in self.entries.values()
                if e.value is not None and boots.get(e.owner) == e.boot]


def view(e: Entry) -> dict[str, Any]:
    """An entry as the instance record reads serve: its value, with its namespace filled in."""
    record = dict(e.value or {})
    record["namespace"] = namespaces.of(e.value)
    return record


def select(rows: list[dict[str, Any]], service: str | None = None,
           namespace: str | None = namespaces.DEFAULT) -> list[dict[str, Any]]:
    """The instance records (from `view`) of `service` (None: every service) in `namespace`
    (None: every namespace)."""
    return [r for r in rows
            if (service is None or r.get("service") == service)
            and (namespace is None or r.get("namespace") == namespace)]
