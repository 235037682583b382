"""Each rule of the membership core (see the theory of operation in core.py)."""

from __future__ import annotations

import random

import pytest

from meshd.membership.core import Membership, MembershipError
from meshd.membership.messages import (
    Ack,
    Alive,
    Dead,
    IndirectPing,
    Nack,
    Ping,
    PushPull,
    Suspect,
)

from .helpers import Harness, addr, settings


def test_probe_acked_keeps_member_alive_and_records_rtt():
    h = Harness()
    h.add("a", "b")
    h.run(3.0)
    assert h.msgs_sent("a", Ping, "b"), "a never probed b"
    assert h.msgs_sent("b", Ack, "a"), "b never acked"
    assert h.status("a", "b") == "alive"
    assert h.member("a", "b").rtt is not None
    assert not h.msgs_sent("a", IndirectPing)
    assert "suspect" not in h.kinds("a", "b")


def test_probes_go_round_robin_over_every_member():
    h = Harness()
    h.add(*"abcdef")
    targets = []
    t = 0.0
    while len(targets) < 10:
        t += 0.05
        h.tick("a", t)
        for m in h.msgs_sent("a", Ping):
            if m not in targets:
                targets.append(m)
        h.deliver()
    first_round = [p.target for p in targets[:5]]
    assert sorted(first_round) == list("bcdef")


def test_failed_probe_asks_helpers_pings_over_stream_then_suspects():
    h = Harness()
    h.add("a", "b", "c", "d", "e")
    h.down = {"b"}
    h.run(4.0)
    indirect = [m for m in h.msgs_sent("a", IndirectPing) if m.target == "b"]
    assert indirect, "no indirect probe of b"
    assert {m.seq for m in indirect} and all(m.nack for m in indirect)
    stream_pings = [s for o, s in h.sent if o == "a" and s.reliable
                    and isinstance(s.msgs[0], Ping) and s.msgs[0].target == "b"]
    assert stream_pings, "no TCP fallback ping"
    assert h.status("a", "b") == "suspect"


def test_indirect_probe_through_a_helper_saves_an_unreachable_member():
    h = Harness(s=settings(tcp_fallback=False))
    h.add("a", "b", "c")
    # a and b cannot talk directly; c reaches both
    h.drop = lambda src, dst: {src, dst} == {"a", "b"}
    h.run(6.0)
    assert h.msgs_sent("a", IndirectPing), "a never asked for help"
    assert h.msgs_sent("c", Ack, "a"), "c never forwarded b's ack"
    assert h.status("a", "b") == "alive"
    assert "suspect" not in h.kinds("a", "b")


def test_helper_sends_nack_when_target_is_silent():
    h = Harness()
    h.add("a", "b", "c")
    c = h.cores["c"]
    out = c.receive(addr("a"), [IndirectPing(77, "b", addr("b"), "a", addr("a"), True)], 0.0)
    assert any(isinstance(m, Ping) and m.target == "b" for s in out.sends for m in s.msgs)
    out = c.tick(0.5 * 0.8 + 0.01)
    nacks = [m for s in out.sends for m in s.msgs if isinstance(m, Nack)]
    assert [n.seq for n in nacks] == [77]
    assert out.sends[0].addr == addr("a")


def test_suspected_node_refutes_with_higher_incarnation():
    h = Harness()
    h.add("a", "b")
    b = h.cores["b"]
    h.take("b", b.receive(addr("a"), [Suspect(0, "b", "a")], 1.0))
    assert b.me.incarnation == 1
    h.take("a", h.cores["a"].receive(addr("c"), [Suspect(0, "b", "c")], 1.0))
    assert h.status("a", "b") == "suspect"
    h.run(3.0)
    refutes = [m for m in h.msgs_sent("b", Alive) if m.node == "b"]
    assert refutes and refutes[0].incarnation == 1
    assert h.status("a", "b") == "alive"
    assert h.member("a", "b").incarnation == 1
    assert "alive" in h.kinds("a", "b")


def test_dead_or_alive_about_self_is_refuted():
    h = Harness()
    h.add("a", "b")
    b = h.cores["b"]
    b.receive(addr("a"), [Dead(3, "b", "a")], 0.0)
    assert b.me.incarnation == 4
    b.receive(addr("a"), [Alive(4, "b", addr("b"), {"stale": "tags"})], 0.0)
    assert b.me.incarnation == 5


def test_old_incarnations_are_ignored():
    h = Harness()
    h.add("a", "b")
    a = h.cores["a"]
    a.receive(addr("b"), [Alive(2, "b", addr("b"), {})], 0.0)
    a.receive(addr("c"), [Suspect(1, "b", "c")], 0.0)
    assert h.status("a", "b") == "alive"
    a.receive(addr("c"), [Dead(1, "b", "c")], 0.0)
    assert h.status("a", "b") == "alive"


