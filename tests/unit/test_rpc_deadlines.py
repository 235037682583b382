"""The deadlines of fast calls (meshd/rpc/deadlines.py): due calls come out in deadline
order, finished ones never expire, and finished ones do not pile up until their deadline."""

from __future__ import annotations

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.rpc.deadlines import MIN_COMPACT, Deadlines


class FakeCall:
    def __init__(self, name: int) -> None:
        self.name = name
        self.finished = False

    def expire(self) -> None:  # the service calls it; Deadlines never does
        raise AssertionError("Deadlines must not expire calls itself")


def test_due_calls_come_out_in_deadline_order_and_finished_ones_never():
    d = Deadlines()
    calls = {n: FakeCall(n) for n in range(6)}
    for n, at in ((0, 5.0), (1, 1.0), (2, 3.0), (3, 2.0), (4, 9.0), (5, 4.0)):
        d.add(at, calls[n])
    calls[3].finished = True
    assert d.next_at() == 1.0
    assert [c.name for c in d.due(3.5)] == [1, 2]  # 3 (deadline 2.0) finished: dropped
    assert d.next_at() == 4.0
    assert d.due(3.9) == []
    calls[5].finished = True
    assert [c.name for c in d.due(100.0)] == [0, 4]
    assert len(d) == 0 and d.next_at() == math.inf


def test_add_says_when_the_expiry_task_must_wake_sooner_than_it_planned():
    d = Deadlines()
    assert d.next_at() == math.inf  # the task sleeps with nothing to wait for
    assert d.add(10.0, FakeCall(0)) is True
    assert d.add(20.0, FakeCall(1)) is False
    assert d.add(5.0, FakeCall(2)) is True
    assert d.add(5.0, FakeCall(3)) is False  # not earlier than what the task waits for
    assert d.next_at() == 5.0
    assert d.add(6.0, FakeCall(4)) is False


def test_one_call_at_a_time_does_not_wake_the_task_per_call():
    """Each call answered before the next one begins: the heap is empty at every add, and
    yet the task, asleep until the first call's deadline, need not be woken."""
    d = Deadlines()
    wakes = 0
    for n in range(10_000):
        call = FakeCall(n)
        if d.add(10.0 + n * 1e-3, call):
            wakes += 1
            d.due(n * 1e-3)  # the task wakes, finds nothing due, and plans again
            d.next_at()
        call.finished = True
    assert wakes == 1


def test_calls_answered_in_order_leave_at_once():
    """The common case: each call is answered long before its deadline."""
    d = Deadlines()
    for n in range(100_000):
        call = FakeCall(n)
        d.add(n * 1e-4 + 10.0, call)
        call.finished = True
    assert len(d) <= 1


def test_finished_calls_behind_a_slow_one_are_compacted_away():
    """A slow call at the top of the heap keeps it from being popped; the finished calls
    behind it must not stay until its deadline (they held 44k dead calls per daemon)."""
    d = Deadlines()
    slow = FakeCall(-1)
    d.add(1.0, slow)
    rng = random.Random(7)
    open_calls: list[FakeCall] = []
    for n in range(100_000):
        call = FakeCall(n)
        d.add(10.0 + rng.random(), call)
        open_calls.append(call)
        while len(open_calls) > 32:  # 32 in flight, answered in any order
            open_calls.pop(rng.randrange(len(open_calls))).finished = True
        assert len(d) <= 2 * MIN_COMPACT + 1
    assert {c.name for c in d.due(math.inf)} == {-1} | {c.name for c in open_calls}


def test_a_drained_burst_does_not_leave_the_threshold_high():
    """A stalled service's 10,000 calls all expire; afterwards the answered calls behind
    one slow call are rebuilt away as soon as the heap has doubled again."""
    d = Deadlines()
    for n in range(10_000):
        d.add(1.0, FakeCall(n))
    assert len(d.due(1.0)) == 10_000 and len(d) == 0
    d.add(50.0, FakeCall(-1))  # the slow one, at the top from now on
    for n in range(10_000):
        call = FakeCall(n)
        d.add(60.0, call)
        call.finished = True
        assert len(d) <= 2 * MIN_COMPACT + 1


def test_compaction_keeps_every_unfinished_call():
    d = Deadlines()
    calls = [FakeCall(n) for n in range(10 * MIN_COMPACT)]
    for call in calls:
        d.add(100.0 - call.name * 1e-3, call)  # each one earlier than the last
        if call.name % 2:
            call.finished = True
    assert len(d) < len(calls)
    due = d.due(math.inf)
    assert [c.name for c in due] == sorted((c.name for c in calls if c.name % 2 == 0),
                                           reverse=True)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "add", "finish", "due"]),
                          st.integers(0, 50), st.floats(0, 100)), max_size=300))
def test_due_agrees_with_a_plain_list(ops):
    """Compaction at 4 held calls (not 1024), so the rebuilds run here too."""
    d, model, made = Deadlines(min_compact=4), [], []
    for op, n, at in ops:
        if op == "add":
            call = FakeCall(len(made))
            made.append(call)
            d.add(at, call)
            model.append((at, call.name, call))
        elif op == "finish" and made:
            made[n % len(made)].finished = True
        elif op == "due":
            want = sorted((a, name) for a, name, c in model if a <= at and not c.finished)
            got = [c.name for c in d.due(at)]
            assert got == [name for _, name in want]
            model = [m for m in model if m[0] > at]
    left = sorted((a, name) for a, name, c in model if not c.finished)
    assert [c.name for c in d.due(math.inf)] == [name for _, name in left]
