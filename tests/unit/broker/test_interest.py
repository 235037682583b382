"""Broker interest table: local counts, LWW records, routing and receiving (interest.py)."""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd import wire
from meshd.broker.interest import (
    Copy,
    InterestTable,
    Merged,
    WireError,
    decode_record,
)
from meshd.broker.subjects import matches
from meshd.errors import MeshError
from meshd.hlc import HLC

FAR = 10**12  # an observer's clock: every test record is in its past


def table(node: str, clock: list[int] | None = None, **kw) -> InterestTable:
    clock = clock if clock is not None else [1000]
    return InterestTable(node, HLC(node, lambda: clock[0]), **kw)


def observer(node: str = "pub") -> InterestTable:
    return InterestTable(node, HLC(node, lambda: FAR, max_drift_ms=None))


def rec(node: str, wall: int, subs: list, counter: int = 0) -> dict:
    return {"v": 1, "ts": [wall, counter, node], "subs": subs}


def near(costs: dict[str, float | None]):
    return lambda n: costs.get(n, 1.0)


def no_load(_: str) -> float:
    return 0.0


# -- local side ---------------------------------------------------------------------------

def test_subscribers_of_one_triple_are_one_entry_with_a_count():
    t = table("a")
    first = t.subscribe("default", "orders.*", None)
    assert first["subs"] == [["default", "orders.*", None, 1]]
    second = t.subscribe("default", "orders.*")
    assert second["subs"] == [["default", "orders.*", None, 2]]
    assert t.unsubscribe("default", "orders.*")["subs"] == [["default", "orders.*", None, 1]]
    # still routed while one subscriber is left
    assert t.route("default", "orders.x", near({}), no_load).nodes == ["a"]
    tomb = t.unsubscribe("default", "orders.*")
    assert tomb["subs"] == []  # no interest left: the tombstone
    assert t.route("default", "orders.x", near({}), no_load).nodes == []
    assert t.unsubscribe("default", "orders.*") is None
    versions = [first["ts"], second["ts"], tomb["ts"]]
    assert versions == sorted(versions) and len({tuple(v) for v in versions}) == 3


def test_queue_group_and_namespace_make_distinct_entries():
    t = table("a")
    t.subscribe("default", "x.>", None)
    t.subscribe("default", "x.>", "g")
    r = t.subscribe("team-a", "x.>", "")  # "" is plain
    assert r["subs"] == [["default", "x.>", None, 1], ["default", "x.>", "g", 1],
                         ["team-a", "x.>", None, 1]]


def test_a_fresh_table_publishes_a_newer_tombstone_than_its_earlier_life():
    clock = [1000]
    before = table("a", clock)
    old = before.subscribe("default", "x", None)
    clock[0] = 2000
    after = table("a", clock)
    assert after.record()["subs"] == []
    peer = observer()
    assert peer.merge("a", old) is Merged.NEW
    assert peer.merge("a", after.record()) is Merged.NEW
    assert peer.route("default", "x", near({}), no_load).nodes == []


@pytest.mark.parametrize("ns, pattern, queue", [
    ("Team A", "x", None), ("default", "a..b", None), ("default", "a b", None),
    ("default", "a.>.b", None), ("default", "", None), ("default", "x", "bad group"),
    ("default", "x", "g" * 129), ("default", "x", 7),
])
def test_invalid_subscriptions_are_400s_and_change_nothing(ns, pattern, queue):
    t = table("a")
    before = t.record()
    with pytest.raises(MeshError) as exc:
        t.subscribe(ns, pattern, queue)
    assert exc.value.status == 400
    assert t.record() == before


def test_routing_an_invalid_topic_is_a_400():
    t = table("a")
    for topic in ("a.*", "a.>", "a..b", ""):
        with pytest.raises(MeshError) as exc:
            t.route("default", topic, near({}), no_load)
        assert exc.value.status == 400


