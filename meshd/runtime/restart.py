"""When a managed process is started again after it exits (sans-IO).

Rules:
- Policies: `always` restarts whatever the exit; `on-failure` when the exit code is not 0 or a
  signal ended it (a clean exit is `exited`); `never` leaves it `exited` or `crashed`. A
  process the runtime stopped because it failed its health check (its registry heartbeat
  stopped) ended in failure, whatever its exit code.
- Backoff: the n-th restart in a row waits min(BACKOFF_MAX, BACKOFF_FIRST * 2^(n-1)) seconds,
  times a jitter in [0.5, 1.0) (processes that crashed together do not restart together). A
  process that ran for STABLE seconds resets the count.
- Start limit: a START_LIMIT-th start within START_WINDOW seconds is not made: the replica is
  `failed`, with the reason, until its spec changes (`meshd update`, `meshd run` again). No
  silent loop.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

BACKOFF_FIRST = 0.1
BACKOFF_MAX = 30.0
STABLE = 60.0
START_LIMIT = 5
START_WINDOW = 60.0


@dataclass
class Decision:
    action: str  # "restart" (after `delay`), "stop" (exited, not restarted) or "fail"
    delay: float = 0.0
    state: str = ""  # the replica's state to show: restarting, exited, crashed, failed
    reason: str = ""


@dataclass
class Restarts:
    """One replica's starts and the policy that decides after each exit."""

    policy: str
    rng: random.Random = field(default_factory=random.Random)
    starts: deque[float] = field(default_factory=deque)
    in_a_row: int = 0
    count: int = 0  # restarts made, shown by `meshd ps`

    def started(self, now: float) -> None:
        self.starts.append(now)
        while self.starts and now - self.starts[0] > START_WINDOW:
            self.starts.popleft()

    def may_start(self, now: float) -> bool:
        """Whether one more start keeps within the start limit."""
        recent = [t for t in self.starts if now - t <= START_WINDOW]
        return len(recent) < START_LIMIT

    def exited(self, code: int | None, ran: float, now: float, why: str = "") -> Decision:
        """A decision once the process ended with `code` (None: killed by a signal) after
        running `ran` seconds; `why`: the runtime ended it for that reason (a failure)."""
        failed = code != 0 or bool(why)
        how = "crashed" if failed else "exited"
        detail = why or ((f"exit code {code}" if code is not None else "killed by a signal")
                         if failed else "exit code 0")
        if self.policy == "never" or (self.policy == "on-failure" and not failed):
            return Decision("stop", state=how, reason=detail)
        if ran >= STABLE:
            self.in_a_row = 0
        if not self.may_start(now):
            return Decision("fail", state="failed",
                            reason=f"{START_LIMIT} starts within {START_WINDOW:g} s, the last "
                                   f"{detail}: fix it and run `meshd update`")
        self.in_a_row += 1
        self.count += 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.in_a_row - 1))
        return Decision("restart", delay * (0.5 + self.rng.random() / 2), "restarting",
                        detail)
