"""Which service and endpoint an HTTP request names: the API gateway's routing rules (sans-IO).

Rules (Micro's API rules, with exact names added):
- Fixed routes: `GET /health`, `GET /openapi.json`, `POST /rpc`, `POST /events/TOPIC`
  (`/events/a/b` is topic "a.b"; an empty segment is an empty token, which is refused).
- A first segment `v` + digits (`/v1/...`) is a version prefix: only instances whose version
  is that number or starts with it (`1`, `1.2.0`, `v1`, `v1.3`) are candidates; the rest of
  the path is routed as below.
- `/SERVICE/ENDPOINT` where ENDPOINT contains a dot names the endpoint exactly
  (`/greeter/Greeter.Hello`).
- `/SERVICE/METHOD` is endpoint `Service.Method` (the service name capitalised is the
  handler): `/greeter/hello` -> `Greeter.Hello`.
- `/SERVICE/HANDLER/METHOD` is `Handler.Method`; with more segments the leading ones are the
  service, dot-joined (`/foo/bar/baz/cat` -> service `foo.bar`, endpoint `Baz.Cat`), as Micro.
- A derived endpoint name matches a registered one ignoring case (`Greeter.hello` is found by
  `/greeter/hello`); an exact name must match exactly.
- An HTTP service (one registering an HTTP address) takes every path under `/SERVICE/`: the
  gateway proxies it, so `resolve` returns only the first segment as the service and the rest
  of the path as the upstream path.
- Segments are percent-decoded by the ASGI server before they reach here; a segment with a
  control character, or a path deeper than MAX_SEGMENTS, is not routed (404).
- GET requests of an RPC route build the JSON request from the query string: one value per
  key (repeated keys make a list), converted to the type the endpoint's request format gives
  the field (integer, number, boolean; anything else stays text).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from meshd.registry.versions import version_matches

__all__ = ["version_matches"]  # re-exported: routing's rule, kept with the registry

MAX_SEGMENTS = 16
MAX_QUERY_FIELDS = 64
_VERSION = re.compile(r"^v[0-9]+$")
_FIXED = {"health", "openapi.json", "rpc", "events"}


@dataclass(frozen=True, slots=True)
class Route:
    """What a path names. `kind`: "health", "openapi", "rpc" (POST /rpc), "event" (topic in
    `service`), "service" (an RPC endpoint or an HTTP service: `service`, candidate endpoint
    names in `endpoints`, `exact` when the path named one, `depth` the segments of the
    prefix /[vN/]SERVICE, which an HTTP service's upstream path leaves out), or "none"."""

    kind: str
    service: str = ""
    endpoints: tuple[str, ...] = ()
    exact: bool = False
    version: str = ""
    depth: int = 1
    dotted: str = ""  # with 4+ segments: Micro's service name, the leading ones dot-joined


NONE = Route("none")


def parse(path: str) -> Route:
    """The route of a request path (already percent-decoded)."""
    parts = [p for p in path.split("/") if p]
    if len(parts) > MAX_SEGMENTS or any(_bad(p) for p in parts):
        return NONE
    if not parts:
        return NONE
    head = parts[0]
    if head in _FIXED and len(parts) == 1:
        return Route({"health": "health", "openapi.json": "openapi", "rpc": "rpc"}.get(
            head, "none"))
    if head == "events":  # every segment a token, empty ones kept (the broker refuses them)
        rest = path.split("/", 2)[2] if path.count("/") >= 2 else ""
        return Route("event", endpoint_topic(rest.split("/"))) if rest else NONE
    version = ""
    if _VERSION.match(head) and len(parts) > 1:
        version, parts = head[1:], parts[1:]
    depth = 2 if version else 1
    service = parts[0]
    if len(parts) == 1:
        return Route("service", service, (), False, version, depth)
    if len(parts) == 2:
        name = parts[1]
        if "." in name:
            return Route("service", service, (name,), True, version, depth)
        return Route("service", service, (f"{_cap(service)}.{_cap(name)}",), False, version,
                     depth)
    endpoint = f"{_cap(parts[-2])}.{_cap(parts[-1])}"
    if len(parts) == 3:
        return Route("service", service, (endpoint,), False, version, depth)
    # Micro: the leading segments are the service (an HTTP service is still the first)
    return Route("service", service, (endpoint,), False, version, depth,
                 ".".join(parts[:-2]))


def upstream_path(raw_path: bytes, depth: int) -> bytes:
    """The raw (still percent-encoded) path an HTTP service is asked for: `raw_path` without
    its first `depth` segments, always starting with "/" (a trailing "/" kept)."""
    segments = raw_path.split(b"/")
    kept, skipped = [], 0
    for seg in segments[1:]:
        if skipped < depth and seg:
            skipped += 1
            continue
        if skipped < depth:  # an empty segment before the prefix ends ("//")
            continue
        kept.append(seg)
    return b"/" + b"/".join(kept)


def endpoint_topic(parts: list[str]) -> str:
    """The topic of POST /events/A/B: "A.B" (segments are topic tokens; a dotted segment is
    kept as it is)."""
    return ".".join(parts)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _bad(segment: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in segment)


def match_endpoint(route: Route, names: list[str] | set[str]) -> str | None:
    """The registered endpoint name the route names, or None."""
    for want in route.endpoints:
        if want in names:
            return want
        if not route.exact:
            low = want.lower()
            found = sorted(n for n in names if n.lower() == low)
            if found:
                return found[0]
    return None


def near(want: str, names: list[str] | set[str], n: int = 5) -> list[str]:
    """Up to `n` names close to `want`, the closest first (for a 404's hint)."""
    import difflib
    low = {name.lower(): name for name in names}
    return [low[m] for m in difflib.get_close_matches(want.lower(), list(low), n, 0.5)]


class QueryError(ValueError):
    """A query string that does not make a request (what is wrong, for a 400)."""


def query_request(query: bytes, fmt: Any) -> dict[str, Any]:
    """The JSON request a GET's query string makes, typed by the request format `fmt` (a
    describe() format; unknown fields stay text: the service checks them)."""
    try:
        pairs = parse_qsl(query.decode("utf-8"), keep_blank_values=True,
                          max_num_fields=MAX_QUERY_FIELDS, strict_parsing=False)
    except (UnicodeDecodeError, ValueError) as exc:
        raise QueryError(f"query string: {exc}") from None
    props = fmt.get("properties") if isinstance(fmt, dict) else None
    props = props if isinstance(props, dict) else {}
    request: dict[str, Any] = {}
    for key, text in pairs:
        value = _typed(text, props.get(key))
        if key in request:
            prev = request[key]
            request[key] = [*prev, value] if isinstance(prev, list) else [prev, value]
        else:
            request[key] = value
    return request


def _typed(text: str, schema: Any) -> Any:
    kind = schema.get("type") if isinstance(schema, dict) else None
    if kind == "array":
        kind = schema.get("items", {}).get("type") if isinstance(schema.get("items"), dict) \
            else None
    try:
        if kind == "integer":
            return int(text)
        if kind == "number":
            return float(text)
        if kind == "boolean":
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(text)
        if kind in ("object", "null") or (kind is None and isinstance(schema, dict)
                                          and "anyOf" in schema):
            return json.loads(text)
    except (ValueError, json.JSONDecodeError):
        raise QueryError(f"query value {text[:40]!r} is not a valid {kind or 'JSON value'}"
                         ) from None
    return text
