"""Hybrid logical clock: timestamps that order events across nodes despite clock skew.

Rules (Kulkarni et al.):
- A timestamp is (wall_ms, counter, node): compared as a tuple, node breaking ties, so two
  writers never produce equal timestamps.
- now(): wall = max(last wall, physical); counter resets when wall moved, else increments.
- observe(remote): merges a remote timestamp so every later local one is greater than it.
- Bounded drift: a remote timestamp more than `max_drift_ms` ahead of our physical clock is
  refused (observe returns False and the clock does not move). Without the bound, one node
  with a clock in the future would drag every node's clock forward with it, and its writes
  would win every conflict until real time caught up. Callers refuse the record carrying
  such a timestamp and count it. As long as every clock is within the bound of every other,
  nothing is refused: a wall never exceeds the fastest physical clock in the cluster.
- The physical clock is injected (`clock()` returns ms); the class never reads time itself.
"""

from __future__ import annotations

from collections.abc import Callable

Timestamp = tuple[int, int, str]

# The default bound, equal to the default of the `store.max_clock_drift` setting (see
# settings.py for the reason of the value).
MAX_DRIFT_MS = 60_000


class HLC:
    def __init__(self, node: str, clock: Callable[[], int],
                 max_drift_ms: int | None = MAX_DRIFT_MS) -> None:
        """`max_drift_ms` None means unbounded (only for tools and simulations that model
        clocks further apart than any bound a node would run with)."""
        self.node = node
        self.clock = clock
        self.max_drift_ms = max_drift_ms
        self.wall = 0
        self.counter = 0

    def now(self) -> Timestamp:
        physical = self.clock()
        if physical > self.wall:
            self.wall, self.counter = physical, 0
        else:
            self.counter += 1
        return (self.wall, self.counter, self.node)

    def observe(self, ts: Timestamp) -> bool:
        """Merge a remote timestamp; False (clock unchanged) if it is too far ahead."""
        wall, counter = ts[0], ts[1]
        physical = self.clock()
        if self.max_drift_ms is not None and wall - physical > self.max_drift_ms:
            return False
        if physical > self.wall and physical > wall:
            self.wall, self.counter = physical, 0
        elif wall > self.wall:
            self.wall, self.counter = wall, counter + 1
        elif wall == self.wall:
            self.counter = max(self.counter, counter) + 1
        else:
            self.counter += 1
        return True
