"""Control operations of routing: the route table, the link graph, and `meshd ping`.

Rules:
- All three read the mesh (resource mesh:routes: for a remote caller, by the rules of
  "default": routes are the cluster's, no namespace's).
- ping measures round trips over the secure link to a live member (the first hop of its
  route), `count` of 1..100, bounded by 5 + count seconds; members reply on the "ping"
  channel, which only authenticated links reach.
"""

from __future__ import annotations

from typing import Any

import trio

from meshd.errors import MeshError, bad_request
from meshd.membership.core import Membership
from meshd.ops import Op, mesh_resource
from meshd.transport.links import Channel, ChannelClosed, LinkError, LinkManager

from .service import RoutingService

CHANNEL = "ping"


class RoutingOps:
    def __init__(self, core: Membership, links: LinkManager, routing: RoutingService) -> None:
        self.core = core
        self.links = links
        self.routing = routing
        links.handlers[CHANNEL] = self._serve_ping

    def ops(self) -> list[Op]:
        routes = mesh_resource("routes")
        return [Op("routes", self.routes, routes), Op("graph", self.graph, routes),
                Op("ping", self.ping, routes)]

    async def routes(self, _: dict[str, Any]) -> Any:
        return self.routing.routes()

    async def graph(self, _: dict[str, Any]) -> Any:
        return {"nodes": sorted({self.core.me.name, *self.routing.table.adverts}),
                "edges": self.routing.edges()}

    async def _serve_ping(self, ch: Channel) -> None:
        while True:
            await ch.send(await ch.receive())

    async def ping(self, args: dict[str, Any]) -> dict[str, Any]:
        """Round trips over the secure link to a node (the first hop of its route)."""
        node = args.get("node")
        count = args.get("count", 5)
        if not isinstance(node, str) or not isinstance(count, int) or not 0 < count <= 100:
            raise bad_request("ping needs a node name and a count of 1..100")
        member = self.core.members.get(node)
        if member is None or member.state not in (0, 1):
            raise MeshError(404, f"no live member named {node!r}")
        route = self.routing.table.route(node)
        path = list(route.path) if route is not None else [self.core.me.name, node]
        samples = []
        try:
            with trio.fail_after(5 + count):
                async with await self.links.open_channel(member.addr, CHANNEL) as ch:
                    for i in range(count):
                        t0 = trio.current_time()
                        await ch.send(i.to_bytes(4, "big"))
                        await ch.receive()
                        samples.append((trio.current_time() - t0) * 1000)
        except (LinkError, ChannelClosed, trio.TooSlowError) as exc:
            raise MeshError(503, f"cannot reach {node}: {exc or 'timeout'}") from None
        estimate = self.routing.estimate(node)
        return {"node": node, "address": member.addr, "path": path,
                "rtt_ms": [round(x, 3) for x in samples],
                "min_ms": round(min(samples), 3),
                "avg_ms": round(sum(samples) / len(samples), 3),
                "vivaldi_estimate_ms": None if estimate is None else round(estimate * 1000, 3)}
