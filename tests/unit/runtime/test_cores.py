"""The runtime's sans-IO cores: specs and sources checked, replicas placed (sticky, spread,
moved after the grace period, never back), restarts with backoff and a start limit."""

from __future__ import annotations

import random

import pytest

from meshd.errors import MeshError
from meshd.runtime.placement import (
    ALIVE,
    DEAD,
    LEFT,
    SUSPECT,
    Node,
    Slot,
    apply,
    coordinator,
    mine,
    plan,
)
from meshd.runtime.restart import BACKOFF_MAX, START_LIMIT, Restarts
from meshd.runtime.spec import Source, parse_source, parse_spec


@pytest.mark.parametrize(("text", "source"), [
    ("/srv/greeter", Source("folder", "/srv/greeter")),
    ("module:pkg.svc", Source("module", "pkg.svc")),
    ("/srv/repo@v1.2", Source("git", "/srv/repo", "v1.2")),
    ("/srv/repo.git", Source("git", "/srv/repo.git")),
    ("https://example.com/org/repo.git@main", Source("git", "https://example.com/org/repo.git",
                                                     "main")),
    ("https://user@example.com/org/repo", Source("git", "https://user@example.com/org/repo")),
    ("git@example.com:org/repo.git", Source("git", "git@example.com:org/repo.git")),
    ("git@example.com:org/repo.git@v2", Source("git", "git@example.com:org/repo.git", "v2")),
    ("/srv/a@b/app", Source("folder", "/srv/a@b/app")),
])
def test_sources(text, source):
    assert parse_source(text) == source
    assert str(parse_source(text)) == text


@pytest.mark.parametrize("text", ["", "  ", "relative/dir", "module:1bad", "module:",
                                  "/srv/repo@", "/srv/repo@-x", 5, None])
def test_bad_sources_are_400(text):
    with pytest.raises(MeshError) as err:
        parse_source(text)
    assert err.value.status == 400


def test_specs_checked_and_round_trip_through_a_record():
    spec = parse_spec({"name": "greeter", "source": "/srv/greeter", "replicas": 2,
                       "env": {"MODE": "x"}, "placement": "zone=a", "restart": "on-failure",
                       "command": ["python", "app.py"], "namespace": "team-a"})
    assert (spec.replicas, spec.placement, spec.restart, spec.command) == (
        2, "zone=a", "on-failure", ("python", "app.py"))
    assert parse_spec(spec.to_record()) == spec
    for bad in ({"name": "Bad"}, {"replicas": 0}, {"replicas": True}, {"restart": "sometimes"},
                {"env": {"MESHD_TOKEN": "x"}}, {"env": {"A B": "x"}}, {"placement": "zone="},
                {"placement": "a b"}, {"command": [""]}, {"memory_mb": -1},
                {"namespace": "Bad_NS"}):
        with pytest.raises(MeshError) as err:
            parse_spec({"name": "ok", "source": "/srv/x", **bad})
        assert err.value.status == 400, bad


def nodes(*specs: tuple[str, str] | tuple[str, str, float], **tags) -> list[Node]:
    out = []
    for item in specs:
        name, status = item[0], item[1]
        down = item[2] if len(item) > 2 else None
        out.append(Node(name, status, tuple(sorted(tags.get(name, {}).items())), down))
    return out


def spec(name="svc", replicas=2, placement="", **kw):
    return parse_spec({"name": name, "source": "/srv/x", "replicas": replicas,
                       "placement": placement, **kw})


def test_replicas_spread_then_stay_put():
    ns = nodes(("a", ALIVE), ("b", ALIVE), ("c", ALIVE))
    s = spec(replicas=2, placement="role=web")
    tagged = nodes(("a", ALIVE), ("b", ALIVE), ("c", ALIVE),
                   a={"role": "web"}, b={"role": "web"}, c={"role": "web"})
    placed = apply({}, plan([s], {}, tagged, now=0, grace=30))
    assert sorted(sl.node for sl in placed["svc"].values()) == ["a", "b"]  # spread
    # a second spec goes to the least loaded node first
    t = spec("other", replicas=1, placement="role=web")
    placed = apply(placed, plan([s, t], placed, tagged, now=1, grace=30))
    assert placed["other"]["0"].node == "c"
    assert plan([s, t], placed, tagged, now=2, grace=30) == []  # nothing to do
    assert mine(placed, "a") == [("svc", "0")]
    # `*`: one per node, whatever replicas says
    every = spec("every", replicas=1, placement="*")
    placed2 = apply({}, plan([every], {}, ns, now=0, grace=30))
    assert sorted(placed2["every"]) == ["a", "b", "c"]
    assert coordinator(ns) == "a"


