"""The node's own control operations: status, effective settings, invite, leave.

Rules:
- status reads the mesh (resource mesh:status: for a remote caller, by the rules of
  "default": it is the cluster's state, no namespace's): name, id, address, incarnation,
  members by state, links, uptime, version, and every component's counters; the data dir
  too, but not to a remote caller (paths on the node are its operator's business).
- settings, invite (it prints the cluster secret) and leave are the node's operator's only.
- leave replies at once and leaves in the background: the reply must not wait for the node
  it stops.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import trio

from . import versions
from .membership.messages import STATE_NAMES
from .ops import REQUEST_REMOTE, Op, mesh_resource
from .secure.keyring import format_secret
from .settings import as_dict


@functools.cache
def package_version() -> str:
    try:
        return version("meshd")
    except PackageNotFoundError:
        return "0+unknown"


class NodeOps:
    def __init__(self, node: Any, stats: Callable[[], dict[str, int]]) -> None:
        self.node = node
        self.stats = stats  # every component's counters, merged

    def ops(self) -> list[Op]:
        return [Op("status", self.status, mesh_resource("status")),
                Op("settings", self.settings, "operator"),
                Op("invite", self.invite, "operator"),
                Op("leave", self.leave, "operator")]

    async def status(self, _: dict[str, Any]) -> Any:
        st = self.status_now()
        if REQUEST_REMOTE.get():
            del st["data_dir"]
        return st

    def status_now(self) -> dict[str, Any]:
        n = self.node
        counts: dict[str, int] = {}
        for m in n.core.member_list():
            counts[STATE_NAMES[m.state]] = counts.get(STATE_NAMES[m.state], 0) + 1
        return {
            "name": n.name, "id": n.identity.node_id, "short_id": n.identity.short,
            "address": n.advertise, "data_dir": str(n.data_dir),
            "profile": n.settings.profile, "incarnation": n.core.me.incarnation,
            "health_score": n.core.health_score, "members": counts,
            "links": len({id(v) for v in n.links.links.values()}),
            "uptime_s": round(time.time() - n.started, 1), "stats": self.stats(),
            "version": package_version(),
            "protocols": versions.describe(),
            "metrics": getattr(n, "metrics_address", ""),
            "api": getattr(n, "api_address", ""),
            "web": getattr(n, "web_address", ""),
        }

    async def settings(self, _: dict[str, Any]) -> Any:
        return as_dict(self.node.settings)

    async def invite(self, _: dict[str, Any]) -> Any:
        return self.invite_now()

    def invite_now(self) -> dict[str, Any]:
        n = self.node
        secret = format_secret(n.keyring.primary)
        root = n.auth.root_fingerprint or ""
        env = f"MESHD_SECRET={secret}" + (f" MESHD_AUTH_ROOT={root}" if root else "")
        return {"secret": secret, "address": n.advertise, "auth_root": root,
                "command": f"{env} meshd up --join {n.advertise}"}

    async def leave(self, _: dict[str, Any]) -> Any:
        trio.lowlevel.spawn_system_task(self.node.shutdown)
        return {"left": True}
