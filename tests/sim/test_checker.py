"""Issue 23: the nemesis's checker (sim/checker.py) finds each kind of violation planted in
otherwise good data, and passes the good data."""

from __future__ import annotations

from meshd.store import crdt
from meshd_sim import checker


def invariants(findings: list[checker.Finding]) -> list[str]:
    return [f.invariant for f in findings]


def test_membership_agrees_only_when_every_node_sees_exactly_the_running_ones():
    running = ["a", "b", "c"]
    good = {"a": ["a", "b", "c"], "b": ["c", "b", "a"], "c": ["a", "b", "c"]}
    assert checker.membership(good, running) == []
    bad = dict(good, b=["a", "b"], c=["a", "b", "c", "d"])
    found = checker.membership(bad, running)
    assert invariants(found) == ["membership-agrees"] * 2
    assert "missing ['c']" in found[0].detail and "not running ['d']" in found[1].detail


def test_digests_must_be_equal_and_the_odd_nodes_are_named():
    assert checker.digests("store", {"a": [1], "b": [1], "c": [1]}) == []
    (f,) = checker.digests("store", {"a": [1], "b": [2], "c": [1]})
    assert f.invariant == "store-digests-equal" and f.nodes == ["b"]


def test_registry_writes_are_held_as_written_and_removals_may_be_collected():
    ts = (5, 0, "a")
    latest = {"a/i1": (ts, "a", False), "a/i2": ((6, 0, "a"), "a", True)}
    held = {"a": {"a/i1": ts, "a/i2": (6, 0, "a")}, "b": {"a/i1": ts}}  # b collected i2
    assert checker.registry(latest, held) == []
    (f,) = checker.registry(latest, dict(held, c={"a/i1": (4, 0, "a")}))
    assert f.invariant == "registry-write-kept" and "c" in f.nodes
    (f,) = checker.registry(latest, dict(held, c={}))  # a registration missing
    assert f.invariant == "registry-write-kept"


def test_lww_history_an_acknowledged_write_may_be_superseded_never_undone():
    led = checker.LwwKey(acked=(10, 0, "a"),
                         written={(10, 0, "a"): b"x", (12, 0, "b"): None, (8, 0, "c"): b"old"})
    assert checker.lww("k", led, crdt.lww((10, 0, "a"), b"x")) == []
    assert checker.lww("k", led, crdt.lww((12, 0, "b"), None)) == []  # a later delete
    assert invariants(checker.lww("k", led, crdt.lww((8, 0, "c"), b"old"))) == [
        "lww-acked-write-kept"]
    assert invariants(checker.lww("k", led, None)) == ["lww-acked-write-kept"]
    assert invariants(checker.lww("k", led, crdt.lww((10, 0, "a"), b"y"))) == [
        "lww-no-invented-value"]
    assert invariants(checker.lww("k", led, crdt.lww((99, 0, "z"), b"x"))) == [
        "lww-no-invented-value"]
    assert checker.lww("k", checker.LwwKey(), None) == []  # nothing acknowledged


def test_counters_lie_between_the_acknowledged_sum_and_that_plus_the_unknown():
    assert checker.counter("c", checker.CounterKey(acked=7), 7) == []
    assert invariants(checker.counter("c", checker.CounterKey(acked=7), 6)) == ["counter-sum"]
    assert invariants(checker.counter("c", checker.CounterKey(acked=7), 8)) == ["counter-sum"]
    led = checker.CounterKey(acked=7, unknown=3)
    assert [checker.counter("c", led, v) == [] for v in (6, 7, 10, 11)] == [
        False, True, True, False]


