"""The deadlines of calls answered from callbacks: which are due, and when the next one is.

Sans-IO: the RPC service's expiry task asks `due(now)` and sleeps until `next_at()`; `add`
says when a new call's deadline comes before that (the task must be woken), and only then:
a daemon with one call in flight at a time would otherwise wake the task on every call.

Rules:
- A call is anything with a `finished` flag and an `expire()` method; a finished call is
  never expired, only dropped.
- Finished calls leave the heap soon, not at their deadline: most calls end long before it
  (a 10 s timeout, answered in a millisecond), and a call held until its deadline keeps its
  reply, closures and trace context alive. At a few thousand calls a second that was tens of
  thousands of dead calls per daemon, which every full collection of the garbage collector
  walked (pauses of 150-400 ms, a gateway's p99 thirty times its p50).
  - `add` drops finished calls from the top of the heap;
  - when the heap has doubled since it was last compacted or drained, it is rebuilt
    without the finished ones (amortized O(1) per call, whatever order calls finish in;
    the threshold falls again as the heap drains, so a burst of slow calls does not leave
    it high).
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Any, Protocol

MIN_COMPACT = 1024  # a heap this small is never rebuilt


class Expirable(Protocol):
    finished: bool

    def expire(self) -> None: ...


class Deadlines:
    """Pending calls by deadline."""

    def __init__(self, min_compact: int = MIN_COMPACT) -> None:
        self._heap: list[tuple[float, int, Any]] = []
        self._n = itertools.count()
        self._min_compact = min_compact
        self._compact_at = min_compact
        self._planned = math.inf  # when the expiry task wakes (its last next_at())

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, deadline: float, call: Expirable) -> bool:
        """Hold `call` until `deadline`; True when that is before the expiry task plans to
        wake (it must be woken; it then plans again with next_at())."""
        heap = self._heap
        if heap and heap[0][2].finished:
            while heap and heap[0][2].finished:
                heapq.heappop(heap)
            self._lower()
        if len(heap) >= self._compact_at:
            heap = self._compact()
        heapq.heappush(heap, (deadline, next(self._n), call))
        if deadline < self._planned:
            self._planned = deadline
            return True
        return False

    def _compact(self) -> list[tuple[float, int, Any]]:
        """Rebuild the heap without the finished calls; the new heap."""
        heap = self._heap = [e for e in self._heap if not e[2].finished]
        heapq.heapify(heap)
        self._compact_at = max(self._min_compact, 2 * len(heap))
        return heap

    def _lower(self) -> None:
        """The heap shrank: the next rebuild comes when it has doubled from here."""
        self._compact_at = min(self._compact_at, max(self._min_compact, 2 * len(self._heap)))

    def due(self, now: float) -> list[Expirable]:
        """Remove and return the unfinished calls whose deadline is `now` or past (finished
        ones on the way are dropped)."""
        heap, out = self._heap, []
        while heap and (heap[0][2].finished or heap[0][0] <= now):
            call = heapq.heappop(heap)[2]
            if not call.finished:
                out.append(call)
        self._lower()
        return out

    def next_at(self) -> float:
        """The earliest deadline held (inf when none): when the expiry task wakes next."""
        self._planned = self._heap[0][0] if self._heap else math.inf
        return self._planned