def test_suspicion_expires_to_dead_after_max_without_confirmations():
    h = Harness()
    h.add(*[f"n{i}" for i in range(10)])
    a = h.cores["n0"]
    a.receive(addr("n1"), [Suspect(0, "n9", "n1")], 0.0)
    s = settings()
    n = 10
    h.down = set(h.cores) - {"n0"}
    h.tick("n0", s.suspicion_max(n) - 0.01)
    assert h.status("n0", "n9") == "suspect"
    out = h.tick("n0", s.suspicion_max(n) + 0.01)
    assert h.status("n0", "n9") == "dead"
    sent = [m for send in out.sends for m in send.msgs]
    queued = a._broadcasts.take(1 << 20, 1000)  # what the next probes would piggyback
    assert any(isinstance(m, Dead) and m.node == "n9" for m in sent + queued), \
        "the node that declared n9 dead must tell the others"


def test_confirmations_shrink_the_suspicion_timeout_to_the_minimum():
    h = Harness()
    h.add(*[f"n{i}" for i in range(10)])
    a = h.cores["n0"]
    s = settings()
    a.receive(addr("n1"), [Suspect(0, "n9", "n1")], 0.0)
    a.receive(addr("n2"), [Suspect(0, "n9", "n2")], 0.0)
    a.receive(addr("n2"), [Suspect(0, "n9", "n2")], 0.0)  # same accuser: counts once
    h.tick("n0", s.suspicion_min(10) + 0.01)
    assert h.status("n0", "n9") == "suspect", "one confirmation must not reach the minimum"
    a.receive(addr("n3"), [Suspect(0, "n9", "n3")], s.suspicion_min(10) + 0.02)
    h.tick("n0", s.suspicion_min(10) + 0.03)
    assert h.status("n0", "n9") == "dead"


def test_without_lifeguard_the_suspicion_timeout_is_fixed_at_the_minimum():
    h = Harness(s=settings(lifeguard=False))
    h.add(*[f"n{i}" for i in range(10)])
    a = h.cores["n0"]
    a.receive(addr("n1"), [Suspect(0, "n9", "n1")], 0.0)
    h.tick("n0", h.s.suspicion_min(10) + 0.01)
    assert h.status("n0", "n9") == "dead"


def test_graceful_leave_is_seen_as_left_not_dead():
    h = Harness()
    h.add("a", "b", "c")
    h.take("b", h.cores["b"].leave(1.0))
    h.deliver()
    h.down = {"b"}
    h.run(3.0)
    assert h.status("a", "b") == "left"
    assert h.status("c", "b") == "left"
    assert "dead" not in h.kinds("a", "b")


def test_dead_members_are_reaped_after_gossip_to_the_dead():
    h = Harness()
    h.add("a", "b", "c")
    a = h.cores["a"]
    a.receive(addr("c"), [Dead(0, "b", "c")], 1.0)
    assert h.status("a", "b") == "dead"
    h.tick("a", 1.0 + h.s.gossip_to_the_dead - 0.01)
    assert h.member("a", "b") is not None
    h.tick("a", 1.0 + h.s.gossip_to_the_dead + 0.01)
    assert h.member("a", "b") is None
    assert "reap" in h.kinds("a", "b")


def test_join_push_pull_merges_both_ways():
    h = Harness()
    h.add("a", converged=False)
    h.add("b", "c", converged=False)
    h.cores["b"].restore([h.cores["c"].me.to_state()], 0.0)
    h.take("a", h.cores["a"].join([addr("b")], 0.0))
    h.deliver()
    assert h.status("a", "b") == "alive" and h.status("a", "c") == "alive"
    assert h.status("b", "a") == "alive"
    assert "join-ok" in [e.kind for o, e in h.events if o == "a"]
    pp = h.msgs_sent("a", PushPull)
    assert pp and pp[0].join and not pp[0].reply


def test_join_to_silent_address_fails_after_timeout():
    h = Harness()
    h.add("a", converged=False)
    h.take("a", h.cores["a"].join(["nobody:1"], 0.0, timeout=5.0))
    h.tick("a", 5.01)
    failed = [e for o, e in h.events if e.kind == "join-failed"]
    assert failed and failed[0].addr == "nobody:1"


def test_remote_dead_is_merged_as_suspicion_only():
    h = Harness()
    h.add("a", "b", "c")
    states = [m.to_state() for m in h.cores["b"].member_list()]
    for st in states:
        if st.node == "c":
            st.state = 2  # dead in b's view
    h.cores["a"].receive(addr("b"), [PushPull("b", False, False, states)], 0.0, reliable=True)
    assert h.status("a", "c") == "suspect"