def test_local_caps_on_patterns_and_bytes():
    t = table("a", max_patterns=2)
    t.subscribe("default", "a", None)
    t.subscribe("default", "b", "g")
    with pytest.raises(MeshError) as exc:
        t.subscribe("default", "c", None)
    assert exc.value.status == 400 and "limit" in exc.value.detail
    assert [s[1] for s in t.record()["subs"]] == ["a", "b"]
    t.subscribe("default", "a", None)  # more subscribers of a known entry: no new pattern
    t.unsubscribe("default", "b", "g")
    t.subscribe("default", "c", None)  # room again

    small = table("a", max_record_bytes=200)
    small.subscribe("default", "p" * 60)
    with pytest.raises(MeshError):
        small.subscribe("default", "q" * 80)
    assert [s[1] for s in small.record()["subs"]] == ["p" * 60]
    # what a node may publish, its peers accept (same caps, same estimate)
    decode_record("a", small.record(), max_record_bytes=200)


# -- replication --------------------------------------------------------------------------

SUB = st.tuples(st.sampled_from(["default", "team-a"]),
                st.sampled_from(["a.b", "a.*", "a.>", "*.b", ">", "b.c"]),
                st.sampled_from([None, "g1", "g2"]))


def _write(node: str, wall: int, counter: int) -> dict:
    # one timestamp is one write (HLC timestamps never repeat): its content follows from it
    rnd = random.Random(f"{node}{wall}{counter}")
    keys = {(rnd.choice(["default", "team-a"]), rnd.choice(["a.b", "a.*", ">", "b.c"]),
             rnd.choice([None, "g1"])) for _ in range(rnd.randrange(4))}
    return rec(node, wall, [[ns, p, q, rnd.randrange(1, 4)] for ns, p, q in sorted(
        keys, key=lambda k: (k[0], k[1], k[2] or ""))], counter)


writes = st.builds(_write, st.sampled_from(["a", "b", "c"]), st.integers(1, 30),
                   st.integers(0, 3))


def state(t: InterestTable):
    routes = [t.route(ns, topic, near({}), no_load)
              for ns in ("default", "team-a") for topic in ("a.b", "b.c", "x")]
    return t.digest(), t.rows(), routes


def merged(items) -> InterestTable:
    t = observer()
    for r in items:
        t.merge(r["ts"][2], r)
    return t


@settings(max_examples=200)
@given(st.lists(writes, max_size=12), st.randoms())
def test_merge_is_commutative_associative_idempotent(items, rnd):
    expected = state(merged(items))
    shuffled = list(items)
    rnd.shuffle(shuffled)
    assert state(merged(shuffled)) == expected  # any order
    assert state(merged(items + items)) == expected  # duplicates change nothing
    half = len(items) // 2
    left, right = merged(items[:half]), merged(items[half:])
    for node, r in right.records_of(right.differing(left.digest())).items():
        left.merge(node, r)
    assert state(left) == expected  # halves merged by anti-entropy


def test_merge_keeps_the_newest_record_of_each_node():
    t = observer()
    new = rec("b", 20, [["default", "x", None, 1]])
    old = rec("b", 10, [["default", "y", None, 1]])
    assert t.merge("b", new) is Merged.NEW
    assert t.merge("b", old) is Merged.OLD
    assert t.merge("b", new) is Merged.OLD
    assert t.route("default", "x", near({}), no_load).nodes == ["b"]
    assert t.route("default", "y", near({}), no_load).nodes == []
    assert t.version_of("b") == (20, 0, "b")


def test_a_record_too_far_in_the_future_is_refused_and_counted():
    t = table("pub", [1000])
    far = rec("b", 1000 + 61_000, [["default", "x", None, 1]])
    assert t.merge("b", far) is Merged.FUTURE
    assert t.stats["interest_future_refused"] == 1
    assert t.version_of("b") is None
    assert t.merge("b", rec("b", 1000 + 59_000, [])) is Merged.NEW


