"""Edges of rules D1, S2 and L2 that the scenarios in test_core.py pass through unchecked:
broadcasts are queued one per node, a leaving node does not refute, small clusters expect
no confirmations, and the first accuser never confirms its own suspicion."""

from __future__ import annotations

from meshd.membership.messages import Alive, Dead, Suspect

from .helpers import Harness, addr, settings


def _cluster(n: int) -> Harness:
    h = Harness()
    h.add(*[f"n{i}" for i in range(n)])
    return h


def test_changes_about_different_members_are_queued_side_by_side():
    h = _cluster(4)
    a = h.cores["n0"]
    base = a.pending_broadcasts()  # our own alive, from the start
    a.receive(addr("x"), [Alive(1, "x", addr("x"), {})], 0.0)
    a.receive(addr("y"), [Alive(1, "y", addr("y"), {})], 0.0)
    assert a.pending_broadcasts() == base + 2
    a.receive(addr("n2"), [Suspect(0, "n1", "n2")], 0.0)
    assert a.pending_broadcasts() == base + 3
    a.receive(addr("n2"), [Dead(0, "n3", "n2")], 0.0)
    assert a.pending_broadcasts() == base + 4
    a.receive(addr("n2"), [Dead(0, "n1", "n2")], 0.0)
    assert a.pending_broadcasts() == base + 4, "news about n1 replaces the older news about it"


def test_a_leaving_node_does_not_refute_an_alive_about_itself():
    h = _cluster(3)
    a = h.cores["n0"]
    a.leave(0.0)
    inc = a.me.incarnation
    a.receive(addr("n1"), [Alive(inc, "n0", addr("n0"), {"stale": "tags"})], 0.1)
    a.receive(addr("n1"), [Suspect(inc, "n0", "n1")], 0.1)
    assert a.me.incarnation == inc and a.me.status == "left"


def _expiry(n: int) -> tuple[Harness, float, float]:
    """A cluster of n; n0 suspects n1 at t=0 on n2's word and hears nothing more."""
    h = _cluster(n)
    h.cores["n0"].receive(addr("n2"), [Suspect(0, "n1", "n2")], 0.0)
    h.down = set(h.cores) - {"n0"}
    return h, settings().suspicion_min(n), settings().suspicion_max(n)


def test_a_cluster_too_small_for_confirmations_uses_the_minimum_timeout():
    k = settings().suspicion_mult - 2  # confirmations expected (L2)
    h, low, high = _expiry(k + 1)  # n - 2 < k: none can come
    assert low < high
    h.tick("n0", low + 0.01)
    assert h.status("n0", "n1") == "dead"


def test_a_cluster_just_large_enough_waits_the_maximum_for_confirmations():
    k = settings().suspicion_mult - 2
    h, low, high = _expiry(k + 2)
    h.tick("n0", low + 0.01)
    assert h.status("n0", "n1") == "suspect"
    h.tick("n0", high - 0.01)
    assert h.status("n0", "n1") == "suspect"
    h.tick("n0", high + 0.01)
    assert h.status("n0", "n1") == "dead"


def test_the_first_accuser_repeating_itself_is_no_confirmation():
    h = _cluster(10)
    a = h.cores["n0"]
    out = a.receive(addr("n2"), [Suspect(0, "n9", "n2")], 0.0)
    assert [(e.kind, e.detail) for e in out.events] == [("suspect", "by n2")]
    a.receive(addr("n2"), [Suspect(0, "n9", "n2")], 0.0)
    a.receive(addr("n3"), [Suspect(0, "n9", "n3")], 0.0)
    h.down = set(h.cores) - {"n0"}
    h.tick("n0", settings().suspicion_min(10) + 0.01)
    assert h.status("n0", "n9") == "suspect", "one real confirmation of the k expected"
