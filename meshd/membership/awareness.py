"""Lifeguard's local health multiplier (LHM).

Rules:
- A score in [0, max_multiplier - 1]; probe interval and timeouts are scaled by score + 1.
- A successful probe lowers it by one; a failed probe raises it by the number of nacks that
  should have come back but did not (by one when no nacks were expected); having to refute a
  suspicion of ourselves raises it by one. Each says "maybe I am the slow one".
"""

from __future__ import annotations


class Awareness:
    __slots__ = ("max_multiplier", "score")

    def __init__(self, max_multiplier: int) -> None:
        self.max_multiplier = max(1, max_multiplier)
        self.score = 0

    def apply(self, delta: int) -> None:
        self.score = min(self.max_multiplier - 1, max(0, self.score + delta))

    def scale(self, duration: float) -> float:
        return duration * (self.score + 1)
