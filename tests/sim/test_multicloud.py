"""Routing across clouds where only gateways cross (sim/scenarios/multicloud*.toml)."""

from __future__ import annotations

import pytest

from meshd_sim.engine import Simulation
from meshd_sim.scenario import ScenarioError, load


def run(name: str, *overrides: str, seed: int | None = None) -> tuple[Simulation, dict]:
    sim = Simulation(load(name, list(overrides)), seed=seed)
    return sim, sim.run()


def test_steady_hour_every_pair_routed_near_optimal_no_flaps_no_false_deaths():
    sim, r = run("multicloud")
    m = r["metrics"]
    assert r["duration_s"] - sim.sc.warmup >= 3600
    assert m["route_coverage"] == 1.0
    assert m["path_stretch_p99"] <= 1.10
    assert m["route_flaps"] == 0
    assert m["false_deaths"] == 0 and m["suspicions_after_warmup"] == 0
    # the topology is what the scenario says: internal nodes cannot reach other clouds
    net = sim.net
    gateways = [n for n in sim.nodes if net.gateway[n.idx]]
    assert len(gateways) == 6
    internal_a = next(n for n in sim.nodes if net.zone_of[n.idx] == 0 and not net.gateway[n.idx])
    internal_c = next(n for n in sim.nodes if net.zone_of[n.idx] == 2 and not net.gateway[n.idx])
    assert not net.reachable(internal_a.idx, internal_c.idx)
    # and a-c traffic takes the faster way through cloud b (15 + 20 ms < 40 ms one way)
    route = internal_a.routing.table.route(internal_c.name)
    zones = [net.zone_of[sim.by_name[x].idx] for x in route.path]
    assert 1 in zones


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_gateway_crash_routes_converge_within_two_probe_intervals_plus_dissemination(seed):
    sim, r = run("multicloud-gateway-down", seed=seed)
    m = r["metrics"]
    s = sim.settings
    assert m["crashes"] == 3 and m["route_unconverged"] == 0
    # 2 probe intervals to notice (watch: no answer for 2 intervals + a timeout), then at
    # most one recompute tick (1 s) for the news to reach the table
    assert m["route_convergence_s_max"] <= 2 * s.probe_interval + s.probe_timeout + 1.0
    assert m["route_coverage"] == 1.0 and m["path_stretch_p99"] <= 1.10
    # nobody alive was blamed for the dead gateways: only they were suspected
    assert m["false_deaths"] == 0
    assert m["suspicions"] <= 3 * (sim.n_initial - 1)  # at most one per observer and crash


def test_without_routed_probes_members_behind_gateways_die():
    _, r = run("multicloud", "duration=200", "routing=false")
    assert r["metrics"]["false_deaths"] > 0


def test_crash_fault_zone_must_exist():
    with pytest.raises(ScenarioError, match="zone"):
        load("multicloud-gateway-down", ["faults=[{kind='crash', zone='nowhere'}]"])


def test_one_percent_loss_everywhere_no_false_deaths_every_pair_still_routed():
    _, r = run("multicloud", "duration=1200", "network.loss=0.01")
    m = r["metrics"]
    assert m["false_deaths"] == 0
    assert m["route_coverage"] == 1.0 and m["path_stretch_p99"] <= 1.10
