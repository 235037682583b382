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
