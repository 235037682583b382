"""The API gateway's OpenAPI 3.1 document, built from the registry's instance records (sans-IO).

Rules:
- Fixed routes are always there: `GET /health`, `GET /openapi.json`, `POST /rpc`,
  `POST /events/{topic}`. Every operation lists the gateway's error answers (400, 401, 403,
  404, 408, 413, 429, 500, 503) as `components.schemas.Error`, the shape of
  MeshError.to_dict(). Anyone may call (`security` allows no credentials): the rules decide.
- An RPC endpoint is `/{service}/{endpoint}` under its exact name: `post` with its request
  format as the JSON body (required unless the format is "any") and its response format as
  the 200. A `get` is added when the request is an object of scalar fields only (string,
  integer, number, boolean), at most MAX_QUERY_FIELDS of them, every required one listed:
  one query parameter per field, as the gateway reads a GET's query string. A stream
  endpoint answers `get` and `post` with server-sent events (a WebSocket upgrade is also
  accepted).
- An HTTP service (an instance's metadata gives an "http" address) is documented only as
  the proxied `/{service}/{path}` (get, post, put, patch, delete): the gateway sends every
  path under `/{service}/` to it, so its RPC endpoints are not routable by path. Access to it
  is the resource `service:NAME:http`: `allowed(service, "http")`.
- The instances of a service are read newest version first (version, then id, descending
  string order); endpoints are the union by name, the first instance naming one giving its
  formats.
- Left out: names a path cannot carry (empty, over MAX_NAME, "." or "..", containing
  `{ } / ? # % \\`, whitespace or control characters), endpoint names without a dot (the
  gateway reads a dotless segment as a method of the service's handler, so only POST /rpc
  reaches them), services the gateway routes elsewhere (`events`, `v` + digits: a version
  prefix), and endpoints (or HTTP services) that `allowed` refuses.
- Formats come from service processes and are untrusted: only type, title, description,
  properties, required, items, additionalProperties, anyOf, enum, format and default are
  kept; a schema that is not a map, deeper than MAX_DEPTH or beyond MAX_NODES per format
  becomes {} (any); a malformed keyword is dropped alone; prose is cut to MAX_TEXT
  characters; `default` stays only where it is a scalar the schema certainly accepts. The
  document is a valid OpenAPI 3.1 document whatever the formats hold.
- Deterministic: services and endpoints sorted by name; operationIds are
  `{service}.{endpoint}` (`.get` for the GET of an endpoint with both), characters outside
  [A-Za-z0-9_.-] replaced by "_", made unique with a numeric suffix.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any

MAX_DEPTH = 12
MAX_NODES = 2000
MAX_TEXT = 200
MAX_NAME = 128  # service and endpoint names, as the registry takes them
MAX_ENUM = 100
MAX_QUERY_FIELDS = 64  # what the gateway reads of a query string
MAX_INT = 2**63

KEYWORDS = ("type", "title", "description", "properties", "required", "items",
            "additionalProperties", "anyOf", "enum", "format", "default")  # all a format keeps
JSON_TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
SCALARS = frozenset({"string", "integer", "number", "boolean"})
HTTP_METHODS = ("get", "post", "put", "patch", "delete")
HTTP_ENDPOINT = "http"  # the endpoint part of an HTTP service's resource, service:NAME:http
ERRORS = {
    400: "The request is malformed or does not fit the endpoint's request format.",
    401: "The credentials given are not valid.",
    403: "The caller may not call this.",
    404: "No such route, service or endpoint.",
    408: "The call timed out.",
    413: "The request is too large.",
    429: "Too many requests: wait as long as Retry-After says.",
    500: "The service or the gateway failed.",
    503: "No instance of the service can be reached.",
}
ERROR_REF = "#/components/schemas/Error"
_UNSAFE = re.compile(r"[{}/?#%\\]")
_VERSION_PREFIX = re.compile(r"^v[0-9]+$")
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def _meshd_version() -> str:
    try:
        return metadata.version("meshd")
    except metadata.PackageNotFoundError:
        return "0+unknown"


VERSION = _meshd_version()

_DESCRIPTION = (
    "The meshd API gateway. Routes follow Micro's API rules: `/SERVICE/ENDPOINT` calls the "
    "endpoint of that exact name (as listed here), `/SERVICE/METHOD` calls `Service.Method`, "
    "`/SERVICE/HANDLER/METHOD` calls `Handler.Method`, and a leading `/vN/` picks instances "
    "of version N. `POST /rpc` names the service and endpoint in its body. HTTP services are "
    "proxied: every path under `/SERVICE/` goes to the service. Errors are JSON "
    "`{id, code, detail, status}`. Only what the caller may call is listed."
)


Allowed = Callable[[str, str], bool]


def build(services: Mapping[str, list[dict[str, Any]]], *, title: str = "meshd API gateway",
          version: str = VERSION, server_url: str | None = None,
          allowed: Allowed | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document for `services` (name -> instance records), showing only what
    `allowed(service, endpoint)` lets through when it is given."""
    ids = _OperationIds()
    paths = _fixed_paths(ids)
    names = sorted(n for n in services if isinstance(n, str) and routable_service(n))
    for service in names:
        instances = _instances(services[service])
        if _is_http(instances):
            if allowed is None or allowed(service, HTTP_ENDPOINT):
                paths[f"/{service}/{{path}}"] = _http_service(service, ids)
            continue
        for name, endpoint in sorted(_endpoints(instances).items()):
            if routable_endpoint(name) and (allowed is None or allowed(service, name)):
                paths[f"/{service}/{name}"] = _endpoint(service, name, endpoint, ids)
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": _DESCRIPTION},
    }
    if server_url is not None:
        doc["servers"] = [{"url": server_url}]
    doc["paths"] = paths
    doc["components"] = _components()
    doc["security"] = [{}, {"bearer": []}, {"cookie": []}]
    return doc