def test_our_own_newer_record_from_an_earlier_life_is_not_applied_but_outdated():
    clock = [1000]
    t = table("a", clock)
    t.subscribe("default", "mine", None)
    ghost = rec("a", 5000, [["default", "ghost", None, 1]], counter=3)
    assert t.merge("a", ghost) is Merged.OURS
    assert t.version > (5000, 3, "a")
    assert t.record()["subs"] == [["default", "mine", None, 1]]
    assert t.route("default", "ghost", near({}), no_load).nodes == []
    peer = observer()
    peer.merge("a", ghost)
    assert peer.merge("a", t.record()) is Merged.NEW  # the republished record wins
    assert peer.route("default", "mine", near({}), no_load).nodes == ["a"]


def test_forget_drops_a_node_and_anti_entropy_brings_it_back():
    t = observer()
    r = rec("b", 10, [["default", "x", None, 1]])
    t.merge("b", r)
    assert t.forget("b") is True
    assert t.forget("b") is False
    assert t.forget("pub") is False  # never ourselves
    assert t.route("default", "x", near({}), no_load).nodes == []
    assert "b" not in t.digest()
    holder = observer("c")
    holder.merge("b", r)
    assert holder.differing(t.digest()) == ["b", "c", "pub"]  # b, and each own tombstone
    assert t.merge("b", holder.records_of(["b"])["b"]) is Merged.NEW


def test_records_travel_as_cbor():
    t = table("a")
    t.subscribe("team-a", "orders.>", "billing")
    t.subscribe("team-a", "orders.>", "billing")
    again = wire.loads(wire.dumps(t.record()))
    peer = observer()
    assert peer.merge("a", again) is Merged.NEW
    assert peer.rows() == [{"node": "a", "namespace": "team-a", "pattern": "orders.>",
                            "queue": "billing", "subscribers": 2}]


GOOD = rec("b", 10, [["default", "x.*", "g", 2]])


def _with(**change):
    r = {**GOOD, **change}
    return {k: v for k, v in r.items() if v is not ...}


@pytest.mark.parametrize("raw, why", [
    (None, "map"), ([], "map"), (_with(subs=...), "map"), (_with(extra=1), "map"),
    (_with(v=2), "version"), (_with(v=True), "version"),
    (_with(ts=[10, 0]), "timestamp"), (_with(ts=[10, 0, 5]), "timestamp"),
    (_with(ts=[True, 0, "b"]), "timestamp"), (_with(ts=[-1, 0, "b"]), "timestamp"),
    (_with(ts=[10, 0, "c"]), "written by"), (_with(ts=[1 << 70, 0, "b"]), "timestamp"),
    (_with(subs={}), "list"), (_with(subs=[["default", "x", None]]), "entry 0"),
    (_with(subs=[["default", b"x", None, 1]]), "type"),
    (_with(subs=[["Default", "x", None, 1]]), "namespace"),
    (_with(subs=[["default", "x..y", None, 1]]), "entry 0"),
    (_with(subs=[["default", "x", "a group", 1]]), "queue"),
    (_with(subs=[["default", "x", "", 1]]), "canonical"),
    (_with(subs=[["", "x", None, 1]]), "canonical"),
    (_with(subs=[["default", "x", None, 0]]), "count"),
    (_with(subs=[["default", "x", None, True]]), "count"),
    (_with(subs=[["default", "x", None, 1 << 40]]), "count"),
    (_with(subs=[["default", "x", None, 1], ["default", "x", None, 2]]), "repeats"),
    (_with(subs=[["default", f"p{i}", None, 1] for i in range(10_001)]), "10000"),
    (_with(subs=[["default", f"{i}.{'p' * 100}", None, 1] for i in range(9_000)]), "bytes"),
])
def test_malformed_records_are_refused_clearly_and_change_nothing(raw, why):
    t = observer()
    t.merge("b", rec("b", 5, [["default", "keep", None, 1]]))
    before = state(t)
    with pytest.raises(WireError, match=why):
        t.merge("b", raw)
    assert state(t) == before
    assert t.stats["interest_refused"] == 1


