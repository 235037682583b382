"""The hybrid logical clock, one case per branch of now() and observe().

The physical clock is a variable the test sets; every expected timestamp is written out.
"""

from __future__ import annotations

from meshd.hlc import HLC, MAX_DRIFT_MS

T = 1_700_000_000_000


class Clock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def _hlc(ms: int = T, node: str = "b", **kw: int | None) -> tuple[HLC, Clock]:
    clock = Clock(ms)
    return HLC(node, clock, **kw), clock


def test_now_follows_the_physical_clock_and_counts_within_a_millisecond():
    hlc, clock = _hlc()
    assert hlc.now() == (T, 0, "b")
    assert hlc.now() == (T, 1, "b")
    clock.ms = T + 5
    assert hlc.now() == (T + 5, 0, "b")


def test_now_never_goes_back_when_the_physical_clock_does():
    hlc, clock = _hlc()
    hlc.now()
    clock.ms = T - 1000
    assert hlc.now() == (T, 1, "b")


def test_a_remote_wall_ahead_within_the_drift_moves_the_clock():
    hlc, _ = _hlc()
    hlc.now()
    remote = (T + 30_000, 7, "a")
    assert hlc.observe(remote) is True
    assert (hlc.wall, hlc.counter) == (T + 30_000, 8)
    after = hlc.now()
    assert after == (T + 30_000, 9, "b")
    assert after > remote, "every later local timestamp orders after what we observed"


def test_a_remote_wall_exactly_at_the_drift_bound_is_taken():
    hlc, _ = _hlc()
    assert hlc.observe((T + MAX_DRIFT_MS, 0, "a")) is True
    assert hlc.now()[0] == T + MAX_DRIFT_MS


def test_a_remote_wall_beyond_the_drift_is_refused_and_leaves_the_clock():
    hlc, _ = _hlc()
    hlc.now()
    assert hlc.observe((T + MAX_DRIFT_MS + 1, 0, "a")) is False
    assert (hlc.wall, hlc.counter) == (T, 0)


def test_an_unbounded_clock_takes_any_remote_wall():
    hlc, _ = _hlc(max_drift_ms=None)
    assert hlc.observe((T + 10 * MAX_DRIFT_MS, 2, "a")) is True
    assert hlc.now() == (T + 10 * MAX_DRIFT_MS, 4, "b")


def test_a_remote_at_our_wall_takes_the_greater_counter_plus_one():
    hlc, _ = _hlc()
    hlc.now()
    hlc.now()  # (T, 1)
    assert hlc.observe((T, 5, "a")) is True
    assert (hlc.wall, hlc.counter) == (T, 6)
    assert hlc.observe((T, 2, "a")) is True
    assert (hlc.wall, hlc.counter) == (T, 7)


def test_a_remote_behind_us_only_ticks_the_counter():
    hlc, _ = _hlc()
    hlc.observe((T + 1000, 3, "a"))  # our wall is now ahead of the physical clock
    assert hlc.observe((T - 5000, 50, "a")) is True
    assert (hlc.wall, hlc.counter) == (T + 1000, 5)


def test_a_physical_clock_ahead_of_both_resets_the_counter():
    hlc, clock = _hlc()
    hlc.observe((T, 9, "a"))
    clock.ms = T + 10
    assert hlc.observe((T + 5, 3, "a")) is True
    assert (hlc.wall, hlc.counter) == (T + 10, 0)


def test_observing_an_older_remote_in_the_same_millisecond_keeps_counting_up():
    hlc, _ = _hlc()
    first, second = hlc.now(), hlc.now()  # (T, 0), (T, 1): the physical clock stands still
    assert hlc.observe((T - 5, 9, "a")) is True
    third = hlc.now()
    assert first < second < third
    assert third == (T, 3, "b")


def test_a_remote_at_our_physical_time_ahead_of_our_wall_orders_after_the_remote():
    hlc, clock = _hlc(T - 10)
    hlc.now()  # wall T - 10
    clock.ms = T
    remote = (T, 5, "a")
    assert hlc.observe(remote) is True
    assert (hlc.wall, hlc.counter) == (T, 6)
    assert hlc.now() > remote

