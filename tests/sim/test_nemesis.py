"""Issue 23: the nemesis (sim/nemesis.py) runs membership, registry, store and broker cores
together under rounds of faults, checks them at every quiet period, and finds a broken core.

Short runs: one round of 400 s of faults then a quiet period (about 12 s of wall time
each); one simulated hour of the bundled scenario (`test_one_simulated_hour`); the 24-hour
runs of seeds 1-10 are in the soak (tests/sim/test_soak.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from meshd.broker import interest
from meshd.registry import replication
from meshd.store import crdt
from meshd_sim import brokersim
from meshd_sim.nemesis import NemesisSimulation
from meshd_sim.scenario import ScenarioError, load

SHORT = ["nemesis.fault_phase=400", "nemesis.quiet=180", "nemesis.settle=120",
         "duration=700"]


def run(extra: list[str] | None = None, seed: int | None = None) -> dict:
    return NemesisSimulation(load("nemesis", SHORT + (extra or [])), seed=seed).run()


def test_a_short_run_injects_faults_checks_everything_and_finds_nothing():
    r = run()
    assert r["violations"] == [], r["violations"][:3]
    assert r["quiet_periods"] == 1
    assert sum(r["faults"].values()) >= 4 and set(r["faults"]) == {
        "partition", "crash", "pause", "clock", "loss", "latency"}
    m = r["metrics"]
    assert m["store_ops_acked"] > 1000 and m["registry_ops"] > 100
    assert m["broker_publishes_acked"] > 300 and m["broker_lost"] == 0
    # core publishes reached their subscribers (one plain subscriber takes every topic, the
    # queue group too), and the quiet period's probes were checked
    assert m["broker_core_published"] > 300
    assert m["broker_core_handed"] > 2 * m["broker_core_published"] * 0.8
    # every acknowledged store op, live registry write and owed message was looked at
    assert r["checked_ops"] >= m["store_ops_acked"] + m["broker_publishes_acked"]
    assert r["not_modelled"]
    # the checker over the event log, afterwards, looked at the same operations
    assert r["history_check"]["violations"] == 0
    assert r["history_check"]["checked_ops"] == r["checked_ops"]
    assert r["history_check"]["checks"] == 1


def test_every_kind_of_fault_happens_and_is_healed_for_the_check():
    for kind in ("partition", "crash", "pause", "clock", "loss", "latency"):
        r = run([f"nemesis.kinds={{{kind} = 1}}", "nemesis.every=[5, 15]",
                 "nemesis.length=[5, 15]", "nemesis.fault_phase=200", "duration=450"])
        assert r["faults"][kind] >= 5, (kind, r["faults"])
        assert sum(r["faults"].values()) == r["faults"][kind]
        assert r["violations"] == [], (kind, r["violations"][:2])


def test_the_same_seed_replays_byte_identically():
    short = ["nemesis.fault_phase=150", "duration=400", "nemesis.every=[5, 20]"]
    a, b = run(short, seed=3), run(short, seed=3)
    assert a["event_log_sha256"] == b["event_log_sha256"]
    assert a["violations"] == b["violations"] and a["faults"] == b["faults"]
    assert sum(a["faults"].values()) >= 5
    assert run(short, seed=4)["event_log_sha256"] != a["event_log_sha256"]


def test_a_register_merge_that_keeps_the_older_write_is_caught(monkeypatch):
    def older_wins(a, b):
        if a is None:
            return b
        if b is None:
            return a
        return a if crdt.lww_ts(a) <= crdt.lww_ts(b) else b

    monkeypatch.setattr(crdt, "merge_lww", older_wins)
    r = run(["nemesis.kinds={crash = 1}"])
    found = {v["invariant"] for v in r["violations"]}
    assert "lww-acked-write-kept" in found, found
    v = next(v for v in r["violations"] if v["invariant"] == "lww-acked-write-kept")
    key = v["detail"].split(":")[0]
    assert v["excerpt"] and all(key in line.split() for line in v["excerpt"])
    assert v["found_by"] == ["quiet-period", "event-log"]  # both checkers see it
    # a violation replays from its seed
    again = run(["nemesis.kinds={crash = 1}"])
    assert again["violations"] == r["violations"]


def test_messages_for_a_paused_node_keep_their_order():
    """Regression (seed 1, 24 hours, t=20518): messages that came for a paused node were
    each retried PAUSE_STEP after their own arrival, so a core message was handed over
    after the next one from the same publisher once the node resumed. With pauses alone
    and 20 core publishes a second, the old model broke order in every seed of 1-3."""
    r = run(["nemesis.kinds={pause = 1}", "nemesis.core_rate=20", "nemesis.every=[5, 10]"],
            seed=1)
    assert r["faults"]["pause"] >= 40
    assert r["violations"] == [], r["violations"][:3]
    assert r["metrics"]["broker_core_handed"] > 10_000


def test_a_copy_sent_twice_is_caught_as_a_core_duplicate(monkeypatch):
    """A shell that resends core copies (as a naive retry would) breaks at-most-once."""
    send_item = brokersim.BrokerNode.send_item

    def twice(self, node, item):
        send_item(self, node, item)
        if item["t"] == "copy":
            send_item(self, node, item)

    monkeypatch.setattr(brokersim.BrokerNode, "send_item", twice)
    r = run(["nemesis.kinds={latency = 1}"])
    found = {v["invariant"] for v in r["violations"]}
    assert "broker-core-at-most-once" in found, found
    assert all(v["found_by"] == ["quiet-period", "event-log"] for v in r["violations"])


def test_a_node_that_forgets_its_plain_subscribers_fails_the_quiet_probes(monkeypatch):
    local_targets = interest.InterestTable.local_targets

    def groups_only(self, ns, topic, groups):
        return interest.Targets((), local_targets(self, ns, topic, groups).groups)

    monkeypatch.setattr(interest.InterestTable, "local_targets", groups_only)
    r = run(["nemesis.kinds={latency = 1}"])
    found = {v["invariant"] for v in r["violations"]}
    assert found == {"broker-core-delivered-when-healed"}, found
    assert all(v["found_by"] == ["quiet-period", "event-log"] for v in r["violations"])


def test_an_exception_in_a_core_is_a_violation_and_the_run_goes_on(monkeypatch):
    real = replication.Replicator.receive
    calls = {"n": 0}

    def flaky(self, sender, msg, now):
        calls["n"] += 1
        if calls["n"] == 500:
            raise KeyError("planted")
        return real(self, sender, msg, now)

    monkeypatch.setattr(replication.Replicator, "receive", flaky)
    r = run(["nemesis.kinds={clock = 1}"])
    (v,) = [v for v in r["violations"] if v["invariant"] == "no-crash-from-exception"]
    assert "KeyError: 'planted'" in v["detail"] and v["nodes"]
    assert v["found_by"] == ["quiet-period", "event-log"]
    assert r["quiet_periods"] == 1  # it went on to the check, with the node restarted
    assert r["metrics"]["broker_lost"] == 0


@pytest.mark.parametrize("override, message", [
    ("nemesis.quiet=0", "nemesis.fault_phase and nemesis.quiet must be above 0"),
    ("nemesis.settle=500", "nemesis.settle must be above 0 and shorter than nemesis.quiet"),
    ("nemesis.every=[5]", "nemesis.every must be [low, high]"),
    ("nemesis.kinds={meteor = 1}", "nemesis.kinds.meteor: not a fault"),
    ("nemesis.kinds={crash = 0}", "nemesis.kinds must give some fault a weight above 0"),
    ("nemesis.loss=2", "nemesis.loss is a probability"),
    ("nemesis.colour=1", "unknown key nemesis.colour"),
    ("nemesis.commit_ms=0", "nemesis.commit_ms must be above 0"),
    ("broker.core_subscribers=[{node = 1}]", "broker.core_subscribers[0] needs pattern and node"),
    ('broker.core_subscribers=[{pattern = "a", node = 1, queue = "durable:x"}]',
     "is a durable subscriber's"),
])
def test_bad_nemesis_settings_are_named(override, message):
    with pytest.raises(ScenarioError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load("nemesis", [override])


def test_the_cli_prints_the_issue_json_keys_and_refuses_bad_input_cleanly():
    out = subprocess.run([sys.executable, "-m", "meshd_sim", "run", "nemesis", "--seed", "2",
                          "--duration", "400", "--set", "nemesis.fault_phase=200",
                          "--set", "nemesis.quiet=150", "--set", "nemesis.settle=100",
                          "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    for key in ("violations", "faults", "quiet_periods", "checked_ops"):
        assert key in r
    assert r["seed"] == 2 and r["quiet_periods"] == 1
    bad = subprocess.run([sys.executable, "-m", "meshd_sim", "run", "nemesis", "--set",
                          "nemesis.quiet=-1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "nemesis.quiet must not be negative" in bad.stderr


def test_one_simulated_hour():
    """CI's run of the bundled scenario: one simulated hour of seed 1 (2 rounds)."""
    r = NemesisSimulation(load("nemesis", ["duration=3600"])).run()
    assert r["violations"] == [], r["violations"][:3]
    assert r["quiet_periods"] == 2 == r["history_check"]["checks"]
    assert r["history_check"]["checked_ops"] == r["checked_ops"]
    assert sum(r["faults"].values()) >= 20


def test_kill_9_loses_what_was_not_committed_and_nothing_acknowledged():
    """Store changes reach the disk a group commit after they are made: with commits of
    2 s, crashes lose changes and the outcome of ops waiting for them; no acknowledged op
    is lost, and the broker resumes from consumer states saved before the crash."""
    r = run(["nemesis.kinds={crash = 1}", "nemesis.commit_ms=2000", "nemesis.every=[5, 15]"],
            seed=2)
    m = r["metrics"]
    assert r["faults"]["crash"] >= 10
    assert m["store_uncommitted_lost"] > 0 and m["store_acks_lost_uncommitted"] > 0
    assert m["store_ops_unknown"] > 0 and m["store_commits"] > 1000
    assert r["violations"] == [], r["violations"][:3]
    assert m["broker_lost"] == 0
