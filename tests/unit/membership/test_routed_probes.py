"""Routed probes (core rule P5): members behind gateways stay alive; gossip goes direct."""

from __future__ import annotations

from meshd.membership.messages import MAX_HOPS, Alive, IndirectPing, Nack, Ping

from .helpers import Harness, addr, settings

# a chain of reachability: a1 <-> ga <-> gc <-> c1 (as between two clouds' internal nodes)
CHAIN = ["a1", "ga", "gc", "c1"]
LINKS = {frozenset(p) for p in (("a1", "ga"), ("ga", "gc"), ("gc", "c1"))}


def _next_hop_table(me: str):
    pos = CHAIN.index(me)

    def next_hop(dest: str) -> str | None:
        if dest not in CHAIN or dest == me:
            return None
        step = 1 if CHAIN.index(dest) > pos else -1
        return CHAIN[pos + step]
    return next_hop


def _chain(routed: bool) -> Harness:
    h = Harness(s=settings(tcp_fallback=False))
    h.add(*CHAIN)
    h.drop = lambda src, dst: frozenset((src, dst)) not in LINKS
    if routed:
        for name, core in h.cores.items():
            core.next_hop = _next_hop_table(name)
        measure_all(h)
    return h


def measure_all(h: Harness) -> None:
    """What the routing layer does first (P6): ping everyone once; silence = unreached."""
    for name, core in h.cores.items():
        h.take(name, core.measure([n for n in h.cores if n != name], h.now))
    h.deliver()


def test_member_two_relays_away_stays_alive_with_routes():
    h = _chain(routed=True)
    h.run(40.0)
    for a in CHAIN:
        for b in CHAIN:
            if a != b:
                assert h.status(a, b) == "alive", (a, b)
                assert "suspect" not in h.kinds(a, b), (a, b)
    forwarded = [m for m in h.msgs_sent("ga", IndirectPing, "gc") if m.target == "c1"]
    assert [m for m in forwarded if m.hops == 1], "ga never forwarded a1's probe"


def test_without_routes_the_same_member_is_suspected():
    h = _chain(routed=False)
    h.run(40.0)
    assert "suspect" in h.kinds("a1", "c1")


def test_gossip_and_push_pull_go_only_to_members_reached_directly():
    h = _chain(routed=True)
    h.run(2.0)
    h.sent.clear()
    # a change to spread: a1's tags
    h.take("a1", h.cores["a1"].update_tags({"v": "2"}, h.now))
    h.run(40.0)
    assert not [s for o, s in h.sent if o == "a1" and s.addr in (addr("gc"), addr("c1"))
                and not any(isinstance(m, Ping | IndirectPing) for m in s.msgs)], \
        "a1 sent gossip or push-pull to a member it only reaches through ga"
    assert h.cores["c1"].members["a1"].tags == {"v": "2"}
    assert [m for m in h.msgs_sent("a1", Alive) if m.node == "a1"]


def test_routed_request_is_not_forwarded_past_the_hop_limit():
    h = _chain(routed=True)
    h.run(1.5)  # the measure pings of c1 expired: ga knows it does not reach c1 directly
    ga = h.cores["ga"]
    out = ga.receive(addr("a1"), [IndirectPing(5, "c1", addr("c1"), "a1", addr("a1"), True,
                                               MAX_HOPS)], h.now)
    assert not [m for s in out.sends for m in s.msgs if isinstance(m, IndirectPing)]
    out = ga.receive(addr("a1"), [IndirectPing(6, "c1", addr("c1"), "a1", addr("a1"), True,
                                               MAX_HOPS - 1)], h.now)
    fwd = [(s.addr, m) for s in out.sends for m in s.msgs if isinstance(m, IndirectPing)]
    assert [(a, m.hops, m.nack) for a, m in fwd] == [(addr("gc"), MAX_HOPS, True)]


def test_target_that_receives_a_routed_request_acks_it():
    h = _chain(routed=True)
    out = h.cores["c1"].receive(addr("gc"), [IndirectPing(9, "c1", addr("c1"), "gc",
                                                          addr("gc"), False, 1)], 0.0)
    assert [(s.addr, type(m).__name__, m.seq) for s in out.sends for m in s.msgs[:1]] == \
        [(addr("gc"), "Ack", 9)]