def test_push_pull_reply_carries_refutation():
    h = Harness()
    h.add("a", "b")
    states = [m.to_state() for m in h.cores["a"].member_list()]
    for st in states:
        if st.node == "b":
            st.state = 2
    out = h.cores["b"].receive(addr("a"), [PushPull("a", True, False, states)], 0.0,
                               reliable=True)
    reply = out.sends[0].msgs[0]
    assert isinstance(reply, PushPull) and reply.reply
    mine = next(st for st in reply.states if st.node == "b")
    assert mine.incarnation == 1 and mine.state == 0


def test_reconnect_tries_dead_members_addresses():
    h = Harness()
    h.add("a", "b", "c")
    h.cores["a"].receive(addr("b"), [Dead(0, "c", "b")], 0.0)
    h.down = {"c"}
    h.run(200.0, step=1.0)
    joins = [s for o, s in h.sent if o == "a" and s.addr == addr("c")
             and isinstance(s.msgs[0], PushPull) and s.msgs[0].join]
    assert joins, "no reconnect attempt to the dead member"
    assert h.member("a", "c") is None, "dead member should have been reaped meanwhile"


def test_left_members_are_not_retried_by_default():
    h = Harness()
    h.add("a", "b", "c")
    h.cores["a"].receive(addr("c"), [Dead(0, "c", "c")], 0.0)
    h.down = {"c"}
    h.run(200.0, step=1.0)
    assert not [s for o, s in h.sent if o == "a" and s.addr == addr("c")
                and isinstance(s.msgs[0], PushPull)]


def _first_ping_after_suspicion(lifeguard: bool):
    h = Harness(s=settings(lifeguard=lifeguard))
    h.add("a", "b")
    h.cores["a"].receive(addr("c"), [Suspect(0, "b", "c")], 0.0)
    h.cores["a"]._broadcasts.drop("b")  # gossip already spent: only the buddy rule remains
    pings = []
    t = 0.0
    while not pings and t < 3.0:
        t += 0.05
        h.tick("a", t)
        pings = [s for o, s in h.sent if o == "a" and isinstance(s.msgs[0], Ping)]
    return h, pings, t


def test_buddy_system_ping_carries_the_suspicion():
    h, pings, t = _first_ping_after_suspicion(lifeguard=True)
    assert pings and pings[0].addr == addr("b")
    assert [m for m in pings[0].msgs[1:] if isinstance(m, Suspect) and m.node == "b"]
    h.cores["b"].receive(addr("a"), pings[0].msgs, t)
    assert h.cores["b"].me.incarnation == 1
    _, pings, _ = _first_ping_after_suspicion(lifeguard=False)
    assert pings and not [m for m in pings[0].msgs[1:] if isinstance(m, Suspect)]


def test_missing_nacks_raise_local_health_and_stretch_probing():
    h = Harness()
    h.add("a", "b", "c", "d", "e")
    # a hears nothing at all: every probe fails and no nack comes back
    h.drop = lambda src, dst: dst == "a"
    h.run(6.0)
    a = h.cores["a"]
    assert a.health_score >= 3
    # the probe interval is now scaled by score + 1: count pings in a 4 s window
    before = len(h.msgs_sent("a", Ping))
    h.run(10.0)
    assert len(h.msgs_sent("a", Ping)) - before <= 4 * 2 / (a.health_score + 1) + 2


def test_nacks_from_helpers_keep_local_health_clean():
    h = Harness()
    h.add("a", "b", "c", "d", "e")
    h.down = {"b"}
    h.run(8.0)
    assert h.status("a", "b") in ("suspect", "dead")
    assert h.cores["a"].health_score == 0


def test_lifeguard_off_never_changes_local_health():
    h = Harness(s=settings(lifeguard=False))
    h.add("a", "b", "c")
    h.drop = lambda src, dst: dst == "a"
    h.run(6.0)
    assert h.cores["a"].health_score == 0
    assert not any(m.nack for m in h.msgs_sent("a", IndirectPing))


def test_each_broadcast_is_sent_at_most_the_retransmit_limit():
    h = Harness()
    h.add("a", "b")
    h.take("a", h.cores["a"].update_tags({"role": "web"}, 0.0))
    h.run(20.0)
    carried = [m for m in h.msgs_sent("a", Alive) if m.node == "a"]
    assert len(carried) == h.s.retransmit_limit(2)
    assert h.member("b", "a").tags == {"role": "web"}


def test_newer_broadcast_replaces_older_about_same_node():
    h = Harness()
    h.add("a", "b")
    a = h.cores["a"]
    a.update_tags({"v": "1"}, 0.0)
    a.update_tags({"v": "2"}, 0.0)
    assert a.pending_broadcasts() == 1