def test_or_set_adds_win_and_acknowledged_removes_hold():
    led = checker.SetKey(acked_adds={"a:1": "x", "b:1": "y"},
                         adds={"a:1": "x", "b:1": "y", "c:1": "z", "a:2": "w"},
                         removed={"b:1", "a:2"}, acked_removed={"a:2"})
    assert checker.or_set("s", led, ["x"]) == []  # y removed (unacked remove landed)
    assert checker.or_set("s", led, ["x", "y", "z"]) == []  # y's remove may not have landed
    assert invariants(checker.or_set("s", led, [])) == ["set-acked-add-kept"]
    assert invariants(checker.or_set("s", led, ["x", "w"])) == ["set-acked-remove-kept"]
    assert invariants(checker.or_set("s", led, ["x", "q"])) == ["set-no-invented-member"]


def test_durable_messages_are_owed_until_delivered_and_duplicates_need_a_redelivery():
    owed = [("billing", "m1"), ("audit", "m1"), ("billing", "m2")]
    received = {("billing", "m1"): 1, ("audit", "m1"): 2, ("billing", "m2"): 1}
    assert checker.broker(owed, received, {}) == []
    found = checker.broker(owed, {("billing", "m1"): 1}, {("audit", "m1"): "attempt 5"})
    assert invariants(found) == ["broker-durable-delivered"] * 2
    assert "dead-lettered: attempt 5" in found[0].detail and found[0].subjects == ["m1"]
    assert checker.queue_duplicates({("billing", "m1"): 0}) == []
    assert invariants(checker.queue_duplicates({("billing", "m1"): 1})) == [
        "broker-no-duplicate-without-redelivery"]


def test_core_delivery_is_at_most_once_per_subscriber_and_group_and_in_order():
    ledger = checker.CoreLedger()
    assert ledger.handed("core0", None, "c1", "a", "orders.x", 1) == []
    assert ledger.handed("core0", None, "c2", "a", "orders.x", 2) == []
    assert ledger.handed("core0", None, "c4", "b", "orders.x", 1) == []  # another publisher
    assert ledger.handed("core1", "shipping", "c1", "a", "orders.x", 1) == []
    # the same message again: to the subscriber, and to another member of the group
    assert invariants(ledger.handed("core0", None, "c2", "a", "orders.x", 2)) == \
        ["broker-core-at-most-once"]
    (f,) = ledger.handed("core2", "shipping", "c1", "a", "orders.x", 1)
    assert f.invariant == "broker-core-at-most-once" and "'shipping'" in f.detail
    # an older message of a publisher after a newer one on the same topic
    assert ledger.handed("core0", None, "c5", "a", "orders.x", 4) == []
    (f,) = ledger.handed("core0", None, "c3", "a", "orders.x", 3)
    assert f.invariant == "broker-core-in-order" and f.nodes == ["a"]
    assert ledger.handed("core0", None, "c6", "a", "orders.y", 1) == []  # another topic


def test_core_probes_must_reach_every_target_once_healed():
    ledger = checker.CoreLedger()
    ledger.handed("core0", None, "p1", "a", "orders.x", 1)
    ledger.handed("core3", "shipping", "p1", "a", "orders.x", 1)
    assert checker.core_delivered([("p1", ["core0", "shipping"])], ledger) == []
    (f,) = checker.core_delivered([("p1", ["core0", "core1", "shipping", "audit"])], ledger)
    assert f.invariant == "broker-core-delivered-when-healed"
    assert f.detail.endswith("never reached audit, core1") and f.subjects == ["p1"]


def test_a_counter_is_the_acknowledged_sum_plus_whole_increments_of_unknown_outcome():
    led = checker.CounterKey(acked=1, unknown=5, parts=[5])
    assert checker.counter("c", led, 1) == [] and checker.counter("c", led, 6) == []
    # within [acked, acked + unknown] but no subset of the unknown ones makes it: the
    # acknowledged +1 was swallowed by a +5 that a restarted node had lost
    (f,) = checker.counter("c", led, 5)
    assert f.invariant == "counter-sum" and "no subset of them adds 4" in f.detail
    led = checker.CounterKey(acked=3, unknown=9, parts=[2, 3, 4])
    assert [v for v in range(14) if not checker.counter("c", led, v)] == [3, 5, 6, 7, 8, 9, 10, 12]
