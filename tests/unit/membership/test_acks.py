"""What an ack does (P5, P6, L1): the RTT it records, the reachability it proves, the hop it
shows alive, the health it restores, and what it stops (a relay's nack). One core, driven
by hand with explicit times."""

from __future__ import annotations

import pytest

from meshd.membership.messages import Ack, Dead, IndirectPing, Nack, Ping, Suspect

from .helpers import addr
from .solo import msgs, sends_of, solo, step, until_ping, until_probe


def test_a_direct_ack_records_the_round_trip_then_smooths_it():
    a = solo("b", t0=1000.0)
    t, seq = until_ping(a, "b")
    a.receive(addr("b"), [Ack(seq)], t + 0.03)
    b = a.members["b"]
    assert b.rtt == pytest.approx(0.03)
    assert b.rtt_at == t + 0.03
    t, seq = until_ping(a, "b")
    a.receive(addr("b"), [Ack(seq)], t + 0.08)
    assert a.members["b"].rtt == pytest.approx(0.8 * 0.03 + 0.2 * 0.08)  # a new snapshot


def test_only_an_ack_over_the_stream_reports_udp_unreachable():
    a = solo("b", inc=3)
    t, seq = until_ping(a, "b")
    out = a.receive(addr("b"), [Ack(seq)], t + 0.01)
    assert not [e for e in out.events if e.kind == "udp-unreachable"]
    t, seq = until_ping(a, "b")
    out = a.receive(addr("b"), [Ack(seq)], t + 0.7, reliable=True)
    assert [(e.kind, e.node, e.addr, e.incarnation, e.tags) for e in out.events] == \
        [("udp-unreachable", "b", addr("b"), 3, {})]
    assert a.members["b"].rtt == pytest.approx(0.01), "a stream ack is no UDP round trip"


def _direct_ack(core, target: str) -> None:
    t, seq = until_ping(core, target)
    core.receive(addr(target), [Ack(seq)], t + 0.01)


def _helper_ack(core, target: str, helper: str = "c") -> None:
    """The direct ping gets no answer; the indirect round's helper forwards an ack."""
    t, seq = until_ping(core, target)
    out = core.tick(t + core.s.probe_timeout)
    assert [m.seq for m in msgs(out, IndirectPing, helper)] == [seq]
    core.receive(addr(helper), [Ack(seq)], t + core.s.probe_timeout + 0.1)


def test_two_probes_in_a_row_answered_only_through_a_helper_make_a_member_unreached():
    a = solo("b", "c")
    a.next_hop = lambda dest: None
    _direct_ack(a, "b")
    _helper_ack(a, "b")
    assert "b" not in a.unreached, "one lost ping is no broken path"
    _direct_ack(a, "b")  # answering directly again starts the count over
    _helper_ack(a, "b")
    assert "b" not in a.unreached
    _helper_ack(a, "b")
    assert "b" in a.unreached


def test_without_routing_helper_acks_never_make_a_member_unreached():
    a = solo("b", "c")
    for _ in range(3):
        _helper_ack(a, "b")
    assert a.unreached == frozenset()


def _routed_to_b_via_c():
    """b answers only through helpers (so it is unreached) and the table routes it via c."""
    a = solo("b", "c", "d", t0=100.0, tcp_fallback=False)
    a.next_hop = {"b": "c"}.get
    _direct_ack(a, "b")
    _helper_ack(a, "b")
    _helper_ack(a, "b")
    assert "b" in a.unreached
    return a


def test_an_ack_relayed_by_the_hop_of_a_routed_probe_shows_the_hop_alive():
    a = _routed_to_b_via_c()
    t, send, m = until_probe(a, "b")
    assert send.addr == addr("c") and isinstance(m, IndirectPing)
    assert (m.target, m.target_addr, m.source, m.source_addr, m.nack) == \
        ("b", addr("b"), "a", addr("a"), True)
    a.receive(addr("c"), [Ack(m.seq)], t + 0.02)
    assert a.members["c"].heard_at == t + 0.02
    assert a.members["b"].rtt_at < t, "an ack through a hop is no direct round trip"
    heard = a.members["c"].heard_at
    # the next routed probe is answered by another helper, not by the hop
    t, send, m = until_probe(a, "b")
    assert send.addr == addr("c")
    out = a.tick(t + a.s.probe_timeout)
    assert msgs(out, IndirectPing, "d")
    a.receive(addr("d"), [Ack(m.seq)], t + a.s.probe_timeout + 0.1)
    assert a.members["c"].heard_at == heard, "d's ack says nothing about the hop c"


def test_a_probe_of_a_suspect_carries_our_suspicion_of_it_direct_or_routed():
    a = solo("b", "c")
    a.receive(addr("c"), [Suspect(0, "b", "c")], 0.0)
    _, send, m = until_probe(a, "b")
    assert isinstance(m, Ping)
    assert ("b", "a") in [(x.node, x.source) for x in send.msgs if isinstance(x, Suspect)]
    a = _routed_to_b_via_c()
    a.receive(addr("d"), [Suspect(0, "b", "d")], a.next_deadline())
    _, send, m = until_probe(a, "b")
    assert isinstance(m, IndirectPing) and send.addr == addr("c")
    assert ("b", "a") in [(x.node, x.source) for x in send.msgs if isinstance(x, Suspect)]


