"""Nemesis: rounds of random faults against membership, registry, store and broker together,
with a client workload and the checker (sim/checker.py) at every quiet period, and the
checker over the event log (sim/history.py) after the run.

Theory of operation
-------------------
The run is a sequence of rounds: a fault phase (`fault_phase` s) in which the workload runs
and the nemesis starts a fault every `every` s (uniform between its bounds, from the seed),
then a quiet period (`quiet` s): every fault is healed at its start, the workload stops, and
after `settle` s the checker looks at every node. Faults, drawn with weights `kinds`:
- partition: halves, islands (3-5 groups), one-way (one side cannot send to the other) or a
  bridge (two halves and one node that reaches both), as one-way blocked pairs
  (network.Network.blocked); one partition at a time.
- crash: kill -9 of a running node (at most a third of the nodes down at once); it restarts
  when the fault ends. What was on disk survives, everything else is lost: store records
  are committed `commit_ms` after a change (a group commit; a write is acknowledged to its
  client, and a replica's ack sent, only after the commit that holds it, as
  store/service.py does), the broker's log at once (an append is its commit), consumer
  states SAVE_EVERY after a change (durable._saver: a restarted origin offers again what
  was acked since).
- pause: a running node handles nothing, timers included, until the fault ends.
- clock: a node's wall clock jumps by up to `max_jump` s either way (the total offset stays
  within `max_offset`): seen by the HLCs and the broker's delivery times, not by the
  membership core's timers (monotonic in the daemon).
- loss: every datagram is lost with a probability up to `loss`; streams pay retransmits.
- latency: every link gets up to `latency_ms` more latency.
Clock offsets of up to `max_offset` s are drawn for every node at the start (the scenario's
clock_offset fault). The drift bound of every HLC is raised to twice `max_offset` plus a
margin, as an operator must set store.max_clock_drift for such clocks.

The workload (fault phases only, from its own seeded stream), through random running nodes:
- store: LWW writes and deletes, counter increments, OR-set adds and removes, each asking for
  `replicas` 1 or 2 at random; an op with replicas 1 is acknowledged at once (the local
  commit), one with 2 when a peer's ack arrives within `ack_timeout` s, else its outcome is
  unknown to the client (it may still land).
- registry: instances registered and removed by their nodes.
- broker: durable publishes through brokersim (acknowledged once in the origin's log), to
  the scenario's [broker] durable subscribers; core publishes (`core_rate` per second) to
  its core subscribers (plain, and queue groups), checked as each hand-over happens (at
  most once, in order per publisher and topic, only where the pattern matches), and core
  probes in each quiet period (CORE_PROBES nodes publish one per topic at settle/2; each
  must reach every matching subscriber, one member of each matching group, by the check).

The event log carries `hist` records for the event-log checker: each store op issued and
what its client was told, registry writes, durable offers and dead letters, core probes,
exceptions, and at each check what every node sees and holds (see sim/history.py). They
are written beside the other lines and change nothing the run decides: without them the
log is what it was before they were written. The whole log also goes to a temporary file
of the run's own, which the event-log checker reads after the run; history records are
kept out of violations' excerpts.

Rules:
- Everything is deterministic from the seed: the same run gives the same event log (sha256)
  and the same violations, so any violation replays byte-identically.
- A violation records the simulated time, the invariant, the nodes, and an excerpt: the last
  event-log lines (of the last EXCERPT_RING) that name its subjects.
- An exception escaping any core or handler is a violation ("no-crash-from-exception"); the
  node it happened on (if known) is crashed and restarted at the next quiet period.

Not modelled (listed in the result's `not_modelled`): durable replicas > 1, a client
retrying an op whose outcome it never learned.
"""

from __future__ import annotations

import collections
import itertools
import json
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshd.broker.subjects import matches
from meshd.membership.messages import ALIVE
from meshd.store import crdt
from meshd.store.memrecords import MemoryRecords
from meshd.store.replication import StoreReplicator, split_acks

from . import checker, history
from .brokersim import BrokerNode, BrokerSimulation
from .engine import SimNode
from .scenario import ScenarioError, _table
from .storesim import StoreSim

DB, TBL = "nemesis", "t"
EXCERPT_RING = 20000  # event-log lines kept for excerpts
MAX_EXCEPTIONS = 20  # past this many the run stops and raises
REG_PER_NODE = 6  # a node's registered instances: at this many, one goes
KINDS = ("partition", "crash", "pause", "clock", "loss", "latency")
CORE_PROBES = 3  # nodes that each publish a core probe per topic in a quiet period
NOT_MODELLED = ["durable topics with replicas > 1",
                "clients retrying an operation whose outcome they never learned"]


@dataclass(slots=True)
class NemesisSettings:
    fault_phase: float = 1200.0
    quiet: float = 240.0
    settle: float = 120.0
    every: tuple[float, float] = (20.0, 90.0)
    length: tuple[float, float] = (5.0, 90.0)
    kinds: dict[str, float] | None = None  # weights; None: all of KINDS alike
    max_offset: float = 288.0
    max_jump: float = 120.0
    loss: float = 0.2
    latency_ms: float = 300.0
    store_rate: float = 4.0  # ops per second
    registry_rate: float = 0.5
    publish_rate: float = 1.0
    core_rate: float = 1.0  # core publishes per second (with [broker] core_subscribers)
    keys: int = 20  # per kind of value
    ack_timeout: float = 5.0
    commit_ms: float = 4.0  # a group commit (its fsync): kill -9 loses what is younger


