"""Deadlines (A3, L2): a core driven only by next_deadline(), as the shell drives it, still
declares an expired suspicion dead on time; a join fails exactly at its timeout, once, and
not after its reply came."""

from __future__ import annotations

import pytest

from meshd.membership.core import MemberEvent
from meshd.membership.messages import ALIVE, Ack, MemberState, Ping, PushPull, Suspect

from .helpers import addr
from .solo import run_until, sends_of, solo


def test_driven_by_its_own_deadlines_a_core_declares_an_expired_suspicion_dead_on_time():
    a = solo("b", "c")
    a.receive(addr("c"), [Suspect(0, "b", "c")], 0.0)
    deadline = a.s.suspicion_min(3)  # too small a cluster for confirmations: the minimum
    dead_at = []

    def see(t, out):
        for s, m in sends_of(out, Ping):
            if not s.reliable:  # everyone answers probes (an ack refutes nothing)
                a.receive(addr(m.target), [Ack(m.seq)], t)
        dead_at.extend(t for e in out.events if (e.kind, e.node) == ("dead", "b"))
    run_until(a, 3 * deadline, see)
    assert dead_at == [pytest.approx(deadline)]


def _failed(out) -> list[tuple]:
    return [(e.kind, e.node, e.addr, e.incarnation, e.tags) for e in out.events
            if e.kind == "join-failed"]


def test_a_join_without_reply_fails_exactly_at_its_timeout():
    a = solo(t0=5.0)
    out = a.join([addr("s")], 5.0, timeout=10.0)
    assert [s.addr for s, _ in sends_of(out, PushPull)] == [addr("s")]
    assert not _failed(a.tick(14.99))
    assert _failed(a.tick(15.0)) == [("join-failed", "", addr("s"), 0, {})]
    assert not _failed(a.tick(30.0))


def test_a_join_that_got_its_reply_does_not_fail_later():
    a = solo(t0=5.0)
    a.join([addr("s")], 5.0, timeout=10.0)
    out = a.receive(addr("s"), [PushPull("s", True, True, [
        MemberState("s", addr("s"), 0, ALIVE, {})])], 5.1, reliable=True)
    assert ("join-ok", "s") in [(e.kind, e.node) for e in out.events]
    assert not _failed(a.tick(20.0))


def test_a_join_whose_stream_failed_fails_at_once_and_only_once():
    a = solo(t0=5.0)
    a.join([addr("s")], 5.0, timeout=10.0)
    out = a.stream_failed(addr("s"), 6.0, "refused")
    assert out.events == [MemberEvent("join-failed", "", addr("s"), 0, {}, "refused")]
    assert not _failed(a.tick(20.0))
