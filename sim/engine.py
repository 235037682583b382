"""Discrete-event simulator that runs many real membership cores over a simulated network.

Theory of operation
-------------------
One heap of events in virtual time: packet deliveries, core ticks (scheduled at each core's
``next_deadline()``), and scheduled calls (faults, changes, checks). Popping an event hands it
to the node's core; the core's output is turned into more events. Nothing reads the wall
clock except for `sim_wall_s`.

Rules:
- Determinism: one seed drives everything. The network, the fault schedule and each node's
  core get their own ``random.Random`` derived from the seed and a fixed label, so the same
  scenario and seed produce the same byte-for-byte event log, whose sha256 is reported.
  Nothing iterates over sets of strings (their order depends on PYTHONHASHSEED).
- A node's clock is virtual time plus its clock offset; cores only ever see their own clock.
- Crash: the node stops at once and forgets everything; messages to it are lost. Restart:
  a new core on the same address with a higher incarnation (as if persisted) joins again.
- Pause ("full"): the node handles nothing, timers included; on resume its expired timers
  fire first, then the packets that queued up, as a process descheduled for a while would.
  Stall ("receive" mode): timers keep firing (it keeps probing and gossiping) but incoming
  packets queue until the stall ends: the slow-message-processing failure Lifeguard targets.
- Ties in time are broken by insertion order.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import random
import resource
import sys
import time
from collections.abc import Callable
from typing import IO, Any

import cbor2

from meshd import namespaces
from meshd.hlc import HLC
from meshd.membership.core import Membership, Output
from meshd.membership.messages import ALIVE, decode_packet, encode_packet
from meshd.membership.table import Names
from meshd.registry.core import select, view
from meshd.registry.replication import Replicator

from .metrics import Metrics
from .network import Network
from .routingsim import RoutingSim
from .scenario import Fault, Scenario, ScenarioError
from .storesim import STORE, StoreSim

DELIVER, TICK, CALL, REG = 0, 1, 2, 3
NO_PAUSE, FULL, RECEIVE = 0, 1, 2
# registry_namespaces: the namespaces greeter instances are written in (the first by naming
# none, as an old node's record)
NAMESPACES = (namespaces.DEFAULT, "team-a", "team-b")


class SimNode:
    __slots__ = ("addr", "backlog", "core", "degraded_until", "idx", "incarnation", "jump",
                 "name", "offset", "pause_mode", "replicator", "routing", "store", "tick_at",
                 "up")

    def __init__(self, idx: int, name: str, addr: str) -> None:
        self.idx = idx
        self.name = name
        self.addr = addr
        self.core: Membership | None = None
        self.replicator: Replicator | None = None
        self.store: Any = None
        self.routing: Any = None
        self.up = False
        self.tick_at = math.inf
        self.offset = 0.0
        # a wall-clock jump (sim/nemesis.py): seen by what reads the wall clock (the HLCs),
        # not by the timers of the cores, which run on a monotonic clock as the daemon's do
        self.jump = 0.0
        self.pause_mode = NO_PAUSE
        self.backlog: list[tuple[str, list[Any], bool]] = []
        self.degraded_until = -math.inf
        self.incarnation = 0

    @property
    def paused(self) -> bool:
        return self.pause_mode != NO_PAUSE

    def wall_ms(self, now: float) -> int:
        """This node's wall clock at simulated time `now`, in ms (what an HLC reads)."""
        return int((now + self.offset + self.jump) * 1000)


