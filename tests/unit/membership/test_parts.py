"""Suspicion timeouts, the broadcast queue, local health and settings."""

from __future__ import annotations

import math

import pytest

from meshd.membership.awareness import Awareness
from meshd.membership.broadcast import BroadcastQueue
from meshd.membership.suspicion import Suspicion
from meshd.settings import SettingsError, membership_profile


def test_suspicion_timeout_shrinks_with_confirmations():
    s = Suspicion("a", k=2, min_timeout=12.0, max_timeout=72.0, start=100.0)
    assert s.deadline() == 172.0
    assert s.confirm("b")
    expected = 72.0 - 60.0 * math.log(2) / math.log(3)
    assert s.timeout() == pytest.approx(expected)
    assert not s.confirm("b"), "the same accuser counts once"
    assert not s.confirm("a"), "the first accuser is not a confirmation"
    assert s.confirm("c")
    assert s.timeout() == 12.0
    assert not s.confirm("d"), "confirmations beyond k do not count"


def test_suspicion_without_expected_confirmations_uses_min():
    s = Suspicion("a", k=0, min_timeout=4.0, max_timeout=24.0, start=0.0)
    assert s.deadline() == 4.0


def test_broadcast_queue_least_sent_first_newest_first_and_limit():
    q = BroadcastQueue()
    q.queue("a", "A", 10)
    q.queue("b", "B", 10)
    assert q.take(1000, limit=2) == ["B", "A"]
    q.queue("c", "C", 10)
    assert q.take(13, limit=2) == ["C"], "only one fits; the unsent one goes first"
    assert q.take(1000, limit=2) == ["C", "B", "A"]
    assert q.take(1000, limit=2) == [], "each sent twice: all retired"
    assert len(q) == 0


def test_broadcast_queue_replaces_by_key_and_skips_oversized():
    q = BroadcastQueue()
    q.queue("a", "old", 10)
    q.queue("a", "new", 10)
    q.queue("b", "huge", 5000)
    assert q.take(1400, limit=3) == ["new"]
    assert len(q) == 2


def test_awareness_bounds():
    a = Awareness(8)
    a.apply(20)
    assert a.score == 7 and a.scale(0.5) == 4.0
    a.apply(-100)
    assert a.score == 0 and a.scale(0.5) == 0.5


def test_profiles_and_overrides():
    lan = membership_profile("lan")
    assert (lan.probe_interval, lan.probe_timeout, lan.gossip_interval, lan.gossip_nodes,
            lan.indirect_checks, lan.suspicion_mult, lan.retransmit_mult,
            lan.push_pull_interval) == (1.0, 0.5, 0.2, 3, 3, 4, 4, 30.0)
    assert membership_profile("wan").probe_interval == 5.0
    assert membership_profile("local").probe_timeout == 0.2
    assert membership_profile("lan", probe_interval="2").probe_interval == 2.0
    assert lan.suspicion_min(1000) == 12.0
    assert lan.suspicion_max(1000) == 72.0
    assert lan.retransmit_limit(1000) == 16
    assert lan.push_pull_period(1000) == 180.0
    assert lan.push_pull_period(20) == 30.0


@pytest.mark.parametrize("kwargs, match", [
    ({"probe_intervall": 1}, "unknown setting membership.probe_intervall"),
    ({"probe_interval": "fast"}, "must be float"),
    ({"gossip_nodes": 2.5}, "must be int"),
    ({"lifeguard": "maybe"}, "must be bool"),
    ({"probe_timeout": -1}, "negative"),
])
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(SettingsError, match=match):
        membership_profile("lan", **kwargs)


def test_unknown_profile():
    with pytest.raises(SettingsError, match="unknown profile"):
        membership_profile("moon")
