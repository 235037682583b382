"""The origin side of durable delivery (meshd/broker/origin.py), rules O1-O4."""

from __future__ import annotations

from meshd.broker.consumer import Consumer
from meshd.broker.interest import InterestTable
from meshd.broker.origin import Dead, Deliver, Origin, log_of, mirror_ns
from meshd.hlc import HLC

FAR = 10**12


def setup(costs: dict[str, float | None]) -> tuple[Origin, InterestTable]:
    interest = InterestTable("o", HLC("o", lambda: FAR, max_drift_ms=None))
    sent: dict[str, int] = {}
    origin = Origin("o", interest, lambda n: costs.get(n), lambda n: float(sent.get(n, 0)))
    return origin, interest


def interest_of(interest: InterestTable, node: str, wall: int, subs: list) -> None:
    interest.merge(node, {"v": 1, "ts": [wall, 0, node], "subs": subs})


def consumer(n: int, **kw) -> Consumer:
    c = Consumer(**{"ack_wait": 10.0, "max_deliver": 2, **kw})
    for seq in range(1, n + 1):
        c.append(seq)
    return c


def test_o1_wants_a_consumer_per_durable_name_matching_a_delivered_log():
    origin, interest = setup({"a": 1.0})
    interest_of(interest, "a", 1, [["default", "orders.*", "durable:billing", 1],
                                   ["default", "orders.*", "workers", 1],  # not durable
                                   ["team-a", "orders.created", "durable:x", 1]])
    assert origin.wanted([("default", "orders.created")]) == [
        ("default", "orders.created", "billing")]
    # a copy of b's log of namespace default is served like ours
    copy = mirror_ns("b", "default")
    assert log_of(copy) == ("b", "default")
    assert origin.wanted([(copy, "orders.created")]) == [(copy, "orders.created", "billing")]
    origin.add(("default", "orders.created", "billing"), consumer(0))
    assert origin.wanted([("default", "orders.created")]) == []  # has it already


def test_o2_nothing_is_polled_without_a_member_and_deadlines_wait_for_one():
    origin, interest = setup({"a": 1.0})
    key = ("default", "jobs", "w")
    origin.add(key, consumer(3))
    assert origin.offer(key, 0.0) == []  # no member anywhere: no attempt spent
    assert origin.consumers[key].counts()["waiting"] == 3
    interest_of(interest, "a", 1, [["default", "jobs", "durable:w", 1]])
    got = origin.offer(key, 0.0)
    assert got == [Deliver("a", 1, 1), Deliver("a", 2, 1), Deliver("a", 3, 1)]
    assert origin.next_deadline() == 10.0  # the ack wait
    interest_of(interest, "a", 2, [])  # the member left: its deadline no longer counts
    assert origin.offer(key, 11.0) == [] and origin.next_deadline() is None
    interest_of(interest, "a", 3, [["default", "jobs", "durable:w", 1]])
    again = origin.offer(key, 11.0)
    assert [(d.seq, d.attempt) for d in again] == [(1, 2), (2, 2), (3, 2)]
    assert origin.stats["broker_redelivered"] == 3
    assert origin.offer(key, 22.0) == [Dead(1, 2, "not acked after 2 deliveries"),
                                       Dead(2, 2, "not acked after 2 deliveries"),
                                       Dead(3, 2, "not acked after 2 deliveries")]


def test_o2_a_group_on_two_equal_nodes_shares_the_messages():
    costs = {"a": 1.0, "b": 1.0}
    interest = InterestTable("o", HLC("o", lambda: FAR, max_drift_ms=None))
    sent: dict[str, int] = {}
    origin = Origin("o", interest, costs.get, lambda n: float(sent.get(n, 0)))
    for node in "ab":
        interest_of(interest, node, 1, [["default", "jobs", "durable:w", 1]])
    key = ("default", "jobs", "w")
    origin.add(key, consumer(4))
    nodes = [d.node for d in origin.offer(key, 0.0) if isinstance(d, Deliver)]
    assert sorted(nodes) == ["a", "a", "b", "b"]  # the core counts what it gave each


def test_o3_settles_from_another_node_only_for_what_it_was_given():
    origin, interest = setup({"a": 1.0, "m": 1.0})
    interest_of(interest, "a", 1, [["default", "jobs", "durable:w", 1]])
    key = ("default", "jobs", "w")
    origin.add(key, consumer(2))
    assert [d.seq for d in origin.offer(key, 0.0)] == [1, 2]
    assert origin.settle(key, "ack", [1, 2], None, 1.0, peer="m") == []  # never given to m
    assert origin.stats["broker_settles_refused"] == 2
    assert origin.settle(key, "ack", [1], None, 1.0, peer="a") == [1]
    assert origin.settle(key, "ack", [2], None, 1.0) == [2]  # this node's own subscriber
    assert origin.consumers[key].floor == 2 and origin.where == {}


def test_o3_a_return_gives_the_attempt_back_and_o4_a_departure_too():
    origin, interest = setup({"a": 1.0})
    interest_of(interest, "a", 1, [["default", "jobs", "durable:w", 1]])
    key = ("default", "jobs", "w")
    origin.add(key, consumer(2, max_deliver=1))
    assert [d.seq for d in origin.offer(key, 0.0)] == [1, 2]
    assert origin.settle(key, "return", [1], 0.0, 1.0, peer="a") == [1]
    assert origin.gone("a", 1.0) == [(key, 2)]
    # both offered again at attempt 1: max_deliver 1 is not reached by those two
    assert origin.offer(key, 1.0) == [Deliver("a", 1, 1), Deliver("a", 2, 1)]
    assert origin.settle(key, "nak", [1], 0.0, 2.0, peer="a") == [1]
    assert origin.offer(key, 2.0)[0] == Dead(1, 1, "not acked after 1 deliveries")
