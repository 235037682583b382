"""The routing table's bookkeeping rules: advert versions, the nearest-links bound, the
recompute rate limit with the daemon's defaults, what recompute reports, and avoided hops
under hysteresis."""

from __future__ import annotations

import math

from meshd.routing.table import RoutingTable


def _line() -> RoutingTable:
    """s - x - d, 10 ms a hop, and s - y - d, 10.5 ms a hop."""
    t = RoutingTable("s")
    t.advertise("s", 1, {"x": 0.010, "y": 0.0105})
    t.advertise("x", 1, {"s": 0.010, "d": 0.010})
    t.advertise("y", 1, {"s": 0.0105, "d": 0.0105})
    t.advertise("d", 1, {"x": 0.010, "y": 0.0105})
    return t


def test_an_advert_is_news_only_with_a_higher_version():
    t = RoutingTable("s")
    assert t.advertise("x", 2, {"s": 0.010}) is True
    assert t.advertise("x", 2, {"s": 0.500}) is False
    assert t.advertise("x", 1, {"s": 0.500}) is False
    assert t.adverts["x"] == (2, {"s": 0.010})
    assert t.advertise("x", 3, {"s": 0.020}) is True
    assert t.adverts["x"] == (3, {"s": 0.020})


def test_an_advert_keeps_only_the_64_nearest_links():
    t = RoutingTable("s")
    # names sort the other way round from RTTs: the bound must go by RTT
    links = {f"p{99 - i:02d}": 0.001 * (i + 1) for i in range(70)}
    t.advertise("x", 1, links)
    kept = t.adverts["x"][1]
    assert len(kept) == 64
    assert set(kept) == {f"p{99 - i:02d}" for i in range(64)}


def test_the_first_recompute_needs_no_force():
    t = _line()
    assert t.recompute(0.0) is True
    r = t.route("d")
    assert (r.dest, r.next_hop) == ("d", "x")
    assert t.route("y").to_dict()["latency_ms"] == 10.5


def test_recompute_waits_one_second_by_default_and_only_for_changes():
    t = _line()
    assert t.recompute(100.0)
    t.advertise("x", 2, {"s": 0.010, "d": 0.010})
    assert t.recompute(100.9) is False, "within the default min_interval of 1 s"
    assert t.recompute(101.0) is False, "due, but nothing moved"
    assert t.recompute(101.5) is False, "the change was consumed at 101.0"


def test_a_recompute_due_exactly_at_the_interval_runs():
    t = _line()
    t.recompute(100.0)
    t.forget("x")
    assert t.recompute(100.5) is False
    assert t.recompute(101.0) is True
    assert t.route("d").next_hop == "y"


def test_losing_every_link_drops_every_route_and_says_so():
    t = _line()
    t.recompute(0.0)
    for origin in ("s", "x", "y", "d"):
        t.forget(origin)
    assert t.recompute(5.0) is True
    assert t.routes == {}
    t.forget("nobody")
    assert t.recompute(10.0, force=True) is False


def test_a_kept_route_still_names_its_destination():
    t = _line()
    t.recompute(0.0)
    t.advertise("y", 2, {"s": 0.0095, "d": 0.0095})  # 19 ms vs 20 ms: kept
    t.advertise("s", 2, {"x": 0.010, "y": 0.0095})
    t.advertise("d", 2, {"x": 0.010, "y": 0.0095})
    assert t.recompute(5.0) is False
    r = t.route("d")
    assert (r.dest, r.next_hop, r.path) == ("d", "x", ("s", "x", "d"))
    assert r.to_dict() == {"destination": "d", "next_hop": "x", "path": ["s", "x", "d"],
                           "latency_ms": 20.0}


def test_an_avoided_hop_loses_a_kept_route_at_once_despite_hysteresis():
    t = _line()
    t.recompute(0.0)
    assert t.route("d").next_hop == "x"
    t.set_avoid(frozenset({"x"}))
    assert t.recompute(1.0) is True
    assert t.route("d").path == ("s", "y", "d"), "21 ms via y beats a path through x"
    assert t.route("x").path == ("s", "x"), "x stays a destination"


