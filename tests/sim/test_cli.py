"""`python -m meshd_sim` run as a user runs it (a subprocess): `list`, `run` with `--set`,
`--lifeguard/--no-lifeguard`, and the `steady` scenario's result at sizes that take a
second or two."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from meshd_sim.scenario import SCENARIO_DIR

README = Path(__file__).resolve().parents[2] / "README.md"
SMALL_STEADY = ("--set", "duration=200", "--set", "warmup=20")


def sim(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "meshd_sim", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def run_json(*args: str) -> dict[str, Any]:
    out = sim("run", *args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_list_shows_every_bundled_scenario_with_its_description():
    out = sim("list")
    assert out.returncode == 0, out.stderr
    listed = dict(line.split(None, 1) for line in out.stdout.splitlines())
    bundled = {p.stem: tomllib.loads(p.read_text())["description"]
               for p in SCENARIO_DIR.glob("*.toml")}
    assert listed == bundled
    # every scenario the README's table names is there to run
    in_readme = set(re.findall(r"^\| `([\w-]+)` \|", README.read_text(), re.M))
    assert "steady" in in_readme and in_readme == set(listed)


def test_steady_message_load_is_flat_in_cluster_size_and_the_simulator_is_fast():
    small = run_json("steady", "--nodes", "40", *SMALL_STEADY)
    large = run_json("steady", "--nodes", "200", *SMALL_STEADY)
    for r, n in ((small, 40), (large, 200)):
        assert (r["scenario"], r["nodes"], r["duration_s"], r["lifeguard"]) == (
            "steady", n, 200.0, True)
        m = r["metrics"]
        # a healthy cluster: nobody suspected, nobody declared dead
        assert m["suspicions"] == 0 and m["false_deaths"] == 0, m
        # SWIM sends about one ping and one ack per node per probe interval (1 s on lan)
        assert 1.5 <= m["msgs_per_node_per_s"] <= 3.0, m
        assert 0 < m["kbit_per_node_per_s"] <= 330, m  # the bandwidth goal (benchmarks.md)
    # the load per node does not grow with the cluster (the goal: within 15%)
    ratio = large["metrics"]["msgs_per_node_per_s"] / small["metrics"]["msgs_per_node_per_s"]
    assert abs(ratio - 1) <= 0.15, ratio
    # virtual time: 200 nodes x 200 s run far faster than real time (the goal is 1,000
    # nodes x 600 s within 60 s; a tenth of real time is a generous bound here)
    assert large["sim_wall_s"] < large["duration_s"] / 10, large["sim_wall_s"]
    human = sim("run", "steady", "--nodes", "20", "--duration", "60")
    assert human.returncode == 0, human.stderr
    assert "scenario steady  nodes=20" in human.stdout and "lifeguard=on" in human.stdout
    assert "messages sent per node per second" in human.stdout
    assert "event log sha256" in human.stdout


def test_set_overrides_any_scenario_key():
    base = run_json("steady", "--nodes", "40", *SMALL_STEADY)
    slower = run_json("steady", "--nodes", "40", *SMALL_STEADY,
                      "--set", "membership.probe_interval=2")
    ratio = slower["metrics"]["msgs_per_node_per_s"] / base["metrics"]["msgs_per_node_per_s"]
    assert 0.4 <= ratio <= 0.6, ratio  # half the probes, half the messages
    lossy = run_json("steady", "--nodes", "40", *SMALL_STEADY, "--set", "network.loss=0.2")
    assert base["metrics"]["suspicions"] == 0 < lossy["metrics"]["suspicions"]
    other = run_json("steady", *SMALL_STEADY, "--set", "nodes=25", "--set", "seed=7")
    assert (other["nodes"], other["seed"]) == (25, 7)
    assert other["event_log_sha256"] != base["event_log_sha256"]
    for bad, message in ((("--set", "membership.probe=1"), "unknown setting membership.probe"),
                         (("--set", "loss"), "--set takes KEY=VALUE, got 'loss'"),
                         (("--set", "a.b.c=1"), "--set key must be NAME, membership.NAME")):
        out = sim("run", "steady", "--nodes", "5", *bad)
        assert out.returncode != 0 and message in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


def test_lifeguard_flags_override_the_scenario_setting():
    args = ("slow-nodes", "--nodes", "30", "--duration", "250")
    default, on, off = run_json(*args), run_json(*args, "--lifeguard"), run_json(
        *args, "--no-lifeguard")
    assert (default["lifeguard"], on["lifeguard"], off["lifeguard"]) == (True, True, False)
    assert on["event_log_sha256"] == default["event_log_sha256"]  # the scenario's own: on
    # the flag is the membership.lifeguard setting
    assert run_json(*args, "--set", "membership.lifeguard=false")["event_log_sha256"] == \
        off["event_log_sha256"]
    # and it matters: stalled nodes' probes kill healthy members without Lifeguard
    assert off["metrics"]["false_deaths"] > 0
    assert on["metrics"]["false_deaths"] * 5 <= off["metrics"]["false_deaths"]
    human = sim("run", "steady", "--nodes", "10", "--duration", "60", "--no-lifeguard")
    assert human.returncode == 0 and "lifeguard=off" in human.stdout
