"""Vivaldi network coordinates (Dabek et al.), with Serf's refinements and defaults.

Rules:
- A coordinate is a Euclidean vector plus a height (the access-link latency) and an
  adjustment term; distances estimate RTT in seconds.
- Each RTT sample to a peer moves our coordinate along the error-weighted spring force
  (ce = cc = 0.25), with our error estimate updated the same way (Serf's VivaldiCE/CC).
- The adjustment term is the mean residual of the last `adjustment_window` samples; gravity
  pulls coordinates toward the origin (rho = 150 ms) so the system does not drift.
- Defaults are Serf's: 8 dimensions, max error 1.5, min height 10 µs.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

DIMENSIONS = 8
MAX_ERROR = 1.5
CE = 0.25
CC = 0.25
ADJUSTMENT_WINDOW = 20
HEIGHT_MIN = 10e-6
GRAVITY_RHO = 0.150
ZERO = 1e-6


@dataclass
class Coordinate:
    vec: list[float] = field(default_factory=lambda: [0.0] * DIMENSIONS)
    error: float = MAX_ERROR
    adjustment: float = 0.0
    height: float = HEIGHT_MIN

    def distance_to(self, other: Coordinate) -> float:
        """Estimated RTT in seconds."""
        d = math.dist(self.vec, other.vec) + self.height + other.height
        adjusted = d + self.adjustment + other.adjustment
        return adjusted if adjusted > 0 else d

    def to_wire(self) -> list[object]:
        return [list(self.vec), self.error, self.adjustment, self.height]

    @classmethod
    def from_wire(cls, raw: object) -> Coordinate:
        if not isinstance(raw, list) or len(raw) != 4 or not isinstance(raw[0], list) \
                or len(raw[0]) != DIMENSIONS:
            raise ValueError("bad coordinate")
        vec = [float(x) for x in raw[0]]
        error, adjustment, height = (float(raw[1]), float(raw[2]), float(raw[3]))
        if not all(math.isfinite(x) for x in [*vec, error, adjustment, height]):
            raise ValueError("coordinate is not finite")
        return cls(vec, max(ZERO, min(MAX_ERROR, error)), adjustment, max(HEIGHT_MIN, height))


class VivaldiClient:
    def __init__(self, rng: random.Random | None = None) -> None:
        self.coord = Coordinate()
        self.rng = rng or random.Random()
        self._residuals: list[float] = []

    def update(self, other: Coordinate, rtt: float) -> Coordinate:
        """Fold in one RTT sample (seconds) to a peer at `other`."""
        if not (0 < rtt < 10) or not math.isfinite(rtt):
            return self.coord
        me = self.coord
        dist = me.distance_to(other)
        total_error = max(me.error + other.error, ZERO)
        weight = me.error / total_error
        wrongness = abs(dist - rtt) / rtt
        me.error = min(MAX_ERROR, max(ZERO, CE * weight * wrongness + me.error * (1 - CE * weight)))
        force = CC * weight * (rtt - dist)
        self._apply_force(other, force)
        # adjustment: mean residual over a window
        self._residuals.append(rtt - me.distance_to(other) + me.adjustment)
        self._residuals = self._residuals[-ADJUSTMENT_WINDOW:]
        me.adjustment = sum(self._residuals) / (2 * len(self._residuals))
        # gravity toward the origin
        norm = math.sqrt(sum(x * x for x in me.vec))
        pull = -((norm / GRAVITY_RHO) ** 2)
        if norm > ZERO:
            me.vec = [x + pull * (x / norm) * 1e-3 for x in me.vec]
        return me

    def _apply_force(self, other: Coordinate, force: float) -> None:
        me = self.coord
        diff = [a - b for a, b in zip(me.vec, other.vec, strict=True)]
        mag = math.sqrt(sum(d * d for d in diff))
        if mag < ZERO:  # on top of each other: push in a random direction
            unit = [self.rng.uniform(-1, 1) for _ in diff]
            norm = math.sqrt(sum(u * u for u in unit)) or 1.0
            unit = [u / norm for u in unit]
        else:
            unit = [d / mag for d in diff]
        me.vec = [v + u * force for v, u in zip(me.vec, unit, strict=True)]
        if mag > ZERO:
            me.height = max(HEIGHT_MIN, (me.height + other.height) * force / mag + me.height)