# --- names


def _path_safe(name: str) -> bool:
    return (0 < len(name) <= MAX_NAME and name not in (".", "..")
            and not _UNSAFE.search(name)
            and not any(c.isspace() or not c.isprintable() for c in name)
            and _encodable(name))


def routable_service(name: str) -> bool:
    """Whether `/{name}/...` reaches service `name` through the gateway."""
    return _path_safe(name) and name != "events" and not _VERSION_PREFIX.match(name)


def routable_endpoint(name: str) -> bool:
    """Whether `/{service}/{name}` names endpoint `name` exactly."""
    return _path_safe(name) and "." in name


class _OperationIds:
    """Unique, safe operationIds for one document."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def take(self, raw: str) -> str:
        base = _ID_UNSAFE.sub("_", raw)
        found, n = base, 1
        while found in self.used:
            n += 1
            found = f"{base}_{n}"
        self.used.add(found)
        return found


# --- instance records


def _text_of(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _instances(records: Any) -> list[dict[str, Any]]:
    """The well-formed records of a service, newest version first."""
    if not isinstance(records, list | tuple):
        return []
    good = [r for r in records if isinstance(r, dict)]
    return sorted(good, key=lambda r: (_text_of(r.get("version")), _text_of(r.get("id"))),
                  reverse=True)


def _is_http(instances: list[dict[str, Any]]) -> bool:
    return any(isinstance(r.get("metadata"), dict) and r["metadata"].get("http")
               for r in instances)


def _endpoints(instances: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Endpoint name -> its record, the first instance naming it winning."""
    found: dict[str, dict[str, Any]] = {}
    for record in instances:
        endpoints = record.get("endpoints")
        if not isinstance(endpoints, list):
            continue
        for ep in endpoints:
            if isinstance(ep, dict) and isinstance(ep.get("name"), str):
                found.setdefault(ep["name"], ep)
    return found


# --- untrusted formats


class _Budget:
    """How many more schema nodes one format may add."""

    def __init__(self, nodes: int) -> None:
        self.left = nodes

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


def schema(fmt: Any, *, max_nodes: int = MAX_NODES) -> dict[str, Any]:
    """A safe JSON Schema for an untrusted request or response format (None: any)."""
    if not isinstance(fmt, dict):
        return {}
    return _schema(fmt, 1, _Budget(max_nodes))


def _sub(node: Any, depth: int, budget: _Budget) -> Any:
    """A subschema: true and false are schemas there too."""
    if isinstance(node, bool):
        return node if budget.take() else {}
    return _schema(node, depth, budget)


def _schema(node: Any, depth: int, budget: _Budget) -> dict[str, Any]:
    if not isinstance(node, dict) or depth >= MAX_DEPTH or not budget.take():
        return {}
    out: dict[str, Any] = {}
    kind = _type(node.get("type"))
    if kind is not None:
        out["type"] = kind
    for key in ("title", "description"):
        text = _prose(node.get(key))
        if text is not None:
            out[key] = text
    props = node.get("properties")
    if isinstance(props, dict):
        out["properties"] = _properties(props, depth, budget)
    required = node.get("required")
    if isinstance(required, list):
        out["required"] = _required(required, budget)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict | bool):
            out[key] = _sub(node[key], depth + 1, budget)
    options = node.get("anyOf")
    if isinstance(options, list):
        kept = [_sub(o, depth + 1, budget) for o in options[:MAX_NODES] if budget.left > 0]
        if kept:
            out["anyOf"] = kept
    values = _enum(node.get("enum"), budget)
    if values:
        out["enum"] = values
    fmt = node.get("format")
    if isinstance(fmt, str) and len(fmt) <= MAX_TEXT and _encodable(fmt):
        out["format"] = fmt
    if "default" in node and _fits(node["default"], out):
        out["default"] = node["default"]
    return out


