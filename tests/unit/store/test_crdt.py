"""CRDT laws for every store record kind, by hypothesis."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.store import crdt

nodes = st.sampled_from(["a", "b", "c"])
tss = st.tuples(st.integers(0, 20), st.integers(0, 3), nodes)


@st.composite
def lwws(draw):
    ts = draw(tss)
    # one timestamp is one write: its value follows from it
    value = None if (ts[0] + ts[1]) % 4 == 0 else f"{ts}".encode()
    return crdt.lww(ts, value)


@st.composite
def counters(draw):
    c = None
    for node, delta in draw(st.lists(st.tuples(nodes, st.integers(-5, 5)), max_size=6)):
        c = crdt.counter_add(c, node, delta)
    if c is not None and draw(st.booleans()):
        c = crdt.counter_reset(c)
    return c


@st.composite
def sets(draw):
    s = None
    for i, (node, elem, op) in enumerate(draw(st.lists(
            st.tuples(nodes, st.sampled_from("xyz"), st.booleans()), max_size=6))):
        s = crdt.set_add(s, elem, f"{node}:{i}") if op else crdt.set_remove(s, elem)
    return s


@st.composite
def states(draw):
    out = {}
    for key, strat in (("lww", lwws()), ("counter", counters()), ("set", sets())):
        v = draw(st.one_of(st.none(), strat))
        if v is not None:
            out[key] = v
    return out


def norm(s):
    return crdt.canonical(s)


@settings(max_examples=400)
@given(states(), states(), states())
def test_merge_laws(a, b, c):
    assert norm(crdt.merge(a, b)) == norm(crdt.merge(b, a))
    assert norm(crdt.merge(crdt.merge(a, b), c)) == norm(crdt.merge(a, crdt.merge(b, c)))
    assert norm(crdt.merge(a, a)) == norm(a)


def test_lww_latest_wins_and_delete_is_a_write():
    w1 = crdt.lww((1, 0, "a"), b"one")
    w2 = crdt.lww((2, 0, "b"), b"two")
    d = crdt.lww((3, 0, "a"), None)
    assert crdt.merge_lww(w1, w2) is w2
    assert crdt.merge_lww(crdt.merge_lww(w2, d), w1)[1] is None


def test_counter_increments_from_many_nodes_and_reset():
    c = crdt.counter_add(None, "a", 5)
    other = crdt.counter_add(None, "b", -2)
    merged = crdt.merge_counter(c, other)
    assert crdt.counter_value(merged) == 3
    reset = crdt.counter_reset(merged)
    assert crdt.counter_value(reset) == 0 and not crdt.counter_live(reset)
    concurrent = crdt.counter_add(other, "b", 4)  # b did not see the reset
    assert crdt.counter_value(crdt.merge_counter(reset, concurrent)) == 4


def test_set_add_wins_over_concurrent_remove():
    base = crdt.set_add(None, "x", "a:1")
    removed = crdt.set_remove(base, "x")
    re_added = crdt.set_add(base, "x", "b:1")  # concurrent with the remove
    assert crdt.set_members(crdt.merge_set(removed, re_added)) == ["x"]
    assert crdt.set_members(removed) == []
