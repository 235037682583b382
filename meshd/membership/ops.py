"""Control operations of membership: the member list, its events, joining through peers.

Rules:
- `members` and `members.watch` read the mesh (resource mesh:members: for a remote caller,
  by the rules of "default": the member list is the cluster's, no namespace's);
  `join` makes this node contact peers, which only its operator decides.
- A member row says how this node reaches the member ("reach"): direct, via a relay, no
  route, or not measured yet. Reserved tags (id, boot, authroot) are shown as columns or not
  at all, never as user tags.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meshd import versions
from meshd.errors import MeshError, bad_request
from meshd.ops import Emit, Op, mesh_resource
from meshd.transport import addr as addrs

from .core import Membership
from .messages import STATE_NAMES
from .service import MembershipService

RESERVED_TAGS = ("id", "boot", "authroot", "ver", versions.TAG)


class MembershipOps:
    def __init__(self, core: Membership, membership: MembershipService,
                 next_hop: Callable[[str], str | None]) -> None:
        self.core = core
        self.membership = membership
        self.next_hop = next_hop  # the routing table's first hop towards a member

    def ops(self) -> list[Op]:
        members = mesh_resource("members")
        return [Op("members", self.members, members),
                Op("members.watch", self.watch, members, "stream"),
                Op("join", self.join, "operator")]

    def member_rows(self) -> list[dict[str, Any]]:
        rows = []
        unreached = self.core.unreached
        me = self.core.me.name
        for m in sorted(self.core.member_list(), key=lambda m: m.name):
            tags = {k: v for k, v in m.tags.items() if k not in RESERVED_TAGS}
            rows.append({
                "name": m.name, "id": m.tags.get("id", ""), "address": m.addr,
                "status": STATE_NAMES[m.state], "incarnation": m.incarnation, "tags": tags,
                "rtt_ms": None if m.rtt is None else round(m.rtt * 1000, 3),
                "version": m.tags.get("ver", ""),  # "" from a release that did not say
                "protocols": versions.describe(versions.parse(m.tags.get(versions.TAG))),
                "self": m.name == me,
                "reach": self._reach(m, unreached),
            })
        return rows

    def _reach(self, m: Any, unreached: frozenset[str]) -> str:
        """How this node gets to a member: "direct", "via HOP" (it does not answer us
        directly; probes and links follow the route), "no route" or "unknown" (not yet
        measured)."""
        if m.name == self.core.me.name:
            return "self"
        if m.name in unreached:
            hop = self.next_hop(m.name)
            return f"via {hop}" if hop is not None and hop != m.name else "no route"
        return "direct" if m.rtt_at is not None else "unknown"

    async def members(self, _: dict[str, Any]) -> Any:
        return self.member_rows()

    async def watch(self, args: dict[str, Any], emit: Emit) -> None:
        with self.membership.subscription() as events:
            async for ev in events:
                await emit({"kind": ev.kind, "name": ev.node, "address": ev.addr,
                            "incarnation": ev.incarnation, "detail": ev.detail})

    async def join(self, args: dict[str, Any]) -> Any:
        peers = args.get("peers")
        if not isinstance(peers, list) or not peers or \
                not all(isinstance(p, str) for p in peers):
            raise bad_request("join needs a list of peer addresses")
        for p in peers:
            try:
                addrs.parse(p, 7946)
            except addrs.AddressError as exc:
                raise bad_request(str(exc)) from None
        full = [addrs.format(*addrs.parse(p, 7946)) for p in peers]
        ok, errors = await self.membership.join(full)
        if ok == 0:
            raise MeshError(503, "could not join: " + "; ".join(errors))
        return {"joined": ok, "errors": errors}