def _type(value: Any) -> str | list[str] | None:
    if isinstance(value, str):
        return value if value in JSON_TYPES else None
    if not isinstance(value, list) or not 0 < len(value) <= len(JSON_TYPES) \
            or not all(isinstance(t, str) and t in JSON_TYPES for t in value):
        return None
    return list(dict.fromkeys(value))


def _properties(props: dict[Any, Any], depth: int, budget: _Budget) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, sub in props.items():
        if budget.left <= 0:
            break
        if isinstance(name, str) and len(name) <= MAX_TEXT and _encodable(name):
            out[name] = _sub(sub, depth + 1, budget)
    return out


def _required(names: list[Any], budget: _Budget) -> list[str]:
    out: dict[str, None] = {}
    for name in names:
        if not budget.take():
            break
        if isinstance(name, str) and len(name) <= MAX_TEXT and _encodable(name):
            out[name] = None
    return list(out)


def _enum(values: Any, budget: _Budget) -> list[Any]:
    if not isinstance(values, list):
        return []
    out: list[Any] = []
    seen: set[tuple[str, Any]] = set()
    for v in values[:MAX_ENUM]:
        if not budget.take():
            break
        if _scalar(v) and (type(v).__name__, v) not in seen:
            seen.add((type(v).__name__, v))
            out.append(v)
    return out


def _scalar(v: Any) -> bool:
    """A JSON scalar that serialises anywhere (finite, bounded, valid text)."""
    if v is None or isinstance(v, bool):
        return True
    if isinstance(v, int):
        return -MAX_INT < v < MAX_INT
    if isinstance(v, float):
        return math.isfinite(v)
    return isinstance(v, str) and len(v) <= MAX_TEXT and _encodable(v)


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    return "number" if isinstance(v, float) else "string"


def _fits(value: Any, node: dict[str, Any]) -> bool:
    """Whether a default certainly fits the (sanitized) schema: scalars only, checked
    against type and enum; a node with anyOf or format keeps no default."""
    if not _scalar(value) or "anyOf" in node or "format" in node:
        return False
    kind = _json_type(value)
    types = node.get("type")
    if types is not None:
        allowed = {types} if isinstance(types, str) else set(types)
        if kind not in allowed and not (kind == "integer" and "number" in allowed):
            return False
    if "enum" in node:
        return any(type(e) is type(value) and e == value for e in node["enum"])
    return True


def _prose(value: Any) -> str | None:
    if not isinstance(value, str) or not _encodable(value):
        return None
    return value[:MAX_TEXT]


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return False
    return True


# --- operations


def _errors() -> dict[str, Any]:
    return {str(status): {"description": text,
                          "content": {"application/json": {"schema": {"$ref": ERROR_REF}}}}
            for status, text in ERRORS.items()}


def _json(description: str, body: Any) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": body}}}


def _query_parameters(request: dict[str, Any]) -> list[dict[str, Any]] | None:
    """One query parameter per field if the request is an object of scalar fields only."""
    props = request.get("properties")
    if request.get("type") != "object" or not isinstance(props, dict) \
            or len(props) > MAX_QUERY_FIELDS:
        return None
    if not all(isinstance(p, dict) and p.get("type") in SCALARS and "anyOf" not in p
               for p in props.values()):
        return None
    required = request.get("required", [])
    if any(name not in props for name in required):
        return None
    return [{"name": name, "in": "query", "required": name in required,
             "schema": copy.deepcopy(p)} for name, p in props.items()]


