"""Route hysteresis at the real threshold: the daemon's table (its default switch_gain, 10%)
keeps a path against a new best up to 10% cheaper and switches at 10% or more.

Two ways from s to d: via x (the current route, 100 ms) and via y, whose cost is set just
below, at and just above the threshold. Gains of 9% and 11% bracket it, so a table that
switched at 5% or only at 20% fails here.
"""

from __future__ import annotations

import math

from meshd.routing.table import RoutingTable


def _table(via_x: tuple[float, float], via_y: tuple[float, float]) -> RoutingTable:
    # the default gain, as routing/service.py and the simulator use; no hop cost, so the
    # thresholds below are the gain's alone (test_table_rules.py tests hop costs)
    t = RoutingTable("s", hop_cost=0.0)
    _advertise(t, 1, via_x, via_y)
    t.recompute(0.0, force=True)
    return t


def _advertise(t: RoutingTable, version: int, via_x: tuple[float, float],
               via_y: tuple[float, float]) -> None:
    (sx, xd), (sy, yd) = via_x, via_y
    t.advertise("s", version, {"x": sx, "y": sy})
    t.advertise("x", version, {"s": sx, "d": xd})
    t.advertise("y", version, {"s": sy, "d": yd})
    t.advertise("d", version, {"x": xd, "y": yd})


def _after_change(via_y: tuple[float, float]) -> RoutingTable:
    t = _table((0.050, 0.050), (0.100, 0.100))
    assert t.route("d").path == ("s", "x", "d")
    _advertise(t, 2, (0.050, 0.050), via_y)
    t.recompute(10.0)
    return t


def test_a_new_best_9_percent_cheaper_does_not_move_the_route():
    t = _after_change((0.041, 0.050))  # 91 ms against 100 ms
    r = t.route("d")
    assert r.path == ("s", "x", "d")
    assert math.isclose(r.cost, 0.100), "a kept route reports its own path's cost"
    assert t.flaps == 0


def test_a_new_best_11_percent_cheaper_takes_the_route():
    t = _after_change((0.039, 0.050))  # 89 ms against 100 ms
    r = t.route("d")
    assert r.path == ("s", "y", "d")
    assert math.isclose(r.cost, 0.089)
    assert t.flaps == 1


def test_a_new_best_exactly_10_percent_cheaper_takes_the_route():
    t = _table((0.5, 0.5), (1.0, 1.0))  # binary-exact: 1.0 * (1 - 0.1) == 0.45 + 0.45
    _advertise(t, 2, (0.5, 0.5), (0.45, 0.45))
    t.recompute(10.0)
    assert t.route("d").path == ("s", "y", "d")


def test_without_a_current_route_the_best_path_is_taken_at_once():
    t = _table((0.050, 0.050), (0.041, 0.050))
    assert t.route("d").path == ("s", "y", "d")
    assert t.flaps == 0


def test_a_kept_route_that_breaks_moves_at_once_whatever_the_gain():
    t = _after_change((0.049, 0.050))  # 99 ms: kept
    assert t.route("d").path == ("s", "x", "d")
    t.forget("x")
    t.recompute(20.0)
    assert t.route("d").path == ("s", "y", "d")


def test_every_next_hop_move_counts_as_a_flap():
    t = _after_change((0.039, 0.050))  # moved to y: one flap
    _advertise(t, 3, (0.030, 0.050), (0.039, 0.050))  # x now 80 ms against 89: back to x
    t.recompute(20.0)
    assert t.route("d").path == ("s", "x", "d")
    assert t.flaps == 2
