"""Durable pub/sub in the simulator (sim/brokersim.py, scenario broker-partition): the
broker's real InterestTable and Consumer cores on every node, publishes through both sides
of a partition, then a heal.

The property (the issue's test): every acknowledged publish reaches every durable
subscriber NAME at least once (a queue group as a whole), nothing is lost, and every
duplicate comes from a redelivery the consumer was entitled to make.

Rules: fixed seeds; assertions on counts and on simulated time only, never on wall time;
each test says what would make it fail. The default runs take well under a second each;
the long variant is marked `soak`.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from meshd.broker.consumer import Consumer
from meshd_sim.__main__ import main as sim_main
from meshd_sim.brokersim import BrokerNode, BrokerSimulation
from meshd_sim.engine import Simulation
from meshd_sim.scenario import ScenarioError, load

PUBLISH = "{kind='broker-publish', at=5.0, duration=95.0, rate=10.0}"
CUT = "{kind='partition', at=30.0, duration=40.0, fractions=[0.5, 0.5]}"


def run(*overrides: str, seed: int | None = None, nodes: int | None = None
        ) -> tuple[BrokerSimulation, dict]:
    sim = BrokerSimulation(load("broker-partition", list(overrides)), seed=seed, nodes=nodes)
    return sim, sim.run()["metrics"]


def assert_all_delivered(m: dict) -> None:
    assert m["broker_publishes_acked"] > 0 and m["broker_owed"] > 0
    assert m["broker_lost"] == 0
    assert m["broker_delivered"] == m["broker_owed"]
    assert m["broker_unacked"] == 0
    assert m["broker_dead"] == 0
    assert m["broker_duplicates_without_redelivery"] == 0
    assert m["broker_unjustified_offers"] == 0
    assert m["broker_offered_after_ack"] == 0


def test_durable_publishes_on_both_sides_of_a_partition_all_delivered_after_heal():
    sim, m = run()
    # the scenario does what it says: both sides took publishes during the cut, the cut
    # dropped deliveries in flight and held some back until the heal
    side0, side1 = m["broker_published_in_partition"]
    assert side0 > 0 and side1 > 0
    assert m["broker_deliveries_dropped"] > 0 and m["broker_redeliveries"] > 0
    assert m["broker_owed_at_heal"] > 0
    assert m["partition_deaths"] > 0
    assert_all_delivered(m)
    assert m["broker_caught_up_after_heal_s"] is not None
    # the same, message by message and name by name, from the ledger
    assert sim.heal_at is not None
    side1_nodes = {n.name for n in sim.nodes[len(sim.nodes) // 2:]}
    held_back = 0
    for msg_id, (origin, _, topic, _, t) in sim.published.items():
        assert sim.received_n.get(("billing", msg_id), 0) >= 1, msg_id
        if topic == "orders.created":
            assert sim.received_n.get(("audit", msg_id), 0) >= 1, msg_id
            if origin in side1_nodes and 30.0 <= t < sim.heal_at:
                # audit's only member is on side 0: it gets these after the heal
                assert sim.first_at[("audit", msg_id)] >= sim.heal_at
                held_back += 1
        else:
            assert ("audit", msg_id) not in sim.received_n
    assert held_back > 0
    # a queue group: billing's members on both sides took messages; audit only on its node
    assert sim.received_by[("billing", "n0000")] > 0
    assert sim.received_by[("billing", "n0007")] > 0
    assert [node for (name, node) in sim.received_by if name == "audit"] == ["n0002"]


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_other_seeds_lose_nothing(seed):
    _, m = run(seed=seed)
    assert m["broker_deliveries_dropped"] > 0
    assert_all_delivered(m)


def test_same_seed_same_run_other_seed_other_run():
    a = BrokerSimulation(load("broker-partition")).run()
    b = BrokerSimulation(load("broker-partition")).run()
    c = BrokerSimulation(load("broker-partition"), seed=2).run()
    assert a["event_log_sha256"] == b["event_log_sha256"]
    assert a["metrics"] == b["metrics"]
    assert a["event_log_sha256"] != c["event_log_sha256"]


def test_same_run_across_processes_and_hash_seeds():
    """Nothing in the model may depend on set order (PYTHONHASHSEED)."""
    import os
    import subprocess
    import sys

    shas = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed,
               "PYTHONPATH": os.pathsep.join(sys.path)}
        out = subprocess.run([sys.executable, "-m", "meshd_sim", "run", "broker-partition",
                              "--set", "duration=100", "--json"], check=True,
                             capture_output=True, text=True, env=env)
        shas.append(json.loads(out.stdout)["event_log_sha256"])
    assert shas[0] == shas[1]


def test_ack_wait_alone_redelivers_what_the_partition_dropped(monkeypatch):
    """Without on_gone (no nak when a member is declared dead) the ack timeout alone must
    still bring every dropped delivery again: fails if Consumer stops redelivering after
    ack_wait."""
    monkeypatch.setattr(BrokerNode, "on_gone", lambda self, node: None)
    _, m = run()
    assert m["broker_deliveries_dropped"] > 0
    assert m["broker_redeliveries"] >= m["broker_deliveries_dropped"]
    assert_all_delivered(m)


def test_on_gone_alone_redelivers_what_the_partition_dropped():
    """With an ack timeout longer than the run, the naks for members declared dead must
    bring the dropped deliveries again: fails if on_gone's nak (spent=False) is lost."""
    _, m = run("broker.ack_wait=10000")
    assert m["broker_deliveries_dropped"] > 0
    assert m["broker_lost"] == 0 and m["broker_unjustified_offers"] == 0


