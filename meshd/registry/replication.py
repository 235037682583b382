"""Registry replication (sans-IO): rumor pushes plus digest anti-entropy.

Theory of operation
-------------------
Messages (plain dicts, CBOR on the wire):
    {"t": "delta",   "entries": [...]}                   a change, pushed to `fanout` peers
    {"t": "digest",  "digest": {owner: [count, xor]}}    starts a sync
    {"t": "entries", "entries": [...], "want": [owner]}  the other side's differing owners,
                                                         and which of ours it wants
    {"t": "fill",    "entries": [...]}                   ours for the owners it wanted
Rules:
- A local write is pushed to `fanout` random live peers; a peer that learns something new
  pushes the new entries on to `fanout` others (not back to the sender).
- Every `sync_interval` (jittered) a random live peer gets our digest; only the entries of
  owners whose digests differ travel, so repair costs grow with the difference.
- Input that does not parse raises WireError; the shell counts it and drops the message.
- An entry whose HLC timestamp is more than the clock's drift bound ahead of our physical
  clock is refused, not applied, and counted (`registry_future_refused`): one node with a
  clock in the future must not drag every clock forward (see hlc.py).
- A node removes its own instances of earlier boots: an entry it owns that arrives from a
  peer with another boot id than `boot` (set by the shell) and a value is answered with a
  tombstone of ours, so a restarted node's old instances (never served: their boot is not
  the live one) do not stay in every node's state, digest and repairs for ever (the nemesis
  restarted nodes every few minutes and each life's instances piled up).
- Tombstones are collected `ttl` after they were written, by `wall()` (the newest of our
  clock and the times this node has seen from any node, so nodes agree on it within a
  gossip round whatever their clocks). A tombstone from a peer for a key we do not hold,
  written more than `ttl` before `wall()`, is dropped: we collected it already. Before
  these rules tombstones were collected only `ttl` after each node saw them, so one node
  still held one when another had collected it; the repair brought it back to the one that
  had collected it, which kept it another ttl, and so on: the nemesis found tombstones
  bouncing between nodes for ever.
- The core never does I/O: `write`, `receive` and `tick` return (address, message) pairs.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from meshd.hlc import HLC

from .core import Entry, RegistryState, WireError, entry_from_wire

Send = tuple[str, dict[str, Any]]


class Replicator:
    def __init__(self, node: str, hlc: HLC, peers: Callable[[], list[str]],
                 rng: random.Random, now: float, fanout: int = 3,
                 sync_interval: float = 5.0) -> None:
        self.node = node
        self.hlc = hlc
        self.peers = peers
        self.rng = rng
        self.fanout = fanout
        self.sync_interval = sync_interval
        self.state = RegistryState()
        self.next_sync = now + rng.uniform(0, sync_interval)
        self.on_change: Callable[[str, Entry, Entry | None], None] | None = None
        self.boot: str | None = None  # this node's boot id: our entries of others are removed
        self.stats = {"registry_future_refused": 0, "registry_stale_removed": 0,
                      "registry_old_tombstones_dropped": 0}

    def write(self, key: str, boot: str, value: dict[str, Any] | None, now: float) -> list[Send]:
        """A local change (value None deletes): applied here, then pushed."""
        entry = Entry(f"{self.node}/{key}", self.hlc.now(), boot, value)
        return self._apply([entry], None, now)

    def _apply(self, entries: list[Entry], source: str | None, now: float) -> list[Send]:
        changed = []
        old_before = self.wall() - int(self.state.tombstone_ttl * 1000)
        held = self.state.entries
        for e in entries:
            old = held.get(e.key)
            if old is not None and old.ts >= e.ts:
                continue  # (most of a repair: nothing to observe or apply)
            if source is not None and e.value is None and e.ts[0] < old_before \
                    and old is None:
                self.stats["registry_old_tombstones_dropped"] += 1
                continue  # collected here already, or never needed: see the rules
            if source is not None and not self.hlc.observe(e.ts):  # source None: our own
                self.stats["registry_future_refused"] += 1
                continue
            if self.state.apply(e, now):
                changed.append(e)
                if self.on_change is not None:
                    kind = "delete" if e.value is None else (
                        "create" if old is None or old.value is None else "update")
                    self.on_change(kind, e, old)
        if source is not None and self.boot is not None:
            changed += self._remove_stale(changed, now)
        if not changed:
            return []
        msg = {"t": "delta", "entries": [e.to_wire() for e in changed]}
        targets = [p for p in self.peers() if p != source]
        self.rng.shuffle(targets)
        return [(addr, msg) for addr in targets[:self.fanout]]

    def wall(self) -> int:
        """The time tombstones are aged by (ms): the newest of our clock and what the HLC
        has seen from any node."""
        return max(self.hlc.wall, self.hlc.clock())

    def _remove_stale(self, changed: list[Entry], now: float) -> list[Entry]:
        """Tombstones for our own entries of an earlier boot among `changed` (the rules)."""
        out = []
        for e in changed:
            if e.value is not None and e.boot != self.boot and e.owner == self.node:
                tomb = Entry(e.key, self.hlc.now(), self.boot or "", None)
                if self.state.apply(tomb, now):
                    out.append(tomb)
                    self.stats["registry_stale_removed"] += 1
                    if self.on_change is not None:
                        self.on_change("delete", tomb, e)
        return out

    def next_deadline(self) -> float:
        return self.next_sync

    def tick(self, now: float) -> list[Send]:
        if now < self.next_sync:
            return []
        self.next_sync = now + self.sync_interval * (0.5 + self.rng.random())
        self.state.collect(now, self.wall())
        peers = self.peers()
        if not peers:
            return []
        return [(peers[self.rng.randrange(len(peers))],
                 {"t": "digest", "digest": self.state.digest()})]

    def sync_with(self, peer: str) -> list[Send]:
        """Start anti-entropy with `peer` now (for a member that just joined)."""
        return [(peer, {"t": "digest", "digest": self.state.digest()})]

    def receive(self, sender: str, msg: Any, now: float) -> list[Send]:
        if not isinstance(msg, dict):
            raise WireError("registry message must be a map")
        kind = msg.get("t")
        if kind == "delta":
            return self._apply(_entries(msg), sender, now)
        if kind == "digest":
            remote = msg.get("digest")
            if not isinstance(remote, dict):
                raise WireError("bad digest")
            owners = self.state.differing_owners(remote)
            ours = self.state.entries_of(owners)
            return [(sender, {"t": "entries", "want": owners,
                              "entries": [e.to_wire() for e in ours]})]
        if kind == "entries":
            out = self._apply(_entries(msg), sender, now)
            wanted = msg.get("want", [])
            if not isinstance(wanted, list):
                raise WireError("bad want list")
            mine = self.state.entries_of([w for w in wanted if isinstance(w, str)])
            if mine:
                out.append((sender, {"t": "fill", "entries": [e.to_wire() for e in mine]}))
            return out
        if kind == "fill":
            return self._apply(_entries(msg), sender, now)
        raise WireError(f"unknown registry message {kind!r}")


def _entries(msg: dict[str, Any]) -> list[Entry]:
    raw = msg.get("entries", [])
    if not isinstance(raw, list) or len(raw) > 100_000:
        raise WireError("entries must be a list")
    return [entry_from_wire(x) for x in raw]
