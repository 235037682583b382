"""The RTT filter is the median of the last `window` samples: an outlier that arrives last
does not move it, a real change does once it fills half the window."""

from __future__ import annotations

from meshd.routing.rtt import RttFilter


def test_an_outlier_as_the_latest_sample_does_not_move_the_estimate():
    f = RttFilter(window=5)
    for x in (0.010, 0.012, 0.011, 0.013):
        f.add("p", x)
    est = f.add("p", 0.900)
    assert est == 0.012
    assert f.get("p") == 0.012


def test_a_low_outlier_as_the_latest_sample_is_ignored_too():
    f = RttFilter(window=5)
    for x in (0.050, 0.052, 0.051, 0.001):
        est = f.add("p", x)
    assert est == (0.050 + 0.051) / 2
    assert f.get("p") == est


def test_a_real_change_shows_once_it_is_most_of_the_window():
    f = RttFilter(window=5)
    for _ in range(5):
        f.add("p", 0.010)
    assert f.add("p", 0.040) == 0.010
    assert f.add("p", 0.040) == 0.010
    assert f.add("p", 0.040) == 0.040, "3 of 5 samples moved: the median follows"


def test_old_samples_leave_the_window():
    f = RttFilter(window=3)
    for x in (0.100, 0.100, 0.100, 0.020, 0.020):
        f.add("p", x)
    assert f.get("p") == 0.020


def test_peers_are_kept_apart_and_forgotten():
    f = RttFilter()
    f.add("p", 0.010)
    f.add("q", 0.300)
    assert f.get("p") == 0.010 and f.get("q") == 0.300
    f.forget("p")
    assert f.get("p") is None and f.get("q") == 0.300
    f.forget("never-seen")  # not an error
    assert f.get("q") == 0.300


def test_the_default_window_is_seven_samples():
    f = RttFilter()
    for _ in range(7):
        f.add("p", 0.100)
    for _ in range(3):
        assert f.add("p", 0.020) == 0.100
    assert f.add("p", 0.020) == 0.020, "4 of the last 7 samples are 20 ms"
