"""Store replication (sans-IO): batched delta pushes and Merkle-style anti-entropy.

Theory of operation
-------------------
Writes become deltas, queued per key (merged) and flushed every `batch_interval` in one
message per peer: to every live peer while the cluster has at most `all_threshold` members
(one hop, lowest latency, N-1 messages per batch), else to `fanout` random peers which
forward what was new to them (epidemic, O(log N) hops, bounded cost per node).

Anti-entropy every `sync_interval` with a random peer, five messages at most:
    A -> B  roots     {table: [count, xor]}
    B -> A  buckets   bucket digests of the tables whose roots differ
    A -> B  keys      A's key hashes in the differing buckets
    B -> A  records   B's records for keys that differ or A lacks, and the keys B wants
    A -> B  fill      A's records for those keys
Rules:
- Merges are CRDT merges (crdt.py): order, duplicates and repeats of messages do not matter.
- A write that asks for `replicas` > 1 carries an ack id; receivers answer with an ack; the
  shell waits for enough acks. An ack promises that the records are on the receiver's disk:
  `receive` returns it among its sends, and the receiving shell must hold it back
  (`split_acks`) until the commit holding everything merged so far has completed. A batch
  with a refused record is not acknowledged.
- A record whose HLC timestamp is more than the clock's drift bound ahead of our physical
  clock is refused, not merged, and counted (`store_future_refused`): one node with a clock
  in the future must not drag every clock forward nor win every conflict (see hlc.py).
  Anti-entropy offers it again later; it is accepted once real time has caught up.
- Anything malformed raises WireError; the shell drops the message and counts it.
- Records from peers pass `accept` before they merge (the auth database takes only records
  signed by a trusted issuer key); refused ones are dropped and counted. Tables named in
  `merge_first` merge first within a message, so a key arrives before what it signed.
- Every repair message is bounded (`repair_bytes`, and at most REPAIR_TABLES tables and
  REPAIR_KEYS key hashes per round): a round that had to leave differences out says "more",
  and the side that started it starts the next round at once when the last one moved
  something (a node that is far behind catches up in bounded steps, never with one huge
  message a link would refuse; differences that cannot be repaired, such as refused
  records, wait for the next sync tick).
- Deletes are tombstones, dropped `tombstone_grace` after they were written (checked at
  each sync tick, against this node's clock), except in `keep_tombstones` databases. A
  replica cut off for longer than that may bring the deleted value back: the grace must
  exceed the longest partition to tolerate.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

from meshd.hlc import HLC

from . import crdt
from .records import Records
from .state import BUCKETS, StoreState, bucket_of, split_name

log = logging.getLogger("meshd.store")
Send = tuple[str, dict[str, Any]]
ChangeHook = Callable[[str, str, str, crdt.State, bool], None]
REPAIR_BYTES = 8 << 20  # records in one repair message (links carry up to 64 MiB)
REPAIR_TABLES = 64  # tables whose bucket digests go in one message (4096 numbers each)
REPAIR_KEYS = 100_000  # key hashes in one message (about 4 MB)
CHUNK_KEYS = 20_000  # our key hashes read at once when answering a key list
PAGE_KEYS = 512  # records read at once for a repair message


class WireError(ValueError):
    pass


class StoreReplicator:
    def __init__(self, node: str, hlc: HLC, peers: Callable[[], list[str]],
                 rng: random.Random, now: float, *, batch_interval: float = 0.05,
                 sync_interval: float = 10.0, fanout: int = 4, all_threshold: int = 64,
                 tombstone_grace: float = 86400.0, repair_bytes: int = REPAIR_BYTES,
                 repair_keys: int = REPAIR_KEYS, records: Records | None = None) -> None:
        self.node = node
        self.repair_bytes = repair_bytes
        self.repair_keys = repair_keys
        self.hlc = hlc
        self.peers = peers
        self.rng = rng
        self.batch_interval = batch_interval
        self.sync_interval = sync_interval
        self.fanout = fanout
        self.all_threshold = all_threshold
        self.tombstone_grace_ms = int(tombstone_grace * 1000)
        self.state = StoreState(records)  # in memory unless given (the daemon: on disk)
        self.pending: dict[tuple[str, str, str], tuple[crdt.State, str | None]] = {}
        self.pending_acks: list[int] = []
        self.next_flush = float("inf")
        self.next_sync = now + rng.uniform(0, sync_interval)
        self.acks: dict[int, set[str]] = {}
        self._next_wid = 0
        self.on_change: ChangeHook | None = None
        self.on_drop: Callable[[str, str, str], None] | None = None
        # accept(db, table, key, state) -> bool: whether a record from a peer may merge
        # (the auth database takes only records signed by a trusted issuer key)
        self.accept: Callable[[str, str, str, crdt.State], bool] | None = None
        # tables merged first within one message (records that vouch for the others)
        self.merge_first: tuple[tuple[str, str], ...] = ()
        # databases whose deletes are remembered for ever: a signed record there must never
        # come back by replay once its tombstone is gone (the auth database)
        self.keep_tombstones: frozenset[str] = frozenset()
        # errors of the records backend a timer tick survives (the daemon: sqlite3.Error)
        self.backend_errors: tuple[type[Exception], ...] = ()
        self.stats = {"store_msgs_out": 0, "store_bytes_repair": 0, "store_repairs": 0,
                      "store_refused": 0,
                      "store_future_refused": 0}

    # --- local writes ----------------------------------------------------------------------

    def local(self, db: str, tbl: str, key: str, delta: crdt.State, now: float,
              want_acks: bool = False) -> tuple[crdt.State, int | None]:
        """Apply a local change; returns the merged state and, if asked, an ack id."""
        merged = self.state.apply(db, tbl, key, delta)
        current = merged if merged is not None else self.state.get(db, tbl, key) or {}
        if merged is not None and self.on_change is not None:
            self.on_change(db, tbl, key, merged, True)
        self._queue(db, tbl, key, delta, None, now)
        wid = None
        if want_acks:
            self._next_wid += 1
            wid = self._next_wid
            self.acks[wid] = set()
            self.pending_acks.append(wid)
        return current, wid

    def _queue(self, db: str, tbl: str, key: str, delta: crdt.State, source: str | None,
               now: float) -> None:
        k = (db, tbl, key)
        old = self.pending.get(k)
        self.pending[k] = (crdt.merge(old[0], delta) if old else delta,
                           source if old is None else old[1])
        if self.next_flush == float("inf"):
            self.next_flush = now + self.batch_interval

    # --- timers ----------------------------------------------------------------------------

    def next_deadline(self) -> float:
        return min(self.next_flush, self.next_sync)

    def tick(self, now: float) -> list[Send]:
        out: list[Send] = []
        if now >= self.next_flush:
            out += self._flush()
        if now >= self.next_sync:
            self.next_sync = now + self.sync_interval * (0.5 + self.rng.random())
            dropped: list[tuple[str, str, str]] = []
            try:
                self.state.collect(self.hlc.clock(), self.tombstone_grace_ms,
                                   self.keep_tombstones, dropped)
            except self.backend_errors as exc:  # the disk failed: try again next tick
                log.warning("tombstone collection stopped after %d keys: %s", len(dropped),
                            exc)
            for db, tbl, key in dropped:
                if self.on_drop is not None:
                    self.on_drop(db, tbl, key)
            peers = self.peers()
            if peers:
                target = peers[self.rng.randrange(len(peers))]
                out.append((target, {"t": "roots", "roots": self.state.roots()}))
        return out

    def sync_with(self, peer: str) -> list[Send]:
        """Start anti-entropy with `peer` now (a member that just joined gets our state at
        once instead of at the next random sync)."""
        return [(peer, {"t": "roots", "roots": self.state.roots()})]

    def _flush(self) -> list[Send]:
        self.next_flush = float("inf")
        if not self.pending:
            return []
        peers = self.peers()
        gossip = len(peers) + 1 > self.all_threshold
        entries = [[db, tbl, key, state] for (db, tbl, key), (state, _) in self.pending.items()]
        sources = {src for _, src in self.pending.values()}
        msg: dict[str, Any] = {"t": "batch", "e": entries, "fwd": gossip}
        if self.pending_acks:
            msg["ack"] = self.pending_acks
        self.pending = {}
        self.pending_acks = []
        if gossip:
            targets = [p for p in peers if p not in sources]
            self.rng.shuffle(targets)
            peers = targets[:self.fanout]
        self.stats["store_msgs_out"] += len(peers)
        return [(p, msg) for p in peers]

    # --- messages in -----------------------------------------------------------------------

    def receive(self, sender: str, msg: Any, now: float) -> list[Send]:
        if not isinstance(msg, dict):
            raise WireError("store message must be a map")
        kind = msg.get("t")
        if kind == "batch":
            refused = self._merge_entries(_entries(msg.get("e")), sender, now,
                                          bool(msg.get("fwd")))
            ids = msg.get("ack")
            if isinstance(ids, list) and ids and not refused:
                return [(sender, {"t": "ack", "ids": [i for i in ids if isinstance(i, int)]})]
            return []
        if kind == "ack":
            for wid in msg.get("ids", []) if isinstance(msg.get("ids"), list) else []:
                if wid in self.acks:
                    self.acks[wid].add(sender)
            return []
        if kind == "roots":
            remote = _map(msg.get("roots"))
            mine = self.state.roots()
            names = sorted(n for n in set(mine) | set(remote) if mine.get(n) != remote.get(n))
            if not names:
                return []
            reply: dict[str, Any] = {"t": "buckets", "tables": {
                n: self.state.bucket_digests(n) for n in names[:REPAIR_TABLES]}}
            if len(names) > REPAIR_TABLES:
                reply["more"] = True
            return [(sender, reply)]
        if kind == "buckets":
            tables = _map(msg.get("tables"))
            keys: dict[str, Any] = {}
            budget = self.repair_keys
            more = bool(msg.get("more"))
            for name, remote in tables.items():
                if not isinstance(remote, list) or len(remote) != BUCKETS:
                    raise WireError("bad bucket digests")
                if budget <= 0:
                    more = True
                    break
                mine = self.state.bucket_digests(name)
                differing = [i for i in range(BUCKETS) if mine[i] != remote[i]]
                sizes = self.state.bucket_sizes(name)
                if sum(sizes[b] for b in differing) > budget:
                    # only the buckets that fit: the rest next round
                    differing, more = self._fit(name, differing, budget), True
                hashes = self.state.key_hashes(name, differing)
                budget -= len(hashes)
                keys[name] = {"b": differing, "k": hashes}
            out: dict[str, Any] = {"t": "keys", "tables": keys}
            if more:
                out["more"] = True
            return [(sender, out)] if keys else []
        if kind == "keys":
            tables = _map(msg.get("tables"))
            records, want = [], {}
            budget = self.repair_bytes
            more = bool(msg.get("more"))
            for name, spec in tables.items():
                if not isinstance(spec, dict) or not isinstance(spec.get("k"), dict) \
                        or not isinstance(spec.get("b"), list):
                    raise WireError("bad key list")
                if budget <= 0:  # the records are full: the other tables next round
                    more = True
                    break
                theirs: dict[str, int] = spec["k"]
                db, tbl = split_name(name)
                seen: dict[str, int] = {}  # our hashes of their keys
                # a bounded number of our key hashes at a time (a far-behind peer names
                # every bucket of a large table), and none once the records are full: one
                # message costs a bounded amount of work, the next round covers the rest
                chunks = self.state.bucket_chunks(name, spec["b"], CHUNK_KEYS)
                done: set[int] | None = None  # the buckets compared, if not all of them
                for n, chunk in enumerate(chunks):
                    if budget <= 0:
                        done = {b for c in chunks[:n] for b in c}
                        more = True
                        break
                    mine = self.state.key_hashes(name, chunk)
                    seen.update((k, h) for k, h in mine.items() if k in theirs)
                    differ = [k for k, h in mine.items() if theirs.get(k) != h]
                    found, budget, cut = self._budgeted(db, tbl, differ, budget)
                    records += found
                    more = more or cut
                wanted = [k for k, h in theirs.items() if seen.get(k) != h
                          and (done is None or (type(k) is str and bucket_of(k) in done))]
                if wanted:
                    want[name] = wanted
            reply = {"t": "records", "e": records, "want": want}
            self.stats["store_repairs"] += len(records)
            self.stats["store_bytes_repair"] += self.repair_bytes - budget
            if more:
                reply["more"] = True
            return [(sender, reply)]
        if kind == "records":
            before = self.state.roots()
            self._merge_entries(_entries(msg.get("e")), sender, now, False)
            out = []
            fill = []
            budget = self.repair_bytes
            more = bool(msg.get("more"))
            for name, keys in _map(msg.get("want")).items():
                db, tbl = split_name(name)
                asked = [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []
                found, budget, cut = self._budgeted(db, tbl, asked, budget)
                fill += found
                more = more or cut
            if fill:
                out.append((sender, {"t": "fill", "e": fill}))
            if more and (fill or self.state.roots() != before):
                # the round left differences out and moved something: go on at once
                out.append((sender, {"t": "roots", "roots": self.state.roots()}))
            return out
        if kind == "fill":
            self._merge_entries(_entries(msg.get("e")), sender, now, False)
            return []
        raise WireError(f"unknown store message {kind!r}")

    def _budgeted(self, db: str, tbl: str, keys: list[str], budget: int
                  ) -> tuple[list[list[Any]], int, bool]:
        """The records of `keys` (those we hold) while `budget` bytes last: (records, budget
        left, whether some were left out). Read a page at a time, without filling the
        cache."""
        out: list[list[Any]] = []
        for i in range(0, len(keys), PAGE_KEYS):
            for key, state in self.state.peek(db, tbl, keys[i:i + PAGE_KEYS]):
                if budget <= 0:
                    return out, budget, True
                budget -= _size(key, state)
                out.append([db, tbl, key, state])
        return out, budget, False

    def _fit(self, name: str, buckets: list[int], budget: int) -> list[int]:
        """The leading buckets whose keys fit in `budget` key hashes (at least one)."""
        sizes = self.state.bucket_sizes(name)
        chosen, used = [], 0
        for b in buckets:
            n = sizes[b]
            if chosen and used + n > budget:
                break
            chosen.append(b)
            used += n
        return chosen

    def _merge_entries(self, entries: list[list[Any]], sender: str, now: float,
                       forward: bool) -> int:
        """Merge remote records; returns how many were refused for timestamps too far
        ahead (records `accept` refuses are counted apart: they are not ours to ack)."""
        if self.merge_first:
            first = self.merge_first
            entries.sort(key=lambda e: (e[0], e[1]) not in first)
        accept = self.accept
        refused = 0
        for db, tbl, key, state in entries:
            if accept is not None and not accept(db, tbl, key, state):
                self.stats["store_refused"] += 1
                continue
            reg = state.get("lww")
            if reg is not None and not self.hlc.observe((reg[0][0], reg[0][1], reg[0][2])):
                refused += 1
                continue
            merged = self.state.apply(db, tbl, key, state)
            if merged is None:
                continue
            if self.on_change is not None:
                self.on_change(db, tbl, key, merged, False)
            if forward:
                self._queue(db, tbl, key, state, sender, now)
        self.stats["store_future_refused"] += refused
        return refused


def split_acks(sends: list[Send]) -> tuple[list[Send], list[Send]]:
    """(sends to make now, acks to send once what was merged so far is durable)."""
    now: list[Send] = []
    acks: list[Send] = []
    for send in sends:
        (acks if send[1].get("t") == "ack" else now).append(send)
    return now, acks


def _size(key: str, state: crdt.State) -> int:
    """Roughly the encoded size of a record (enough for a budget)."""
    reg = state.get("lww") if isinstance(state, dict) else None
    value = reg[1] if reg is not None and isinstance(reg[1], bytes) else b""
    extra = 0 if reg is None else len(reg[2]) * 32
    return 64 + len(key) + len(value) + extra + 16 * (len(state) - (reg is not None))


# --- strict decoding -----------------------------------------------------------------------

def _map(v: Any) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise WireError("expected a map")
    return v


def _text(v: Any, what: str) -> str:
    if type(v) is not str or len(v) > 1024:
        raise WireError(f"bad {what}")
    return v


def _int_map(v: Any) -> dict[str, int]:
    if type(v) is not dict or not all(type(k) is str and type(n) is int and n >= 0
                                      for k, n in v.items()):
        raise WireError("bad counter")
    return v


def _is_register(reg: Any) -> bool:
    return (type(reg) is list and len(reg) == 4 and type(reg[0]) is list and len(reg[0]) == 3
            and type(reg[0][0]) is int and type(reg[0][1]) is int and type(reg[0][2]) is str
            and (reg[1] is None or type(reg[1]) is bytes) and type(reg[2]) is dict
            and (reg[3] is None or type(reg[3]) is int))


def check_state(s: Any) -> crdt.State:
    if type(s) is not dict or not set(s) <= {"lww", "counter", "set"}:
        raise WireError("bad record state")
    reg = s.get("lww")
    if reg is not None and not _is_register(reg):
        raise WireError("bad register")
    c = s.get("counter")
    if c is not None:
        if type(c) is not dict or set(c) != {"p", "n", "bp", "bn"}:
            raise WireError("bad counter")
        for part in c.values():
            _int_map(part)
    st = s.get("set")
    if st is not None:
        if type(st) is not dict or type(st.get("adds")) is not dict \
                or type(st.get("removed")) is not list:
            raise WireError("bad set")
        for elem, tags in st["adds"].items():
            if type(elem) is not str or type(tags) is not list \
                    or not all(type(t) is str for t in tags):
                raise WireError("bad set")
        if not all(type(t) is str for t in st["removed"]):
            raise WireError("bad set")
    return s


def _entries(v: Any) -> list[list[Any]]:
    if type(v) is not list:
        raise WireError("entries must be a list")
    out = []
    for e in v:
        if type(e) is not list or len(e) != 4:
            raise WireError("entry must be [db, table, key, state]")
        out.append([_text(e[0], "database"), _text(e[1], "table"), _text(e[2], "key"),
                    check_state(e[3])])
    return out