_KEYS = {"fault_phase": float, "quiet": float, "settle": float, "every": list,
         "length": list, "kinds": dict, "max_offset": float, "max_jump": float,
         "loss": float, "latency_ms": float, "store_rate": float, "registry_rate": float,
         "publish_rate": float, "core_rate": float, "keys": int, "ack_timeout": float,
         "commit_ms": float}


def _pair(v: list[Any], where: str) -> tuple[float, float]:
    if len(v) != 2 or not all(isinstance(x, int | float) and not isinstance(x, bool)
                              for x in v) or not 0 < v[0] <= v[1]:
        raise ScenarioError(f"{where} must be [low, high] seconds with 0 < low <= high")
    return (float(v[0]), float(v[1]))


def parse_nemesis(raw: Any) -> NemesisSettings:
    """The [nemesis] table; ScenarioError naming the key that is wrong."""
    t = _table(raw, _KEYS, "nemesis")
    s = NemesisSettings()
    for key in ("fault_phase", "quiet", "settle", "max_offset", "max_jump", "loss",
                "latency_ms", "store_rate", "registry_rate", "publish_rate", "core_rate", "keys",
                "ack_timeout", "commit_ms"):
        if key in t:
            setattr(s, key, t[key])
    for key in ("every", "length"):
        if key in t:
            setattr(s, key, _pair(t[key], f"nemesis.{key}"))
    if "kinds" in t:
        kinds = t["kinds"]
        for k, w in kinds.items():
            if k not in KINDS:
                raise ScenarioError(f"nemesis.kinds.{k}: not a fault; known: {', '.join(KINDS)}")
            if not isinstance(w, int | float) or isinstance(w, bool) or w < 0:
                raise ScenarioError(f"nemesis.kinds.{k} must be a weight >= 0")
        if not any(kinds.values()):
            raise ScenarioError("nemesis.kinds must give some fault a weight above 0")
        s.kinds = {k: float(kinds[k]) for k in KINDS if k in kinds}
    if s.fault_phase <= 0 or s.quiet <= 0:
        raise ScenarioError("nemesis.fault_phase and nemesis.quiet must be above 0")
    if not 0 < s.settle < s.quiet:
        raise ScenarioError("nemesis.settle must be above 0 and shorter than nemesis.quiet")
    if s.loss > 1:
        raise ScenarioError("nemesis.loss is a probability between 0 and 1")
    if s.commit_ms <= 0:
        raise ScenarioError("nemesis.commit_ms must be above 0")
    if s.keys < 1 or s.ack_timeout <= 0:
        raise ScenarioError("nemesis.keys must be at least 1 and nemesis.ack_timeout above 0")
    return s


