"""A durable subscriber's delivery state (sans-IO): what to deliver next, what to deliver
again, what is dead.

Theory of operation: a durable topic is a log of messages numbered 1, 2, 3... on disk. A
named durable subscriber (alone or shared by a queue group) walks that log with one
`Consumer`: the shell tells it about messages as they are appended (`append`), asks what to
deliver (`poll`), and reports acks and naks. Time is passed in (`now`, wall-clock seconds:
delays and redelivery deadlines must survive a restart, so they are wall times, as the
store's TTLs are); `next_deadline()` says when `poll` has work again.

Rules:
- C1 In order: new messages are offered in log order. A message with a delay (`not_before`)
  is held until due without holding back the messages after it.
- C2 At most `max_in_flight` messages are delivered and not yet acked; the rest wait.
- C3 A delivered message not acked within `ack_wait` seconds is delivered again; a nak
  asks for that at once (or after the delay it gives). Attempt n waits `backoff[n-1]`
  (the last entry repeats) before it is offered again after a nak. A delivery that never
  reached a subscriber (returned: `nak(spent=False)`) does not count as an attempt.
- C4 A message delivered `max_deliver` times and still not acked is dead: `poll` returns it
  once as dead (the shell moves it to TOPIC.dead with the reason) and it counts as acked.
- C5 Acks: acking a message that is not pending (acked already, never delivered, unknown)
  changes nothing and says so; a late ack of a redelivered message counts.
- C6 Resume: `state()` is what must be on disk (the ack floor, the acks above it, where the
  walk is, what was pending with its attempts, what is scheduled); `Consumer.restore`
  continues from it: pending messages are offered again at once (their ack timers died with
  the process), so a restart duplicates only unacked messages and loses none.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

DELIVER, DEAD = "deliver", "dead"


@dataclass(frozen=True)
class Offer:
    """One thing for the shell to do: deliver `seq` (attempt `attempt`), or dead-letter it."""
    kind: str
    seq: int
    attempt: int
    reason: str = ""


@dataclass
class _Pending:
    attempt: int
    due: float  # when it is offered again unless acked


@dataclass
class Consumer:
    ack_wait: float = 30.0
    max_deliver: int = 5
    max_in_flight: int = 1000
    backoff: tuple[float, ...] = (1.0, 5.0, 30.0)
    floor: int = 0  # every message up to here is acked (or dead)
    acked: set[int] = field(default_factory=set)  # acked above the floor
    walked: int = 0  # messages up to here have been offered or scheduled
    last: int = 0  # the log's last message
    pending: dict[int, _Pending] = field(default_factory=dict)
    _not_before: dict[int, float] = field(default_factory=dict)  # delayed, not yet walked
    _scheduled: list[tuple[float, int]] = field(default_factory=list)  # (due, seq) heap
    _again: list[tuple[float, int]] = field(default_factory=list)  # (due, seq) heap

    def __post_init__(self) -> None:
        if self.max_deliver < 1 or self.max_in_flight < 1 or self.ack_wait <= 0 \
                or not self.backoff or any(b < 0 for b in self.backoff):
            raise ValueError("max_deliver and max_in_flight >= 1, ack_wait > 0, backoff "
                             "non-empty and not negative")

    # --- input -----------------------------------------------------------------------------

    def append(self, seq: int, not_before: float | None = None) -> None:
        """The log holds message `seq` (appended in order; a delay: due at `not_before`)."""
        if seq <= self.last:
            return  # told twice (a restart re-announcing the log): nothing new
        self.last = seq
        if not_before is not None:
            self._not_before[seq] = not_before

    def ack(self, seq: int) -> bool:
        """C5: whether the ack changed anything."""
        if seq <= self.floor or seq in self.acked or seq not in self.pending:
            return False
        del self.pending[seq]
        self._acked(seq)
        return True

    def nak(self, seq: int, now: float, delay: float | None = None,
            spent: bool = True) -> bool:
        """Deliver `seq` again after `delay` (default: the backoff of its attempt). With
        `spent` False the delivery never reached a subscriber (its node had none left, or
        died): the attempt is given back (C3)."""
        p = self.pending.get(seq)
        if p is None:
            return False
        if not spent:
            p.attempt = max(0, p.attempt - 1)
        wait = delay if delay is not None else \
            self.backoff[min(p.attempt, len(self.backoff)) - 1]
        p.due = now + max(0.0, wait)
        heapq.heappush(self._again, (p.due, seq))
        return True

    # --- output ----------------------------------------------------------------------------

    def poll(self, now: float) -> list[Offer]:
        """What to deliver (or dead-letter) now, in order: redeliveries first, then
        scheduled messages that came due, then new ones (C1-C4)."""
        out: list[Offer] = []
        while self._again and self._again[0][0] <= now:
            due, seq = heapq.heappop(self._again)
            if self._stale(due, seq):
                continue  # acked since, or rescheduled
            p = self.pending[seq]
            if p.attempt >= self.max_deliver:
                del self.pending[seq]
                self._acked(seq)
                out.append(Offer(DEAD, seq, p.attempt,
                                 f"not acked after {p.attempt} deliveries"))
                continue
            p.attempt += 1
            p.due = now + self.ack_wait
            heapq.heappush(self._again, (p.due, seq))
            out.append(Offer(DELIVER, seq, p.attempt))
        while self._scheduled and self._scheduled[0][0] <= now and self._room():
            _, seq = heapq.heappop(self._scheduled)
            if not self._is_acked(seq):
                out.append(self._deliver(seq, now))
        while self.walked < self.last and self._room():
            seq = self.walked + 1
            self.walked = seq
            due = self._not_before.pop(seq, None)
            if self._is_acked(seq):
                continue  # acked elsewhere (absorb) before it was offered here
            if due is not None and due > now:
                heapq.heappush(self._scheduled, (due, seq))
                continue
            out.append(self._deliver(seq, now))
        return out

    def may_offer(self, now: float) -> bool:
        """False when `poll(now)` is sure to return nothing (a cheap check first)."""
        return bool((self._again and self._again[0][0] <= now)
                    or (self._room() and (self.walked < self.last or (
                        self._scheduled and self._scheduled[0][0] <= now))))

    def next_deadline(self) -> float | None:
        """When `poll` may have work without new input (None: only input brings work)."""
        while self._again and self._stale(*self._again[0]):
            heapq.heappop(self._again)  # acked or rescheduled since it was pushed
        times = [t for t, _ in self._again[:1]]
        if self._room():  # a scheduled message waits for room as well as for its time
            times += [t for t, _ in self._scheduled[:1]]
        return min(times) if times else None

    def counts(self) -> dict[str, int]:
        """Pending (delivered, not acked), waiting (in the log, not yet offered), scheduled."""
        return {"pending": len(self.pending), "scheduled": len(self._scheduled),
                "waiting": self.last - self.walked}

    def caught_up(self, last: int) -> None:
        """The shell appended what its log holds, up to `last` (after creating or restoring
        this consumer): the walk starts no lower than the ack floor."""
        self.last = max(self.last, last)
        self.walked = max(self.walked, self.floor)

    def absorb(self, floor: int, acked: list[int] | set[int]) -> int:
        """C7: acks made elsewhere (a replica delivered this log while its origin was down):
        every message up to `floor` and each in `acked` counts as acked here; none of them
        is offered again. How many pending ones that settled."""
        done = {s for s in acked if s > floor}
        settled = 0
        for seq in list(self.pending):
            if seq <= floor or seq in done:
                del self.pending[seq]
                settled += 1
        if floor > self.floor:
            self.floor = floor
            self.acked = {s for s in self.acked if s > floor}
            for seq in [s for s in self._not_before if s <= floor]:
                del self._not_before[seq]
        self.acked |= {s for s in done if s > self.floor}
        while self.floor + 1 in self.acked:
            self.floor += 1
            self.acked.discard(self.floor)
        self.walked = max(self.walked, self.floor)
        self.last = max(self.last, self.walked)
        return settled

    def _is_acked(self, seq: int) -> bool:
        return seq <= self.floor or seq in self.acked

    # --- C6 --------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"floor": self.floor, "acked": sorted(self.acked), "walked": self.walked,
                "pending": {str(s): p.attempt for s, p in self.pending.items()},
                "scheduled": [[due, seq] for due, seq in sorted(self._scheduled)]}

    @classmethod
    def restore(cls, state: dict[str, Any], now: float, **settings: Any) -> Consumer:
        """Continue from `state()`; pending messages are offered again at once."""
        c = cls(**settings)
        c.floor = int(state.get("floor", 0))
        c.acked = {int(s) for s in state.get("acked", []) if int(s) > c.floor}
        c.walked = c.last = int(state.get("walked", c.floor))
        for s, attempt in dict(state.get("pending", {})).items():
            seq = int(s)
            if seq > c.floor and seq not in c.acked:
                c.pending[seq] = _Pending(int(attempt), now)
                heapq.heappush(c._again, (now, seq))
        for due, seq in state.get("scheduled", []):
            heapq.heappush(c._scheduled, (float(due), int(seq)))
        return c

    # --- inside ----------------------------------------------------------------------------

    def _stale(self, due: float, seq: int) -> bool:
        p = self.pending.get(seq)
        return p is None or p.due != due

    def _room(self) -> bool:
        return len(self.pending) < self.max_in_flight

    def _deliver(self, seq: int, now: float) -> Offer:
        p = self.pending[seq] = _Pending(1, now + self.ack_wait)
        heapq.heappush(self._again, (p.due, seq))
        return Offer(DELIVER, seq, 1)

    def _acked(self, seq: int) -> None:
        self.acked.add(seq)
        while self.floor + 1 in self.acked:
            self.floor += 1
            self.acked.discard(self.floor)
