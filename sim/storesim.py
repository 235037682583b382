"""The store workload in the simulator: real StoreReplicators on every node.

Rules (metric definitions):
- ops: local writes and deletes issued by the workload. msgs_per_op: store messages sent
  by all nodes (pushes and anti-entropy) after warmup, divided by ops.
- latency of a write: from issue until every running node holds it or a later write of the
  same key (a superseded write counts as delivered). p50 and max over all writes.
- store_lost_writes: at the end, keys whose newest write (by HLC) is missing on some running
  node. store_last_writer_lost: keys whose final value is not the one written last in
  simulated time although that write came at least `spacing` after the one before it
  (so it had seen it): what LWW on raw skewed clocks gets wrong and an HLC gets right.
  Only meaningful without partitions (concurrent writes may legitimately go either way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import cbor2

from meshd.hlc import HLC, MAX_DRIFT_MS
from meshd.store import crdt
from meshd.store.memrecords import MemoryRecords
from meshd.store.replication import StoreReplicator

from .metrics import quantile_index
from .scenario import Fault

STORE = 4


class _WallClockOnly(HLC):
    """LWW on raw wall clocks: what you get without a hybrid logical clock."""

    def observe(self, ts: Any) -> bool:
        return True


@dataclass
class _Write:
    key: str
    ts: tuple[int, int, str]
    start: float
    holders: dict[str, None] = field(default_factory=dict)
    done: float | None = None


class StoreSim:
    def __init__(self, sim: Any) -> None:
        self.sim = sim
        self.sc = sim.sc
        self.writes: list[_Write] = []
        self.open: dict[str, list[_Write]] = {}
        self.latest: dict[str, tuple[int, int, str]] = {}
        self.last_in_time: dict[str, tuple[float, bytes | None]] = {}
        self.spacing_ok: dict[str, bool] = {}
        self.ops = 0
        self.msgs = 0
        self.bytes = 0
        self.converged: list[float] = []
        self.versions_at_heal = 0
        self.counter = 0
        # node name -> its records, kept across crashes when set (sim/nemesis.py: a store's
        # file survives kill -9); None: a crashed node's store is gone with it
        self.disks: dict[str, MemoryRecords] | None = None

    # --- nodes -----------------------------------------------------------------------------

    def start_node(self, node: Any, core: Any) -> StoreReplicator:

        sim = self.sim

        def peers() -> list[str]:
            return core.alive_peers()

        clock_cls = HLC if self.sc.store_hlc else _WallClockOnly
        hlc = clock_cls(node.name, lambda: node.wall_ms(sim.now),
                        max_drift_ms=self._drift_ms())
        records = self.records_for(node)
        rep = StoreReplicator(node.name, hlc, peers,
                              sim._rng(f"store:{node.name}:{node.incarnation}"),
                              sim.now + node.offset,
                              batch_interval=self.sc.store_batch_interval,
                              sync_interval=self.sc.store_sync_interval,
                              tombstone_grace=self.sc.store_tombstone_grace, records=records)
        if records is not None:  # store/service.py: the clock moves to the newest record
            newest = records.newest(node.wall_ms(sim.now) + hlc.max_drift_ms)
            if newest is not None:
                hlc.observe((newest[0], newest[1], node.name))
        rep.on_change = lambda db, tbl, key, state, local, n=node: self._changed(n, key, state)
        return rep

    def records_for(self, node: Any) -> MemoryRecords | None:
        """The records a (re)starting node's store runs on: its disk's, when disks are kept
        (None: a fresh store)."""
        return None if self.disks is None else self.disks.setdefault(node.name, MemoryRecords())

    def _drift_ms(self) -> int:
        """The HLC drift bound: the daemon's default, or wider when the scenario sets clocks
        further apart than it (an operator must then raise store.max_clock_drift alike, or
        such nodes' records are refused)."""
        skew = max((f.max_s for f in self.sc.faults if f.kind == "clock_offset"), default=0.0)
        return max(MAX_DRIFT_MS, int(2 * skew * 1000))

    def _changed(self, node: Any, key: str, state: crdt.State) -> None:
        reg = state.get("lww")
        if reg is None:
            return
        ts = crdt.lww_ts(reg)
        pending = self.open.get(key)
        if not pending:
            return
        need = self.sim.count_up()
        still = []
        for w in pending:
            if ts >= w.ts:
                w.holders[node.name] = None
                if len(w.holders) >= need and w.done is None:
                    w.done = self.sim.now - w.start
            if w.done is None:
                still.append(w)
        self.open[key] = still

    def send(self, node: Any, sends: list[tuple[str, Any]]) -> None:
        sim = self.sim
        for addr, msg in sends:
            size = len(cbor2.dumps(msg)) if sim.size_messages else 0
            if sim.now >= self.sc.warmup:
                self.msgs += 1
                self.bytes += size
            sim.metrics.sent(sim.now, size)
            dst = sim.by_addr.get(addr)
            if dst is None:
                continue
            when = sim.net.delivery_time(node.idx, dst.idx, size, sim.now, True, connect=False)
            if when is not None:
                sim._push(when, STORE, dst, (node.addr, msg))

    def deliver(self, node: Any, payload: tuple[str, Any]) -> None:
        sender, msg = payload
        self.send(node, node.store.receive(sender, msg, self.sim.now + node.offset))
        self.sim._schedule_tick(node)

    # --- workload --------------------------------------------------------------------------

    def schedule_writes(self, f: Fault) -> None:
        interval = 1.0 / max(f.rate, 1e-9)
        n = int(f.duration * f.rate)
        for i in range(n):
            self.sim.call_at(f.at + i * interval, self._write_one, f)

    def _write_one(self, f: Fault, delete: bool = False) -> None:
        sim = self.sim
        pool = [n for n in sim.nodes if n.up and not n.paused and n.store is not None]
        if not pool:
            return
        node = pool[sim.fault_rng.randrange(len(pool))]
        rep = node.store
        key = f"k{sim.fault_rng.randrange(max(1, f.keys))}"
        now = sim.now + node.offset
        self.counter += 1
        value = None if delete else f"v{self.counter}".encode()
        ts = rep.hlc.now()
        rep.local("db", "t", key, {"lww": crdt.lww(ts, value)}, now)
        self.ops += 1
        w = _Write(key, ts, sim.now, {node.name: None})
        self.writes.append(w)
        self.open.setdefault(key, []).append(w)
        if self.latest.get(key, (0, 0, "")) < ts:
            self.latest[key] = ts
        prev = self.last_in_time.get(key)
        # the newest write should win only if it came clearly after the one before it
        self.spacing_ok[key] = prev is None or sim.now - prev[0] >= max(f.spacing, 0.0)
        self.last_in_time[key] = (sim.now, value)
        sim._schedule_tick(node)

    def schedule_deletes(self, f: Fault) -> None:
        for i in range(f.count or 1):
            self.sim.call_at(f.at + i * f.spacing, lambda _a, f=f: self._write_one(f, True))

    # --- partitions --------------------------------------------------------------------------

    def on_heal(self) -> None:
        up = [n for n in self.sim.nodes if n.up and n.store is not None]
        self.versions_at_heal = len({repr(sorted(n.store.state.roots().items())) for n in up})
        self.sim.call_at(self.sim.now + 0.5, self._check, self.sim.now)

    def _check(self, healed_at: float) -> None:
        up = [n for n in self.sim.nodes if n.up and n.store is not None]
        roots = [n.store.state.roots() for n in up]
        if all(r == roots[0] for r in roots):
            self.converged.append(self.sim.now - healed_at)
            return
        self.sim.call_at(self.sim.now + 0.5, self._check, healed_at)

    # --- results ---------------------------------------------------------------------------

    def result(self) -> dict[str, Any]:
        up = [n for n in self.sim.nodes if n.up and n.store is not None]
        lost = 0
        for key, ts in self.latest.items():
            for n in up:
                s = n.store.state.get("db", "t", key)
                if s is None or "lww" not in s or crdt.lww_ts(s["lww"]) != ts:
                    lost += 1
                    break
        wrong_winner = 0
        for key, (_, value) in self.last_in_time.items():
            if not self.spacing_ok.get(key, True):
                continue
            for n in up:
                s = n.store.state.get("db", "t", key)
                have = s["lww"][1] if s and "lww" in s else None
                if have != value:
                    wrong_winner += 1
                    break
        lat = sorted(w.done for w in self.writes if w.done is not None)
        undelivered = sum(1 for w in self.writes if w.done is None)
        roots = [n.store.state.roots() for n in up]
        return {
            "ops": self.ops,
            "msgs_per_op": round(self.msgs / self.ops, 2) if self.ops else None,
            "latency_p50_ms": round(lat[quantile_index(len(lat), 0.5)] * 1000, 1) if lat
            else None,
            "latency_max_ms": round(lat[-1] * 1000, 1) if lat else None,
            "writes_not_everywhere": undelivered,
            "store_replicas_identical": all(r == roots[0] for r in roots),
            "store_lost_writes": lost,
            "store_last_writer_lost": wrong_winner,
            "store_versions_at_heal": self.versions_at_heal,
            "store_converged_after_heal_s": round(max(self.converged), 3) if self.converged
            else None,
            "store_bytes": self.bytes,
        }


def inf_to_none(x: float) -> float | None:
    return None if math.isinf(x) else x
