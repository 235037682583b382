"""The probe round's edges (P1-P3, P5): when helpers are asked and which, the TCP fallback,
the blind-probe grace, and the random choice of helpers in a cluster large enough that it is
sampled rather than shuffled. One core, driven by hand with explicit times."""

from __future__ import annotations

from meshd.membership.messages import Ack, Dead, Digest, IndirectPing, Ping, PushPull

from .helpers import addr
from .solo import msgs, run_until, sends_of, solo, step, until_ping


def test_helpers_are_asked_only_once_the_probe_timeout_passed():
    a = solo("b", "c", "d")
    t, seq = until_ping(a, "b")
    out = a.tick(t + a.s.probe_timeout - 0.01)
    assert not msgs(out, IndirectPing)
    out = a.tick(t + a.s.probe_timeout)
    assert {m.seq for m in msgs(out, IndirectPing)} == {seq}


def test_a_small_cluster_asks_every_other_member_for_help_but_never_the_target():
    a = solo("b", "c", "d")
    t, seq = until_ping(a, "b")
    out = a.tick(t + a.s.probe_timeout)
    got = sorted((s.addr, m.seq, m.target, m.target_addr, m.source, m.source_addr, m.nack)
                 for s, m in sends_of(out, IndirectPing))
    assert got == [(addr(h), seq, "b", addr("b"), "a", addr("a"), True) for h in ("c", "d")]


def test_no_one_is_asked_about_a_member_declared_dead_meanwhile():
    a = solo("b", "c", "d")
    t, _ = until_ping(a, "b")
    a.receive(addr("c"), [Dead(0, "b", "c")], t + 0.1)
    out = a.tick(t + a.s.probe_timeout)
    assert not [m for m in msgs(out, IndirectPing) if m.target == "b"]
    assert not [s for s in out.sends if s.reliable]


def test_the_indirect_round_also_asks_the_routing_tables_hop_once_and_skips_tcp():
    for seed in range(6):
        a = solo("b", "c", "d", "e", seed=seed, indirect_checks=1)
        a.next_hop = {"b": "e"}.get
        t, seq = until_ping(a, "b")
        out = a.tick(t + a.s.probe_timeout)
        dests = [s.addr for s, m in sends_of(out, IndirectPing) if m.seq == seq]
        assert addr("e") in dests, seed
        assert len(dests) == len(set(dests)) and len(dests) <= 2, (seed, dests)
        assert not [s for s in out.sends if s.reliable], "a route is known: no TCP ping"


def test_without_tcp_fallback_no_stream_ping_is_sent():
    a = solo("b", "c", tcp_fallback=False)
    t, _ = until_ping(a, "b")
    out = a.tick(t + a.s.probe_timeout)
    assert msgs(out, IndirectPing)
    assert not [s for s in out.sends if s.reliable]


def test_the_blind_probe_grace_runs_from_the_members_last_change_not_from_time_zero():
    t0 = 5000.0
    a = solo("b", "c", "d", t0=t0, tcp_fallback=False)
    a.next_hop = lambda dest: None  # routing on, no route formed; nobody answers or nacks
    run_until(a, t0 + a.s.route_grace - 1.0)
    assert [m.status for m in a.member_list()] == ["alive"] * 4
    run_until(a, t0 + a.s.route_grace + 30.0)
    assert "suspect" in [m.status for m in a.member_list()] or \
        "dead" in [m.status for m in a.member_list()]


def test_in_a_large_cluster_helpers_and_gossip_targets_are_k_distinct_members():
    others = [f"n{i:02}" for i in range(20)]
    a = solo(*others, tcp_fallback=False)
    k, fanout = a.s.indirect_checks, a.s.gossip_nodes
    rounds = gossips = 0
    t = 0.0
    while rounds < 30:
        a.update_tags({"round": str(gossips)}, t)  # news for every round
        t, out = step(a)
        helpers: dict[int, list[str]] = {}
        for s, m in sends_of(out, IndirectPing):
            helpers.setdefault(m.seq, []).append(s.addr)
        for seq, dests in helpers.items():
            target = next(m.target for s, m in sends_of(out, IndirectPing) if m.seq == seq)
            assert len(dests) == k and len(set(dests)) == k, dests
            assert addr(target) not in dests and addr("a") not in dests
            a.receive(dests[0], [Ack(seq)], t + 0.01)  # a helper got through
            rounds += 1
        news = [s for s in out.sends
                if not isinstance(s.msgs[0], Ping | IndirectPing | Ack | PushPull | Digest)]
        if news:
            dests = [s.addr for s in news]
            assert len(dests) == fanout and len(set(dests)) == fanout, dests
            assert addr("a") not in dests and not [s for s in news if s.reliable], \
                "gossip goes over UDP"
            gossips += 1
    assert gossips > 30
    assert [m.status for m in a.member_list()] == ["alive"] * 21