def test_malformed_digests_are_refused():
    t = observer()
    for raw in (None, [], {"b": [1]}, {"b": [1, "x"]}, {1: [1, 2]}):
        with pytest.raises(WireError):
            t.differing(raw)


junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.binary(max_size=4),
    lambda kids: st.lists(kids, max_size=5)
    | st.dictionaries(st.sampled_from(["v", "ts", "subs", "x"]) | st.text(max_size=3), kids,
                      max_size=4),
    max_leaves=30)


@settings(max_examples=300)
@given(st.one_of(junk, st.fixed_dictionaries({"v": st.just(1) | junk, "ts": junk,
                                               "subs": junk})))
def test_any_input_is_merged_or_refused_never_a_crash(raw):
    t = observer()
    with contextlib.suppress(WireError):
        t.merge("b", raw)
    t.route("default", "a.b", near({}), no_load)


# -- routing ------------------------------------------------------------------------------

def test_ten_nodes_one_interested_node_one_copy():
    pub = table("n0")
    for i in range(1, 10):
        peer = table(f"n{i}")
        peer.subscribe("default", "orders.created" if i == 7 else "billing.>", None)
        pub.merge(peer.node, peer.record())
    d = pub.route("default", "orders.created", near({}), no_load)
    assert d.nodes == ["n7"]
    assert d.copies["n7"] == Copy("n7", ("orders.created",), {})


def test_a_node_gets_one_copy_listing_its_plain_patterns_and_its_groups():
    pub = observer()
    pub.merge("b", rec("b", 1, [["default", "a.*", None, 3], ["default", "a.>", None, 1],
                                ["default", "a.>", "g", 2], ["default", "a.b", "h", 1],
                                ["default", "*.b", "h", 1], ["default", "z", None, 1]]))
    d = pub.route("default", "a.b", near({}), no_load)
    assert d.copies == {"b": Copy("b", ("a.*", "a.>"), {"g": ("a.>",), "h": ("*.b", "a.b")})}


def _group_table(members: list[str]) -> InterestTable:
    pub = observer()
    for n in members:
        pub.merge(n, rec(n, 1, [["default", "jobs.>", "workers", 1]]))
    return pub


def test_a_group_goes_to_the_nearest_member():
    pub = _group_table(["b", "c", "d"])
    loads = {"b": 0.0, "c": 9.0, "d": 0.0}
    d = pub.route("default", "jobs.1", near({"b": 5.0, "c": 1.0, "d": 2.0}), loads.get)
    assert d.nodes == ["c"] and d.copies["c"].groups == {"workers": ("jobs.>",)}


def test_equally_near_members_are_chosen_by_least_load_then_name():
    pub = _group_table(["b", "c", "d", "e"])
    costs = near({"b": 1.0, "c": 1.0, "d": 1.0, "e": 3.0})
    loads = {"b": 2.0, "c": 1.0, "d": 1.0, "e": 0.0}
    assert pub.route("default", "jobs.1", costs, loads.get).nodes == ["c"]
    loads["c"] = 3.0
    assert pub.route("default", "jobs.1", costs, loads.get).nodes == ["d"]


def test_only_a_delivery_without_queue_groups_serves_a_whole_batch():
    pub = _group_table(["b", "c"])
    pub.merge("d", rec("d", 1, [["default", "jobs.*", None, 1], ["default", "logs.*", None, 1]]))
    costs = near({"b": 1.0, "c": 1.0, "d": 1.0})
    assert pub.route("default", "logs.1", costs, no_load).reusable  # plain only
    with_group = pub.route("default", "jobs.1", costs, no_load)
    assert with_group.nodes == ["b", "d"] and not with_group.reusable  # b: chosen by load
    unserved = pub.route("default", "jobs.1", near({"b": None, "c": None, "d": 1.0}), no_load)
    assert unserved.unserved == ("workers",) and not unserved.reusable


