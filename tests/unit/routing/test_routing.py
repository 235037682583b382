"""Routing table (paths, hysteresis, breaks), RTT filter and Vivaldi coordinates."""

from __future__ import annotations

import math
import random

from meshd.routing.rtt import RttFilter
from meshd.routing.table import RoutingTable
from meshd.routing.vivaldi import Coordinate, VivaldiClient


def clouds():
    """Three clouds of 3 nodes; only a1, b1, c1 reach other clouds."""
    links: dict[str, dict[str, float]] = {}

    def link(a, b, rtt):
        links.setdefault(a, {})[b] = rtt
        links.setdefault(b, {})[a] = rtt

    for cloud in "abc":
        nodes = [f"{cloud}{i}" for i in range(1, 4)]
        for i, x in enumerate(nodes):
            for y in nodes[i + 1:]:
                link(x, y, 0.001)
    link("a1", "b1", 0.030)
    link("b1", "c1", 0.040)
    link("a1", "c1", 0.080)
    return links


def table_for(me, links, **kw):
    t = RoutingTable(me, **kw)
    for origin, peers in links.items():
        t.advertise(origin, 1, peers)
    t.recompute(0.0, force=True)
    return t


def test_every_pair_gets_the_lowest_latency_route():
    links = clouds()
    t = table_for("a2", links)
    r = t.route("c3")
    assert r.path == ("a2", "a1", "b1", "c1", "c3")  # 1 + 30 + 40 + 1 < 1 + 80 + 1? no: 72 < 82
    assert r.next_hop == "a1"
    assert math.isclose(r.cost, 0.072)
    assert len(t.routes) == 8


def test_one_sided_links_are_not_used():
    links = clouds()
    links["a1"]["c3"] = 0.001  # c3 does not advertise a1: not a link
    assert table_for("a1", links).route("c3").next_hop != "c3"


def test_hysteresis_keeps_a_route_within_the_gain_and_switches_beyond_it():
    links = clouds()
    t = table_for("a2", links)
    assert t.route("c3").path[1:4] == ("a1", "b1", "c1")
    links["a1"]["c1"] = links["c1"]["a1"] = 0.068  # direct now 70 ms vs 72: within 10%
    t.advertise("a1", 2, links["a1"])
    t.advertise("c1", 2, links["c1"])
    t.recompute(5.0)
    assert t.route("c3").path[1:4] == ("a1", "b1", "c1"), "no flap for a 3% gain"
    links["a1"]["c1"] = links["c1"]["a1"] = 0.040  # 42 ms: clearly better
    t.advertise("a1", 3, links["a1"])
    t.advertise("c1", 3, links["c1"])
    t.recompute(10.0)
    assert t.route("c3").path == ("a2", "a1", "c1", "c3")
    assert t.flaps == 0, "a next-hop change counts as a flap only when the next hop moves"


def test_a_broken_hop_reroutes_at_once():
    links = clouds()
    t = table_for("a2", links)
    del links["b1"]["c1"]
    t.advertise("b1", 2, links["b1"])
    t.recompute(5.0)
    assert t.route("c3").path == ("a2", "a1", "c1", "c3")
    t.forget("c1")
    t.recompute(10.0)
    assert t.route("c3") is None and t.route("c1") is None


def test_recompute_is_rate_limited():
    t = table_for("a2", clouds(), min_interval=1.0)
    t.advertise("a1", 9, {"a2": 0.001})
    assert not t.recompute(0.5)
    assert t.recompute(1.5)


def test_rtt_filter_ignores_an_outlier():
    f = RttFilter(window=5)
    for x in (0.010, 0.011, 0.5, 0.010, 0.012):
        est = f.add("p", x)
    assert est < 0.02


def test_vivaldi_learns_distances_in_a_plane():
    rng = random.Random(7)
    pos = {i: (rng.uniform(0, 0.1), rng.uniform(0, 0.1)) for i in range(20)}
    clients = {i: VivaldiClient(random.Random(i)) for i in pos}

    def true_rtt(a, b):
        return math.dist(pos[a], pos[b]) + 0.001

    for _ in range(300):
        for i in clients:
            j = rng.randrange(20)
            if j != i:
                clients[i].update(clients[j].coord, true_rtt(i, j))
    errors = [abs(clients[i].coord.distance_to(clients[j].coord) - true_rtt(i, j))
              / true_rtt(i, j) for i in range(20) for j in range(20) if i != j]
    errors.sort()
    assert errors[len(errors) // 2] < 0.25, f"median relative error {errors[len(errors)//2]}"


def test_coordinates_from_peers_are_checked():
    for bad in (None, [1, 2], [[0.0] * 3, 1, 0, 0], [[float("nan")] * 8, 1, 0, 0]):
        try:
            Coordinate.from_wire(bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad!r}")
    c = Coordinate.from_wire([[0.0] * 8, 9.0, 0.0, 0.0])
    assert c.error == 1.5 and c.height > 0


def test_suspected_gateway_carries_no_transit_but_stays_a_destination():
    links = clouds()
    links["a2"]["b2"] = links["b2"]["a2"] = 0.045  # a second way out of cloud a
    t = table_for("a3", links)
    assert t.route("c3").next_hop == "a1"
    t.set_avoid(frozenset({"a1"}))
    assert t.recompute(0.5, force=True)
    assert "a1" not in t.route("c3").path[1:-1]
    assert t.route("c3").next_hop == "a2"
    assert t.route("a1").path == ("a3", "a1")  # still reachable itself
    t.set_avoid(frozenset())
    t.recompute(1.0, force=True)
    # refuted: the old way is only 10 ms cheaper (76 vs 86 ms, >10%), so it comes back
    assert t.route("c3").next_hop == "a1"


def test_avoiding_this_node_itself_is_ignored():
    t = table_for("a1", clouds())
    before = dict(t.routes)
    t.set_avoid(frozenset({"a1"}))
    t.recompute(1.0, force=True)
    assert t.routes == before and len(before) == 8
