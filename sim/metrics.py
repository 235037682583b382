"""Measured outcomes of a simulation run.

Rules (each metric's definition):
- msgs/bytes: every packet or stream message sent by a running node inside the measurement
  window [warmup, end], divided by nodes and window length.
- dissemination: for each injected change (a node's new tags at a new incarnation), the
  time until 99.9% and 100% of the nodes that were up at the change learned it, in gossip
  intervals ("rounds"). The reported value is the worst change.
- detection: for each crash, seconds from the crash to the first suspicion of the node by
  anyone (first) and until every running node declared it dead (all);
  dead_after_suspicion: from that first suspicion until every running node declared it dead.
- false_deaths: declarations "X is dead" by a running node about a running X that had no
  fault of its own (pause, stall) within the last `grace` seconds and was not cut off from the
  observer by a partition within the last `grace` seconds. grace = the longest suspicion
  timeout, so anything a fault could still explain is not counted as false.
  degraded_deaths counts those explained by the subject's own pause or stall;
  partition_deaths those across a cut. The _after_warmup variants count only from warmup on.
- rejoin_after_heal_s: after a partition heals, seconds until every running node sees every
  other running node alive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def quantile_index(n: int, q: float) -> int:
    return max(0, math.ceil(q * n) - 1)


@dataclass
class ChangeTrack:
    node: str
    incarnation: int
    start: float
    required: int
    learned: list[float] = field(default_factory=list)
    seen: dict[str, None] = field(default_factory=dict)


@dataclass
class CrashTrack:
    node: str
    incarnation: int
    start: float
    first: float | None = None
    done: float | None = None
    dead_seen: dict[str, None] = field(default_factory=dict)


class Metrics:
    def __init__(self, warmup: float, end: float, gossip_interval: float, grace: float) -> None:
        self.warmup = warmup
        self.end = end
        self.gossip_interval = gossip_interval
        self.grace = grace
        self.msgs = 0
        self.bytes = 0
        self.dropped = 0
        self.changes: list[ChangeTrack] = []
        self._changes_by_node: dict[str, ChangeTrack] = {}
        self.crashes: list[CrashTrack] = []
        self._crash_by_node: dict[str, CrashTrack] = {}
        self.false_deaths = 0
        self.false_deaths_after_warmup = 0
        self.suspicions_after_warmup = 0
        self.false_death_subjects: dict[str, None] = {}
        self.degraded_deaths = 0
        self.partition_deaths = 0
        self.true_deaths = 0
        self.suspicions = 0
        self.heals: list[float] = []
        self.rejoin_after_heal: list[float | None] = []
        self.false_death_log: list[str] = []
        self.registry_latest: dict[str, Any] = {}
        self.registry_converged: list[float] = []
        self.registry_bytes = 0
        self.registry_versions_at_heal = 0
        self.registry_namespace_of: dict[str, str] = {}  # key -> the namespace written in
        self.registry_gone: set[str] = set()  # keys deregistered
        self.registry_namespace_mixed = 0

    # --- feeds from the engine ---------------------------------------------------------

    def sent(self, now: float, size: int) -> None:
        if now >= self.warmup:
            self.msgs += 1
            self.bytes += size

    def change(self, node: str, incarnation: int, now: float, required: int) -> None:
        track = ChangeTrack(node, incarnation, now, required)
        self.changes.append(track)
        self._changes_by_node[node] = track

    def crash(self, node: str, incarnation: int, now: float) -> None:
        track = CrashTrack(node, incarnation, now)
        self.crashes.append(track)
        self._crash_by_node[node] = track

    def restarted(self, node: str) -> None:
        self._crash_by_node.pop(node, None)

    def event(self, now: float, observer: str, ev: Any, sim: Any) -> None:
        kind = ev.kind
        if kind in ("update", "join", "alive"):
            track = self._changes_by_node.get(ev.node)
            if track is not None and ev.incarnation >= track.incarnation \
                    and observer not in track.seen and observer != track.node:
                track.seen[observer] = None
                track.learned.append(now - track.start)
            return
        if kind == "suspect":
            self.suspicions += 1
            if now >= self.warmup:
                self.suspicions_after_warmup += 1
            crash = self._crash_by_node.get(ev.node)
            if crash is not None and crash.first is None:
                crash.first = now - crash.start
            return
        if kind != "dead":
            return
        crash = self._crash_by_node.get(ev.node)
        if crash is not None:
            self.true_deaths += 1
            if crash.first is None:
                crash.first = now - crash.start
            crash.dead_seen[observer] = None
            if crash.done is None and len(crash.dead_seen) >= sim.count_up():
                crash.done = now - crash.start
            return
        subject = sim.node_by_name(ev.node)
        if subject is None or not subject.up:
            self.true_deaths += 1
            return
        if subject.degraded_until >= now - self.grace or subject.paused:
            self.degraded_deaths += 1
        elif sim.cut_recently(observer, ev.node, now - self.grace):
            self.partition_deaths += 1
        else:
            self.false_deaths += 1
            if now >= self.warmup:
                self.false_deaths_after_warmup += 1
            self.false_death_subjects[ev.node] = None
            if len(self.false_death_log) < 20:
                self.false_death_log.append(f"{now:.3f} {observer} declared {ev.node} dead "
                                            f"({ev.detail})")

    # --- results -----------------------------------------------------------------------

    def result(self, nodes: int, sim_end: float) -> dict[str, Any]:
        window = max(1e-9, sim_end - self.warmup)
        out: dict[str, Any] = {
            "msgs_per_node_per_s": round(self.msgs / nodes / window, 3),
            "bytes_per_node_per_s": round(self.bytes / nodes / window, 1),
            "kbit_per_node_per_s": round(self.bytes * 8 / 1000 / nodes / window, 2),
            "false_deaths": self.false_deaths,
            "false_death_nodes": len(self.false_death_subjects),
            "degraded_deaths": self.degraded_deaths,
            "partition_deaths": self.partition_deaths,
            "suspicions": self.suspicions,
            "suspicions_after_warmup": self.suspicions_after_warmup,
            "false_deaths_after_warmup": self.false_deaths_after_warmup,
        }
        if self.changes:
            p999: list[float] = []
            pmax: list[float] = []
            incomplete = 0
            for track in self.changes:
                times = sorted(track.learned)
                if len(times) < track.required:
                    incomplete += 1
                    times = times + [math.inf] * (track.required - len(times))
                if not times:
                    continue
                p999.append(times[quantile_index(len(times), 0.999)] / self.gossip_interval)
                pmax.append(times[-1] / self.gossip_interval)
            out["dissemination_changes"] = len(self.changes)
            out["dissemination_incomplete"] = incomplete
            out["dissemination_rounds_p999"] = _num(max(p999)) if p999 else None
            out["dissemination_rounds_max"] = _num(max(pmax)) if pmax else None
            out["dissemination_rounds_p999_mean"] = _num(sum(p999) / len(p999)) if p999 \
                else None
        if self.crashes:
            firsts = sorted(c.first for c in self.crashes if c.first is not None)
            alls = [c.done for c in self.crashes]
            out["crashes"] = len(self.crashes)
            out["detection_first_s_p50"] = (
                round(firsts[quantile_index(len(firsts), 0.5)], 3) if firsts else None)
            out["detection_first_s_max"] = round(max(firsts), 3) if firsts else None
            complete = [a for a in alls if a is not None]
            out["detection_all_s_max"] = (
                round(max(complete), 3) if complete and len(complete) == len(alls) else None)
            out["detection_all_s_p50"] = (
                round(sorted(complete)[quantile_index(len(complete), 0.5)], 3)
                if complete else None)
            out["detection_incomplete"] = len(alls) - len(complete)
            after = [c.done - c.first for c in self.crashes
                     if c.done is not None and c.first is not None]
            out["dead_after_suspicion_s_max"] = (
                round(max(after), 3) if after and len(after) == len(alls) else None)
        if self.heals:
            known = [r for r in self.rejoin_after_heal if r is not None]
            out["rejoin_after_heal_s"] = (
                round(max(known), 3) if known and len(known) == len(self.heals) else None)
        return out


def _num(x: float) -> float | None:
    return None if math.isinf(x) else round(x, 2)
