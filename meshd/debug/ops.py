"""Control operations of debug: the cluster's logs, stats and traces, and services' logs.

Rules:
- debug.logs / debug.logs.follow / debug.stats / debug.trace / debug.traces read the
  cluster (resource mesh:debug, checked in "default"), checked here; the local daemon
  then asks every live member as itself (service.py: a caller's token is never sent to
  other members).
- Every answer names the nodes that did not answer ("errors": node -> why); a query is not
  an error because one node is down.
- A service's own log records arrive on its registration session (frames {"log": [...]},
  registry/service.py), so their service and instance are the session's, never claimed.
"""

from __future__ import annotations

from typing import Any

from meshd.errors import not_found
from meshd.ops import Emit, Op, mesh_resource

from .service import (
    MAX_RECORDS,
    DebugService,
    log_args,
    merge_summaries,
    ordered,
    service_arg,
    trace_args,
    trace_id_arg,
)

READ = mesh_resource("debug")


class DebugOps:
    def __init__(self, debug: DebugService) -> None:
        self.debug = debug

    def ops(self) -> list[Op]:
        return [Op("debug.logs", self.logs, READ),
                Op("debug.logs.follow", self.follow, READ, kind="stream"),
                Op("debug.stats", self.stats, READ),
                Op("debug.trace", self.trace, READ),
                Op("debug.traces", self.traces, READ)]

    async def logs(self, args: dict[str, Any]) -> Any:
        a = log_args(args)
        remote = {k: v for k, v in a.items() if v is not None}
        answers, errors = await self.debug.gather("logs", remote, only=a["node"])
        records = [r for found in answers.values() for r in found]
        records.sort(key=lambda r: r["time"])
        return {"records": records[-a["limit"]:], "errors": errors}

    async def follow(self, args: dict[str, Any], emit: Emit) -> None:
        log_args({**args, "limit": 1})
        remote = {k: v for k, v in args.items() if k in ("service", "level", "node", "since")
                  and v is not None}
        await self.debug.follow(remote, emit)

    async def stats(self, args: dict[str, Any]) -> Any:
        service = service_arg(args)
        query = {"service": service} if service else {}
        answers, errors = await self.debug.gather("stats", query)
        nodes = [answers[name] for name in sorted(answers)]
        if service:
            nodes = [n for n in nodes if n.get("instances")]
        return {"nodes": nodes, "errors": errors}

    async def trace(self, args: dict[str, Any]) -> Any:
        tid = trace_id_arg(args)
        answers, errors = await self.debug.gather("trace", {"trace_id": tid})
        spans = [s for found in answers.values() for s in found]
        spans.sort(key=lambda s: s["start"])
        if not spans:
            raise not_found(f"no node holds spans of trace {tid} (not sampled, or no longer "
                            "in the buffers)", id="meshd.debug")
        return {"trace_id": tid, "spans": spans, "errors": errors}

    async def traces(self, args: dict[str, Any]) -> Any:
        a = trace_args(args)
        query = {k: v for k, v in a.items() if v not in (None, False)}
        answers, errors = await self.debug.gather("traces", query)
        parts: dict[str, list[dict[str, Any]]] = {}
        for rows in answers.values():
            for row in rows:
                parts.setdefault(row["trace_id"], []).append(row)
        merged = ordered([merge_summaries(p) for p in parts.values()], a["slowest"])
        return {"traces": merged[:a["limit"]], "errors": errors}


__all__ = ["MAX_RECORDS", "DebugOps"]