def _endpoint(service: str, name: str, endpoint: dict[str, Any],
              ids: _OperationIds) -> dict[str, Any]:
    request = schema(endpoint.get("request"))
    response = schema(endpoint.get("response"))
    stream = endpoint.get("stream") is True
    query = _query_parameters(request)
    if stream:
        summary = f"Stream {name} of {service}"
        ok: dict[str, Any] = {
            "description": "Server-sent events, one per message of the stream. A WebSocket "
                           "upgrade is also accepted: requests and responses are then JSON "
                           "messages.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
    else:
        summary = f"Call {name} of {service}"
        ok = _json("The endpoint's response.", response)
    item: dict[str, Any] = {}
    if stream or query is not None:
        get: dict[str, Any] = {"tags": [service], "summary": summary,
                               "operationId": ids.take(f"{service}.{name}.get")}
        if query:
            get["parameters"] = query
        get["responses"] = {"200": copy.deepcopy(ok), **_errors()}
        item["get"] = get
    item["post"] = {
        "tags": [service], "summary": summary, "operationId": ids.take(f"{service}.{name}"),
        "requestBody": {"required": request != {},
                        "content": {"application/json": {"schema": request}}},
        "responses": {"200": ok, **_errors()},
    }
    return item


def _http_service(service: str, ids: _OperationIds) -> dict[str, Any]:
    item: dict[str, Any] = {}
    for method in HTTP_METHODS:
        op: dict[str, Any] = {
            "tags": [service],
            "summary": f"{method.upper()} a path of HTTP service {service}",
            "description": f"Proxied to the service: every path under /{service}/, however "
                           "deep, is the service's own.",
            "operationId": ids.take(f"{service}.{method}"),
            "parameters": [{"name": "path", "in": "path", "required": True,
                            "description": f"The path under /{service}/.",
                            "schema": {"type": "string"}}],
            "x-meshd-http-service": True,
        }
        if method in ("post", "put", "patch"):
            op["requestBody"] = {"required": False, "description": "Passed on as it is.",
                                 "content": {"*/*": {"schema": {}}}}
        op["responses"] = {"default": {"description": "the service's own response"},
                           **_errors()}
        item[method] = op
    return item


# A topic to publish to, as the broker checks it (meshd/broker/subjects.py): tokens of 1..255
# characters, none whitespace (Python's str.isspace), a control character (C0, DEL, C1),
# "*" or ">", separated by "." or "/" (the path's segments); at most 64 tokens.
_TOKEN = ("[^\\u0000-\\u0020\\u007f-\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f"
          "\\u205f\\u3000./*>]{1,255}")
TOPIC_PATTERN = f"^{_TOKEN}([./]{_TOKEN}){{0,63}}$"


def _fixed_paths(ids: _OperationIds) -> dict[str, Any]:
    def op(op_id: str, summary: str, responses: dict[str, Any], **more: Any) -> dict[str, Any]:
        return {"tags": ["gateway"], "summary": summary, "operationId": ids.take(op_id),
                **more, "responses": {**responses, **_errors()}}

    health = {"type": "object", "properties": {"status": {"type": "string", "enum": ["ok"]},
                                                "node": {"type": "string"}},
              "required": ["status", "node"]}
    rpc = {"type": "object",
           "properties": {"service": {"type": "string"}, "endpoint": {"type": "string"},
                          "request": {},
                          "timeout": {"type": "number", "exclusiveMinimum": 0,
                                      "maximum": 3600, "description": "seconds"}},
           "required": ["service", "endpoint"]}
    published = {"type": "object", "properties": {"id": {"type": "string"}},
                 "required": ["id"]}
    return {
        "/health": {"get": op("health", "Whether the gateway's node is up",
                              {"200": _json("The node is up.", health)})},
        "/openapi.json": {"get": op("openapi", "This document",
                                    {"200": _json("What the caller may call.",
                                                  {"type": "object"})})},
        "/rpc": {"post": op(
            "rpc", "Call any endpoint, named in the body",
            {"200": _json("The endpoint's response.", {})},
            requestBody={"required": True, "content": {"application/json": {"schema": rpc}}})},
        "/events/{topic}": {"post": op(
            "publish", "Publish an event to a topic",
            {"202": _json("Published.", published)},
            parameters=[{"name": "topic", "in": "path", "required": True,
                         "description": "dot-separated tokens (/events/a/b is a.b)",
                         "schema": {"type": "string", "maxLength": 256,
                                    "pattern": TOPIC_PATTERN}}],
            requestBody={"required": False,  # an event may be only its topic: {} then
                         "content": {"application/json": {"schema": {}}}})},
    }


def _components() -> dict[str, Any]:
    error = {"type": "object",
             "properties": {"id": {"type": "string", "description": "who raised it"},
                            "code": {"type": "string", "description": "a short word"},
                            "detail": {"type": "string", "description": "one sentence"},
                            "status": {"type": "integer"}},
             "required": ["status", "detail"]}
    return {
        "schemas": {"Error": error},
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "cookie": {"type": "apiKey", "in": "cookie", "name": "meshd_token"},
        },
    }
