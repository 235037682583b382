"""This node's direct links, measured by the membership core's probes. Sans-IO.

Rules:
- An RTT sample is the core's newest direct-probe ack of a member (acks that came back
  through a relay are not samples); each new one feeds the median filter and Vivaldi.
- A direct link is a live (alive or suspect) member that answered a direct probe within the
  horizon: each member is probed once per round of the probe list, so the horizon grows with
  the cluster (3 rounds, at least 30 s).
- Suspected members are to be avoided as transit (see table.py); dead and left members are
  not members of the routing graph at all.
"""

from __future__ import annotations

from typing import Any

from meshd.membership.messages import ALIVE, SUSPECT

from .rtt import RttFilter
from .vivaldi import Coordinate, VivaldiClient


class LinkMonitor:
    def __init__(self, core: Any) -> None:
        self.core = core
        self.me: str = core.me.name
        self.rtts = RttFilter()
        self.vivaldi = VivaldiClient()
        self._seen_rtt: dict[str, float] = {}

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

    def direct_links(self, now: float) -> dict[str, float]:
        """Members that answered a direct probe recently, with their filtered RTT; `now` is
        the core's clock."""
        s = self.core.s
        horizon = max(30.0, 3 * self.core.num_live() * s.probe_interval)
        out = {}
        for m in self.core.member_list():
            if m.name == self.me or m.state not in (ALIVE, SUSPECT) or m.rtt_at is None:
                continue
            if now - m.rtt_at > horizon:
                continue
            est = self.rtts.get(m.name)
            if est is not None:
                out[m.name] = est
        return out
