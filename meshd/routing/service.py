"""Routing shell: advertise this node's direct links, build the next-hop table from everyone's.

Rules:
- Every `advertise_interval` (15 s: each advert is a store write every member merges and
  commits, so N nodes cost N^2 / 15 merges a second), and at once when they change
  (monitor.links_changed: another link set, or an RTT that moved by 20% and 1 ms), this
  node publishes its direct links (members it probed directly
  and got an ack from, with their RTT) and its Vivaldi coordinate, as a record in the store's
  system database "routing" (table "links", key = node name). The store replicates it like
  any record, so link state spreads by gossip and heals by anti-entropy.
- Every `recompute_interval` the table takes any newer adverts of live members, forgets
  members that are gone, and recomputes (with hysteresis, see table.py).
- RTTs come from the membership core's direct probe acks; Vivaldi is fed the same samples
  (monitor.py). Next hops that stopped answering (monitor.py's watch) and suspected members
  (unless they are watched hops that answered us lately) carry no transit traffic.
- The table is the membership core's `next_hop`, so probes of members reached through a
  relay follow the route (membership core P5).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from meshd.store import crdt

from .monitor import LinkMonitor, links_changed
from .table import RoutingTable
from .vivaldi import Coordinate, VivaldiClient

log = logging.getLogger("meshd.routing")
DB, TABLE = "routing", "links"


class RoutingService:
    def __init__(self, core: Any, store: Any, advertise_interval: float = 15.0,
                 recompute_interval: float = 1.0,
                 measure: Callable[[list[str]], None] | None = None) -> None:
        self.core = core
        self.measure = measure
        self.store = store
        self.me = core.me.name
        self.advertise_interval = advertise_interval
        self.table = RoutingTable(self.me, min_interval=recompute_interval)
        self.recompute_interval = recompute_interval
        self.monitor = LinkMonitor(core)
        self._version = 0
        self._advertised: dict[str, float] = {}
        core.next_hop = self.next_hop

    @property
    def vivaldi(self) -> VivaldiClient:
        return self.monitor.vivaldi

    def next_hop(self, dest: str) -> str | None:
        route = self.table.routes.get(dest)
        return None if route is None else route.next_hop

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        next_advert = trio.current_time()
        while True:
            now = trio.current_time()
            records = self._records()  # every advert, decoded once per tick
            self.monitor.sample(self._coordinates(records))
            watched = self.monitor.watch(self.table.transit_hops(), now)
            if self.measure is not None:
                names = sorted(set(self.monitor.to_measure(now)) | set(watched))
                if names:
                    self.measure(names)
            links = self.monitor.direct_links(now)
            if now >= next_advert or links_changed(self._advertised, links):
                await self._advertise(links)
                next_advert = now + self.advertise_interval
            self._load(records)
            self.table.set_avoid(self.monitor.avoid(now))
            if self.table.recompute(now):
                log.debug("routes changed: %d destinations", len(self.table.routes))
            await trio.sleep(self.recompute_interval)

    def _records(self) -> dict[str, Any]:
        return self.store.json_records(DB, TABLE)

    def _coordinates(self, records: dict[str, Any]) -> dict[str, Coordinate]:
        out = {}
        for name, rec in records.items():
            try:
                out[name] = Coordinate.from_wire(rec.get("coord"))
            except (ValueError, TypeError):
                continue
        return out

    async def _advertise(self, links: dict[str, float]) -> None:
        self._version = max(self._version + 1, int(time.time() * 1000))
        self._advertised = links
        record = {"v": self._version, "links": links,
                  "coord": self.vivaldi.coord.to_wire()}
        delta = {"lww": crdt.lww(self.store.hlc.now(), json.dumps(record).encode(), {},
                                 int((time.time() + 10 * self.advertise_interval) * 1000))}
        await self.store._commit_local(DB, TABLE, self.me, delta, 1)

    def _load(self, records: dict[str, Any]) -> None:
        live_names = set(self.monitor.live()) | {self.me}
        for origin, rec in records.items():
            if origin not in live_names:
                self.table.forget(origin)
                continue
            links = rec.get("links")
            version = rec.get("v")
            if isinstance(links, dict) and isinstance(version, int):
                clean = {k: float(v) for k, v in links.items()
                         if isinstance(k, str) and isinstance(v, int | float) and v >= 0}
                self.table.advertise(origin, version, clean)
        for origin in [o for o in self.table.adverts if o not in live_names]:
            self.table.forget(origin)

    # --- views -------------------------------------------------------------------------------

    def routes(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in sorted(self.table.routes.values(), key=lambda r: r.dest)]

    def edges(self) -> list[dict[str, Any]]:
        g = self.table.graph()
        return [{"a": a, "b": b, "latency_ms": round(d["weight"] * 1000, 3)}
                for a, b, d in sorted(g.edges(data=True))]

    def estimate(self, node: str) -> float | None:
        coord = self._coordinates(self._records()).get(node)
        return None if coord is None else self.vivaldi.coord.distance_to(coord)
