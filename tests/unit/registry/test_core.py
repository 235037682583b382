"""Registry CRDT laws (property tests) and replication rules."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.hlc import HLC
from meshd.registry.core import Entry, RegistryState, WireError, entry_from_wire
from meshd.registry.replication import Replicator


def _write(key: str, ts: tuple[int, int, str]) -> Entry:
    # one timestamp is one write (HLC timestamps never repeat): its value follows from it
    v = (ts[0] * 7 + ts[1]) % 5
    return Entry(key, ts, "x", None if v == 0 else {"v": v})


entries = st.builds(
    _write,
    st.sampled_from(["a/1", "a/2", "b/1", "c/9"]),
    st.tuples(st.integers(0, 50), st.integers(0, 5), st.sampled_from(["a", "b", "c"])),
)


def state_of(items):
    s = RegistryState()
    for e in items:
        s.apply(Entry(e.key, e.ts, e.boot, e.value), 0.0)
    return {k: (e.ts, e.value) for k, e in s.entries.items()}, s.digest()


@settings(max_examples=300)
@given(st.lists(entries, max_size=12), st.randoms())
def test_merge_is_commutative_associative_idempotent(items, rnd):
    shuffled = list(items)
    rnd.shuffle(shuffled)
    assert state_of(items) == state_of(shuffled)  # any order
    assert state_of(items) == state_of(items + items)  # duplicates change nothing
    half = len(items) // 2
    left, right = RegistryState(), RegistryState()
    for e in items[:half]:
        left.apply(Entry(e.key, e.ts, e.boot, e.value), 0.0)
    for e in items[half:]:
        right.apply(Entry(e.key, e.ts, e.boot, e.value), 0.0)
    for e in list(right.entries.values()):
        left.apply(Entry(e.key, e.ts, e.boot, e.value), 0.0)
    assert ({k: (e.ts, e.value) for k, e in left.entries.items()}, left.digest()) == \
        state_of(items)


def test_live_view_hides_dead_nodes_and_old_boots():
    s = RegistryState()
    s.apply(Entry("a/1", (1, 0, "a"), "boot1", {"service": "x"}), 0.0)
    s.apply(Entry("b/1", (1, 0, "b"), "boot1", {"service": "x"}), 0.0)
    s.apply(Entry("a/2", (2, 0, "a"), "boot1", None), 0.0)
    assert [e.key for e in s.live({"a": "boot1", "b": "boot1"})] == ["a/1", "b/1"]
    assert [e.key for e in s.live({"a": "boot1"})] == ["a/1"]  # b is dead
    assert [e.key for e in s.live({"a": "boot2", "b": "boot1"})] == ["b/1"]  # a restarted


def test_tombstones_are_collected_after_ttl():
    s = RegistryState(tombstone_ttl=10)
    s.apply(Entry("a/1", (1, 0, "a"), "x", None), 0.0)
    assert s.collect(5.0) == 0
    assert s.collect(11.0) == 1 and not s.entries and not s.digest()
    # written more than the ttl before the wall it is aged by: gone, however late it was seen
    s.apply(Entry("a/2", (50_000, 0, "a"), "x", None), 100.0)
    assert s.collect(101.0, wall_ms=59_000) == 0
    assert s.collect(101.0, wall_ms=60_001) == 1 and not s.entries


def test_collection_by_write_time_takes_each_due_tombstone_once_and_nothing_else():
    s = RegistryState(tombstone_ttl=10)
    s.apply(Entry("a/1", (1_000, 0, "a"), "x", None), 0.0)
    s.apply(Entry("a/1", (2_000, 0, "a"), "x", None), 0.0)  # a newer tombstone, same key
    s.apply(Entry("a/2", (1_500, 0, "a"), "x", None), 0.0)
    s.apply(Entry("a/2", (1_600, 0, "a"), "x", {"service": "s"}), 0.0)  # back: a value
    s.apply(Entry("a/3", (30_000, 0, "a"), "x", None), 0.0)  # not due yet
    s.apply(Entry("a/4", (500, 0, "a"), "x", None), 0.0)  # due, stored last
    assert s.collect(0.0, wall_ms=11_000) == 1 and "a/4" not in s.entries  # a/1 not yet
    assert s.collect(0.0, wall_ms=20_000) == 1  # a/1 once, though stored twice
    assert sorted(s.entries) == ["a/2", "a/3"] and s.entries["a/2"].value is not None
    assert s.collect(0.0, wall_ms=40_001) == 1 and sorted(s.entries) == ["a/2"]
    assert s.collect(0.0, wall_ms=10**9) == 0 and s.entries["a/2"].value is not None


@pytest.mark.parametrize("raw", [None, [], ["nokey", [1, 0, "a"], "x", None],
                                 ["a/1", [1, 0], "x", None], ["a/1", [1, 0, "a"], 5, None],
                                 ["a/1", [1, 0, "a"], "x", [1]]])
def test_bad_wire_entries_raise_wire_error(raw):
    with pytest.raises(WireError):
        entry_from_wire(raw)


def _replicators(names):
    clock = {"t": 1000}
    reps = {}
    for n in names:
        reps[n] = Replicator(n, HLC(n, lambda: clock["t"]),
                             lambda n=n: [x for x in names if x != n], random.Random(n), 0.0,
                             fanout=1, sync_interval=5.0)
    return reps


def deliver(reps, sends, drop=lambda a, b: False, src=None):
    queue = [(src, a, m) for a, m in sends]
    while queue:
        s, dst, msg = queue.pop(0)
        if drop(s, dst):
            continue
        queue += [(dst, a, m) for a, m in reps[dst].receive(s, msg, 1.0)]


def test_push_then_anti_entropy_repairs_what_pushes_missed():
    reps = _replicators(["a", "b", "c", "d"])
    # pushes are all lost: only anti-entropy can spread the write
    reps["a"].write("i1", "x", {"service": "s"}, 0.0)
    assert all("a/i1" not in r.state.entries for n, r in reps.items() if n != "a")
    for t in range(1, 40):
        for n, r in reps.items():
            deliver(reps, r.tick(float(t)), src=n)
    digests = [r.state.digest() for r in reps.values()]
    assert all(d == digests[0] for d in digests)


def test_anti_entropy_sends_only_differing_owners():
    reps = _replicators(["a", "b"])
    for i in range(50):
        for n in ("a", "b"):
            deliver(reps, reps[n].write(f"k{i}", "x", {"i": i}, 0.0), src=n)
    reps["a"].write("late", "x", {"i": 99}, 0.0)  # not delivered
    digest_msg = {"t": "digest", "digest": reps["a"].state.digest()}
    reply = reps["b"].receive("a", digest_msg, 1.0)
    assert reply[0][1]["want"] == ["a"] and reply[0][1]["entries"] == [
        e.to_wire() for e in reps["b"].state.entries_of(["a"])]
    back = reps["a"].receive("b", reply[0][1], 1.0)
    fill = next(m for _, m in back if m["t"] == "fill")
    assert {e[0] for e in fill["entries"]} == {f"a/k{i}" for i in range(50)} | {"a/late"}


def test_unknown_message_raises_wire_error():
    reps = _replicators(["a", "b"])
    with pytest.raises(WireError):
        reps["a"].receive("b", {"t": "nope"}, 0.0)
    with pytest.raises(WireError):
        reps["a"].receive("b", [1, 2], 0.0)


def test_a_restarted_node_removes_its_instances_of_earlier_boots_when_it_sees_them():
    reps = _replicators(["a", "b"])
    for r in reps.values():
        r.boot = "boot1"
    deliver(reps, reps["a"].write("i1", "boot1", {"service": "s"}, 0.0), src="a")
    deliver(reps, reps["b"].write("j1", "boot1", {"service": "s"}, 0.0), src="b")
    assert reps["b"].state.entries["a/i1"].value is not None
    # a restarts (kill -9): a new boot and an empty state; anti-entropy brings i1 back
    clock = {"t": 2000}
    reps["a"] = Replicator("a", HLC("a", lambda: clock["t"]), lambda: ["b"],
                           random.Random("a2"), 0.0, fanout=1, sync_interval=5.0)
    reps["a"].boot = "boot2"
    deliver(reps, reps["a"].write("i2", "boot2", {"service": "s"}, 0.0), src="a")
    deliver(reps, reps["a"].sync_with("b"), src="a")
    for r in reps.values():
        assert r.state.entries["a/i1"].value is None, "the old boot's instance is removed"
        assert r.state.entries["a/i2"].value == {"service": "s"}
        assert r.state.entries["b/j1"].value == {"service": "s"}  # not ours: kept
    assert reps["a"].stats["registry_stale_removed"] == 1
    assert reps["a"].state.digest() == reps["b"].state.digest()


@settings(max_examples=200)
@given(st.lists(st.tuples(entries, st.floats(0, 2000)), max_size=20), st.floats(0, 3000))
def test_the_owner_index_and_tombstone_list_answer_as_a_scan_of_every_entry(items, later):
    s = RegistryState()
    for e, now in items:
        s.apply(Entry(e.key, e.ts, e.boot, e.value), now)
    s.collect(later)
    for owners in (["a"], ["b", "c"], ["c", "a", "a"], ["z"]):
        assert sorted(e.key for e in s.entries_of(owners)) == sorted(
            k for k, e in s.entries.items() if e.owner in owners)
    assert all(now_seen.value is not None or later - now_seen.seen_at <= s.tombstone_ttl
               for now_seen in s.entries.values()), "an old tombstone was not collected"


def test_a_collected_tombstone_does_not_come_back_from_a_peer_that_still_holds_it():
    clock = {"t": 1000}
    reps = {n: Replicator(n, HLC(n, lambda: clock["t"]), lambda n=n: ["b" if n == "a" else "a"],
                          random.Random(n), 0.0, fanout=1, sync_interval=5.0)
            for n in ("a", "b")}
    deliver(reps, reps["a"].write("i1", "x", {"service": "s"}, 0.0), src="a")
    deliver(reps, reps["a"].write("i1", "x", None, 1.0), src="a")  # removed: a tombstone
    deliver(reps, reps["a"].write("i2", "x", {"service": "s"}, 1.0), src="a")
    assert reps["b"].state.entries["a/i1"].value is None
    clock["t"] += 700_000  # 700 s later; a collects its tombstone, b (saw it later) not yet
    assert reps["a"].state.collect(700.0) == 1 and "a/i1" not in reps["a"].state.entries
    deliver(reps, reps["a"].sync_with("b"), src="a")  # the digests differ: b sends i1's
    assert "a/i1" not in reps["a"].state.entries, "the tombstone came back"
    assert reps["a"].stats["registry_old_tombstones_dropped"] == 1
    assert reps["a"].state.entries["a/i2"].value == {"service": "s"}
    assert reps["b"].state.collect(705.0) == 1  # b collects it in turn: the same digests
    assert reps["a"].state.digest() == reps["b"].state.digest()
    # a young tombstone for a key we do not hold is still taken (it may delete a value
    # that reaches us later)
    deliver(reps, reps["b"].write("j1", "x", None, 706.0), src="b")
    assert reps["a"].state.entries["b/j1"].value is None