def _fail_probe(a, nackers: tuple[str, ...]) -> float:
    """Probe b, which stays silent; `nackers` among the helpers nack. Returns the time the
    probe failed (the next round starts then too)."""
    score = a.health_score
    t, seq = until_ping(a, "b")
    interval = a.s.probe_interval * (score + 1)
    while True:
        t2, out = step(a)
        helpers = [s.addr for s, m in sends_of(out, IndirectPing) if m.seq == seq]
        if helpers:
            break
    assert len(helpers) == 3
    for name in nackers:
        a.receive(addr(name), [Nack(seq)], t2 + 0.01)
    return t + interval


def test_local_health_rises_by_the_missing_nacks_and_falls_by_one_per_ack():
    a = solo("b", "c", "d", "e", tcp_fallback=False)
    end = _fail_probe(a, ("c", "d"))
    before = a.health_score
    a.tick(end)
    assert a.health_score == before + 1, "one nack of three missing"
    end = _fail_probe(a, ())
    before = a.health_score
    out = a.tick(end)
    assert a.health_score == before + 3, "three helpers asked, no nack: three missing"
    [(_, ping)] = [(s, m) for s, m in sends_of(out, Ping) if not s.reliable]
    before = a.health_score
    a.receive(addr(ping.target), [Ack(ping.seq)], end + 0.01)
    assert a.health_score == before - 1


def test_a_failed_probe_with_every_nack_back_leaves_health_alone():
    a = solo("b", "c", "d", "e", tcp_fallback=False)
    end = _fail_probe(a, ("c", "d", "e"))
    before = a.health_score
    a.tick(end)
    assert a.health_score == before


def test_a_failed_probe_with_no_helper_raises_health_by_one():
    a = solo("b", tcp_fallback=False)
    t, _ = until_ping(a, "b")
    a.tick(t + a.s.probe_interval)
    assert a.health_score == 1


def test_a_relay_that_forwarded_the_ack_does_not_nack_afterwards():
    a = solo("b", "c")
    out = a.receive(addr("c"), [IndirectPing(7, "b", addr("b"), "c", addr("c"), True)], 0.0)
    [ping] = msgs(out, Ping, "b")
    out = a.receive(addr("b"), [Ack(ping.seq)], 0.1)
    assert [m.seq for m in msgs(out, Ack, "c")] == [7]
    out = a.tick(a.s.nack_fraction * a.s.probe_timeout + 0.01)
    assert not msgs(out, Nack)


# --- measure (P6) ------------------------------------------------------------------------


def test_a_measure_ping_is_quiet_and_skips_self_unknown_and_dead_names():
    a = solo("b", "c", "d", t0=1000.0)
    a.receive(addr("c"), [Dead(0, "d", "c")], 1000.0)
    assert a.pending_broadcasts(), "there is news that could be piggybacked"
    out = a.measure(["zz", "a", "d", "b", "c"], 1000.0)
    pings = sends_of(out, Ping)
    assert sorted(s.addr for s, _ in pings) == [addr("b"), addr("c")]
    for s, m in pings:
        assert m.quiet and (m.source, m.source_addr) == ("a", addr("a"))
        assert len(s.msgs) == 1, "a measurement carries no broadcasts"


def test_silence_to_a_measure_counts_after_a_probe_interval_and_an_ack_clears_it():
    a = solo("b", "c", t0=1000.0)
    a.measure(["b"], 1000.0)
    a.tick(1000.0 + a.s.probe_interval / 2)
    assert "b" not in a.unreached
    a.tick(1000.0 + a.s.probe_interval)
    assert "b" in a.unreached
    [(_, ping)] = sends_of(a.measure(["b"], 1002.0), Ping)
    a.receive(addr("b"), [Ack(ping.seq)], 1002.04)
    b = a.members["b"]
    assert b.rtt == pytest.approx(0.04) and b.rtt_at == 1002.04
    assert "b" not in a.unreached
    # a stream ack or an ack from another address measures nothing
    [(_, ping)] = sends_of(a.measure(["b"], 1003.0), Ping)
    a.receive(addr("b"), [Ack(ping.seq)], 1003.01, reliable=True)
    [(_, ping)] = sends_of(a.measure(["b"], 1004.0), Ping)
    a.receive(addr("c"), [Ack(ping.seq)], 1004.01)
    assert b.rtt_at == 1002.04 and b.rtt == pytest.approx(0.04)


def test_one_lost_measure_of_a_member_that_just_answered_proves_nothing():
    a = solo("b", t0=1000.0)
    t, seq = until_ping(a, "b")
    a.receive(addr("b"), [Ack(seq)], t + 0.01)
    a.measure(["b"], t + 0.1)
    a.tick(t + 0.1 + a.s.probe_interval)  # 1.09 s after the ack: within silent_after()
    assert "b" not in a.unreached
    later = t + 0.01 + a.s.silent_after() + 0.5
    a.measure(["b"], later)
    a.tick(later + a.s.probe_interval)
    assert "b" in a.unreached
