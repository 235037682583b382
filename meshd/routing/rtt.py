"""RTT estimate per peer, robust to outliers: the median of the last few samples.

Rules:
- Keep the last `window` samples; the estimate is their median, so a single slow ack (a GC
  pause, a retransmission) does not move it, while a real change shows after window/2
  samples.
"""

from __future__ import annotations

import statistics
from collections import deque


class RttFilter:
    def __init__(self, window: int = 7) -> None:
        self.window = window
        self._samples: dict[str, deque[float]] = {}

    def add(self, peer: str, rtt: float) -> float:
        samples = self._samples.setdefault(peer, deque(maxlen=self.window))
        samples.append(rtt)
        return statistics.median(samples)

    def get(self, peer: str) -> float | None:
        samples = self._samples.get(peer)
        return statistics.median(samples) if samples else None

    def forget(self, peer: str) -> None:
        self._samples.pop(peer, None)