def test_tags_over_the_limit_are_refused():
    with pytest.raises(MembershipError, match="512"):
        Membership("a", addr("a"), settings(), random.Random(1), 0.0, tags={"x": "y" * 600})
    h = Harness()
    h.add("a")
    with pytest.raises(MembershipError):
        h.cores["a"].update_tags({"x": "y" * 600}, 0.0)


def test_name_claimed_from_another_address_is_a_conflict():
    h = Harness()
    h.add("a", "b")
    a = h.cores["a"]
    out = a.receive("evil:1", [Alive(5, "b", "evil:1", {})], 0.0)
    assert [e.kind for e in out.events] == ["conflict"]
    assert h.member("a", "b").addr == addr("b")


def test_dead_node_may_come_back_on_a_new_address():
    h = Harness()
    h.add("a", "b")
    a = h.cores["a"]
    a.receive(addr("c"), [Dead(0, "b", "c")], 0.0)
    out = a.receive("new:1", [Alive(1, "b", "new:1", {})], 1.0)
    assert [e.kind for e in out.events] == ["join"]
    assert h.member("a", "b").addr == "new:1"
    assert h.status("a", "b") == "alive"


def test_ping_for_another_name_is_ignored():
    h = Harness()
    h.add("a", "b")
    out = h.cores["b"].receive(addr("a"), [Ping(1, "someone-else", "a", addr("a"))], 0.0)
    assert not out.sends


def test_unknown_ack_and_nack_are_ignored():
    h = Harness()
    h.add("a", "b")
    out = h.cores["a"].receive(addr("b"), [Ack(12345), Nack(999)], 0.0)
    assert not out.sends and not out.events


def test_next_deadline_is_monotonic_work_free():
    h = Harness()
    h.add("a", "b")
    a = h.cores["a"]
    d = a.next_deadline()
    assert 0 <= d <= 30.0
    out = a.tick(d - 1e-6)
    assert not out.sends


def test_ack_over_the_stream_only_reports_udp_unreachable():
    h = Harness()
    h.add("a", "b", "c")
    # b's UDP is blocked both ways, TCP works: the fallback ping saves it and says why
    h.drop = lambda src, dst: "b" in (src, dst)
    t = 0.0
    while t < 3.0:
        t = round(t + 0.05, 6)
        h.tick_all(t)
        batch, h.outbox = h.outbox, []
        for src, send in batch:
            dst = send.addr.split(":")[0]
            if not send.reliable and "b" in (src, dst):
                continue
            h.take(dst, h.cores[dst].receive(addr(src), send.msgs, t, send.reliable))
    kinds = [e.kind for o, e in h.events if o == "a" and e.node == "b"]
    assert "udp-unreachable" in kinds
    assert h.status("a", "b") == "alive"


def test_name_at_follows_the_member_table():
    h = Harness()
    h.add("a", "b")
    core = h.cores["a"]
    assert core.name_at(addr("b")) == "b" and core.name_at("nowhere:1") is None
    core.receive(addr("b"), [Alive(0, "newbie", "newbie:7946", {})], 1.0)
    assert core.name_at("newbie:7946") == "newbie"


def test_alive_peers_follows_every_state_change():
    """alive_peers is cached by member_version: each change of state must bump it, or
    replicators would keep pushing to the dead and never to the returned."""
    h = Harness()
    h.add(*[f"n{i}" for i in range(6)])
    a = h.cores["n0"]

    def expected() -> list[str]:
        return [m.addr for m in a.member_list() if m.status == "alive" and m.name != "n0"]

    assert a.alive_peers() == expected() and len(expected()) == 5
    a.receive(addr("n1"), [Suspect(0, "n5", "n1")], 0.0)
    assert addr("n5") not in a.alive_peers() and a.alive_peers() == expected()
    a.receive(addr("n5"), [Alive(1, "n5", addr("n5"), {})], 0.1)  # refuted
    assert addr("n5") in a.alive_peers() and a.alive_peers() == expected()
    a.receive(addr("n1"), [Dead(1, "n5", "n1")], 0.2)  # as a suspicion (S2), then expiry
    h.down = set(h.cores) - {"n0"}
    h.tick("n0", settings().suspicion_max(6) + 1.0)
    assert addr("n5") not in a.alive_peers() and a.alive_peers() == expected()
    a.receive(addr("n5"), [Alive(2, "n5", addr("n5"), {})], 50.0)  # back
    assert addr("n5") in a.alive_peers() and a.alive_peers() == expected()
    a.alive_peers().clear()  # a copy: the cache is not the caller's to change
    assert a.alive_peers() == expected()
