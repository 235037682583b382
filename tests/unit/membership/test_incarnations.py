"""Rule S1 at its boundary (only a *newer* incarnation clears a suspicion), and the
suspicion timer at its deadline.

A suspected member must refute with incarnation + 1; an Alive at the incarnation we already
hold is old news (a delayed copy of the alive that preceded the suspicion, or a push-pull
from a node that has not heard of it) and must leave the suspicion and its timer alone.
"""

from __future__ import annotations

from meshd.membership.messages import ALIVE, Alive, MemberState, PushPull, Suspect

from .helpers import Harness, addr, settings

NODES = [f"n{i}" for i in range(10)]


def _suspected() -> Harness:
    """n0 suspects n9 (incarnation 0) at t=0; nobody answers anyone."""
    h = Harness()
    h.add(*NODES)
    h.take("n0", h.cores["n0"].receive(addr("n1"), [Suspect(0, "n9", "n1")], 0.0))
    h.down = set(NODES) - {"n0"}
    assert h.status("n0", "n9") == "suspect"
    return h


def test_alive_at_the_same_incarnation_does_not_clear_a_suspicion():
    h = _suspected()
    out = h.take("n0", h.cores["n0"].receive(addr("n5"), [Alive(0, "n9", addr("n9"), {})], 0.1))
    assert h.status("n0", "n9") == "suspect"
    assert h.member("n0", "n9").incarnation == 0
    assert not [e for e in out.events if e.node == "n9"], "an old alive is not news"
    assert "alive" not in h.kinds("n0", "n9")


def test_the_suspicion_timer_survives_a_same_incarnation_alive():
    h = _suspected()
    h.cores["n0"].receive(addr("n5"), [Alive(0, "n9", addr("n9"), {})], 0.1)
    h.tick("n0", settings().suspicion_max(len(NODES)) + 0.01)
    assert h.status("n0", "n9") == "dead"


def test_alive_at_the_next_incarnation_clears_the_suspicion():
    h = _suspected()
    out = h.take("n0", h.cores["n0"].receive(addr("n9"), [Alive(1, "n9", addr("n9"), {})], 0.1))
    assert h.status("n0", "n9") == "alive"
    assert h.member("n0", "n9").incarnation == 1
    assert [e.kind for e in out.events if e.node == "n9"] == ["alive"]
    h.tick("n0", settings().suspicion_max(len(NODES)) + 0.01)
    assert h.status("n0", "n9") == "alive", "the cleared suspicion must not fire later"


def test_push_pull_alive_at_the_same_incarnation_keeps_the_suspicion():
    h = _suspected()
    states = [MemberState(n, addr(n), 0, ALIVE, {}) for n in NODES]
    h.cores["n0"].receive(addr("n5"), [PushPull("n5", False, False, states)], 0.1, True)
    assert h.status("n0", "n9") == "suspect"
    states[-1] = MemberState("n9", addr("n9"), 1, ALIVE, {})
    h.cores["n0"].receive(addr("n5"), [PushPull("n5", False, False, states)], 0.2, True)
    assert h.status("n0", "n9") == "alive"


def test_a_suspicion_turns_dead_exactly_at_its_deadline():
    h = _suspected()
    deadline = settings().suspicion_max(len(NODES))
    out = h.tick("n0", deadline)
    assert h.status("n0", "n9") == "dead"
    assert [(e.kind, e.detail) for e in out.events if e.node == "n9"] == [("dead", "by n0")]