def test_dead_member_behind_a_live_path_is_suspected():
    h = _chain(routed=True)
    h.run(3.0)
    h.down = {"c1"}
    h.run(40.0)
    assert "suspect" in h.kinds("a1", "c1")
    assert h.msgs_sent("gc", Nack, "ga") and h.msgs_sent("ga", Nack, "a1"), \
        "the last relay's nack did not travel back along the chain"


def test_broken_path_does_not_get_the_member_behind_it_suspected():
    # a1 - ga - {gc, gc2} - c1: routes go through gc until a node sees gc dead (slower than
    # the daemon, which avoids suspects: a wider window in which paths through gc fail)
    links = {frozenset(p) for p in (("a1", "ga"), ("ga", "gc"), ("ga", "gc2"), ("gc", "c1"),
                                    ("gc2", "c1"))}
    h = Harness(s=settings(tcp_fallback=False))
    h.add("a1", "ga", "gc", "gc2", "c1")
    h.drop = lambda src, dst: frozenset((src, dst)) not in links

    def table(me):
        core = h.cores[me]

        def next_hop(dest):
            if dest == me or frozenset((me, dest)) in links:
                return dest
            gc = core.members.get("gc")
            gate = "gc" if gc is not None and gc.status in ("alive", "suspect") else "gc2"
            if me == "a1":
                return "ga"
            if me == "ga":
                return gate
            if me == "c1":
                return gate
            return "ga" if dest == "a1" else "c1"  # gc, gc2
        return next_hop

    for name, core in h.cores.items():
        core.next_hop = table(name)
    measure_all(h)
    h.run(3.0)
    h.down = {"gc"}
    h.run(40.0)
    assert "suspect" in h.kinds("ga", "gc")  # the broken hop itself is found
    for observer in ("a1", "ga", "gc2"):
        assert "suspect" not in h.kinds(observer, "c1"), f"{observer} blamed c1"
    assert h.status("a1", "c1") == "alive"


def test_relay_whose_route_leads_back_to_the_requester_stays_out():
    h = _chain(routed=True)
    h.run(1.5)
    out = h.cores["ga"].receive(addr("gc"), [IndirectPing(3, "c1", addr("c1"), "gc",
                                                          addr("gc"), True, 0)], h.now)
    assert not [m for s in out.sends for m in s.msgs if isinstance(m, Ping | IndirectPing)]
    out = h.cores["a1"].receive(addr("ga"), [IndirectPing(4, "c1", addr("c1"), "ga",
                                                          addr("ga"), True, 0)], h.now)
    assert not [m for s in out.sends for m in s.msgs if isinstance(m, Ping | IndirectPing)]
    assert not [m for s in h.cores["a1"].tick(h.now + 5.0).sends for m in s.msgs
                if isinstance(m, Nack)], "a relay that could not help said 'silent'"


def test_blind_probe_waits_for_routes_then_counts():
    h = _chain(routed=False)
    for core in h.cores.values():
        core.next_hop = lambda dest: None  # routing on, but no routes formed yet
    grace = h.s.route_grace
    h.run(grace - 1.0)
    assert "suspect" not in h.kinds("a1", "c1"), "suspected before routes could form"
    h.run(grace + 20.0)
    assert "suspect" in h.kinds("a1", "c1"), "a member nobody routes to must not stay alive"


def test_member_whose_direct_path_breaks_becomes_unreached_and_is_probed_through_the_route():
    h = Harness(s=settings(tcp_fallback=False))
    h.add("a", "b", "c")
    tables = {"a": {"b": "c", "c": "c"}, "b": {"a": "c", "c": "c"}, "c": {"a": "a", "b": "b"}}
    for name, core in h.cores.items():
        core.next_hop = tables[name].get
    measure_all(h)
    h.run(3.0)
    assert h.cores["a"].unreached == frozenset()  # everyone answered directly at first
    h.drop = lambda src, dst: {src, dst} == {"a", "b"}  # a firewall rule appears
    h.run(30.0)
    assert "b" in h.cores["a"].unreached and "a" in h.cores["b"].unreached
    assert "suspect" not in h.kinds("a", "b")
    h.sent.clear()
    h.run(40.0)
    routed = [m for m in h.msgs_sent("a", IndirectPing, "c") if m.target == "b"]
    assert routed, "a still probes b directly although only c gets through"
    assert not [m for m in h.msgs_sent("a", Ping, "b") if not m.quiet]