def test_unreachable_members_are_skipped_and_a_group_with_none_is_unserved():
    pub = _group_table(["b", "c"])
    pub.merge("d", rec("d", 1, [["default", "jobs.*", None, 1]]))
    d = pub.route("default", "jobs.1", near({"b": None, "c": 4.0, "d": None}), no_load)
    assert d.nodes == ["c"] and d.unreachable == ("d",) and d.unserved == ()
    d = pub.route("default", "jobs.1", near({"b": None, "c": None, "d": None}), no_load)
    assert d.nodes == [] and d.unserved == ("workers",) and d.unreachable == ("d",)


def test_the_publishing_node_is_nearest_to_itself():
    pub = _group_table(["b"])
    pub.subscribe("default", "jobs.*", "workers")
    d = pub.route("default", "jobs.1", near({"b": 0.5, "pub": None}), no_load)
    assert d.nodes == ["pub"]


def test_same_group_name_in_two_namespaces_is_two_groups_and_namespaces_isolate():
    pub = observer()
    pub.merge("b", rec("b", 1, [["team-a", ">", "g", 1]]))
    pub.merge("c", rec("c", 1, [["team-b", ">", "g", 1], ["team-b", ">", None, 1]]))
    assert pub.route("team-a", "x.y", near({}), no_load).nodes == ["b"]
    assert pub.route("team-b", "x.y", near({}), no_load).nodes == ["c"]
    assert pub.route("default", "x.y", near({}), no_load).nodes == []
    local = table("a")
    local.subscribe("team-a", ">", None)
    assert local.local_targets("team-b", "x", {"g"}).plain == ()
    assert local.local_targets("team-a", "x", set()).plain == (">",)


NODES = ["n0", "n1", "n2", "n3", "n4"]
COST = st.one_of(st.none(), st.integers(0, 3).map(float))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(NODES), st.lists(SUB, max_size=5), min_size=1),
       st.fixed_dictionaries({n: COST for n in NODES}),
       st.fixed_dictionaries({n: st.integers(0, 2).map(float) for n in NODES}),
       st.sampled_from(["default", "team-a"]), st.sampled_from(["a.b", "b.c", "a.b.c", "x"]))
def test_route_serves_every_plain_node_once_and_one_member_per_group(
        subs, costs, loads, ns, topic):
    tables = {n: table(n) for n in NODES}
    for n, keys in subs.items():
        for k in keys:
            tables[n].subscribe(*k)
    pub = tables["n0"]
    for n in NODES[1:]:
        pub.merge(n, tables[n].record())
    d = pub.route(ns, topic, costs.get, loads.get)

    def reach(n):
        return 0.0 if n == "n0" else costs[n]

    want_plain = {n: sorted({p for s, p, q in keys if s == ns and q is None
                             and matches(p, topic)}) for n, keys in subs.items()}
    want_plain = {n: ps for n, ps in want_plain.items() if ps}
    groups = {q for keys in subs.values() for s, p, q in keys
              if q is not None and s == ns and matches(p, topic)}
    chosen = {}
    for g in groups:
        members = {n: sorted({p for s, p, q in keys if s == ns and q == g
                              and matches(p, topic)}) for n, keys in subs.items()}
        live = [(reach(n), loads[n], n) for n, ps in members.items()
                if ps and reach(n) is not None]
        if live:
            best = min(live)[2]
            chosen[g] = best
            assert [c.node for c in d.copies.values() if g in c.groups] == [best]
            assert d.copies[best].groups[g] == tuple(members[best])
        else:
            assert g in d.unserved and all(g not in c.groups for c in d.copies.values())
    served = {n for n in want_plain if reach(n) is not None}
    assert set(d.copies) == served | set(chosen.values())  # one copy each, no one else
    for n in served:
        assert d.copies[n].plain == tuple(want_plain[n])
    assert set(d.unreachable) == set(want_plain) - served
    assert set(d.unserved) == groups - set(chosen)
    for c in d.copies.values():  # a receiver serves exactly what the copy names
        got = tables[c.node].local_targets(ns, topic, set(c.groups))
        assert got.plain == c.plain and got.groups == c.groups