class NemesisStore(StoreSim):
    """The store workload's shell: each node's disk holds what it committed (memory starts
    as the disk at a restart; kill -9 loses what was not committed), the drift bound of the
    nemesis's clocks, and acks noticed as they arrive."""

    def __init__(self, sim: NemesisSimulation) -> None:
        super().__init__(sim)
        self.disks = {}
        self.nemesis = sim
        # node -> wid -> (replicator, op, committed here)
        self.waiting: dict[str, dict[int, list[Any]]] = {}
        # per node: keys changed since its last commit; what waits for the next commit
        # ((done, lost): lost if the node is killed first); the life a commit is due for
        self.dirty: dict[str, dict[tuple[str, str, str], None]] = {}
        self.on_commit: dict[str, list[tuple[Callable[[], None],
                                             Callable[[], None] | None]]] = {}
        self.commit_due: dict[str, int] = {}
        self.delay = sim.ns.commit_ms / 1000
        self.stats = {"store_commits": 0, "store_uncommitted_lost": 0,
                      "store_acks_lost_uncommitted": 0}

    def _drift_ms(self) -> int:
        return self.nemesis.drift_ms

    def records_for(self, node: Any) -> MemoryRecords | None:
        disk = self.disks.setdefault(node.name, MemoryRecords())
        return disk.copy()

    def start_node(self, node: Any, core: Any) -> StoreReplicator:
        rep = super().start_node(node, core)
        changed = rep.on_change

        def on_change(db: str, tbl: str, key: str, state: Any, local: bool) -> None:
            self._dirty(node, (db, tbl, key))
            if changed is not None:
                changed(db, tbl, key, state, local)
        rep.on_change = on_change
        rep.on_drop = lambda db, tbl, key: self._dirty(node, (db, tbl, key))
        return rep

    # --- group commit (service.py: _durable, _committer) --------------------------------------

    def _dirty(self, node: Any, key: tuple[str, str, str]) -> None:
        self.dirty.setdefault(node.name, {})[key] = None
        self._want_commit(node)

    def after_commit(self, node: Any, done: Callable[[], None],
                     lost: Callable[[], None] | None = None) -> None:
        """done() once everything the node holds now is committed; lost() if it is killed
        before that."""
        self.on_commit.setdefault(node.name, []).append((done, lost))
        self._want_commit(node)

    def _want_commit(self, node: Any) -> None:
        if node.name not in self.commit_due:
            self.commit_due[node.name] = node.incarnation
            self.sim.call_at(self.sim.now + self.delay, self._commit, (node, node.incarnation))

    def _commit(self, arg: tuple[Any, int]) -> None:
        node, life = arg
        if self.commit_due.get(node.name) != life or node.incarnation != life or not node.up:
            return  # killed since: crashed() dropped what it was for
        if node.paused:  # (the commit thread stops with the process)
            self.sim.call_at(self.sim.now + self.delay, self._commit, arg)
            return
        del self.commit_due[node.name]
        self.stats["store_commits"] += 1
        mem, disk = node.store.state.records, self.disks[node.name]
        for db, tbl, key in self.dirty.pop(node.name, {}):
            e = mem.get(db, tbl, key, fill=False)
            if e is None:
                disk.delete(db, tbl, key)
            else:
                disk.put(db, tbl, key, e)
        for done, _ in self.on_commit.pop(node.name, []):
            done()

    def crashed(self, node: Any) -> None:
        """kill -9: what was not committed is gone, and what waited for it is lost."""
        self.stats["store_uncommitted_lost"] += len(self.dirty.pop(node.name, {}))
        self.commit_due.pop(node.name, None)
        for _, lost in self.on_commit.pop(node.name, []):
            self.stats["store_acks_lost_uncommitted"] += 1
            if lost is not None:
                lost()

    # --- messages ----------------------------------------------------------------------------

    def send(self, node: Any, sends: list[tuple[str, Any]]) -> None:
        """On its disk first (service.py _send_one): what a node sends waits for the commit
        of its uncommitted changes, and is lost with them."""
        if sends and self.dirty.get(node.name):
            self.after_commit(node, lambda: StoreSim.send(self, node, sends))
        else:
            super().send(node, sends)

    def deliver(self, node: Any, payload: tuple[str, Any]) -> None:
        sender, msg = payload
        rep = node.store
        now, acks = split_acks(rep.receive(sender, msg, self.sim.now + node.offset))
        self.send(node, now)
        if acks:  # an ack promises the records are on disk here: after the commit
            self.after_commit(node, lambda: self.send(node, acks))
        self.sim._schedule_tick(node)
        waiting = self.waiting.get(node.name)
        if waiting:
            for wid, (owner, op, committed) in list(waiting.items()):
                if owner is rep and committed and rep.acks.get(wid):
                    self._acked(node, rep, wid, op)

    def local_committed(self, node: Any, rep: Any, wid: int) -> None:
        """A write with replicas 2 is committed here: acknowledged if its peer's ack came."""
        entry = self.waiting.get(node.name, {}).get(wid)
        if entry is not None and entry[0] is rep:
            entry[2] = True
            if rep.acks.get(wid):
                self._acked(node, rep, wid, entry[1])

    def _acked(self, node: Any, rep: Any, wid: int, op: checker.StoreOp) -> None:
        del self.waiting[node.name][wid]
        rep.acks.pop(wid, None)
        self.nemesis.store_acked(op)


