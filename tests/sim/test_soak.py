"""Full-size scenario runs (minutes each): `python -m pytest -m soak`."""

from __future__ import annotations

import pytest

from meshd_sim.engine import Simulation
from meshd_sim.scenario import load

pytestmark = pytest.mark.soak


def test_lossy_full_hour_no_false_deaths():
    r = Simulation(load("lossy")).run()
    assert r["metrics"]["false_deaths"] == 0


def test_slow_nodes_lifeguard_twenty_times_fewer_false_deaths():
    on = Simulation(load("slow-nodes")).run()["metrics"]
    off = Simulation(load("slow-nodes", ["membership.lifeguard=false"])).run()["metrics"]
    assert on["false_deaths"] * 20 <= off["false_deaths"]


def test_thousand_node_crash_detection():
    m = Simulation(load("crash")).run()["metrics"]
    assert m["detection_incomplete"] == 0
    assert m["detection_first_s_p50"] <= 2.0


@pytest.mark.parametrize("seed", range(1, 11))
def test_nemesis_24_hours(seed):
    """Issue 23: 24 simulated hours of the nemesis per seed, no violation (MESHD_NEMESIS_SECONDS
    shortens it). Prints the wall time (the issue's target: 20 minutes a run)."""
    import os
    import time

    from meshd_sim.nemesis import NemesisSimulation

    seconds = float(os.environ.get("MESHD_NEMESIS_SECONDS", "86400"))
    start = time.perf_counter()
    r = NemesisSimulation(load("nemesis", [f"duration={seconds}"]), seed=seed).run()
    wall = time.perf_counter() - start
    print(f"seed {seed}: {seconds:.0f} simulated s in {wall:.0f} s wall, faults {r['faults']},"
          f" {r['quiet_periods']} quiet periods, {r['checked_ops']} ops checked")
    assert r["violations"] == [], r["violations"][:3]
    assert r["quiet_periods"] == int(seconds // 1440) == r["history_check"]["checks"]
    assert r["history_check"]["checked_ops"] == r["checked_ops"]
