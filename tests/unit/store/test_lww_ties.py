"""LWW tie-break, deterministically: two writers with equal (wall, counter) timestamps.

The hypothesis laws in test_crdt.py find a broken tie-break only when they happen to draw
such a pair; these cases draw it every time.
"""

from __future__ import annotations

import pytest

from meshd.store import crdt

WALL, COUNTER = 1_700_000_000_000, 3


def _pair() -> tuple[list, list]:
    return crdt.lww((WALL, COUNTER, "node-a"), b"from a"), crdt.lww((WALL, COUNTER, "node-b"),
                                                                 b"from b")


def test_equal_wall_and_counter_the_greater_node_id_wins_in_either_order():
    a, b = _pair()
    assert crdt.merge_lww(a, b)[1] == b"from b"
    assert crdt.merge_lww(b, a)[1] == b"from b"


def test_the_node_id_is_part_of_the_compared_timestamp():
    a, b = _pair()
    assert crdt.lww_ts(a) == (WALL, COUNTER, "node-a")
    assert crdt.lww_ts(a) < crdt.lww_ts(b)


@pytest.mark.parametrize("loser_value", [b"v", None], ids=["write", "delete"])
def test_replicas_merging_in_opposite_orders_agree_on_a_tie(loser_value):
    loser = crdt.lww((WALL, COUNTER, "node-a"), loser_value)
    winner = crdt.lww((WALL, COUNTER, "node-b"), b"kept")
    left = crdt.merge({"lww": loser}, {"lww": winner})
    right = crdt.merge({"lww": winner}, {"lww": loser})
    assert crdt.canonical(left) == crdt.canonical(right)
    assert left["lww"][1] == b"kept"


def test_a_higher_counter_beats_a_higher_node_id_and_a_higher_wall_beats_both():
    low_node = crdt.lww((WALL, COUNTER + 1, "node-a"), b"counter")
    high_node = crdt.lww((WALL, COUNTER, "node-z"), b"node")
    assert crdt.merge_lww(high_node, low_node)[1] == b"counter"
    later = crdt.lww((WALL + 1, 0, "node-a"), b"wall")
    assert crdt.merge_lww(low_node, later)[1] == b"wall"
    assert crdt.merge_lww(later, high_node)[1] == b"wall"
