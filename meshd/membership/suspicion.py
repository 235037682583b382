"""Lifeguard's dynamic suspicion timeout.

Rules:
- A suspicion starts at `max_timeout` and shrinks toward `min_timeout` as independent members
  confirm it: timeout(c) = max(min, max - (max - min) * log(c + 1) / log(k + 1)), where c is
  the number of confirmations beyond the first accuser and k the number expected.
- With k == 0 (too few members to expect confirmations) the timeout is `min_timeout`.
- Each accuser counts once; the first accuser is not a confirmation.
- Pure arithmetic: the owner schedules the returned deadline.
"""

from __future__ import annotations

import math


class Suspicion:
    __slots__ = ("accusers", "confirmations", "k", "max_timeout", "min_timeout", "start")

    def __init__(self, accuser: str, k: int, min_timeout: float, max_timeout: float,
                 start: float) -> None:
        self.accusers: dict[str, None] = {accuser: None}
        self.confirmations = 0
        self.k = k
        self.min_timeout = min_timeout
        self.max_timeout = max_timeout if k >= 1 else min_timeout
        self.start = start

    def timeout(self) -> float:
        if self.k < 1 or self.confirmations == 0:
            return self.max_timeout
        frac = math.log(self.confirmations + 1.0) / math.log(self.k + 1.0)
        raw = self.max_timeout - frac * (self.max_timeout - self.min_timeout)
        return max(self.min_timeout, raw)

    def deadline(self) -> float:
        return self.start + self.timeout()

    def confirm(self, accuser: str) -> bool:
        """Record an accuser; True if it is new (and the deadline may have moved)."""
        if self.confirmations >= self.k or accuser in self.accusers:
            return False
        self.accusers[accuser] = None
        self.confirmations += 1
        return True
