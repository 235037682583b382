"""Every bundled scenario at a size that runs in seconds: the direction of each target."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from meshd.membership.messages import ALIVE
from meshd_sim.__main__ import main as sim_main
from meshd_sim.engine import Simulation
from meshd_sim.scenario import ScenarioError, load, parse


def run(name: str, *overrides: str, nodes: int | None = None, seed: int | None = None):
    sc = load(name, list(overrides))
    sim = Simulation(sc, nodes=nodes, seed=seed)
    return sim, sim.run()


def test_same_seed_same_event_log_other_seed_other_log():
    _, a = run("crash", "duration=60", "faults=[{kind='crash', at=20.0}]", nodes=40)
    _, b = run("crash", "duration=60", "faults=[{kind='crash', at=20.0}]", nodes=40)
    _, c = run("crash", "duration=60", "faults=[{kind='crash', at=20.0}]", nodes=40, seed=2)
    assert a["event_log_sha256"] == b["event_log_sha256"]
    assert a["metrics"] == b["metrics"]
    assert a["event_log_sha256"] != c["event_log_sha256"]


def test_dissemination_reaches_everyone_in_few_rounds():
    _, r = run("dissemination", "duration=40", nodes=200)
    m = r["metrics"]
    assert m["dissemination_changes"] == 4
    assert m["dissemination_incomplete"] == 0
    assert m["dissemination_rounds_p999"] <= m["dissemination_rounds_max"] < 16


def test_dissemination_with_loss_still_reaches_everyone():
    _, r = run("dissemination", "duration=40", "network.loss=0.1", nodes=200)
    assert r["metrics"]["dissemination_incomplete"] == 0


def test_crash_is_suspected_then_dead_everywhere():
    _, r = run("crash", "duration=110", nodes=60)
    m = r["metrics"]
    assert m["crashes"] == 3
    assert m["detection_incomplete"] == 0
    assert 0 < m["detection_first_s_p50"] < m["detection_all_s_max"]
    assert m["false_deaths"] == 0


def test_lossy_network_has_suspicions_but_no_false_deaths():
    _, r = run("lossy", "duration=600", nodes=40)
    m = r["metrics"]
    assert m["suspicions"] > 0, "10% loss should cause some suspicions"
    assert m["false_deaths"] == 0


def test_partition_deaths_then_one_cluster_after_heal():
    sim, r = run("partition", "duration=260", nodes=30)
    m = r["metrics"]
    assert m["partition_deaths"] > 0
    assert m["rejoin_after_heal_s"] is not None
    assert m["false_deaths"] == 0
    names = [n.name for n in sim.nodes]
    for node in sim.nodes:
        assert all(node.core.members[x].state == ALIVE for x in names)


def test_lifeguard_cuts_false_deaths_of_slow_nodes_scenario():
    _, on = run("slow-nodes", "duration=900", nodes=40)
    _, off = run("slow-nodes", "duration=900", "membership.lifeguard=false", nodes=40)
    assert off["metrics"]["false_deaths"] > 0, "scenario too gentle to show anything"
    assert on["metrics"]["false_deaths"] * 5 <= off["metrics"]["false_deaths"]


def test_join_bootstrap_crash_restart_pause_and_clock_offsets():
    raw = {
        "name": "churn", "nodes": 25, "duration": 150.0, "warmup": 5.0, "bootstrap": "join",
        "profile": "lan", "codec": True,
        "faults": [
            {"kind": "clock_offset", "fraction": 1.0, "max_s": 300.0},
            {"kind": "crash", "at": 30.0, "restart_after": 40.0},
            {"kind": "pause", "at": 20.0, "count": 2, "every": [5.0, 10.0],
             "pause": {"dist": "fixed", "mean": 0.8}, "until": 100.0},
            {"kind": "join", "at": 50.0, "count": 2, "spacing": 1.0},
            {"kind": "leave", "at": 60.0},
        ],
    }
    sim = Simulation(parse(raw))
    r = sim.run()
    up = [n for n in sim.nodes if n.up]
    assert len(up) == 25 + 2 - 1
    names = {n.name for n in up}
    restarted = [n for n in sim.nodes if n.incarnation > 0]
    assert len(restarted) == 1 and restarted[0].up
    for node in up:
        alive = {m.name for m in node.core.members.values() if m.state == ALIVE}
        assert names <= alive, f"{node.name} misses {names - alive}"
    # the restarted node is known everywhere at its new, higher incarnation
    for node in up:
        assert node.core.members[restarted[0].name].incarnation >= 1
    assert r["metrics"]["false_deaths"] == 0


def test_scenario_errors_are_clear():
    with pytest.raises(ScenarioError, match=r"unknown key scenario\.nodez"):
        parse({"name": "x", "nodez": 3})
    with pytest.raises(ScenarioError, match=r"faults\[0\]\.kind"):
        parse({"name": "x", "faults": [{"kind": "meteor"}]})
    with pytest.raises(ScenarioError, match="loss is a probability"):
        parse({"name": "x", "network": {"loss": 3}})
    with pytest.raises(ScenarioError, match=r"unknown setting membership\.probe"):
        parse({"name": "x", "membership": {"probe": 1}})
    with pytest.raises(ScenarioError, match="no scenario 'nope'"):
        load("nope")


def test_cli_json_has_the_contract_keys_and_errors_are_one_line():
    runner = CliRunner()
    res = runner.invoke(sim_main, ["run", "dissemination", "--nodes", "30", "--duration", "20",
                                   "--seed", "3", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    for key in ("scenario", "seed", "nodes", "event_log_sha256", "sim_wall_s", "metrics"):
        assert key in doc
    assert doc["seed"] == 3 and doc["nodes"] == 30
    for key in ("msgs_per_node_per_s", "bytes_per_node_per_s", "false_deaths",
                "dissemination_rounds_p999", "dissemination_rounds_max"):
        assert key in doc["metrics"]
    bad = runner.invoke(sim_main, ["run", "nope"])
    assert bad.exit_code != 0
    assert "no scenario 'nope'" in bad.output
    assert "Traceback" not in bad.output
    human = runner.invoke(sim_main, ["run", "crash", "--nodes", "20", "--duration", "40"])
    assert human.exit_code == 0 and "event log sha256" in human.output


def test_event_log_is_identical_across_processes_and_hash_seeds():
    import os
    import subprocess
    import sys

    shas = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-m", "meshd_sim", "run", "slow-nodes", "--nodes", "20", "--duration",
             "120", "--json"], check=True, capture_output=True, text=True, env=env)
        shas.append(json.loads(out.stdout)["event_log_sha256"])
    assert shas[0] == shas[1]


def test_registry_replicas_converge_after_a_partition():
    _, r = run("registry-partition")
    m = r["metrics"]
    assert m["registry_versions_at_heal"] >= 2, "the two sides should have diverged"
    assert m["registry_converged_after_heal_s"] is not None
    assert m["registry_replicas_identical"]
    assert m["registry_writes"] > 100 and m["registry_missing_latest"] == 0


def test_registry_namespaces_stay_apart_across_a_partition_and_heal():
    """greeter in default (records naming no namespace, as old nodes write them), team-a and
    team-b: at the heal (sides differ) and at the end, each node serves each namespace's
    instances and none of another's; after the heal every node serves all of them."""
    _, r = run("registry-partition")
    m = r["metrics"]
    assert all(n > 10 for n in m["registry_namespace_instances"].values())
    assert m["registry_namespace_mixed"] == 0
    assert m["registry_namespace_missing"] == 0


def test_store_partition_converges_with_no_lost_write():
    _, r = run("store-partition")
    m = r["metrics"]
    assert m["store_versions_at_heal"] >= 2, "both sides must have diverged"
    assert m["store_converged_after_heal_s"] is not None
    assert m["store_replicas_identical"] and m["store_lost_writes"] == 0
    assert m["writes_not_everywhere"] == 0


def test_store_skewed_clocks_hlc_keeps_lww_sane():
    _, with_hlc = run("store-skew")
    _, wall_only = run("store-skew", "store_hlc=false")
    assert with_hlc["metrics"]["store_last_writer_lost"] == 0
    assert wall_only["metrics"]["store_last_writer_lost"] > 0, "skew should hurt raw clocks"


def test_store_3d_workload_direction():
    _, r = run("store-3d", "duration=14", "faults=[{kind='store-writes', at=2.0, "
               "duration=10.0, rate=100.0, keys=1000}]")
    m = r["metrics"]
    assert m["ops"] == 1000 and m["writes_not_everywhere"] == 0
    assert m["msgs_per_op"] < 30 and m["latency_max_ms"] < 600
