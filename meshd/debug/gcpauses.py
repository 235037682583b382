"""Pauses of this process's garbage collector, by generation: how many and how long.

A full collection walks every object the collector tracks; a daemon that keeps many of them
alive pauses all its work meanwhile. Such pauses once put a gateway's p99 at 30 times its
p50 (answered calls held until their deadline, 150-400 ms a collection: docs/benchmarks.md,
"API gateway"), and nothing the node reported showed them. This makes them visible:
`meshd_gc_pause_seconds{generation}` on /metrics.

Rules:
- `GcPauses.watching()` hooks the interpreter's `gc.callbacks` for the block it guards and
  unhooks on the way out (the DebugService's run owns it); several nodes in one process
  each count the process's pauses (the collector is per process, not per node).
- The callback does constant work (two clock reads and a histogram bucket), never raises,
  never allocates tracked objects of its own on the way.
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
        self.longest = 0.0
        self._began = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        took = time.perf_counter() - self._began
        series = self.series.get(info.get("generation"))
        if series is not None:
            series.observe(took)
            if took > self.longest:
                self.longest = took

    @contextlib.contextmanager
    def watching(self) -> Iterator[GcPauses]:
        gc.callbacks.append(self._callback)
        try:
            yield self
        finally:
            with contextlib.suppress(ValueError):
                gc.callbacks.remove(self._callback)