# -- receiving ----------------------------------------------------------------------------

def test_local_targets_are_plain_matches_and_only_the_named_groups():
    t = table("a")
    t.subscribe("default", "a.*", None)
    t.subscribe("default", "a.>", None)
    t.subscribe("default", "b.*", None)
    t.subscribe("default", "a.b", "g")
    t.subscribe("default", ">", "g")
    t.subscribe("default", "a.b", "h")
    t.subscribe("default", "c", "k")
    got = t.local_targets("default", "a.b", {"g", "k", "absent"})
    assert got.plain == ("a.*", "a.>")
    assert got.groups == {"g": (">", "a.b")}  # h not named; k does not match; absent gone
    assert t.local_targets("default", "a.b", ()).groups == {}
    t.unsubscribe("default", "a.*")
    assert t.local_targets("default", "a.b").plain == ("a.>",)


def test_a_digest_exchange_gives_each_side_what_it_lacks_and_forwards_news():
    clock = [1_000]
    a, b = table("a", clock), table("b", clock)
    a.subscribe("default", "orders.*")
    clock[0] += 10
    b.subscribe("default", "jobs.>", "workers")
    c_rec = rec("c", 500, [["default", "x.y", None, 1]])
    assert a.merge("c", c_rec) is Merged.NEW
    # a starts anti-entropy with b: b answers with its own record and asks for a's and c's
    out = b.receive(InterestTable.message({}, a.digest()))
    assert out.forward == {} and not out.push_ours
    assert set(out.reply) == {"b"} and sorted(out.want) == ["a", "c"]
    back = a.receive(out.answer())
    assert set(back.forward) == {"b"}, "b's record was news to a: a passes it on"
    assert set(back.reply) == {"a", "c"} and back.want == []
    done = b.receive(back.answer())
    assert set(done.forward) == {"a", "c"} and done.answer() is None
    assert a.digest() == b.digest()
    # a second round finds nothing to exchange
    assert b.receive(InterestTable.message({}, a.digest())).answer() is None


def test_receive_refuses_malformed_messages():
    t = table("a")
    for bad in ("x", {"records": []}, {"records": {1: {}}},
                {"records": {}, "want": "all"}, {"records": {}, "digest": {"b": "x"}}):
        with pytest.raises(WireError):
            t.receive(bad)


def test_routing_and_local_targets_follow_every_change_after_a_cached_answer():
    t = observer("pub")
    cost = near({"a": 1.0, "b": 1.0})
    assert t.route("default", "orders.created", cost, no_load).nodes == []
    assert t.merge("a", rec("a", 10, [["default", "orders.*", None, 1]])) is Merged.NEW
    assert t.route("default", "orders.created", cost, no_load).nodes == ["a"]
    assert t.merge("b", rec("b", 10, [["default", "orders.>", None, 1]])) is Merged.NEW
    assert t.route("default", "orders.created", cost, no_load).nodes == ["a", "b"]
    assert t.merge("a", rec("a", 11, [])) is Merged.NEW  # a unsubscribed
    assert t.route("default", "orders.created", cost, no_load).nodes == ["b"]
    t.forget("b")
    assert t.route("default", "orders.created", cost, no_load).nodes == []
    assert t.local_targets("default", "orders.created").plain == ()
    t.subscribe("default", "orders.created")
    assert t.local_targets("default", "orders.created").plain == ("orders.created",)
    t.unsubscribe("default", "orders.created")
    assert t.local_targets("default", "orders.created").plain == ()
