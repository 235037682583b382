"""Call statistics (per service, endpoint and status; per local instance) and the node's
stats samples.

Rules:
- `CallStats.observe` is on every call's path: a dict lookup and a few additions, no
  allocation once a key exists. A call this node both makes and serves (a local call on
  the fast path) is observed once, on side LOCAL, and read as both sides (`by_side`).
  Durations go into fixed buckets (Prometheus's default buckets, in seconds), so
  `meshd stats` and `/metrics` read the same histograms.
- Cardinality is bounded: at most MAX_SERIES (side, service, endpoint, status) keys; calls
  beyond them are counted under service "_other" (a caller naming endpoints that do not
  exist cannot grow the table without end). Instances are forgotten when they deregister.
- `NodeSampler` takes a sample every `debug.stats_interval` seconds into a bounded buffer:
  uptime, CPU seconds, RSS, trio tasks and what the node's components report (links,
  members by state, store size).
"""

from __future__ import annotations

import os
import resource
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0)
MAX_SERIES = 4096
MAX_ENDPOINTS = 256  # endpoints one instance keeps histograms for
OTHER = "_other"


@dataclass(slots=True)
class Series:
    """One histogram: count, sum of seconds, and per-bucket counts (not cumulative)."""

    count: int = 0
    total: float = 0.0
    errors: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))

    def observe(self, seconds: float, status: int = 0) -> None:
        """One call of `seconds`; a non-zero `status` counts it as an error too."""
        self.count += 1
        self.total += seconds
        self.buckets[bisect_left(BUCKETS, seconds)] += 1
        if status:
            self.errors += 1

    def merged(self, other: Series) -> Series:
        return Series(self.count + other.count, self.total + other.total,
                      self.errors + other.errors,
                      [a + b for a, b in zip(self.buckets, other.buckets, strict=True)])

    def cumulative(self) -> list[int]:
        out, run = [], 0
        for n in self.buckets:
            run += n
            out.append(run)
        return out

    def quantile(self, q: float) -> float:
        """An estimate (the upper bound of the bucket holding the q-th call)."""
        if not self.count:
            return 0.0
        want, run = q * self.count, 0
        for i, n in enumerate(self.buckets):
            run += n
            if run >= want:
                return BUCKETS[i] if i < len(BUCKETS) else BUCKETS[-1]
        return BUCKETS[-1]


@dataclass(slots=True)
class InstanceStats:
    service: str
    requests: int = 0
    errors: int = 0
    in_flight: int = 0
    endpoints: dict[str, Series] = field(default_factory=dict)


SeriesKey = tuple[str, str, str, int]  # side, service, endpoint, status
LOCAL = "local"  # the side of a call this node both made and served: counted once


class CallStats:
    def __init__(self) -> None:
        self.series: dict[SeriesKey, Series] = {}
        self.instances: dict[str, InstanceStats] = {}

    def observe(self, side: str, service: str, endpoint: str, status: int,
                seconds: float) -> None:
        _series(self.series, (side, service, endpoint, status), (side, OTHER, OTHER, status),
                MAX_SERIES).observe(seconds, status)

    def by_side(self, side: str) -> dict[tuple[str, str, int], Series]:
        """The series of one side ("server" or "client") by (service, endpoint, status),
        local calls included in both."""
        out: dict[tuple[str, str, int], Series] = {}
        for (s, service, endpoint, status), series in list(self.series.items()):
            if s in (side, LOCAL):
                key = (service, endpoint, status)
                held = out.get(key)
                out[key] = series if held is None else held.merged(series)
        return out

    def begin(self, instance: str, service: str) -> InstanceStats:
        """A call handed to a local instance starts (in-flight + 1)."""
        st = self.instances.get(instance)
        if st is None:
            st = self.instances[instance] = InstanceStats(service)
        st.in_flight += 1
        return st

    @staticmethod
    def end(st: InstanceStats, endpoint: str, status: int, seconds: float) -> None:
        st.in_flight -= 1
        st.requests += 1
        if status:
            st.errors += 1
        _series(st.endpoints, endpoint, OTHER, MAX_ENDPOINTS).observe(seconds, status)

    def forget(self, instance: str) -> None:
        self.instances.pop(instance, None)

    def instance_rows(self, service: str | None = None) -> list[dict[str, Any]]:
        rows = []
        for iid, st in sorted(self.instances.items()):
            if service and st.service != service:
                continue
            rows.append({"instance": iid, "service": st.service, "requests": st.requests,
                         "errors": st.errors, "in_flight": st.in_flight,
                         "endpoints": {name: _summary(s) for name, s in
                                       sorted(st.endpoints.items())}})
        return rows


def _series(table: dict[Any, Series], key: Any, other: Any, cap: int) -> Series:
    """The series of `key` in `table`, made if new; once the table holds `cap` series, a
    new key counts under `other` instead."""
    s = table.get(key)
    if s is None:
        if len(table) >= cap:
            key = other
            s = table.get(key)
        if s is None:
            s = table[key] = Series()
    return s


def _summary(s: Series) -> dict[str, Any]:
    return {"count": s.count, "errors": s.errors, "sum": round(s.total, 6),
            "mean_ms": round(s.total / s.count * 1000, 3) if s.count else 0.0,
            "p50_ms": s.quantile(0.5) * 1000, "p99_ms": s.quantile(0.99) * 1000}


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def count_tasks() -> int:
    """The trio tasks running in this thread's run (walked from the root task)."""
    try:
        todo = [trio.lowlevel.current_root_task()]
    except RuntimeError:
        return 0
    n = 0
    while todo:
        task = todo.pop()
        if task is None:
            continue
        n += 1
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return n


class NodeSampler:
    """Samples of this node, oldest first; `probe()` gives what the components report."""

    def __init__(self, size: int, probe: Callable[[], dict[str, Any]]) -> None:
        self.samples: deque[dict[str, Any]] = deque(maxlen=size)
        self.probe = probe
        self.started = time.time()

    def sample(self, keep: bool = True) -> dict[str, Any]:
        """A sample of now (kept in the buffer unless `keep` is false: a query's)."""
        now = time.time()
        s = {"time": now, "uptime": round(now - self.started, 3),
             "cpu_seconds": round(cpu_seconds(), 3), "rss_bytes": rss_bytes(),
             "tasks": count_tasks(), **self.probe()}
        if keep:
            self.samples.append(s)
        return s

    async def run(self, interval: float,
                  task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self.sample()
            await trio.sleep(interval)