def test_the_check_fails_when_redelivery_is_broken(monkeypatch):
    """Not vacuous: with naks ignored and no ack timeout within the run, what the partition
    dropped is never delivered, and the run says so."""
    monkeypatch.setattr(Consumer, "nak", lambda self, *args, **kwargs: False)
    _, m = run("broker.ack_wait=10000")
    assert m["broker_lost"] > 0
    assert m["broker_redeliveries"] == 0


def test_the_check_fails_when_an_ack_does_not_settle(monkeypatch):
    """Not vacuous: a consumer that keeps acked messages pending offers them again, and
    the run counts those offers."""
    monkeypatch.setattr(Consumer, "ack", lambda self, seq: seq in self.pending)
    _, m = run("duration=120")
    assert m["broker_offered_after_ack"] > 0


def test_crashes_and_restarts_during_the_partition_lose_nothing():
    """Two nodes crash (their logs and consumer state survive) and restart, their clients
    subscribe again: fails if a restarted origin or subscriber node loses a message."""
    crash = "{kind='crash', at=40.0, count=2, spacing=20.0, restart_after=8.0}"
    for seed in (1, 4):
        sim, m = run(f"faults=[{PUBLISH}, {CUT}, {crash}]", seed=seed)
        assert m["crashes"] == 2 and any(n.incarnation > 0 for n in sim.nodes)
        assert_all_delivered(m)


def test_cli_prints_the_broker_counts():
    runner = CliRunner()
    res = runner.invoke(sim_main, ["run", "broker-partition", "--seed", "2", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["scenario"] == "broker-partition" and doc["seed"] == 2
    m = doc["metrics"]
    for key in ("broker_publishes_acked", "broker_owed", "broker_delivered", "broker_lost",
                "broker_unacked", "broker_duplicates", "broker_redeliveries",
                "broker_deliveries_dropped", "broker_caught_up_after_heal_s"):
        assert key in m
    assert m["broker_lost"] == 0
    human = runner.invoke(sim_main, ["run", "broker-partition", "--set", "duration=60"])
    assert human.exit_code == 0 and "broker_lost" in human.output


def test_broker_scenario_errors_are_clear():
    with pytest.raises(ScenarioError, match=r"unknown key broker\.ackwait"):
        load("broker-partition", ["broker.ackwait=3"])
    with pytest.raises(ScenarioError, match="broker-publish needs a \\[broker\\] table"):
        load("steady", [f"faults=[{PUBLISH}]"])
    with pytest.raises(ScenarioError, match=r"broker\.subscribers\[0\] needs"):
        load("broker-partition", ["broker.subscribers=[{durable='x'}]"])
    with pytest.raises(ScenarioError, match="invalid queue group"):
        load("broker-partition", ["broker.subscribers=[{durable='a b', pattern='x', "
                                  "node=0}]"])
    with pytest.raises(ScenarioError, match="on node 7 but the scenario has 4 nodes"):
        run(nodes=4)
    with pytest.raises(ScenarioError, match="needs a \\[broker\\] table"):
        BrokerSimulation(load("steady"))
    assert isinstance(BrokerSimulation(load("broker-partition")), Simulation)


@pytest.mark.soak
def test_soak_two_partitions_loss_and_crashes_many_seeds():
    faults = ("faults=[{kind='broker-publish', at=5.0, duration=300.0, rate=20.0}, "
              "{kind='partition', at=30.0, duration=60.0, fractions=[0.5, 0.5]}, "
              "{kind='partition', at=150.0, duration=50.0, fractions=[1, 1, 1]}, "
              "{kind='crash', at=100.0, count=3, spacing=30.0, restart_after=10.0}]")
    for seed in range(1, 11):
        _, m = run(faults, "duration=420", "network.loss=0.05", seed=seed, nodes=12)
        assert m["broker_deliveries_dropped"] > 0
        assert_all_delivered(m)
