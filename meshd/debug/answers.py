"""Other nodes' answers to debug queries, checked before they are merged.

Rules:
- A member's answer is its word about itself only: every record, span and summary it sends
  is stamped with the member that answered (the node the link proved), whatever it says.
- An answer of the wrong shape is that node's error ("malformed answer"); a bad item inside
  a good answer is dropped alone. Nothing a member answers can fail a query for the others
  or reach the CLI in a shape it cannot print.
- Sizes stay within what this node would have answered itself (service.MAX_RECORDS...).
"""

from __future__ import annotations

import math
from typing import Any

from .logs import LEVELS, MAX_FIELD, MAX_FIELDS, MAX_MESSAGE
from .traces import MAX_NAME, Span, _hex

MAX_TEXT = 256


class Malformed(ValueError):
    """The answer as a whole is not what the query returns."""


def _text(v: Any, limit: int = MAX_TEXT) -> bool:
    return isinstance(v, str) and len(v) <= limit


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def record(r: Any, node: str) -> dict[str, Any] | None:
    """One log record from `node`, or None if it is not a valid one."""
    if not isinstance(r, dict) or not _number(r.get("time")) or r.get("level") not in LEVELS:
        return None
    if not all(_text(r.get(k)) for k in ("service", "instance", "trace_id")) or \
            not _text(r.get("message"), MAX_MESSAGE):
        return None
    fields = r.get("fields", {})
    if not isinstance(fields, dict) or len(fields) > MAX_FIELDS or not all(
            _text(k, 128) and _text(v, MAX_FIELD) for k, v in fields.items()):
        return None
    return {"time": float(r["time"]), "level": r["level"], "node": node,
            "service": r["service"], "instance": r["instance"], "trace_id": r["trace_id"],
            "message": r["message"], "fields": dict(fields)}


def records(value: Any, node: str, limit: int) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise Malformed("log records are a list")
    out = [r for r in (record(x, node) for x in value[:limit]) if r is not None]
    return out


def spans(value: Any, node: str, limit: int) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise Malformed("spans are a list")
    out = []
    for raw in value[:limit]:
        try:
            span = Span.from_dict(raw)
        except ValueError:
            continue
        span.node = node
        out.append(span.to_dict())
    return out


def summaries(value: Any, node: str, limit: int) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise Malformed("trace summaries are a list")
    out = []
    for s in value[:limit]:
        if not isinstance(s, dict) or not isinstance(s.get("trace_id"), str) or \
                not _hex(s["trace_id"], 32) or not _text(s.get("name"), MAX_NAME) or \
                not _text(s.get("service"), MAX_NAME) or not _number(s.get("start")) or \
                not _number(s.get("duration")) or type(s.get("status")) is not int or \
                type(s.get("spans")) is not int or not isinstance(s.get("services"), list):
            continue
        services = [x for x in s["services"][:16] if _text(x, MAX_NAME)]
        out.append({"trace_id": s["trace_id"], "name": s["name"], "service": s["service"],
                    "start": float(s["start"]), "duration": max(0.0, float(s["duration"])),
                    "status": s["status"], "spans": max(0, s["spans"]), "nodes": [node],
                    "services": services})
    return out


_SAMPLE_NUMBERS = ("time", "uptime", "cpu_seconds", "rss_bytes", "tasks", "links",
                   "store_records", "store_bytes", "services", "load1")
_ENDPOINT_NUMBERS = ("count", "errors", "sum", "mean_ms", "p50_ms", "p99_ms")


def stats(value: Any, node: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("sample"), dict) or \
            not isinstance(value.get("instances"), list):
        raise Malformed("stats are a sample and instances")
    raw = value["sample"]
    sample: dict[str, Any] = {k: raw[k] for k in _SAMPLE_NUMBERS if _number(raw.get(k))}
    if _text(raw.get("version"), 32):
        sample["version"] = raw["version"]
    members = raw.get("members")
    if isinstance(members, dict):
        sample["members"] = {k: v for k, v in list(members.items())[:8]
                             if _text(k, 16) and type(v) is int}
    instances = []
    for inst in value["instances"][:1000]:
        if not isinstance(inst, dict) or not _text(inst.get("instance")) or \
                not _text(inst.get("service"), MAX_NAME) or \
                not all(type(inst.get(k)) is int for k in ("requests", "errors",
                                                           "in_flight")) or \
                not isinstance(inst.get("endpoints"), dict):
            continue
        endpoints = {}
        for name, ep in list(inst["endpoints"].items())[:256]:
            if _text(name, MAX_NAME) and isinstance(ep, dict) and \
                    all(_number(ep.get(k)) for k in _ENDPOINT_NUMBERS):
                endpoints[name] = {k: ep[k] for k in _ENDPOINT_NUMBERS}
        instances.append({"instance": inst["instance"], "service": inst["service"],
                          "requests": inst["requests"], "errors": inst["errors"],
                          "in_flight": inst["in_flight"], "endpoints": endpoints})
    return {"node": node, "sample": sample, "instances": instances}
