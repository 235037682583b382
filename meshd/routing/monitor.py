"""This node's direct links, measured by the membership core's probes. Sans-IO.

Rules:
- An RTT sample is the core's newest direct-probe ack of a member (acks that came back
  through a relay are not samples); each new one feeds the median filter and Vivaldi.
- A direct link is a live (alive or suspect) member that answered a direct probe within the
  horizon and has not been found silent to direct pings since (the core's `unreached`).
  Each member is probed once per round of the probe list, so the horizon grows with the
  cluster (3 rounds, at least 30 s).
- Members with no fresh direct RTT are measured with one-off pings (membership core P6), at
  most `limit` per call, each retried no sooner than a probe round (at least 60 s) after the
  last try: a new member's direct links are known within seconds, while members that are
  not reachable directly (another cloud) cost one ping per round.
- Next hops in use are watched like BFD watches a link: pinged every tick (`watch`), and one
  that has not answered (a direct ack, or an ack it relayed back for one of our routed
  probes) for 2 probe intervals plus a probe timeout is down, to be avoided at
  once, without waiting for membership to suspect it (which takes a random wait for its
  turn in someone's probe list). A down hop stays watched until it answers again, or
  until membership finds it silent to direct pings (the core's `unreached`): then our
  advert no longer has the link, so the graph has no edge from us to it, and it may carry
  traffic again further along a path (a node two hops away that we cannot reach directly
  is a relay like any other; avoiding it for good would cut every route through it).
- Suspected members that we do not watch are to be avoided as transit (see table.py); dead
  and left members are not members of the routing graph at all.
"""

from __future__ import annotations

import math
from typing import Any

from meshd.membership.messages import ALIVE, SUSPECT

from .rtt import RttFilter
from .vivaldi import Coordinate, VivaldiClient


def links_changed(old: dict[str, float], new: dict[str, float], tolerance: float = 0.2,
                  floor: float = 0.001) -> bool:
    """Whether an advert of `new` is news after `old`: another set of links, or an RTT that
    moved by more than `tolerance` (relative) and more than `floor` seconds (sub-millisecond
    jitter on a LAN or one host is no news: a route would not move for it, a hop costing
    2 ms, and each advert is a store write every member merges); smaller moves wait for the
    periodic refresh."""
    if old.keys() != new.keys():
        return True
    return any(abs(new[k] - v) > max(tolerance * v, floor) for k, v in old.items())


def _last_answer(m: Any) -> float:
    """When a member last showed us it is alive as a hop: a direct ack, or an ack it relayed
    back for one of our routed probes (-inf if never)."""
    return max(m.rtt_at if m.rtt_at is not None else -math.inf,
               m.heard_at if m.heard_at is not None else -math.inf)


class LinkMonitor:
    def __init__(self, core: Any) -> None:
        self.core = core
        self.me: str = core.me.name
        self.rtts = RttFilter()
        self.vivaldi = VivaldiClient()
        self._seen_rtt: dict[str, float] = {}
        self._tried: dict[str, float] = {}
        self._watched: dict[str, float] = {}  # hop -> when watching began
        self.down: frozenset[str] = frozenset()

    def live(self) -> list[str]:
        """Alive and suspect members other than this node."""
        return [m.name for m in self.core.member_list()
                if m.state in (ALIVE, SUSPECT) and m.name != self.me]

    def suspects(self) -> frozenset[str]:
        return frozenset(m.name for m in self.core.member_list() if m.state == SUSPECT)

    def sample(self, coords: dict[str, Coordinate] | None = None) -> None:
        """Take the newest direct-probe RTT of each member into the filter and Vivaldi."""
        coords = coords or {}
        for m in self.core.member_list():
            if m.name == self.me or m.rtt is None or m.state not in (ALIVE, SUSPECT):
                continue
            if self._seen_rtt.get(m.name) == m.rtt:
                continue
            self._seen_rtt[m.name] = m.rtt
            self.rtts.add(m.name, m.rtt)
            other = coords.get(m.name)
            if other is not None:
                self.vivaldi.update(other, m.rtt)
        live = set(self.live())
        for name in [n for n in self._seen_rtt if n not in live]:
            self._seen_rtt.pop(name, None)
            self.rtts.forget(name)
        for name in [n for n in self._tried if n not in live]:
            del self._tried[name]

    def watch(self, hops: set[str], now: float) -> list[str]:
        """Update `down` for the next hops in use; returns the hops to ping now."""
        limit = self.core.s.silent_after()
        watched = (hops | self.down) - self.core.unreached
        for h in [h for h in self._watched if h not in watched]:
            del self._watched[h]
        down = set()
        for h in sorted(watched):
            m = self.core.members.get(h)
            if m is None or m.state not in (ALIVE, SUSPECT):
                self._watched.pop(h, None)
                continue
            since = self._watched.setdefault(h, now)
            if now - max(since, _last_answer(m)) > limit:
                down.add(h)
        self.down = frozenset(down)
        return sorted(self._watched)

    def avoid(self, now: float) -> frozenset[str]:
        """Members to carry no transit traffic: next hops that stopped answering us, and
        suspected members unless they are hops we watch that answered us within a probe
        interval plus a timeout (our own evidence beats someone else's suspicion, so a
        refuted suspicion of a gateway that answers us does not move our traffic around)."""
        s = self.core.s
        fresh = now - s.probe_interval - s.probe_timeout
        out = set(self.down)
        for name in self.suspects():
            m = self.core.members.get(name)
            if name not in self._watched or m is None or _last_answer(m) < fresh:
                out.add(name)
        return frozenset(out)

    def _horizon(self) -> float:
        return max(30.0, 3 * self.core.num_live() * self.core.s.probe_interval)

    def to_measure(self, now: float, limit: int = 64) -> list[str]:
        """Live members to ping once now (no fresh direct RTT, not tried lately)."""
        horizon = self._horizon()
        retry = max(60.0, self.core.num_live() * self.core.s.probe_interval)
        out: list[str] = []
        for m in self.core.member_list():
            if m.name == self.me or m.state not in (ALIVE, SUSPECT):
                continue
            if m.rtt_at is not None and now - m.rtt_at < horizon / 2:
                continue
            last = self._tried.get(m.name)
            if last is not None and now - last < retry:
                continue
            self._tried[m.name] = now
            out.append(m.name)
            if len(out) >= limit:
                break
        return out

    def direct_links(self, now: float) -> dict[str, float]:
        """Members that answered a direct probe recently, with their filtered RTT; `now` is
        the core's clock."""
        horizon = self._horizon()
        unreached = self.core.unreached
        out = {}
        for m in self.core.member_list():
            if m.name == self.me or m.state not in (ALIVE, SUSPECT) or m.rtt_at is None \
                    or m.name in unreached:
                continue
            if now - m.rtt_at > horizon:
                continue
            est = self.rtts.get(m.name)
            if est is not None:
                out[m.name] = est
        return out
