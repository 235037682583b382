"""Push-pull merge (A1, S1-S5): every state of a remote table is judged on its own, a left
member stays left, same-incarnation news from another address is a conflict, our own stale
state is refuted, identity keys travel with the states. One core, driven by hand."""

from __future__ import annotations

from meshd.membership.messages import (
    ALIVE,
    DEAD,
    LEFT,
    Ack,
    Alive,
    Dead,
    MemberState,
    Ping,
    PushPull,
)

from .helpers import addr
from .solo import run_until, sends_of, solo


def _push(core, states: list[MemberState], now: float = 1.0):
    """b pushes its table to the core over a stream."""
    return core.receive(addr("b"), [PushPull("b", False, False, states)], now, reliable=True)


def test_a_stale_state_does_not_stop_the_merge_of_the_states_after_it():
    a = solo("b", "c", inc=5)
    out = _push(a, [MemberState("c", addr("c"), 2, DEAD, {}),
                    MemberState("x", addr("x"), 0, ALIVE, {})])
    assert a.members["c"].status == "alive", "older news than ours"
    assert a.members["x"].status == "alive"
    assert ("join", "x") in [(e.kind, e.node) for e in out.events]


def test_a_left_member_in_a_remote_table_is_left_here_too():
    a = solo("b", "c")
    out = _push(a, [MemberState("c", addr("c"), 0, LEFT, {})])
    assert a.members["c"].status == "left"
    assert [(e.kind, e.node) for e in out.events] == [("left", "c")]


def test_a_remote_dead_is_only_a_suspicion_here():
    a = solo("b", "c")
    out = _push(a, [MemberState("c", addr("c"), 0, DEAD, {})])
    assert a.members["c"].status == "suspect"
    assert [(e.kind, e.node, e.detail) for e in out.events] == [("suspect", "c", "by b")]


def test_the_same_incarnation_from_another_address_is_a_conflict_not_applied():
    a = solo("b", "c")
    out = _push(a, [MemberState("c", "elsewhere:7946", 0, ALIVE, {})])
    assert [(e.kind, e.node) for e in out.events] == [("conflict", "c")]
    assert a.members["c"].addr == addr("c")


def test_our_own_state_with_other_tags_at_our_incarnation_is_refuted():
    a = solo("b")
    _push(a, [MemberState("a", addr("a"), 0, ALIVE, {"old": "tags"})])
    assert a.me.incarnation == 1 and a.me.tags == {}


def test_a_new_member_from_a_remote_table_keeps_its_key_and_joins_now():
    a = solo("b", t0=50.0)
    key, sig = b"k" * 32, b"s" * 64
    _push(a, [MemberState("x", addr("x"), 3, ALIVE, {"role": "db"}, key, sig)], now=52.5)
    x = a.members["x"]
    assert (x.key, x.sig, x.incarnation, x.tags) == (key, sig, 3, {"role": "db"})
    assert x.state_change == 52.5
    assert a.name_of_key(key) == "x"


def test_a_push_is_answered_with_our_table_over_the_stream():
    a = solo("b")
    out = _push(a, [MemberState("x", addr("x"), 0, ALIVE, {})])
    [(send, reply)] = sends_of(out, PushPull)
    assert send.reliable and send.addr == addr("b") and reply.reply
    assert {st.node for st in reply.states} == {"a", "b", "x"}


def test_each_tag_update_raises_our_incarnation_by_one():
    a = solo("b")
    a.update_tags({"v": "1"}, 1.0)
    a.update_tags({"v": "2"}, 2.0)
    assert a.me.incarnation == 2


def test_updates_about_two_members_are_both_queued_for_gossip():
    a = solo("b", "c")
    base = a.pending_broadcasts()
    a.receive(addr("b"), [Alive(1, "b", addr("b"), {"v": "1"})], 1.0)
    a.receive(addr("c"), [Alive(1, "c", addr("c"), {"v": "1"})], 1.0)
    assert a.pending_broadcasts() == base + 2


def test_a_keyless_member_whose_newer_alive_brings_a_key_is_bound_to_it():
    a = solo("b")
    key = b"k" * 32
    a.receive(addr("b"), [Alive(1, "b", addr("b"), {}, key)], 1.0)
    assert a.members["b"].key == key and a.name_of_key(key) == "b"


def test_our_name_at_another_address_is_reported_with_its_claim_and_not_fought_over():
    a = solo("b")
    out = a.receive(addr("b"), [Alive(3, "a", "other:7946", {"x": "y"})], 1.0)
    assert [(e.kind, e.node, e.addr, e.incarnation, e.tags) for e in out.events] == \
        [("conflict", "a", "other:7946", 3, {"x": "y"})]
    assert a.me.incarnation == 0


def _join_pushes(core, until: float) -> list[str]:
    pushes: list[str] = []

    def see(t, out):
        for s, m in sends_of(out, Ping):
            if not s.reliable:
                core.receive(addr(m.target), [Ack(m.seq)], t)
        pushes.extend(s.addr for s, m in sends_of(out, PushPull) if m.join)
    run_until(core, until, see)
    return pushes


def test_a_dead_member_that_came_back_is_no_longer_sent_reconnect_joins():
    a = solo("b", "c")
    a.receive(addr("c"), [Dead(0, "b", "c")], 0.0)
    assert addr("b") in _join_pushes(a, 20 * a.s.reconnect_interval), "b is retried"
    a = solo("b", "c")
    a.receive(addr("c"), [Dead(0, "b", "c")], 0.0)
    a.receive(addr("b"), [Alive(1, "b", addr("b"), {})], 0.5)
    assert a.members["b"].status == "alive"
    assert addr("b") not in _join_pushes(a, 20 * a.s.reconnect_interval)