class Simulation:
    def __init__(self, scenario: Scenario, *, seed: int | None = None,
                 nodes: int | None = None, event_log: IO[str] | None = None,
                 progress: bool = False) -> None:
        self.sc = scenario
        self.seed = scenario.seed if seed is None else seed
        self.n_initial = scenario.nodes if nodes is None else nodes
        self.settings = scenario.membership
        self.now = 0.0
        self._heap: list[tuple[float, int, int, Any, Any]] = []
        self._seq = 0
        self.nodes: list[SimNode] = []
        self.by_addr: dict[str, SimNode] = {}
        self.by_name: dict[str, SimNode] = {}
        # one name table for every core: members' records are shared while nodes agree
        self.member_names = Names()
        self._up = 0
        self.net = Network(scenario.link, self._rng("network"), scenario.stream_timeout)
        self.fault_rng = self._rng("faults")
        self.metrics = Metrics(
            scenario.warmup, scenario.duration, self.settings.gossip_interval,
            grace=self.settings.suspicion_max(self.n_initial) + 2 * self.settings.probe_interval)
        self._cuts: list[tuple[float, float, list[int]]] = []
        self._sha = hashlib.sha256()
        self._log_file = event_log
        self._progress = progress
        self._events_handled = 0
        self._codec = scenario.codec
        self._zone_index = {z.name: i for i, z in enumerate(scenario.zones)}
        self.storesim = StoreSim(self) if scenario.store else None
        self.routingsim = RoutingSim(self) if scenario.routing else None
        self.net.restricted = {i for i, z in enumerate(scenario.zones) if z.gateways > 0}
        self._zone_counts = [0] * len(scenario.zones)
        # encode registry and store messages to count their bytes (the nemesis, which has no
        # bandwidth limits and reports no bytes, saves the time)
        self.size_messages = True
        for a, b, link in scenario.zone_links:
            ia, ib = self._zone_index[a], self._zone_index[b]
            self.net.links[(ia, ib)] = link
            self.net.links[(ib, ia)] = link

    # --- helpers used by metrics ---------------------------------------------------------

    def count_up(self) -> int:
        return self._up

    def node_by_name(self, name: str) -> SimNode | None:
        return self.by_name.get(name)

    def cut_recently(self, a: str, b: str, since: float) -> bool:
        na, nb = self.by_name.get(a), self.by_name.get(b)
        if na is None or nb is None:
            return False
        for start, end, groups in self._cuts:
            if end >= since and start <= self.now and groups[na.idx] != groups[nb.idx]:
                return True
        return False

    # --- plumbing ------------------------------------------------------------------------

    def _rng(self, label: str) -> random.Random:
        return random.Random(f"{self.seed}:{label}")

    def _push(self, when: float, kind: int, target: Any, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, target, payload))

    def call_at(self, when: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        self._push(when, CALL, fn, arg)

    def log(self, line: str) -> None:
        data = line + "\n"
        self._sha.update(data.encode())
        if self._log_file is not None:
            self._log_file.write(data)

    def _new_node(self) -> SimNode:
        idx = len(self.nodes)
        name = f"n{idx:04d}"
        node = SimNode(idx, name, f"{name}:7946")
        self.nodes.append(node)
        self.by_addr[node.addr] = node
        self.by_name[name] = node
        zone = 0
        if self.sc.zones:
            # zones take consecutive node ranges in proportion to their fraction
            total = sum(z.fraction for z in self.sc.zones)
            pos = (idx % self.n_initial + 0.5) / self.n_initial * total
            acc = 0.0
            for i, z in enumerate(self.sc.zones):
                acc += z.fraction
                if pos <= acc:
                    zone = i
                    break
        gateway = False
        if self.sc.zones:
            # the first `gateways` nodes of a zone are its gateways
            gateway = self._zone_counts[zone] < self.sc.zones[zone].gateways
            self._zone_counts[zone] += 1
        self.net.add_node(zone, gateway)
        return node

    def is_gateway(self, node: SimNode) -> bool:
        return self.net.gateway[node.idx]

    def _start_core(self, node: SimNode) -> Membership:
        core = Membership(node.name, node.addr, self.settings,
                          self._rng(f"core:{node.name}:{node.incarnation}"),
                          self.now + node.offset, incarnation=node.incarnation,
                          names=self.member_names)
        node.core = core
        if self.sc.registry:
            node.replicator = self._start_replicator(node, core)
        if self.storesim is not None:
            node.store = self.storesim.start_node(node, core)
        node.up = True
        if self.routingsim is not None:
            node.routing = self.routingsim.start_node(node, core)
        node.tick_at = math.inf
        node.pause_mode = NO_PAUSE
        node.backlog = []
        self._up += 1
        return core

    def _start_replicator(self, node: SimNode, core: Membership) -> Replicator:
        def peers() -> list[str]:
            return core.alive_peers()

        hlc = HLC(node.name, lambda: node.wall_ms(self.now), **self.hlc_bounds())
        rep = Replicator(node.name, hlc, peers, self._rng(f"reg:{node.name}:{node.incarnation}"),
                         self.now + node.offset, sync_interval=self.sc.registry_sync_interval)
        rep.boot = str(node.incarnation)  # (the registry workloads write it as the boot id)
        return rep

    def hlc_bounds(self) -> dict[str, Any]:
        """Keyword arguments for the registry's and the broker's HLCs: the daemon's defaults
        (a nemesis widens the drift bound as an operator would for its clocks)."""
        return {}

    def _reg_send(self, node: SimNode, sends: list[tuple[str, Any]]) -> None:
        for addr, msg in sends:
            size = len(cbor2.dumps(msg)) if self.size_messages else 0
            self.metrics.sent(self.now, size)
            self.metrics.registry_bytes += size
            dst = self.by_addr.get(addr)
            if dst is None:
                continue
            when = self.net.delivery_time(node.idx, dst.idx, size, self.now, True,
                                          connect=False)
            if when is not None:
                self._push(when, REG, dst, (node.addr, msg))

    def _apply(self, node: SimNode, out: Output) -> None:
        if out.sends:
            for send in out.sends:
                self._transmit(node, send)
        if out.events:
            now = self.now
            for ev in out.events:
                self.log(f"{now:.6f} {node.name} {ev.kind} {ev.node} {ev.incarnation}")
                self.metrics.event(now, node.name, ev, self)
        self._schedule_tick(node)

    def _schedule_tick(self, node: SimNode, local: float | None = None) -> None:
        """Queue the node's next tick, at its earliest deadline (`local`: the core's, when
        the caller just asked for it)."""
        core = node.core
        if core is None or not node.up or node.pause_mode == FULL:
            return
        if local is None:
            local = core.next_deadline()
        if node.replicator is not None:
            local = min(local, node.replicator.next_deadline())
        if node.store is not None:
            local = min(local, node.store.next_deadline())
        deadline = local - node.offset
        if deadline < node.tick_at:
            node.tick_at = deadline
            # the local deadline rides along: (d - offset) + offset need not equal d in floats
            self._seq += 1
            heapq.heappush(self._heap, (deadline if deadline > self.now else self.now,
                                        self._seq, TICK, node, local))

    def _transmit(self, src: SimNode, send: Any) -> None:
        now = self.now
        size = send.size
        msgs = send.msgs
        if self._codec:
            data = encode_packet(msgs)
            size = len(data)
            msgs = decode_packet(data)
        metrics = self.metrics
        metrics.sent(now, size)
        dst = self.by_addr.get(send.addr)
        if dst is None:
            return
        when = self.net.delivery_time(src.idx, dst.idx, size, now, send.reliable)
        if when is None:
            metrics.dropped += 1
            return
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, DELIVER, dst,
                                    (src.addr, msgs, send.reliable)))

    def _deliver(self, node: SimNode, payload: tuple[str, list[Any], bool]) -> None:
        sender, msgs, reliable = payload
        out = node.core.receive(sender, msgs, self.now + node.offset, reliable)  # type: ignore[union-attr]
        self._apply(node, out)

    # --- bootstrap -----------------------------------------------------------------------

    def _bootstrap(self) -> None:
        offsets = [f for f in self.sc.faults if f.kind == "clock_offset"]
        for _ in range(self.n_initial):
            self._new_node()
        for f in offsets:
            for node in self._pick(f, self.nodes):
                node.offset = self.fault_rng.uniform(-f.max_s, f.max_s)
        if self.sc.bootstrap == "converged":
            for node in self.nodes:
                self._start_core(node)
            states = [n.core.me.to_state() for n in self.nodes]  # type: ignore[union-attr]
            for node in self.nodes:
                node.core.restore(states, self.now + node.offset)  # type: ignore[union-attr]
                self._schedule_tick(node)
            self.log(f"{self.now:.6f} - bootstrap converged {self.n_initial}")
        else:
            first = self.nodes[0]
            self._start_core(first)
            self._schedule_tick(first)
            spacing = min(0.05, self.sc.warmup / max(1, self.n_initial) / 2)
            for i, node in enumerate(self.nodes[1:], start=1):
                self.call_at(i * spacing, self._join_node, node)

    def _join_node(self, node: SimNode) -> None:
        core = self._start_core(node)
        seeds = [n.addr for n in self.nodes if n.up and n is not node]
        picks = [seeds[self.fault_rng.randrange(len(seeds))] for _ in range(min(3, len(seeds)))]
        self.log(f"{self.now:.6f} {node.name} start {node.incarnation}")
        self._apply(node, core.join(dict.fromkeys(picks), self.now + node.offset))

    # --- faults --------------------------------------------------------------------------

    def _pick(self, f: Fault, pool: list[SimNode]) -> list[SimNode]:
        if f.count is not None:
            k = f.count
        elif f.fraction is not None:
            k = round(f.fraction * len(pool))
        else:
            k = 1
        k = min(k, len(pool))
        return self.fault_rng.sample(pool, k)

    def _up_nodes(self) -> list[SimNode]:
        return [n for n in self.nodes if n.up and not n.paused]

    def _random_up_node(self) -> SimNode | None:
        pool = self._up_nodes()
        return pool[self.fault_rng.randrange(len(pool))] if pool else None

    def _schedule_faults(self) -> None:
        for f in self.sc.faults:
            handler = getattr(self, f"_fault_{f.kind.replace('-', '_')}")
            handler(f)

    def _fault_clock_offset(self, f: Fault) -> None:
        pass  # applied at bootstrap

    def _repeat(self, f: Fault, action: Callable[[Fault], None]) -> None:
        if f.count is not None:
            count = f.count
        elif f.fraction is not None:
            count = round(f.fraction * self.n_initial)
        else:
            count = 1
        for i in range(count):
            self.call_at(f.at + i * f.spacing, lambda _a, f=f: action(f))

    def _fault_crash(self, f: Fault) -> None:
        self._repeat(f, self._crash_one)

    def _crash_one(self, f: Fault) -> None:
        if f.target == "any" and f.zone is None:
            node = self._random_up_node()
        else:
            zone = None if f.zone is None else self._zone_index[f.zone]
            pool = [n for n in self._up_nodes()
                    if (f.target == "any" or self.is_gateway(n) == (f.target == "gateway"))
                    and (zone is None or self.net.zone_of[n.idx] == zone)]
            node = pool[self.fault_rng.randrange(len(pool))] if pool else None
        if node is None:
            return
        self._crash(node, f.restart_after)

    def _crash(self, node: SimNode, restart_after: float | None) -> None:
        """kill -9: the node stops at once and forgets what it held in memory; restarted
        (joining again) after `restart_after` seconds unless None."""
        core = node.core
        assert core is not None
        self.metrics.crash(node.name, core.me.incarnation, self.now)
        node.incarnation = core.me.incarnation + 1
        node.core = None
        node.replicator = None
        node.store = None
        node.routing = None
        node.up = False
        node.backlog = []
        self._up -= 1
        self.log(f"{self.now:.6f} {node.name} crash {core.me.incarnation}")
        if self.routingsim is not None:
            self.routingsim.on_crash()
        if restart_after is not None:
            self.call_at(self.now + restart_after, self._restart, node)

    def _restart(self, node: SimNode) -> None:
        if node.up:
            return
        self.metrics.restarted(node.name)
        self._join_node(node)

    def _fault_leave(self, f: Fault) -> None:
        self._repeat(f, self._leave_one)

    def _leave_one(self, f: Fault) -> None:
        node = self._random_up_node()
        if node is None:
            return
        self.log(f"{self.now:.6f} {node.name} leave")
        self._apply(node, node.core.leave(self.now + node.offset))  # type: ignore[union-attr]
        self.call_at(self.now + 1.0, self._stop_after_leave, node)

    def _stop_after_leave(self, node: SimNode) -> None:
        if node.up:
            node.up = False
            node.core = None
            node.routing = None
            self._up -= 1

    def _fault_join(self, f: Fault) -> None:
        def add(_f: Fault) -> None:
            node = self._new_node()
            self._join_node(node)
        self._repeat(f, add)

    def _fault_change(self, f: Fault) -> None:
        self._repeat(f, self._change_one)

    def _change_one(self, f: Fault) -> None:
        node = self._random_up_node()
        if node is None:
            return
        core = node.core
        assert core is not None
        out = core.update_tags({"version": str(core.me.incarnation + 1)}, self.now + node.offset)
        self.metrics.change(node.name, core.me.incarnation, self.now, self._up - 1)
        self.log(f"{self.now:.6f} {node.name} change {core.me.incarnation}")
        self._apply(node, out)

    def _fault_store_writes(self, f: Fault) -> None:
        if self.storesim is None:
            raise ScenarioError("store-writes needs `store = true` in the scenario")
        self.storesim.schedule_writes(f)

    def _fault_store_deletes(self, f: Fault) -> None:
        if self.storesim is None:
            raise ScenarioError("store-deletes needs `store = true` in the scenario")
        self.storesim.schedule_deletes(f)

    def _fault_register(self, f: Fault) -> None:
        self.call_at(f.at, self._registry_writes, (f, True))

    def _fault_deregister(self, f: Fault) -> None:
        self.call_at(f.at, self._registry_writes, (f, False))

    def _registry_writes(self, arg: tuple[Fault, bool]) -> None:
        """Chosen nodes register (or remove) `count` instances each."""
        f, register = arg
        pool = [n for n in self.nodes if n.up and n.replicator is not None]
        k = round((f.fraction if f.fraction is not None else 1.0) * len(pool))
        for node in self.fault_rng.sample(pool, k):
            rep = node.replicator
            assert rep is not None
            mine = sorted(e.key.split("/", 1)[1] for e in rep.state.entries.values()
                          if e.owner == node.name and e.value is not None)
            for i in range(f.count or 1):
                now = self.now + node.offset
                ns = namespaces.DEFAULT
                if register:
                    key = f"svc-{self._seq}-{i}"
                    value = {"service": f"svc{i % 3}", "node": node.name, "id": key}
                    if self.sc.registry_namespaces:
                        value["service"] = "greeter"
                        if i % 3:  # i % 3 == 0: no namespace named, as an old node writes
                            value["namespace"] = NAMESPACES[i % 3]
                        ns = NAMESPACES[i % 3]
                    sends = rep.write(key, str(node.incarnation), value, now)
                elif mine:
                    key = mine.pop()
                    sends = rep.write(key, str(node.incarnation), None, now)
                else:
                    break
                entry = rep.state.entries[f"{node.name}/{key}"]
                self.metrics.registry_latest[entry.key] = entry.ts
                if register:
                    self.metrics.registry_namespace_of[entry.key] = ns
                else:
                    self.metrics.registry_gone.add(entry.key)
                self._reg_send(node, sends)
            self._schedule_tick(node)
        self.log(f"{self.now:.6f} - registry {'register' if register else 'deregister'} {k}")

    def _check_namespaces(self, complete: bool) -> int:
        """Instances each node serves per namespace (the daemon's own `select`) against the
        namespace each was written in: a row in another namespace than its own counts as
        mixed (metrics). With `complete`, returns how many expected rows a node misses."""
        expected = self.metrics.registry_namespace_of
        missing = 0
        for n in self.nodes:
            if not n.up or n.replicator is None:
                continue
            rows = [view(e) for e in n.replicator.state.entries.values() if e.value is not None]
            for ns in NAMESPACES:
                got = {f"{r['node']}/{r['id']}" for r in select(rows, "greeter", ns)}
                self.metrics.registry_namespace_mixed += sum(
                    1 for k in got if expected.get(k, ns) != ns)
                if complete:
                    missing += sum(1 for k, where in expected.items()
                                   if where == ns and k not in got
                                   and k not in self.metrics.registry_gone)
        return missing

    def _check_registry(self, healed_at: float) -> None:
        up = [n for n in self.nodes if n.up and n.replicator is not None]
        digests = [n.replicator.state.digest() for n in up]  # type: ignore[union-attr]
        if all(d == digests[0] for d in digests):
            self.metrics.registry_converged.append(self.now - healed_at)
            self.log(f"{self.now:.6f} - registry converged")
            return
        self.call_at(self.now + 0.5, self._check_registry, healed_at)

    def _fault_loss(self, f: Fault) -> None:
        def set_loss(_a: Any) -> None:
            self.net.default.loss = f.loss
            self.log(f"{self.now:.6f} - loss {f.loss}")
        self.call_at(f.at, set_loss)

    def _fault_partition(self, f: Fault) -> None:
        self.call_at(f.at, self._cut, f)

    def _cut(self, f: Fault) -> None:
        order = list(range(len(self.nodes)))
        self.fault_rng.shuffle(order)
        total = sum(f.fractions)
        groups = [0] * len(self.nodes)
        acc = 0.0
        bounds = []
        for fr in f.fractions:
            acc += fr / total
            bounds.append(round(acc * len(order)))
        group = 0
        for pos, idx in enumerate(order):
            while group < len(bounds) - 1 and pos >= bounds[group]:
                group += 1
            groups[idx] = group
        self.net.group_of = groups
        self._cuts.append((self.now, math.inf, groups))
        self.log(f"{self.now:.6f} - partition {len(f.fractions)}")
        self.call_at(self.now + f.duration, self._heal, len(self._cuts) - 1)

    def _heal(self, index: int) -> None:
        start, _, groups = self._cuts[index]
        self._cuts[index] = (start, self.now, groups)
        self.net.group_of = None
        self.metrics.heals.append(self.now)
        self.metrics.rejoin_after_heal.append(None)
        self.log(f"{self.now:.6f} - heal")
        self.call_at(self.now + 0.5, self._check_rejoin, (len(self.metrics.heals) - 1, self.now))
        if self.storesim is not None:
            self.storesim.on_heal()
        if self.sc.registry:
            up = [n for n in self.nodes if n.up and n.replicator is not None]
            distinct = {repr(sorted(n.replicator.state.digest().items()))  # type: ignore[union-attr]
                        for n in up}
            self.metrics.registry_versions_at_heal = len(distinct)
            if self.sc.registry_namespaces:
                self._check_namespaces(complete=False)  # the sides differ; never mix
            self.call_at(self.now + 0.5, self._check_registry, self.now)

    def _check_rejoin(self, arg: tuple[int, float]) -> None:
        index, healed_at = arg
        up = [n for n in self.nodes if n.up]
        names = [n.name for n in up]
        for node in up:
            members = node.core.members  # type: ignore[union-attr]
            for name in names:
                m = members.get(name)
                if m is None or m.state != ALIVE:
                    self.call_at(self.now + 0.5, self._check_rejoin, arg)
                    return
        self.metrics.rejoin_after_heal[index] = self.now - healed_at
        self.log(f"{self.now:.6f} - rejoined")

    def _fault_pause(self, f: Fault) -> None:
        def start(_a: Any) -> None:
            for node in self._pick(f, [n for n in self.nodes if n.up]):
                self._schedule_next_pause(node, f)
        self.call_at(f.at, start)

    def _schedule_next_pause(self, node: SimNode, f: Fault) -> None:
        gap = self.fault_rng.uniform(*f.every)
        self.call_at(self.now + gap, self._pause, (node, f))

    def _pause_length(self, f: Fault) -> float:
        rng = self.fault_rng
        if f.pause_dist == "fixed":
            return f.pause_mean
        if f.pause_dist == "exponential":
            return min(f.pause_max, max(f.pause_min, rng.expovariate(1.0 / f.pause_mean)))
        return rng.uniform(f.pause_min, f.pause_max)

    def _pause(self, arg: tuple[SimNode, Fault]) -> None:
        node, f = arg
        until = f.until if f.until is not None else self.sc.duration
        if self.now >= until or not node.up or node.paused:
            return
        length = self._pause_length(f)
        self._pause_node(node, f.mode, length)
        self.call_at(self.now + length, self._resume, (node, f))

    def _pause_node(self, node: SimNode, mode: str, length: float) -> None:
        """Pause a node ("full" or "receive", see the module rules) for `length` seconds;
        the caller ends it with _resume_node."""
        node.pause_mode = FULL if mode == "full" else RECEIVE
        node.degraded_until = math.inf
        self.log(f"{self.now:.6f} {node.name} pause {mode} {length:.3f}")

    def _resume(self, arg: tuple[SimNode, Fault]) -> None:
        node, f = arg
        if self._resume_node(node):
            self._schedule_next_pause(node, f)

    def _resume_node(self, node: SimNode) -> bool:
        """End a node's pause: its due timers fire, then what queued up (False: it was not
        paused, or is down)."""
        if not node.up or not node.paused:
            return False
        node.pause_mode = NO_PAUSE
        node.degraded_until = self.now
        self.log(f"{self.now:.6f} {node.name} resume")
        core = node.core
        assert core is not None
        node.tick_at = math.inf
        self._apply(node, core.tick(self.now + node.offset))
        backlog, node.backlog = node.backlog, []
        for payload in backlog:
            if node.up and node.pause_mode == NO_PAUSE:
                self._deliver(node, payload)
        return True

    def failed(self, exc: Exception, target: Any) -> bool:
        """An exception escaped a core or a handler at `self.now` (`target`: the event's
        node, or the function of a scheduled call): True to go on with the run (the nemesis
        records it as a violation and crashes the node), False to raise it."""
        return False

    def _registry_result(self) -> dict[str, Any]:
        out = _registry_outcome(self.nodes, self.metrics.registry_latest)
        conv = self.metrics.registry_converged
        out["registry_converged_after_heal_s"] = round(max(conv), 3) if conv else None
        out["registry_bytes"] = self.metrics.registry_bytes
        out["registry_versions_at_heal"] = self.metrics.registry_versions_at_heal
        if self.sc.registry_namespaces:
            out["registry_namespace_missing"] = self._check_namespaces(complete=True)
            out["registry_namespace_mixed"] = self.metrics.registry_namespace_mixed
            out["registry_namespace_instances"] = {
                ns: sum(1 for k, v in self.metrics.registry_namespace_of.items()
                        if v == ns and k not in self.metrics.registry_gone)
                for ns in NAMESPACES}
        return out

    # --- main loop -----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        wall_start = time.perf_counter()
        self._bootstrap()
        self._schedule_faults()
        end = self.sc.duration
        heap = self._heap
        pop = heapq.heappop
        handled = 0
        progress = _Progress(end) if self._progress else None
        while True:  # (a try costs nothing until it catches: see failed)
            try:
                while heap and heap[0][0] <= end:
                    when, _, kind, target, payload = pop(heap)
                    self.now = when
                    handled += 1
                    if kind == DELIVER:
                        if not target.up:
                            self.metrics.dropped += 1
                        elif target.pause_mode:
                            target.backlog.append(payload)
                        else:
                            sender, msgs, reliable = payload
                            self._apply(target, target.core.receive(
                                sender, msgs, when + target.offset, reliable))
                    elif kind == TICK:
                        if target.tick_at != payload - target.offset or not target.up \
                                or target.pause_mode == FULL:
                            continue
                        target.tick_at = math.inf
                        local_now = max(when + target.offset, payload)
                        if target.replicator is not None:
                            self._reg_send(target, target.replicator.tick(local_now))
                        if target.store is not None:
                            self.storesim.send(target, target.store.tick(local_now))
                        core = target.core
                        due = core.next_deadline()
                        if due <= local_now:
                            self._apply(target, core.tick(local_now))
                        else:
                            # what was due is done (an ack came): tick() would do nothing,
                            # and every call into the core sets its clock first
                            self._schedule_tick(target, due)
                    elif kind == STORE:
                        if target.up and target.store is not None and not target.paused:
                            self.storesim.deliver(target, payload)
                    elif kind == REG:
                        if target.up and target.replicator is not None and not target.paused:
                            sender, msg = payload
                            self._reg_send(target, target.replicator.receive(
                                sender, msg, when + target.offset))
                            self._schedule_tick(target)
                    else:
                        target(payload)
                    if progress is not None and handled % 20000 == 0:
                        progress.update(when)
                break
            except Exception as exc:
                if not self.failed(exc, target):
                    raise
        if progress is not None:
            progress.close()
        self.now = end
        self._events_handled = handled
        wall = time.perf_counter() - wall_start
        metrics = self.metrics.result(max(1, self.n_initial), end)
        if self.sc.registry:
            metrics.update(self._registry_result())
        if self.storesim is not None:
            metrics.update(self.storesim.result())
        if self.routingsim is not None:
            metrics.update(self.routingsim.result())
        return {
            "scenario": self.sc.name,
            "seed": self.seed,
            "nodes": self.n_initial,
            "duration_s": end,
            "lifeguard": self.settings.lifeguard,
            "event_log_sha256": self._sha.hexdigest(),
            "sim_wall_s": round(wall, 3),
            "events": handled,
            "peak_rss_mb": round(_peak_rss_mb(), 1),
            "metrics": metrics,
            "false_death_examples": self.metrics.false_death_log[:5],
        }


def _registry_outcome(nodes: list[SimNode], latest: dict[str, Any]) -> dict[str, Any]:
    up = [n for n in nodes if n.up and n.replicator is not None]
    digests = [n.replicator.state.digest() for n in up]  # type: ignore[union-attr]
    missing = 0
    for key, ts in latest.items():
        for n in up:
            e = n.replicator.state.entries.get(key)  # type: ignore[union-attr]
            if e is None or e.ts != ts:
                missing += 1
    return {"registry_replicas_identical": all(d == digests[0] for d in digests),
            "registry_writes": len(latest), "registry_missing_latest": missing}


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / (1024 * 1024)


class _Progress:
    """A rich progress bar over simulated time, on stderr."""

    def __init__(self, end: float) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(TextColumn("simulating"), BarColumn(),
                             TextColumn("{task.completed:.0f}/{task.total:.0f} s"),
                             TimeElapsedColumn(), transient=True)
        self._bar.start()
        self._task = self._bar.add_task("sim", total=end)

    def update(self, now: float) -> None:
        self._bar.update(self._task, completed=now)

    def close(self) -> None:
        self._bar.stop()
