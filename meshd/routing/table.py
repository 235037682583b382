"""Latency-weighted next-hop table from gossiped link state (sans-IO, networkx).

Rules:
- Every node advertises its direct links: {peer: RTT} measured by its own probes (bounded
  to the `max_links` nearest). An advert replaces the same origin's older one (by version).
- The graph has an edge only where both ends advertise each other (a link one side cannot
  use is not a link); its weight is the mean of the two RTTs.
- Shortest paths by latency from this node give each destination a path and a next hop;
  every hop also costs `hop_cost` (default HOP_COST, what a relay's own work adds:
  bench/relay.py), so a relayed path must beat the direct one by more than its relays cost
  and RTT noise between members that answer directly does not send traffic through relays
  (on one host, an idle 10-daemon cluster had routed 7 of 9 peers through relays). A
  route's `cost` is its latency, without the hop costs.
- Recompute is rate-limited to once per `min_interval` and only when something changed.
- Hysteresis: a destination keeps its current path while that path still exists and the new
  best is not at least `switch_gain` (fraction) cheaper (hop costs included), so jittery
  RTTs do not flap routes.
- Members set as `avoid` (silent next hops, suspects) carry no transit traffic: paths go around
  them at once, without waiting for their adverts to age out; they stay reachable as
  destinations. A path through an avoided node no longer "exists" for hysteresis.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import networkx as nx

# What one hop costs on top of its link's RTT, in seconds: a relay's own processing (one
# hop added 0.9-2.5 ms to a direct call in bench/relay.py, 2026-11-30).
HOP_COST = 0.002


@dataclass(frozen=True)
class Route:
    dest: str
    next_hop: str
    path: tuple[str, ...]
    cost: float

    def to_dict(self) -> dict[str, Any]:
        return {"destination": self.dest, "next_hop": self.next_hop, "path": list(self.path),
                "latency_ms": round(self.cost * 1000, 3)}


class RoutingTable:
    def __init__(self, me: str, switch_gain: float = 0.10, min_interval: float = 1.0,
                 max_links: int = 64, hop_cost: float = HOP_COST) -> None:
        self.me = me
        self.hop_cost = hop_cost
        self.switch_gain = switch_gain
        self.min_interval = min_interval
        self.max_links = max_links
        self.adverts: dict[str, tuple[int, dict[str, float]]] = {}
        self.routes: dict[str, Route] = {}
        self.flaps = 0
        self.avoid: frozenset[str] = frozenset()
        self._dirty = False
        self._last = -float("inf")

    def advertise(self, origin: str, version: int, links: dict[str, float]) -> bool:
        """Take an advert; True if it is news."""
        old = self.adverts.get(origin)
        if old is not None and old[0] >= version:
            return False
        nearest = dict(sorted(links.items(), key=lambda kv: kv[1])[:self.max_links])
        self.adverts[origin] = (version, nearest)
        self._dirty = True
        return True

    def set_avoid(self, names: frozenset[str]) -> None:
        """Members that must not carry transit traffic (the routing monitor's avoid():
        next hops that stopped answering, suspected members)."""
        names = names - {self.me}
        if names != self.avoid:
            self.avoid = names
            self._dirty = True

    def forget(self, origin: str) -> None:
        if self.adverts.pop(origin, None) is not None:
            self._dirty = True

    def graph(self) -> nx.Graph:
        g = nx.Graph()
        for origin, (_, links) in self.adverts.items():
            for peer, rtt in links.items():
                back = self.adverts.get(peer, (0, {}))[1].get(origin)
                if back is not None:
                    g.add_edge(origin, peer, weight=(rtt + back) / 2 + self.hop_cost)
        return g

    def recompute(self, now: float, force: bool = False) -> bool:
        """Rebuild routes if due; True if any next hop changed."""
        if not force and (not self._dirty or now - self._last < self.min_interval):
            return False
        self._dirty = False
        self._last = now
        g = self.graph()
        if self.me not in g:
            changed = bool(self.routes)
            self.routes = {}
            return changed
        dist, paths = _shortest(g, self.me, self.avoid)
        changed = False
        new: dict[str, Route] = {}
        for dest, path in paths.items():
            if dest == self.me:
                continue
            weight = dist[dest]
            best = Route(dest, path[1], tuple(path), self._latency(weight, path))
            old = self.routes.get(dest)
            if old is not None and old.path != best.path:
                old_weight = _path_cost(g, old.path, self.avoid)
                if old_weight is not None and weight > old_weight * (1 - self.switch_gain):
                    # keep: not better
                    best = Route(dest, old.next_hop, old.path,
                                 self._latency(old_weight, old.path))
            if old is None or old.next_hop != best.next_hop:
                changed = True
                if old is not None:
                    self.flaps += 1
            new[dest] = best
        if set(new) != set(self.routes):
            changed = True
        self.routes = new
        return changed

    def _latency(self, weight: float, path: tuple[str, ...] | list[str]) -> float:
        """A path's latency: its weight without the hop costs."""
        return max(0.0, weight - self.hop_cost * (len(path) - 1))

    def route(self, dest: str) -> Route | None:
        return self.routes.get(dest)

    def transit_hops(self) -> set[str]:
        """Next hops that carry traffic for other destinations."""
        return {r.next_hop for r in self.routes.values() if r.next_hop != r.dest}


def _shortest(g: nx.Graph, me: str, avoid: frozenset[str]
              ) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Dijkstra from me where avoided nodes may only end a path."""
    if not avoid or not any(n in g for n in avoid):
        return nx.single_source_dijkstra(g, me, weight="weight")
    transit = g.subgraph([n for n in g if n not in avoid or n == me])
    dist, paths = nx.single_source_dijkstra(transit, me, weight="weight")
    for dest in sorted(n for n in avoid if n in g):
        best: tuple[float, list[str]] | None = None
        for nbr, data in g[dest].items():
            if nbr in dist and (best is None or dist[nbr] + data["weight"] < best[0]):
                best = (dist[nbr] + data["weight"], [*paths[nbr], dest])
        if best is not None:
            dist[dest], paths[dest] = best
    return dist, paths


def _path_cost(g: nx.Graph, path: tuple[str, ...],
               avoid: frozenset[str] = frozenset()) -> float | None:
    if any(n in avoid for n in path[1:-1]):
        return None
    total = 0.0
    for a, b in itertools.pairwise(path):
        if not g.has_edge(a, b):
            return None
        total += g[a][b]["weight"]
    return total
