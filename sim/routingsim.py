"""Routing in the simulator: the daemon's LinkMonitor and RoutingTable on every node.

Rules (the model):
- Each node runs meshd.routing's LinkMonitor and RoutingTable on its membership core, and the
  table is the core's `next_hop` (routed probes, membership core P5). Every
  `TICK` it samples RTTs, measures members with no fresh RTT and watches its
  next hops (core P6, monitor.py), marks suspected and down hops as no-transit, forgets members
  that are gone and recomputes (rate limit and hysteresis as in the daemon).
- Adverts: the daemon carries link state as records of its replicated store; here they are
  flooded instead, which has the same effect (every node ends up with everyone's newest
  advert) without simulating the store. A node sends its advert to its direct links when
  its link set changes or an RTT moves by more than 20% (links_changed), and every
  `routing_refresh_interval`; a node forwards news to its own direct links (not back); a node
  that gains a direct link sends it every advert it holds (OSPF's database exchange). Adverts
  travel as stream messages with the link's latency and count in the message totals.
- Vivaldi coordinates are not simulated (they only estimate RTTs for `meshd ping`).

Metrics (over running nodes, on the true graph: an edge wherever the network delivers,
weighted by the expected RTT):
- route_coverage: fraction of ordered pairs connected in the true graph where a packet
  forwarded hop by hop (each node by its own next hop, as relays forward) arrives along true
  edges.
- path_stretch_p99: per such pair, that path's latency over the optimum latency; the p99.
- route_flaps: next-hop changes of existing routes after warmup, summed over nodes.
- route_convergence_s_max: after each crash, time until coverage is 1 again (checked every
  CHECK_INTERVAL); the worst. route_unconverged: crashes after which it never was.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import networkx as nx

from meshd.routing.monitor import LinkMonitor, links_changed
from meshd.routing.table import RoutingTable

from .metrics import quantile_index

RECOMPUTE_INTERVAL = 1.0
TICK = 1.0  # as the daemon's routing loop
CHECK_INTERVAL = 0.1


class NodeRouting:
    __slots__ = ("last_adverts", "last_links", "monitor", "next_refresh", "node", "table",
                 "version")

    def __init__(self, node: Any, core: Any) -> None:
        self.node = node
        self.monitor = LinkMonitor(core)
        self.table = RoutingTable(core.me.name, min_interval=RECOMPUTE_INTERVAL)
        self.version = 0
        self.last_links: dict[str, float] = {}
        self.last_adverts = 0
        self.next_refresh = 0.0

        def next_hop(dest: str) -> str | None:
            route = self.table.routes.get(dest)
            return None if route is None else route.next_hop
        core.next_hop = next_hop


class RoutingSim:
    def __init__(self, sim: Any) -> None:
        self.sim = sim
        self.sc = sim.sc
        self.msgs = 0
        self.flaps = 0
        self.convergence: list[float | None] = []
        self._rng = sim._rng("routing")

    # --- per node ------------------------------------------------------------------------

    def start_node(self, node: Any, core: Any) -> NodeRouting:
        state = NodeRouting(node, core)
        first = self.sim.now + self._rng.uniform(0, TICK)
        self.sim.call_at(first, self._tick, state)
        return state

    def _live(self, state: NodeRouting) -> bool:
        return state.node.up and state.node.routing is state

    def _tick(self, state: NodeRouting) -> None:
        if not self._live(state):
            return
        sim = self.sim
        node = state.node
        sim.call_at(sim.now + TICK, self._tick, state)
        if node.paused:
            return
        local = sim.now + node.offset
        mon, table = state.monitor, state.table
        mon.sample()
        watched = mon.watch(table.transit_hops(), local)
        names = sorted(set(mon.to_measure(local)) | set(watched))
        if names:
            sim._apply(node, node.core.measure(names, local))
        links = mon.direct_links(local)
        gained = [p for p in links if p not in state.last_links]
        if links_changed(state.last_links, links) or local >= state.next_refresh:
            state.version = max(state.version + 1, int(local * 1000))
            state.last_links = links
            state.next_refresh = local + self.sc.routing_refresh_interval
            table.advertise(node.name, state.version, links)
            self._send(node, sorted(links), [(node.name, state.version, links)])
        if gained:
            held = [(o, v, ls) for o, (v, ls) in table.adverts.items()]
            self._send(node, sorted(gained), held)
        live = set(mon.live()) | {node.name}
        for origin in [o for o in table.adverts if o not in live]:
            table.forget(origin)
        table.set_avoid(mon.avoid(local))
        before = table.flaps
        table.recompute(local)
        if sim.now >= self.sc.warmup:
            self.flaps += table.flaps - before

    def _send(self, node: Any, peers: list[str],
              adverts: list[tuple[str, int, dict[str, float]]]) -> None:
        sim = self.sim
        size = 8 + sum(16 + len(o) + 12 * len(ls) + sum(len(p) for p in ls)
                       for o, _, ls in adverts)
        for peer in peers:
            dst = sim.by_name.get(peer)
            if dst is None:
                continue
            self.msgs += 1
            sim.metrics.sent(sim.now, size)
            when = sim.net.delivery_time(node.idx, dst.idx, size, sim.now, True, connect=False)
            if when is not None:
                sim.call_at(when, self._deliver, (dst, node.name, adverts))

    def _deliver(self, arg: tuple[Any, str, list[tuple[str, int, dict[str, float]]]]) -> None:
        dst, sender, adverts = arg
        state = dst.routing
        if state is None or not dst.up or dst.paused:
            return
        news = [(o, v, ls) for o, v, ls in adverts
                if o != dst.name and state.table.advertise(o, v, ls)]
        if news:
            peers = sorted(p for p in state.monitor.direct_links(self.sim.now + dst.offset)
                           if p != sender)
            self._send(dst, peers, news)

    # --- measuring -----------------------------------------------------------------------

    def true_graph(self) -> nx.Graph:
        sim = self.sim
        up = [n for n in sim.nodes if n.up]
        g = nx.Graph()
        g.add_nodes_from(n.name for n in up)
        for a, b in itertools.combinations(up, 2):
            if sim.net.reachable(a.idx, b.idx) and sim.net.reachable(b.idx, a.idx):
                rtt = sim.net.mean_latency(a.idx, b.idx) + sim.net.mean_latency(b.idx, a.idx)
                g.add_edge(a.name, b.name, weight=rtt)
        return g

    def _routes(self, g: nx.Graph) -> tuple[int, int, list[float]]:
        """(pairs, pairs with a true route, stretches)."""
        optimum = dict(nx.all_pairs_dijkstra_path_length(g, weight="weight"))
        pairs = covered = 0
        stretches: list[float] = []
        for node in self.sim.nodes:
            if not node.up or node.routing is None:
                continue
            for dest in g:
                if dest == node.name:
                    continue
                pairs += 1
                cost = self._forward(node.name, dest, g)
                if math.isnan(cost):
                    continue
                covered += 1
                best = optimum[node.name].get(dest)
                if best:
                    stretches.append(cost / best)
            pairs -= sum(1 for d in g if d != node.name and d not in optimum[node.name])
        return pairs, covered, stretches

    def _forward(self, src: str, dest: str, g: nx.Graph) -> float:
        """Latency of the path a packet takes hop by hop (each node's own next hop), or NaN
        if it never arrives (no route, a hop that is down or unreachable, a loop)."""
        cost = 0.0
        cur, seen = src, {src}
        while cur != dest:
            node = self.sim.by_name.get(cur)
            route = None if node is None or node.routing is None \
                else node.routing.table.routes.get(dest)
            if route is None or not g.has_edge(cur, route.next_hop) \
                    or route.next_hop in seen or len(seen) > 16:
                return math.nan
            cost += g[cur][route.next_hop]["weight"]
            cur = route.next_hop
            seen.add(cur)
        return cost

    def coverage(self) -> float:
        pairs, covered, _ = self._routes(self.true_graph())
        return covered / pairs if pairs else 1.0

    def on_crash(self) -> None:
        self.convergence.append(None)
        self.sim.call_at(self.sim.now + CHECK_INTERVAL, self._check,
                         (len(self.convergence) - 1, self.sim.now))

    def _check(self, arg: tuple[int, float]) -> None:
        index, since = arg
        if self.coverage() >= 1.0:
            self.convergence[index] = self.sim.now - since
            self.sim.log(f"{self.sim.now:.6f} - routes converged")
            return
        self.sim.call_at(self.sim.now + CHECK_INTERVAL, self._check, arg)

    def result(self) -> dict[str, Any]:
        pairs, covered, stretches = self._routes(self.true_graph())
        stretches.sort()
        done = [c for c in self.convergence if c is not None]
        return {
            "route_coverage": round(covered / pairs, 4) if pairs else None,
            "path_stretch_p99": (round(stretches[quantile_index(len(stretches), 0.99)], 4)
                                 if stretches else None),
            "path_stretch_max": round(stretches[-1], 4) if stretches else None,
            "route_flaps": self.flaps,
            "route_convergence_s_max": round(max(done), 3) if done else None,
            "route_convergence_s": [round(c, 3) for c in done],
            "route_unconverged": len(self.convergence) - len(done),
            "routing_msgs": self.msgs,
        }