def test_around_an_avoided_hop_the_lowest_latency_path_wins_not_the_fewest_hops():
    t = RoutingTable("s")
    links = {
        "s": {"g": 0.001, "a": 0.001, "c": 0.050},
        "g": {"s": 0.001, "d": 0.001},
        "a": {"s": 0.001, "b": 0.001},
        "b": {"a": 0.001, "d": 0.001},
        "c": {"s": 0.050, "d": 0.001},
        "d": {"g": 0.001, "b": 0.001, "c": 0.001},
    }
    for origin, peers in links.items():
        t.advertise(origin, 1, peers)
    t.set_avoid(frozenset({"g"}))
    t.recompute(0.0, force=True)
    assert t.route("d").path == ("s", "a", "b", "d")
    assert t.route("g").path == ("s", "g")


def test_an_avoided_destination_is_reached_over_its_cheapest_last_hop():
    t = RoutingTable("s")
    links = {
        "s": {"p": 0.010, "q": 0.020},
        "p": {"s": 0.010, "z": 0.050},
        "q": {"s": 0.020, "z": 0.0012344},
        "z": {"p": 0.050, "q": 0.0012344},
    }
    for origin, peers in links.items():
        t.advertise(origin, 1, peers)
    t.set_avoid(frozenset({"z"}))
    t.recompute(0.0, force=True)
    r = t.route("z")
    assert r.path == ("s", "q", "z")
    assert r.to_dict()["latency_ms"] == 21.234


def test_transit_hops_are_the_next_hops_that_carry_other_destinations():
    t = RoutingTable("s")
    t.advertise("s", 1, {"g": 0.001, "n": 0.001})
    t.advertise("g", 1, {"s": 0.001, "far": 0.030})
    t.advertise("n", 1, {"s": 0.001})
    t.advertise("far", 1, {"g": 0.030})
    t.recompute(0.0, force=True)
    assert t.route("far").next_hop == "g"
    assert t.transit_hops() == {"g"}, "n is only a destination; g also carries far"


def test_an_avoided_destination_compares_whole_path_costs_of_its_last_hops():
    # either neighbour may come first: the nearer neighbour (q) has the dearer last hop
    for order in (("p", "q"), ("q", "p")):
        t = RoutingTable("s")
        last_hop = {"p": 0.002, "q": 0.050}
        t.advertise("s", 1, {"p": 0.030, "q": 0.020})
        t.advertise("p", 1, {"s": 0.030, "z": 0.002})
        t.advertise("q", 1, {"s": 0.020, "z": 0.050})
        t.advertise("z", 1, {n: last_hop[n] for n in order})
        t.set_avoid(frozenset({"z"}))
        t.recompute(0.0, force=True)
        r = t.route("z")
        assert r.path == ("s", "p", "z"), order
        assert r.to_dict()["latency_ms"] == 32.0, order


def _direct_or_relayed(direct: float, leg: float, **kw: float) -> RoutingTable:
    """s reaches d directly (RTT `direct`) or through r (two legs of RTT `leg`)."""
    t = RoutingTable("s", **kw)
    t.advertise("s", 1, {"d": direct, "r": leg})
    t.advertise("r", 1, {"s": leg, "d": leg})
    t.advertise("d", 1, {"s": direct, "r": leg})
    t.recompute(0.0, force=True)
    return t


def test_a_relay_must_beat_the_direct_path_by_more_than_its_hop_cost():
    # 0.8 ms through a relay against 1 ms direct: RTT noise between members on one LAN
    t = _direct_or_relayed(0.0010, 0.0004)
    r = t.route("d")
    assert r.path == ("s", "d"), "a direct member went through a relay for 0.2 ms"
    assert math.isclose(r.cost, 0.0010), "a route's cost is its latency, hop costs apart"
    assert _direct_or_relayed(0.0010, 0.0004, hop_cost=0.0).route("d").path == ("s", "r", "d")
    # a relay that saves more than its cost (20 ms against 50) still carries the traffic
    far = _direct_or_relayed(0.050, 0.010).route("d")
    assert far.path == ("s", "r", "d") and math.isclose(far.cost, 0.020)
