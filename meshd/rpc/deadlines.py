"""The deadlines of calls answered from callbacks: which are due, and when the next one is.

Sans-IO: the RPC service's expiry task asks `due(now)` and sleeps until `next_at()`.

Rules:
- A call is anything with a `finished` flag and an `expire()` method; a finished call is
  never expired, only dropped.
- Finished calls leave the heap soon, not at their deadline: most calls end long before it
  (a 10 s timeout, answered in a millisecond), and a call held until its deadline keeps its
  reply, closures and trace context alive. At a few thousand calls a second that was tens of
  thousands of dead calls per daemon, which every full collection of the garbage collector
  walked (pauses of 150-400 ms, a gateway's p99 thirty times its p50).
  - `add` drops finished calls from the top of the heap;
  - when the heap has doubled since it was last compacted, it is rebuilt without the
    finished ones (amortized O(1) per call, whatever order calls finish in).
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

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Any]] = []
        self._n = itertools.count()
        self._compact_at = MIN_COMPACT

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, deadline: float, call: Expirable) -> bool:
        """Hold `call` until `deadline`; True when it is now the earliest (the expiry task
        must wake sooner than it planned)."""
        heap = self._heap
        while heap and heap[0][2].finished:
            heapq.heappop(heap)
        if len(heap) >= self._compact_at:
            self._compact()
        earliest = not heap or deadline < heap[0][0]
        heapq.heappush(heap, (deadline, next(self._n), call))
        return earliest

    def _compact(self) -> None:
        heap = self._heap = [e for e in self._heap if not e[2].finished]
        heapq.heapify(heap)
        self._compact_at = max(MIN_COMPACT, 2 * len(heap))

    def due(self, now: float) -> list[Expirable]:
        """Remove and return the unfinished calls whose deadline is `now` or past (finished
        ones on the way are dropped)."""
        heap, out = self._heap, []
        while heap and (heap[0][2].finished or heap[0][0] <= now):
            call = heapq.heappop(heap)[2]
            if not call.finished:
                out.append(call)
        return out

    def next_at(self) -> float:
        """The earliest deadline held (inf when none)."""
        return self._heap[0][0] if self._heap else math.inf
