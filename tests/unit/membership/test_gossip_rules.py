"""Gossip rounds (D2, P5) and push-pull (A1) as one core sees them: who gets each round's
packet, how the round keeps its phase, when it sleeps and wakes, the share of the recently
dead, the transit hops taken in turn. One core, driven by hand with explicit times."""

from __future__ import annotations

import pytest

from meshd.membership.messages import Ack, Alive, Dead, Digest, Ping, PushPull

from .helpers import addr
from .solo import run_until, sends_of, solo, step

# only gossip rounds wake the core: probes, push-pull and reconnects are out of the way
QUIET = {"probe_interval": 1e4, "push_pull_interval": 1e4, "reconnect_interval": 1e4}


def _ack_pings(core, answer: set[str] | None = None):
    """An on_out callback: every direct probe ping is acked by its target (if in `answer`)."""
    def on_out(t, out):
        for s, m in sends_of(out, Ping):
            if not s.reliable and (answer is None or m.target in answer):
                core.receive(addr(m.target), [Ack(m.seq)], t)
    return on_out


def _gossip_sends(out):
    return [s for s in out.sends if not s.reliable and isinstance(s.msgs[0], Alive | Dead)]


def test_a_two_node_cluster_gossips_and_push_pulls_with_its_one_peer():
    a = solo("b")
    gossip: list[str] = []
    pushes: list[str] = []
    ack = _ack_pings(a)

    def see(t, out):
        ack(t, out)
        gossip.extend(s.addr for s in _gossip_sends(out))
        pushes.extend(s.addr for s, _ in sends_of(out, PushPull) if s.reliable)
        pushes.extend(s.addr for s, _ in sends_of(out, Digest) if s.reliable)
    a.update_tags({"v": "1"}, 0.0)
    run_until(a, 2 * a.s.push_pull_interval + 1.0, see)
    assert gossip and set(gossip) == {addr("b")}
    assert len(pushes) >= 2 and set(pushes) == {addr("b")}


@pytest.mark.parametrize("seed", range(8))
def test_news_about_one_target_does_not_stop_the_round_for_the_others(seed):
    # the alive about b is never sent to b itself (it knows); c must still get it
    a = solo("b", "c", seed=seed, gossip_nodes=2, **QUIET)
    t = 0.0
    while a.pending_broadcasts():
        t, _ = step(a)
    a.receive(addr("b"), [Alive(1, "b", addr("b"), {"v": "2"})], t)
    _, out = step(a)
    got = {s.addr: [m.node for m in s.msgs] for s in _gossip_sends(out)}
    assert got == {addr("c"): ["b"]}


def test_recently_dead_members_get_gossip_with_the_chance_of_one_live_member():
    dead = [f"d{i}" for i in range(10)]
    a = solo("b", "c", *dead, retransmit_mult=20, **QUIET)  # news enough for every target
    for name in dead:
        a.receive(addr("b"), [Dead(0, name, "b")], 0.0)
    rounds = to_dead = 0
    to_live: set[str] = set()
    t = 0.0
    while rounds < 100:
        a.update_tags({"r": str(rounds)}, t)  # news for every round
        t, out = step(a)
        dests = [s.addr.split(":")[0] for s in _gossip_sends(out)]
        to_dead += len([d for d in dests if d in dead])
        to_live.update(d for d in dests if d not in dead)
        rounds += 1
    assert to_live == {"b", "c"}
    # 3 of a pool of 12 (2 live, 10 dead): 2.5 dead members per round on average
    assert 1.0 < to_dead / rounds < 5.0


def test_a_late_gossip_round_keeps_the_phase_and_skips_the_backlog():
    a = solo("b", gossip_interval=0.25, **QUIET)
    g0 = a.next_deadline()
    assert g0 < 0.25
    assert _gossip_sends(a.tick(g0))
    assert a.next_deadline() == g0 + 0.25
    late = g0 + 0.25 + 0.25  # a whole round late, to the bit
    assert len(_gossip_sends(a.tick(late))) == 1
    assert a.next_deadline() == pytest.approx(late + 0.25)
    later = late + 3 * 0.25 + 0.1
    assert len(_gossip_sends(a.tick(later))) == 1, "one round, not the backlog"
    assert a.next_deadline() == pytest.approx(late + 4 * 0.25)


def test_gossip_sleeps_when_nothing_is_queued_and_wakes_on_the_phase_grid():
    a = solo("b", gossip_interval=0.25, **QUIET)
    last = None
    while a.pending_broadcasts():
        last, _ = step(a)
    assert a.next_deadline() > 100, "nothing to gossip: no more rounds"
    now = last + 0.6
    a.update_tags({"v": "1"}, now)
    assert a.next_deadline() == pytest.approx(last + 0.75)


def test_gossip_sleeps_when_piggybacking_emptied_the_queue():
    a = solo("b", gossip_interval=0.25, **QUIET)
    g0 = a.next_deadline()
    for seq in range(1, 20):
        if not a.pending_broadcasts():
            break
        a.receive(addr("b"), [Ping(seq, "a", "b", addr("b"))], 0.0)  # acks carry the news
    assert not a.pending_broadcasts()
    assert a.next_deadline() == g0
    assert not a.tick(g0).sends
    assert a.next_deadline() > 100


def test_each_gossip_round_also_reaches_one_transit_hop_in_turn():
    direct = ["h1", "h2"] + [f"d{i}" for i in range(10)]
    a = solo(*direct, "u1", "u2", gossip_nodes=1, tcp_fallback=False)
    a.next_hop = {"u1": "h1", "u2": "h2"}.get
    a.measure(["u1", "u2"], 0.0)
    run_until(a, a.s.probe_interval, _ack_pings(a, set(direct)))
    assert a.unreached == {"u1", "u2"}
    hops: list[str] = []
    ack = _ack_pings(a, set(direct))
    rounds = 0
    t = a.s.probe_interval
    while rounds < 8:
        a.update_tags({"r": str(rounds)}, t)
        t, out = step(a)
        ack(t, out)
        dests = [s.addr.split(":")[0] for s in _gossip_sends(out)]
        if dests:
            rounds += 1
            hops.extend(d for d in dests if d in ("h1", "h2"))
            assert not {"u1", "u2"} & set(dests), "gossip goes only to members reached directly"
    assert hops.count("h1") >= 4 and hops.count("h2") >= 4, hops