class NemesisSimulation(BrokerSimulation):
    """The broker simulation (membership, registry, store and broker on every node) with the
    nemesis's faults, workload and checks (see the module rules)."""

    def __init__(self, scenario: Any, **kwargs: Any) -> None:
        if scenario.nemesis is None:
            raise ScenarioError("a nemesis run needs a [nemesis] table in the scenario")
        if not scenario.registry or not scenario.store:
            raise ScenarioError("a nemesis scenario needs registry = true and store = true")
        super().__init__(scenario, **kwargs)
        # the event log goes to a file of the run's own as well, read back by the
        # event-log checker after the run (sim/history.py); written here (_write), not by
        # the engine
        self.user_log = self._log_file
        self._log_file = None
        self.history_file: Any = tempfile.TemporaryFile(  # noqa: SIM115 (run closes it)
            "w+", encoding="utf-8", prefix="meshd-nemesis-")
        self.history_error: str | None = None
        self.ns: NemesisSettings = scenario.nemesis
        self.drift_ms = int((2 * self.ns.max_offset + 10) * 1000)
        self.storesim = NemesisStore(self)
        self.save_states = True  # kill -9 loses consumer states younger than SAVE_EVERY
        if self.net.default.bandwidth <= 0 and not self.net.links:
            self.size_messages = False  # (registry and store bytes are not reported)
        self.nrng = self._rng("nemesis")
        self.wrng = self._rng("workload")
        self.ring: collections.deque[str] = collections.deque(maxlen=EXCERPT_RING)
        self.violations: list[dict[str, Any]] = []
        self.fault_counts: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.quiet_periods = 0
        self.rounds = 0
        self.checked_ops = 0
        self.phase_end = 0.0
        self.in_phase = False
        self.cut_until: float | None = None
        self.paused_until: dict[str, float] = {}
        self.base_link = {"loss": self.net.default.loss, "latency": self.net.default.latency}
        self.link_until: dict[str, float] = {}  # "loss", "latency" -> when it ends
        self.exceptions = 0
        # the ledger
        self.ledger = checker.StoreLedger()
        self.lww_keys = self.ledger.lww_keys
        self.counters = self.ledger.counters
        self.sets = self.ledger.sets
        self.store_ops = {"acked": 0, "unknown": 0, "issued": 0}
        # entry key -> (ts of its last write, owner, the owner's life then, a removal)
        self.reg_latest: dict[str, tuple[Any, str, int, bool]] = {}
        self.reg_mine: dict[str, list[str]] = {}  # node -> its live instances this life
        self.reg_count = 0
        self.dead_letters: dict[tuple[str, str], str] = {}
        self.checked_publishes = 0
        self.dup_reported: set[tuple[str, str]] = set()
        # what the checks have looked at so far: publishes (in order), owed pairs not yet
        # received, repeated pairs; each check looks at what is new since (24 hours of
        # publishes scanned at every quiet period made the checks grow with the run)
        self.owed_scanned = 0
        self.owed_open: dict[tuple[str, str], None] = {}
        self.owed_total = 0
        self.repeats_seen = 0
        self.core_ledger = checker.CoreLedger()
        self.core_probes: list[tuple[str, list[str]]] = []  # this quiet period's

    # --- engine hooks -----------------------------------------------------------------------

    def hlc_bounds(self) -> dict[str, Any]:
        return {"max_drift_ms": self.drift_ms}

    def log(self, line: str) -> None:
        self._write(line)
        self.ring.append(line)

    def hist(self, node: str, kind: str, data: Any, raw: str | None = None) -> None:
        """A history record for the event-log checker (sim/history.py): what a client did
        or was told, or what the nodes held at a check (`raw`: `data` as JSON already).
        Not kept for excerpts."""
        text = raw if raw is not None else json.dumps(data, separators=(",", ":"),
                                                      sort_keys=True)
        self._write(f"{self.now:.6f} {node} hist {kind} {text}")

    def _write(self, line: str) -> None:
        """A line into the log's sha256, the run's own file and the caller's file. A
        failed write to the run's own file ends the event-log check (reported in the
        result), never a node: it is not the cluster's fault."""
        data = line + "\n"
        self._sha.update(data.encode())
        if self.history_file is not None:
            try:
                self.history_file.write(data)
            except OSError as exc:
                self.history_error = f"cannot write the event log for its checker: {exc}"
                self.history_file.close()
                self.history_file = None
        if self.user_log is not None:
            self.user_log.write(data)

    def _schedule_faults(self) -> None:
        super()._schedule_faults()
        self.hist("-", "setup", {
            "core": [[c.pattern, c.queue] for c in self.workload.core_subscribers],
            "durable": {name: list(p) for name, p in self.names.items()}})
        self.call_at(self.sc.warmup, self._round)

    def failed(self, exc: Exception, target: Any) -> bool:
        self.exceptions += 1
        node = target if isinstance(target, SimNode) else getattr(
            getattr(target, "__self__", None), "node", None)
        name = node.name if isinstance(node, SimNode) else None
        where = "".join(traceback.format_exception(exc, limit=-4)).strip()
        self.hist(name or "-", "exception", {"detail": f"{type(exc).__name__}: {exc}\n{where}"})
        self.violation(checker.Finding("no-crash-from-exception",
                                       f"{type(exc).__name__}: {exc}\n{where}",
                                       [name] if name else [], [name] if name else []))
        if isinstance(node, SimNode) and node.up:
            self._crash(node, None)  # restarted with the others at the next quiet period
        return self.exceptions < MAX_EXCEPTIONS

    # --- rounds -----------------------------------------------------------------------------

    def _round(self, _arg: Any = None) -> None:
        s = self.ns
        if self.now + s.fault_phase > self.sc.duration:
            return
        self.phase_end = self.now + s.fault_phase
        self.in_phase = True
        self.rounds += 1
        self.log(f"{self.now:.6f} - nemesis round until {self.phase_end:.3f}")
        self.hist("-", "round", {"until": self.phase_end})
        self.call_at(self.phase_end, self._quiet)
        self.call_at(self.now + self.nrng.uniform(*s.every), self._fault)
        for rate, fn in ((s.store_rate, self._store_op), (s.registry_rate, self._registry_op),
                         (s.publish_rate, self._publish), (s.core_rate, self._publish_core)):
            if rate > 0:
                self.call_at(self.now + self.wrng.expovariate(rate), self._work, (rate, fn))

    def _work(self, arg: tuple[float, Any]) -> None:
        rate, fn = arg
        if not self.in_phase:
            return
        fn()
        self.call_at(self.now + self.wrng.expovariate(rate), self._work, arg)

    def _quiet(self, _arg: Any = None) -> None:
        self.in_phase = False
        self._heal_all()
        if self.workload.core_subscribers:
            self.call_at(self.now + self.ns.settle / 2, self._core_probe)
        self.call_at(self.now + self.ns.settle, self._check)
        self.call_at(self.now + self.ns.quiet, self._round)

    # --- faults -----------------------------------------------------------------------------

    def _fault(self, _arg: Any = None) -> None:
        if not self.in_phase:
            return
        s = self.ns
        kinds = s.kinds or dict.fromkeys(KINDS, 1.0)
        names = list(kinds)
        kind = self.nrng.choices(names, weights=[kinds[k] for k in names])[0]
        end = min(self.now + self.nrng.uniform(*s.length), self.phase_end)
        if getattr(self, f"_start_{kind}")(end):
            self.fault_counts[kind] += 1
        self.call_at(self.now + self.nrng.uniform(*s.every), self._fault)

    def _running(self) -> list[SimNode]:
        return [n for n in self.nodes if n.up and not n.paused]

    def _start_partition(self, end: float) -> bool:
        if self.cut_until is not None:
            return False
        n = len(self.nodes)
        order = list(range(n))
        self.nrng.shuffle(order)
        form = self.nrng.choice(("halves", "islands", "one-way", "bridge"))
        if form == "islands":
            k = self.nrng.randint(3, 5)
            group = {idx: pos % k for pos, idx in enumerate(order)}
        else:
            group = {idx: int(pos >= n // 2) for pos, idx in enumerate(order)}
        bridge = order[0] if form == "bridge" else None
        blocked = set()
        for a in range(n):
            for b in range(n):
                if group[a] == group[b] or bridge in (a, b):
                    continue
                if form == "one-way" and group[a] != 0:
                    continue  # side 1 still reaches side 0
                blocked.add((a, b))
        self.net.blocked = frozenset(blocked)
        self.cut_until = end
        sides = sorted({g for g in group.values()})
        members = [" ".join(self.nodes[i].name for i in sorted(group) if group[i] == g)
                   for g in sides]
        self.log(f"{self.now:.6f} - nemesis partition {form}"
                 + (f" bridge {self.nodes[bridge].name}" if bridge is not None else "")
                 + "".join(f" | {m}" for m in members))
        self.call_at(end, self._end_partition, end)
        return True

    def _end_partition(self, end: float) -> None:
        if self.cut_until == end:
            self.net.blocked = frozenset()
            self.cut_until = None
            self.log(f"{self.now:.6f} - nemesis heal partition")

    def _start_crash(self, end: float) -> bool:
        down = sum(1 for n in self.nodes if not n.up)
        pool = [n for n in self.nodes if n.up]
        if not pool or down + 1 > len(self.nodes) // 3:
            return False
        node = pool[self.nrng.randrange(len(pool))]
        self._crash(node, None)
        self.call_at(end, self._restart, node)
        return True

    def _start_pause(self, end: float) -> bool:
        pool = self._running()
        if not pool:
            return False
        node = pool[self.nrng.randrange(len(pool))]
        self._pause_node(node, "full", end - self.now)
        self.paused_until[node.name] = end
        self.call_at(end, self._end_pause, (node, end))
        return True

    def _end_pause(self, arg: tuple[SimNode, float]) -> None:
        node, end = arg
        if self.paused_until.get(node.name) == end:
            del self.paused_until[node.name]
            self._resume_node(node)

    def _start_clock(self, end: float) -> bool:
        pool = [n for n in self.nodes if n.up]
        node = pool[self.nrng.randrange(len(pool))]
        s = self.ns
        jump = self.nrng.uniform(-s.max_jump, s.max_jump)
        total = max(-s.max_offset, min(s.max_offset, node.offset + node.jump + jump))
        node.jump = total - node.offset
        self.log(f"{self.now:.6f} {node.name} clock jump {jump:+.3f} now {total:+.3f}")
        return True

    def _start_loss(self, end: float) -> bool:
        return self._link_fault("loss", self.nrng.uniform(0.01, self.ns.loss), end)

    def _start_latency(self, end: float) -> bool:
        extra = self.nrng.uniform(0.01, self.ns.latency_ms / 1000)
        return self._link_fault("latency", self.base_link["latency"] + extra, end)

    def _link_fault(self, kind: str, value: float, end: float) -> bool:
        """Set every link's `kind` ("loss", "latency") until `end` (one at a time)."""
        if kind in self.link_until:
            return False
        setattr(self.net.default, kind, value)
        self.link_until[kind] = end
        self.log(f"{self.now:.6f} - nemesis {kind} {value:.4f}")
        self.call_at(end, self._end_link_fault, (kind, end))
        return True

    def _end_link_fault(self, arg: tuple[str, float]) -> None:
        kind, end = arg
        if self.link_until.get(kind) == end:
            del self.link_until[kind]
            setattr(self.net.default, kind, self.base_link[kind])
            self.log(f"{self.now:.6f} - nemesis {kind} ends")

    def _heal_all(self) -> None:
        if self.cut_until is not None:
            self._end_partition(self.cut_until)
        for kind, end in list(self.link_until.items()):
            self._end_link_fault((kind, end))
        for node in self.nodes:
            if node.name in self.paused_until:
                self._end_pause((node, self.paused_until[node.name]))
            if not node.up:
                self._restart(node)
        self.log(f"{self.now:.6f} - nemesis quiet")

    # --- the workload -----------------------------------------------------------------------

    def _client_node(self, attr: str) -> SimNode | None:
        pool = [n for n in self.nodes if n.up and not n.paused and getattr(n, attr) is not None]
        return pool[self.wrng.randrange(len(pool))] if pool else None

    def _store_op(self) -> None:
        node = self._client_node("store")
        if node is None:
            return
        rng, rep, keys = self.wrng, node.store, self.ns.keys
        kind = rng.choice(("write", "write", "delete", "incr", "add", "add", "remove"))
        now = self.now + node.offset
        self.store_ops["issued"] += 1
        n = self.store_ops["issued"]
        if kind in ("write", "delete"):
            key = f"r{rng.randrange(keys)}"
            ts = rep.hlc.now()
            value = None if kind == "delete" else f"v{n}".encode()
            delta: crdt.State = {"lww": crdt.lww(ts, value)}
            self.lww_keys.setdefault(key, checker.LwwKey()).written[ts] = value
            op = checker.StoreOp(kind, key, node.name, n, ts=ts)
        else:
            # (sets get new keys each round: an OR-set keeps every tag it was ever given,
            # so one key churned for 24 hours would grow without end; the store's, as is)
            key = f"c{rng.randrange(keys)}" if kind == "incr" else \
                f"s{self.rounds}.{rng.randrange(keys)}"
            current = rep.state.get(DB, TBL, key) or {}
            if kind == "incr":
                d = rng.randint(1, 5)
                delta = {"counter": crdt.counter_add(current.get("counter"), node.name, d)}
                self.counters.setdefault(key, checker.CounterKey())
                op = checker.StoreOp(kind, key, node.name, n, delta=d)
            elif kind == "add":
                element = f"e{rng.randrange(keys)}"
                ts = rep.hlc.now()
                tag = f"{node.name}:{ts[0]}:{ts[1]}:{node.incarnation}"  # store/service.py
                if tag in self.sets.get(key, checker.SetKey()).adds:
                    self.violation(checker.Finding("set-tag-unique", f"{key}: tag {tag} made "
                                                   "twice", [node.name], [key]))
                delta = {"set": crdt.set_add_delta(element, tag)}  # as store/service.py
                self.sets.setdefault(key, checker.SetKey()).adds[tag] = element
                op = checker.StoreOp(kind, key, node.name, n, tags=(tag,), element=element)
            else:
                have = crdt.set_members(current.get("set"))
                if not have:
                    return
                element = have[rng.randrange(len(have))]
                removed = crdt.set_remove_delta(current.get("set"), element)
                assert removed is not None
                seen = tuple(removed["removed"])
                delta = {"set": removed}
                self.sets.setdefault(key, checker.SetKey()).removed.update(seen)
                op = checker.StoreOp(kind, key, node.name, n, tags=seen, element=element)
        replicas = rng.choice((1, 2))
        _, wid = rep.local(DB, TBL, key, delta, now, want_acks=replicas > 1)
        self.log(f"{self.now:.6f} {node.name} store {kind} {key} {op.element or op.delta or ''}"
                 f" r{replicas}")
        rec: dict[str, Any] = {"id": n, "kind": kind, "key": key}
        if op.ts is not None:
            rec["ts"], rec["value"] = op.ts, None if kind == "delete" else f"v{n}"
        elif kind == "incr":
            rec["delta"] = op.delta
        else:
            rec["element"], rec["tags"] = op.element, op.tags
        self.hist(node.name, "op", rec)
        store = self.storesim
        if wid is None:  # acknowledged once committed here (service.py _commit_local)
            store.after_commit(node, lambda: self.store_acked(op), lambda: self.store_unknown(op))
        else:
            store.waiting.setdefault(node.name, {})[wid] = [rep, op, False]
            store.after_commit(node, lambda: store.local_committed(node, rep, wid))
            self.call_at(self.now + self.ns.ack_timeout, self._ack_timeout, (node, rep, wid))
        self._schedule_tick(node)

    def _ack_timeout(self, arg: tuple[SimNode, Any, int]) -> None:
        node, rep, wid = arg
        waiting = self.storesim.waiting.get(node.name, {})
        entry = waiting.get(wid)
        if entry is None or entry[0] is not rep:
            return  # acknowledged, or the op's node life is over (decided below)
        del waiting[wid]
        rep.acks.pop(wid, None)
        self.store_unknown(entry[1])

    def store_acked(self, op: checker.StoreOp) -> None:
        self.store_ops["acked"] += 1
        self.ledger.acked(op)
        self.hist(op.node, "acked", op.id)

    def store_unknown(self, op: checker.StoreOp) -> None:
        self.store_ops["unknown"] += 1
        self.ledger.unknown(op)
        self.hist(op.node, "unknown", op.id)

    def _crash(self, node: SimNode, restart_after: float | None) -> None:
        # ops waiting for acks on the node: the client never learns their outcome
        for _rep, op, _ in self.storesim.waiting.pop(node.name, {}).values():
            self.store_unknown(op)
        self.storesim.crashed(node)
        self.reg_mine.pop(node.name, None)  # (its instances die with it: see _check)
        super()._crash(node, restart_after)

    def _registry_op(self) -> None:
        node = self._client_node("replicator")
        if node is None:
            return
        rep = node.replicator
        mine = self.reg_mine.setdefault(node.name, [])
        now = self.now + node.offset
        if mine and (len(mine) >= REG_PER_NODE or self.wrng.random() < 0.4):
            key = mine.pop(self.wrng.randrange(len(mine)))
            sends = rep.write(key, str(node.incarnation), None, now)
            what = "deregister"
        else:
            self.reg_count += 1
            key = f"i{self.reg_count}"
            sends = rep.write(key, str(node.incarnation),
                              {"service": f"svc{self.reg_count % 5}", "node": node.name,
                               "id": key}, now)
            mine.append(key)
            what = "register"
        entry = rep.state.entries[f"{node.name}/{key}"]
        self.reg_latest[entry.key] = (entry.ts, node.name, node.incarnation,
                                      entry.value is None)
        self.log(f"{self.now:.6f} {node.name} registry {what} {key}")
        self.hist(node.name, "reg", {"key": entry.key, "ts": entry.ts, "life": node.incarnation,
                                     "gone": entry.value is None})
        self._reg_send(node, sends)
        self._schedule_tick(node)

    def _publish(self) -> None:
        self._publish_one(None)  # type: ignore[arg-type]

    def _publish_core(self) -> None:
        if not self.workload.core_subscribers:
            return
        node = self._client_node("core")
        if node is not None:
            topics = self.workload.topics
            self.publish_core(node, topics[self.wrng.randrange(len(topics))])

    def core_received(self, b: BrokerNode, sub: Any, origin: str,
                      wired: dict[str, Any]) -> None:
        super().core_received(b, sub, origin, wired)
        i = self._core_index[id(sub.cfg)]
        _, topic, seq, _ = self.core_published[wired["id"]]
        cfg = sub.cfg
        if not matches(cfg.pattern, topic):
            self.violation(checker.Finding("broker-core-matching", f"{wired['id']} on "
                                           f"{topic} handed to core{i}, subscribed to "
                                           f"{cfg.pattern}", [b.name], [wired["id"]]))
        for f in self.core_ledger.handed(f"core{i}", cfg.queue, wired["id"], origin, topic,
                                         seq):
            f.nodes = [b.name]
            self.violation(f)

    def _core_probe(self, _arg: Any = None) -> None:
        """With every fault healed for settle/2: a core message per topic from CORE_PROBES
        running nodes, which every attached matching subscriber (one member of each
        matching group) must get by the check."""
        pool = self._running()
        for node in self.wrng.sample(pool, min(CORE_PROBES, len(pool))):
            for topic in self.workload.topics:
                msg_id = self.publish_core(node, topic)
                targets = set()
                for i, cfg in enumerate(self.workload.core_subscribers):
                    attached = self.nodes[cfg.node].up and cfg.at < self.now
                    if attached and matches(cfg.pattern, topic):
                        targets.add(cfg.queue or f"core{i}")
                self.core_probes.append((msg_id, sorted(targets)))
                self.hist(node.name, "probe", {"msg": msg_id, "targets": sorted(targets)})

    def offered(self, b: BrokerNode, key: Any, o: Any) -> None:
        super().offered(b, key, o)
        msg_id = self.id_at.get((b.name, *key[:2], o.seq))
        if msg_id is None:
            return
        if o.kind != "deliver":
            self.dead_letters[(key[2], msg_id)] = f"attempt {o.attempt}"
            self.log(f"{self.now:.6f} {b.name} dead {key[2]} {msg_id}")
            self.hist(b.name, "dead", {"name": key[2], "msg": msg_id,
                                       "why": f"attempt {o.attempt}"})
        else:
            self.hist(b.name, "offer", {"name": key[2], "msg": msg_id})

    # --- checks -----------------------------------------------------------------------------

    def _owed_open(self) -> list[tuple[str, str]]:
        """The owed (durable name, id) pairs of publishes before this phase's end not
        received yet (_owed, kept up as the run goes: a pair received stays received)."""
        items = itertools.islice(self.published.items(), self.owed_scanned, None)
        for msg_id, (_, _, topic, _, t) in items:
            if t >= self.phase_end:
                break
            self.owed_scanned += 1
            for name, patterns in self.names.items():
                if any(matches(p, topic) for p in patterns):
                    self.owed_open[(name, msg_id)] = None
                    self.owed_total += 1
        for pair in [p for p in self.owed_open if p in self.received_n]:
            del self.owed_open[pair]
        return list(self.owed_open)

    def violation(self, f: checker.Finding) -> None:
        self.violations.append(checker.violation(f, self.now, self.ring))
        self.log(f"{self.now:.6f} - violation {f.invariant} {' '.join(f.nodes)}")

    def _check(self, _arg: Any = None) -> None:
        self.quiet_periods += 1
        up = [n for n in self.nodes if n.up]
        findings: list[checker.Finding] = []
        views = {n.name: [m.name for m in n.core.member_list() if m.state == ALIVE]
                 for n in up}
        findings += checker.membership(views, [n.name for n in up])
        # digests of what readers see: a tombstone is collected at a different moment on
        # each node (the registry's after 600 s as each saw it; the store's by its clock),
        # so raw digests differ for a while after every collection
        findings += checker.digests("registry", {n.name: sorted(
            (k, e.ts) for k, e in n.replicator.state.entries.items() if e.value is not None)
            for n in up})
        seen: dict[tuple[str, int], tuple[Any, Any, str]] = {}
        frags: dict[str, list[str]] = {}
        findings += checker.digests("store", {n.name: self._store_view(
            n, seen, frags.setdefault(n.name, [])) for n in up})
        held = {n.name: {k: e.ts for k, e in n.replicator.state.entries.items()} for n in up}
        self._observed(up, views, frags)
        live = {n.name: n.incarnation for n in up}
        latest = {k: (ts, owner, gone) for k, (ts, owner, life, gone)
                  in self.reg_latest.items() if live.get(owner) == life}
        findings += checker.registry(latest, held)
        self.checked_ops += len(latest)
        if up:
            state = up[0].store.state
            for key, led in sorted(self.lww_keys.items()):
                s = state.get(DB, TBL, key)
                findings += checker.lww(key, led, s.get("lww") if s else None)
            for key, cled in sorted(self.counters.items()):
                s = state.get(DB, TBL, key) or {}
                c = s.get("counter")
                findings += checker.counter(key, cled, crdt.counter_value(c))
                for node, nled in sorted(cled.slots.items()):
                    findings += checker.counter(f"{key}[{node}]", nled,
                                                c["p"].get(node, 0) if c else 0)
            for key, sled in sorted(self.sets.items()):
                s = state.get(DB, TBL, key) or {}
                findings += checker.or_set(key, sled, crdt.set_members(s.get("set")))
            self.checked_ops += self.store_ops["acked"]
        findings += checker.broker(self._owed_open(), self.received_n, self.dead_letters)
        self.checked_ops += self.owed_total
        extra = {}
        for name, msg_id in dict.fromkeys(self.repeated[self.repeats_seen:]):
            if (name, msg_id) in self.dup_reported:
                continue
            origin, ns, topic, seq, _ = self.published[msg_id]
            over = self.received_n[(name, msg_id)] - \
                self.offers.get((origin, ns, topic, name, seq), 0)
            if over > 0:
                extra[(name, msg_id)] = over
                self.dup_reported.add((name, msg_id))
        self.repeats_seen = len(self.repeated)
        findings += checker.queue_duplicates(extra)
        findings += checker.core_delivered(self.core_probes, self.core_ledger)
        self.checked_ops += len(self.core_probes)
        self.core_probes = []
        for f in findings:
            self.violation(f)
        self.log(f"{self.now:.6f} - nemesis check {len(findings)} violations")

    def _store_view(self, node: SimNode, seen: dict[tuple[str, int], tuple[Any, Any, str]],
                    frags: list[str]) -> list[Any]:
        """What a reader of the workload's keys gets on `node`; each key's history record
        (its register, counter value and per-node increments, set members, as JSON) goes to
        `frags`. A key's view is made once per state (`seen`: most nodes hold the same
        states; looked up by key and entry hash, and taken only if the states are equal, so
        a bad hash cannot hide a difference)."""
        records = node.store.state.records
        out: list[Any] = []
        for key in [*sorted(self.lww_keys), *sorted(self.counters), *sorted(self.sets)]:
            e = records.get(DB, TBL, key)
            s = {} if e is None else e.state
            hit = None if e is None else seen.get((key, e.hash))
            if hit is not None and hit[0] == s:
                out.append(hit[1])
                frags.append(hit[2])
                continue
            reg = s.get("lww")
            view = (key, None if reg is None or reg[1] is None else (reg[0], reg[1]),
                    crdt.counter_value(s.get("counter")), crdt.set_members(s.get("set")))
            c = s.get("counter")
            frag = json.dumps([key, None if reg is None else [
                reg[0], None if reg[1] is None else reg[1].decode()], view[2],
                c["p"] if c else {}, view[3]], separators=(",", ":"), sort_keys=True)
            if e is not None:
                seen[(key, e.hash)] = (s, view, frag)
            out.append(view)
            frags.append(frag)
        return out

    def _observed(self, up: list[SimNode], alive: dict[str, list[str]],
                  frags: dict[str, list[str]]) -> None:
        """The history record of a check: the running nodes (and their lives), what each
        sees as alive, holds in the registry and reads from the workload's keys; each
        distinct view written once, the nodes naming it by its index."""
        def index(views: list[str], refs: dict[str, int], text: str) -> int:
            if text not in refs:
                refs[text] = len(views)
                views.append(text)
            return refs[text]
        parts = [f'"up":{json.dumps({n.name: n.incarnation for n in up}, sort_keys=True)}']
        for what, by_node in (
                ("alive", {n: json.dumps(sorted(v), separators=(",", ":"))
                           for n, v in alive.items()}),
                ("registry", {n.name: json.dumps(
                    {k: [e.ts, e.value is not None] for k, e in n.replicator.state.entries.items()},
                    separators=(",", ":"), sort_keys=True) for n in up}),
                ("store", {n: "[" + ",".join(f) + "]" for n, f in frags.items()})):
            views: list[str] = []
            refs: dict[str, int] = {}
            names = {n: index(views, refs, text) for n, text in sorted(by_node.items())}
            parts.append(f'"{what}":{json.dumps(names, sort_keys=True)}')
            parts.append(f'"{what}_views":[{",".join(views)}]')
        self.hist("-", "check", None, "{" + ",".join(parts) + "}")

    # --- the result -------------------------------------------------------------------------

    def _history_check(self) -> dict[str, Any]:
        """The checker over the event log, afterwards: the invariants again from what the
        log alone says. Each of its findings marks one found in the run with the same
        time, invariant and detail, or is added (found by it alone)."""
        if self.history_file is None:
            return {"error": self.history_error}
        started = time.perf_counter()
        self.history_file.flush()
        self.history_file.seek(0)
        report = history.check(self.history_file)
        by_key: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for v in self.violations:
            by_key.setdefault((v["time"], v["invariant"], v["detail"]), []).append(v)
        for v in report.violations:
            same = by_key.get((v["time"], v["invariant"], v["detail"]))
            if same:
                same.pop(0)["found_by"].append("event-log")
            else:
                self.violations.append({**v, "found_by": ["event-log"]})
        return {"violations": len(report.violations), "checked_ops": report.checked_ops,
                "lines": report.lines, "checks": report.checks,
                "wall_s": round(time.perf_counter() - started, 3)}

    def run(self) -> dict[str, Any]:
        try:
            result = super().run()
            self.hist("-", "end", {"checks": self.quiet_periods})
            result["event_log_sha256"] = self._sha.hexdigest()  # (the end record too)
            for v in self.violations:
                v["found_by"] = ["quiet-period"]
            result["history_check"] = self._history_check()
        finally:
            if self.history_file is not None:
                self.history_file.close()
        result["violations"] = self.violations
        result["faults"] = dict(self.fault_counts)
        result["quiet_periods"] = self.quiet_periods
        result["checked_ops"] = self.checked_ops
        result["not_modelled"] = NOT_MODELLED
        result["metrics"].update({f"store_ops_{k}": v for k, v in self.store_ops.items()})
        result["metrics"]["registry_ops"] = self.reg_count
        result["metrics"].update(self.storesim.stats)
        return result
