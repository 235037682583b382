"""Pauses of this process's garbage collector, by generation: how many and how long.

A full collection walks every object the collector tracks; a daemon that keeps many of them
alive pauses all its work meanwhile. Such pauses once put a gateway's p99 at 30 times its
p50 (answered calls held until their deadline, 150-400 ms a collection: docs/benchmarks.md,
"API gateway"), and nothing the node reported showed them. This makes them visible:
`meshd_gc_pause_seconds{generation}` on /metrics.

Rules:
- `GcPauses.watching()` hooks the interpreter's `gc.callbacks` for the block it guards and
  unhooks on the way out (the DebugService's run owns it); a nested `watching()` of the
  same GcPauses adds no second hook. Several nodes in one process each count the process's
  pauses (the collector is per process, not per node).
- The callback does constant work (two clock reads and a histogram bucket), never raises,
  never allocates tracked objects of its own on the way. A "stop" without its "start"
  (hooked in the middle of a collection) is not counted.
- A collection can happen anywhere, while the series are read too: `snapshot()` copies them
  and starts again if a pause was counted meanwhile, so a scrape's count, sum and buckets
  agree.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator
from typing import Any

from .stats import Series

GENERATIONS = (0, 1, 2)


class GcPauses:
    def __init__(self) -> None:
        self.series = {g: Series() for g in GENERATIONS}  # seconds per collection
        self._began: float | None = None
        self._hooked = False

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        began, self._began = self._began, None
        series = self.series.get(info.get("generation"))
        if began is not None and series is not None:
            series.observe(time.perf_counter() - began)

    def snapshot(self) -> dict[int, Series]:
        """A consistent copy of the series (none changed while it was taken)."""
        while True:
            counts = [s.count for s in self.series.values()]
            copy = {g: Series(s.count, s.total, s.errors, s.buckets[:])
                    for g, s in self.series.items()}
            if [s.count for s in self.series.values()] == counts:
                return copy

    @contextlib.contextmanager
    def watching(self) -> Iterator[GcPauses]:
        if self._hooked:
            yield self
            return
        gc.callbacks.append(self._callback)
        self._hooked = True
        try:
            yield self
        finally:
            self._hooked = False
            self._began = None
            with contextlib.suppress(ValueError):
                gc.callbacks.remove(self._callback)