def test_a_dead_nodes_replica_moves_after_the_grace_period_and_never_back():
    s = spec(replicas=2, placement="")
    up = nodes(("a", ALIVE), ("b", ALIVE), ("c", ALIVE))
    placed = apply({}, plan([s], {}, up, now=0, grace=30))
    lost = next(slot for slot, sl in placed["svc"].items() if sl.node == "a")
    # suspect, or dead within the grace period: stays
    for status, down in ((SUSPECT, None), (DEAD, 100.0)):
        view = [Node("a", status, (), down), *up[1:]]
        assert plan([s], placed, view, now=110, grace=30) == []
    # dead for the grace period: placed on a live node that does not run it yet
    view = [Node("a", DEAD, (), 100.0), *up[1:]]
    changes = plan([s], placed, view, now=131, grace=30)
    assert [(c.slot, c.slot_value.node) for c in changes] == [(lost, "c")]
    placed = apply(placed, changes)
    # a comes back: nothing moves back
    assert plan([s], placed, up, now=200, grace=30) == []
    # a node that left: at once, no grace
    view = [*up[:2], Node("c", LEFT)]
    assert [c.slot_value.node for c in plan([s], placed, view, now=201, grace=30)] == ["a"]


def test_scale_down_unplaceable_and_removed_specs():
    up = nodes(("a", ALIVE), ("b", ALIVE))
    s3 = spec(replicas=3, placement="")
    placed = apply({}, plan([s3], {}, up, now=0, grace=30))
    assert len(placed["svc"]) == 3
    s1 = spec(replicas=1, placement="")
    placed = apply(placed, plan([s1], placed, up, now=1, grace=30))
    assert list(placed["svc"]) == ["0"]
    nowhere = spec("lonely", replicas=1, placement="zone=mars")
    changes = plan([s1, nowhere], placed, up, now=2, grace=30)
    assert [(c.spec, c.slot_value.node, "zone=mars" in c.slot_value.reason)
            for c in changes] == [("lonely", "", True)]
    placed = apply(placed, changes)
    assert plan([s1, nowhere], placed, up, now=3, grace=30) == []  # still pending: no churn
    # a spec removed: its slots go
    assert {(c.spec, c.slot_value) for c in plan([nowhere], placed, up, now=4, grace=30)} \
        == {("svc", None)}
    # the selector changed: the replica moves to a node that matches
    tagged = nodes(("a", ALIVE), ("b", ALIVE), b={"zone": "mars"})
    assert [c.slot_value.node for c in plan([nowhere], placed, tagged, now=5, grace=30)
            if c.spec == "lonely"] == ["b"]
    moved = {"svc": {"0": Slot("a", 0)}}
    only_b = spec(replicas=1, placement="b")
    assert [c.slot_value.node for c in plan([only_b], moved, up, now=6, grace=30)] == ["b"]


def test_restarts_back_off_with_jitter_and_stop_at_the_start_limit():
    r = Restarts("always", random.Random(7))
    now, delays = 0.0, []
    r.started(now)
    for _ in range(START_LIMIT - 1):
        d = r.exited(1, ran=0.1, now=now)
        assert d.action == "restart" and d.state == "restarting" and "exit code 1" in d.reason
        delays.append(d.delay)
        now += d.delay
        r.started(now)
    assert all(0.05 <= d <= 0.1 * 2 ** i for i, d in enumerate(delays))  # doubling, jittered
    assert delays[-1] > delays[0]
    d = r.exited(None, ran=0.1, now=now)
    assert d.action == "fail" and d.state == "failed" and "signal" in d.reason
    assert r.count == START_LIMIT - 1
    # the cap, and a stable run resets the count
    r2 = Restarts("always", random.Random(1))
    r2.in_a_row = 20
    assert r2.exited(1, ran=1, now=0).delay <= BACKOFF_MAX
    assert r2.exited(1, ran=120, now=1000).delay <= 0.1
    # policies
    assert Restarts("on-failure").exited(0, 1, 0).action == "stop"
    assert Restarts("on-failure").exited(2, 1, 0).action == "restart"
    never = Restarts("never").exited(3, 1, 0)
    assert (never.action, never.state) == ("stop", "crashed")
