"""Counter, set and normal-form operations, one explicit case each.

The hypothesis laws (test_crdt.py) compare states through crdt.canonical, so they cannot
notice a broken canonical(), and they never look at counter_live or at what an operation
keeps of the state it is given; these cases do.
"""

from __future__ import annotations

from meshd.store import crdt


def test_counter_of_nothing_is_zero_and_not_live():
    assert crdt.counter_value(None) == 0
    assert crdt.counter_live(None) is False
    assert crdt.counter_reset(None) is None


def test_counter_adds_accumulate_per_node_and_by_sign():
    c = crdt.counter_add(None, "a", 1)
    c = crdt.counter_add(c, "a", 2)
    c = crdt.counter_add(c, "b", -4)
    c = crdt.counter_add(c, "b", 0)
    assert c["p"] == {"a": 3} and c["n"] == {"b": 4}
    assert crdt.counter_value(c) == -1


def test_a_counter_is_live_until_reset_and_again_after_any_change():
    up = crdt.counter_add(None, "a", 1)
    assert crdt.counter_live(up) is True
    gone = crdt.counter_reset(up)
    assert crdt.counter_live(gone) is False and crdt.counter_value(gone) == 0
    down = crdt.counter_add(gone, "b", -1)
    assert crdt.counter_live(down) is True
    assert crdt.counter_value(down) == -1
    assert crdt.counter_live(crdt.counter_add(gone, "a", 1)) is True


def test_counter_merge_keeps_every_node_of_both_sides():
    a = crdt.counter_add(None, "a", 5)
    b = crdt.counter_add(crdt.counter_add(None, "b", 2), "c", -1)
    merged = crdt.merge_counter(a, b)
    assert merged == {"p": {"a": 5, "b": 2}, "n": {"c": 1}, "bp": {}, "bn": {}}
    assert crdt.counter_value(merged) == 6


def test_set_add_keeps_earlier_elements_and_remove_of_all_empties_the_set():
    s = crdt.set_add(None, "x", "a:1")
    s = crdt.set_add(s, "y", "a:2")
    assert crdt.set_members(s) == ["x", "y"]
    one = crdt.set_remove(s, "x")
    assert crdt.set_members(one) == ["y"]
    assert crdt.set_members(crdt.set_remove(s)) == []
    assert crdt.set_remove(None) is None


def test_a_remove_keeps_the_tags_removed_before():
    s = crdt.set_add(None, "x", "a:1")
    s = crdt.set_remove(s, "x")
    s = crdt.set_add(s, "y", "a:2")
    s = crdt.set_remove(s, "y")
    assert s["removed"] == ["a:1", "a:2"]
    assert crdt.set_members(s) == []


def test_canonical_keeps_every_part_and_drops_zero_counter_entries():
    state = {
        "lww": crdt.lww((5, 0, "a"), b"v"),
        "counter": {"p": {"b": 1, "a": 0}, "n": {}, "bp": {}, "bn": {}},
        "set": {"adds": {"y": ["b:2", "a:1"], "x": ["c:1"]}, "removed": ["c:1"]},
    }
    out = crdt.canonical(state)
    assert out["lww"] == state["lww"]
    assert out["counter"] == {"p": {"b": 1}, "n": {}, "bp": {}, "bn": {}}
    assert out["set"] == {"adds": {"x": ["c:1"], "y": ["a:1", "b:2"]}, "removed": ["c:1"]}
    assert list(out["set"]["adds"]) == ["x", "y"]
    assert crdt.canonical({}) == {}
