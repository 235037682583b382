"""Hybrid logical clock: timestamps that order events across nodes despite clock skew.

Rules (Kulkarni et al.):
- A timestamp is (wall_ms, counter, node): compared as a tuple, node breaking ties, so two
  writers never produce equal timestamps.
- now(): wall = max(last wall, physical); counter resets when wall moved, else increments.
- observe(remote): merges a remote timestamp so every later local one is greater than it.
- The physical clock is injected (`clock()` returns ms); the class never reads time itself.
"""

from __future__ import annotations

from collections.abc import Callable

Timestamp = tuple[int, int, str]


class HLC:
    def __init__(self, node: str, clock: Callable[[], int]) -> None:
        self.node = node
        self.clock = clock
        self.wall = 0
        self.counter = 0

    def now(self) -> Timestamp:
        physical = self.clock()
        if physical > self.wall:
            self.wall, self.counter = physical, 0
        else:
            self.counter += 1
        return (self.wall, self.counter, self.node)

    def observe(self, ts: Timestamp) -> None:
        wall, counter = ts[0], ts[1]
        physical = self.clock()
        if physical > self.wall and physical > wall:
            self.wall, self.counter = physical, 0
        elif wall > self.wall:
            self.wall, self.counter = wall, counter + 1
        elif wall == self.wall:
            self.counter = max(self.counter, counter) + 1
        else:
            self.counter += 1
