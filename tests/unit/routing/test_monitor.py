"""LinkMonitor: direct links, measuring, next-hop watch and what routing avoids."""

from __future__ import annotations

from dataclasses import dataclass, field

from meshd.membership.messages import ALIVE, DEAD, SUSPECT
from meshd.routing.monitor import LinkMonitor, links_changed
from meshd.settings import membership_profile


@dataclass
class FakeMember:
    name: str
    state: int = ALIVE
    rtt: float | None = None
    rtt_at: float | None = None
    heard_at: float | None = None


@dataclass
class FakeCore:
    """The parts of the membership core the monitor reads."""

    names: list[str]
    s: object = field(default_factory=lambda: membership_profile("lan"))
    unreached: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        self.me = FakeMember("me")
        self.members = {n: FakeMember(n) for n in self.names}
        self.members["me"] = self.me

    def member_list(self):
        return list(self.members.values())

    def num_live(self) -> int:
        return sum(m.state in (ALIVE, SUSPECT) for m in self.members.values())


def test_direct_links_are_recent_direct_answers_minus_unreached():
    core = FakeCore(["a", "b", "c", "d"])
    mon = LinkMonitor(core)
    for name, rtt in (("a", 0.001), ("b", 0.002), ("c", 0.003)):
        core.members[name].rtt, core.members[name].rtt_at = rtt, 100.0
    core.members["d"].rtt, core.members["d"].rtt_at = 0.004, 10.0  # long ago
    mon.sample()
    core.unreached = frozenset({"c"})
    assert mon.direct_links(101.0) == {"a": 0.001, "b": 0.002}


def test_members_without_a_fresh_rtt_are_measured_then_retried_only_after_a_while():
    core = FakeCore(["a", "b", "c"])
    core.members["a"].rtt_at = 99.0
    mon = LinkMonitor(core)
    assert mon.to_measure(100.0) == ["b", "c"]
    assert mon.to_measure(101.0) == []  # tried a second ago
    # a probe round (>= 60 s) later; by then a's answer is stale too
    assert mon.to_measure(100.0 + 61.0) == ["a", "b", "c"]
    core.members["c"].state = DEAD
    assert mon.to_measure(100.0 + 200.0) == ["a", "b"]  # the dead one is not measured


def test_watched_hop_is_down_after_two_intervals_and_a_timeout_of_silence_and_back_on_answer():
    core = FakeCore(["g1", "g2"])
    mon = LinkMonitor(core)
    s = core.s
    limit = 2 * s.probe_interval + s.probe_timeout
    core.members["g1"].rtt_at = 100.0
    assert mon.watch({"g1"}, 100.0) == ["g1"]
    assert mon.down == frozenset()
    mon.watch({"g1"}, 100.0 + limit - 0.1)
    assert mon.down == frozenset()
    mon.watch({"g1"}, 100.0 + limit + 0.1)
    assert mon.down == frozenset({"g1"})
    # no longer in use (routes went around it) but still watched until it answers
    assert mon.watch(set(), 104.0) == ["g1"] and mon.down == frozenset({"g1"})
    core.members["g1"].heard_at = 104.5  # it relayed one of our acks: alive as a hop
    mon.watch(set(), 104.6)
    assert mon.down == frozenset()
    assert mon.watch(set(), 104.7) == []


def test_down_hop_found_silent_to_direct_pings_is_no_longer_avoided_as_a_relay():
    """A hop that stopped answering is avoided only while it is our neighbour: once
    membership finds it silent to direct pings our advert drops the link, and it must be
    free to carry traffic further along a path (h0-h1-h2-h3: h2 is h3's only way in)."""
    core = FakeCore(["g1", "g2"])
    mon = LinkMonitor(core)
    limit = 2 * core.s.probe_interval + core.s.probe_timeout
    core.members["g1"].rtt_at = 100.0
    mon.watch({"g1"}, 100.0)
    mon.watch({"g1"}, 100.0 + limit + 0.1)
    assert mon.down == frozenset({"g1"}) and "g1" in mon.avoid(100.0 + limit + 0.1)
    core.unreached = frozenset({"g1"})
    assert mon.watch(set(), 100.0 + limit + 0.2) == []
    assert mon.down == frozenset() and mon.avoid(100.0 + limit + 0.2) == frozenset()


def test_suspected_hop_that_answers_us_is_not_avoided_one_that_is_silent_is():
    core = FakeCore(["g1", "g2", "x"])
    mon = LinkMonitor(core)
    for n in ("g1", "g2"):
        core.members[n].rtt_at = 100.0
    mon.watch({"g1", "g2"}, 100.0)
    for n in ("g1", "g2", "x"):
        core.members[n].state = SUSPECT
    core.members["g1"].rtt_at = 100.9  # answered our watch ping just now
    core.members["g2"].rtt_at = 99.0  # silent for 2 s
    assert mon.avoid(101.0) == frozenset({"g2", "x"})  # x: not ours to judge, believe it


def test_links_changed_only_for_another_set_or_a_large_move():
    old = {"a": 0.010, "b": 0.020}
    assert not links_changed(old, {"a": 0.011, "b": 0.019})
    assert links_changed(old, {"a": 0.013, "b": 0.020})
    assert links_changed(old, {"a": 0.010})


def test_sub_millisecond_jitter_is_no_news():
    # loopback or one LAN: 0.3 ms -> 0.6 ms doubles but moves no route (a hop costs 2 ms)
    old = {"a": 0.0003, "b": 0.0020}
    assert not links_changed(old, {"a": 0.0006, "b": 0.0028})
    assert links_changed(old, {"a": 0.0015, "b": 0.0020}), "a move past 1 ms is news"
