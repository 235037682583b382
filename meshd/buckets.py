"""Token buckets per key: the one rate limit the node uses (login attempts, a service's log
records, a relay session's spans).

Rules:
- A key's bucket starts full (`burst` tokens) and refills at `per_s` tokens a second, never
  above `burst`; `take` spends one token or says how long to wait for one.
- Time is given by the caller (`now`, any monotonic clock, the same one for a table).
- The table holds at most `cap` keys: buckets that have refilled go first (they hold
  nothing); if every bucket is still draining, the oldest half goes, so a flood of keys
  cannot grow it.
"""

from __future__ import annotations


class TokenBuckets:
    def __init__(self, burst: float, per_s: float, cap: int = 10_000) -> None:
        self.burst, self.per_s, self.cap = burst, per_s, cap
        self.level: dict[str, tuple[float, float]] = {}

    def take(self, key: str, now: float) -> float:
        """0 if allowed, else seconds to wait."""
        if key not in self.level and len(self.level) >= self.cap:
            self._prune(now)
        tokens, at = self.level.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.per_s)
        if tokens < 1:
            self.level[key] = (tokens, now)
            return (1 - tokens) / self.per_s
        self.level[key] = (tokens - 1, now)
        return 0.0

    def _prune(self, now: float) -> None:
        full = [k for k, (t, at) in self.level.items()
                if t + (now - at) * self.per_s >= self.burst]
        for k in full:
            del self.level[k]
        if len(self.level) >= self.cap:
            oldest = sorted(self.level, key=lambda k: self.level[k][1])
            for k in oldest[:len(oldest) // 2]:
                del self.level[k]
