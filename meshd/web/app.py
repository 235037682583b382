"""The web dashboard's HTTP app: the page, its assets, and the node's op table as JSON.

Theory of operation
-------------------
The dashboard is one page (meshd/web/static/: index.html, app.js, style.css, shipped in the
package: no CDN, clusters often have no internet) that reads and operates the mesh through
one bridge to the op table every other client uses (meshd/ops.py):
- `POST /api/call` `{"op", "args"}` runs a call op and answers `{"result": ...}`, or the
  op's structured error `{"error": {"status", "code", "detail", "id"}}`;
- `POST /api/stream` `{"op", "args"}` runs a stream op (members.watch, debug.logs.follow,
  store.watch...) and answers NDJSON: `{"ok": true}` then one `{"event": ...}` line per event,
  until the page goes (or an `{"error": ...}` line: at once if the op is refused, after
  `{"ok": true}` if its handler refuses or fails, or when the token stops being valid: it
  is checked again every KEEPALIVE seconds while the stream runs).
  An operation's own failure (denied, not found, the service's error) is an answer, HTTP 200
  with the error's status in the body and in X-Meshd-Status; HTTP error statuses are the
  request's own faults (a body that is not JSON: 400, 415, 413, 405, 404 for an unknown path).
The page acts with the token it holds (from `auth.login` with an account and secret, or
pasted), sent as `Authorization: Bearer`. Every request is a remote request of that token
(ops.REQUEST_REMOTE), admitted by the table as a request of an environment through the proxy
is: the rules decide, a denial is the op's 403 naming the rule (the page shows it as
denied), and the node's operator ops are 403 (a browser is never the node's operator).
Without a token only "public" ops run (logging in).

Rules:
- No cookies: the token lives in the page's sessionStorage and travels in a header that a
  page of another site cannot make a browser send, so there is no ambient credential for
  CSRF to ride. Defence in depth: a POST must be `application/json` (415: an HTML form
  cannot send it without a preflight), and a request whose Origin is not this server's is
  refused (403).
- Every answer carries a strict Content-Security-Policy (script, style, connections and
  images from this origin only; no inline script, no framing), nosniff and no-referrer.
- Bounds: bodies at most web.max_body_bytes (413); a call at most web.timeout (504); streams
  held at once per token at most web.max_streams (429: ops.StreamSlots); a stream ends when
  the page goes. Session ops (service registration, RPC streams, tunnels) are not served
  (400). Connections are bounded by the server (meshd/gateway/server.py).
- The Host a request names must be the address it reached, localhost, 127.0.0.1, ::1 or
  one of web.hosts (403 otherwise): a page of another site that rebinds its DNS name to
  this address cannot read the dashboard or call its public ops. An Origin, when sent,
  must be that same host (http or https: a TLS-terminating proxy in front is fine).
- JSON both ways is strict: NaN and Infinity are refused in requests and never sent (a
  non-finite number goes out as null), map keys that are not text become text, and a value
  JSON has no form for is sent as its text.
- Bytes in an answer (store values, message bodies) go to the page as text when they are
  UTF-8, else as {"base64": ...}.
- Assets are read from the package once, at start, and served with ETag (304 on a match)
  and gzip when the browser accepts it.
- Whatever one request does ends that request: an op's failure is its structured error, an
  unexpected one a 500 logged here, never the listener or the node.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

import trio

from meshd import namespaces
from meshd.asgi import allow_header, non_http, require_method
from meshd.errors import MeshError, bad_request, not_found
from meshd.gateway.bodies import ClientGone, read_body
from meshd.gateway.policy import header
from meshd.ops import OpTable, RemoteRequest, StreamSlots
from meshd.settings import WebSettings

log = logging.getLogger("meshd.web")

ID = "meshd.web"
JSON = b"application/json"
NDJSON = b"application/x-ndjson"
CSP = (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       b"connect-src 'self'; font-src 'self'; form-action 'self'; base-uri 'none'; "
       b"frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
TYPES = {".html": b"text/html; charset=utf-8", ".js": b"text/javascript; charset=utf-8",
         ".css": b"text/css; charset=utf-8", ".svg": b"image/svg+xml"}
INDEX = "index.html"
KEEPALIVE = 15.0  # seconds between blank lines on a quiet stream (proxies keep it open)


@dataclass(frozen=True)
class Asset:
    body: bytes
    gzipped: bytes
    content_type: bytes
    etag: bytes

    @classmethod
    def of(cls, body: bytes, content_type: bytes) -> Asset:
        etag = b'"' + hashlib.sha256(body).hexdigest()[:20].encode() + b'"'
        return cls(body, gzip.compress(body, 9, mtime=0), content_type, etag)


def load_assets() -> dict[str, Asset]:
    """Every file of meshd/web/static, by name, read once."""
    assets: dict[str, Asset] = {}
    for item in resources.files("meshd.web").joinpath("static").iterdir():
        suffix = item.name[item.name.rfind("."):]
        if not item.is_file() or suffix not in TYPES:
            continue
        assets[item.name] = Asset.of(item.read_bytes(), TYPES[suffix])
    if INDEX not in assets:
        raise RuntimeError("the dashboard's index.html is missing from the package")
    return assets


class Dashboard:
    """The ASGI app of `meshd up --web-listen`."""

    def __init__(self, table: OpTable, settings: WebSettings,
                 stats: dict[str, int] | None = None) -> None:
        self.table = table
        self.s = settings
        self.assets = load_assets()
        self._mark_index(namespaces.check(settings.namespace))
        self.stats: dict[str, int] = stats if stats is not None else {}
        for key in ("web_requests", "web_calls", "web_errors"):
            self.stats.setdefault(key, 0)
        self.slots = StreamSlots(settings.max_streams, self.stats, "web")
        self.hosts = frozenset(h.strip().lower() for h in settings.hosts)

    def _mark_index(self, namespace: str) -> None:
        """The page opens in web.namespace: index.html carries it (a checked name: letters,
        digits and dashes only)."""
        page = self.assets[INDEX]
        body = page.body.replace(b'<html lang="en">',
                                 b'<html lang="en" data-namespace="' + namespace.encode() + b'">',
                                 1)
        self.assets[INDEX] = Asset.of(body, page.content_type)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if await non_http(scope, receive, send):  # no WebSocket: the page streams over HTTP
            return
        self.stats["web_requests"] += 1
        try:
            await self._route(scope, receive, send)
        except ClientGone:
            return
        except MeshError as exc:
            await _answer(send, exc.status, dumps({"error": exc.to_dict()}), JSON,
                          allow_header(exc))
        except Exception:
            log.exception("dashboard request failed")
            self.stats["web_errors"] += 1
            with contextlib.suppress(Exception):
                await _answer(send, 500, dumps({"error": MeshError(
                    500, "the dashboard failed on this request; see the node's log",
                    id=ID).to_dict()}), JSON)

    async def _route(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path, method = scope["path"], scope["method"]
        headers = scope.get("headers") or []
        self._check_host(headers, scope)
        if path.startswith("/api/"):
            _same_origin(headers, scope)
            if path == "/api/call":
                require_method(method, ("POST",), ID)
                await self._call(scope, receive, send)
                return
            if path == "/api/stream":
                require_method(method, ("POST",), ID)
                await self._stream(scope, receive, send)
                return
            raise not_found(f"no API {path[:80]!r}: /api/call and /api/stream", id=ID)
        require_method(method, ("GET", "HEAD"), ID)
        if path == "/health":
            await _answer(send, 200, b'{"status":"ok"}', JSON)
            return
        if path in ("/", "/index.html"):
            await self._asset(INDEX, headers, send, cache=b"no-cache")
            return
        if path.startswith("/assets/") and path[8:] in self.assets:
            await self._asset(path[8:], headers, send, cache=b"no-cache")
            return
        if path == "/favicon.ico":
            await self._asset("icon.svg", headers, send, cache=b"max-age=86400")
            return
        raise not_found(f"no page {path[:80]!r}: the dashboard is at /", id=ID)

    def _check_host(self, headers: list[Any], scope: dict[str, Any]) -> None:
        """The Host named must be one this dashboard answers to (see the module's rules)."""
        raw = header(headers, b"host")
        host = (raw or b"").decode("latin-1").strip().lower()
        if host in self.hosts:
            return
        name = _host_name(host)
        server = scope.get("server")
        own = {"localhost", "127.0.0.1", "[::1]"}
        if server:
            own.add(f"[{server[0]}]" if ":" in str(server[0]) else str(server[0]))
        if name in own or name in self.hosts:
            return
        raise MeshError(403, f"this dashboard does not answer to Host {host[:80]!r}: reach "
                             "it by its address or localhost, or name it in web.hosts", id=ID)

    async def _asset(self, name: str, headers: list[Any], send: Any, cache: bytes) -> None:
        asset = self.assets.get(name)
        if asset is None:
            raise not_found(f"no asset {name!r}", id=ID)
        common = [(b"etag", asset.etag), (b"cache-control", cache),
                  (b"vary", b"accept-encoding")]
        if header(headers, b"if-none-match") == asset.etag:
            await _answer(send, 304, b"", None, common)
            return
        accepts = header(headers, b"accept-encoding") or b""
        if b"gzip" in accepts:
            await _answer(send, 200, asset.gzipped, asset.content_type,
                          [*common, (b"content-encoding", b"gzip")])
        else:
            await _answer(send, 200, asset.body, asset.content_type, common)

    async def _request(self, scope: dict[str, Any], receive: Any
                       ) -> tuple[str, dict[str, Any], str | None]:
        """The op's name, its args and the caller's token of an /api request."""
        headers = scope.get("headers") or []
        kind = (header(headers, b"content-type") or b"").split(b";")[0].strip().lower()
        if kind != JSON:
            raise MeshError(415, "send the request as application/json", id=ID)
        body = await read_body(scope, receive, self.s.max_body_bytes, self.s.read_timeout)
        try:
            req = json.loads(body, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            raise bad_request("the body is not JSON", id=ID) from None
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            raise bad_request('send {"op": NAME, "args": {...}}', id=ID)
        args = req.get("args")
        args = {} if args is None else args
        if not isinstance(args, dict):
            raise bad_request("args must be an object", id=ID)
        namespaces.check(args.get("namespace"))
        auth = header(headers, b"authorization") or b""
        token = auth[7:].strip().decode("latin-1") if auth[:7].lower() == b"bearer " else ""
        return req["op"], args, token or None

    def _op(self, name: str) -> Any:
        op = self.table.get(name)
        if op is None:
            raise not_found(f"this node has no operation {name[:64]!r}", id=ID)
        return op

    async def _call(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        name, args, token = await self._request(scope, receive)
        self.stats["web_calls"] += 1
        try:
            op = self._op(name)
            if op.kind != "call":
                raise bad_request(f"{op.name} is a {op.kind}: POST it to /api/stream"
                                  if op.kind == "stream" else
                                  f"{op.name} is a session, which the dashboard does not run",
                                  id=ID)
            with _remote(token, scope):
                self.table.admit(op, args)
                with trio.move_on_after(self.s.timeout) as waited:
                    result = await op.handler(args)
            if waited.cancelled_caught:
                raise MeshError(504, f"{op.name} took over {self.s.timeout:g} s", id=ID)
        except MeshError as exc:
            await _op_error(send, exc)
            return
        await _answer(send, 200, dumps({"result": result}), JSON)

    async def _stream(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        name, args, token = await self._request(scope, receive)
        try:
            op = self._op(name)
            if op.kind != "stream":
                raise bad_request(f"{op.name} is not a stream: POST it to /api/call", id=ID)
            with _remote(token, scope):
                self.table.admit(op, args)
                with self.slots.hold():
                    await send({"type": "http.response.start", "status": 200,
                                "headers": [(b"content-type", NDJSON),
                                            (b"cache-control", b"no-store"),
                                            *SECURITY_HEADERS]})
                    await send({"type": "http.response.body", "body": b'{"ok":true}\n',
                                "more_body": True})
                    await self._run_stream(op, args, receive, send)
        except MeshError as exc:  # refused before it started
            await _op_error(send, exc, NDJSON)

    async def _run_stream(self, op: Any, args: dict[str, Any], receive: Any,
                          send: Any) -> None:
        async def emit(item: Any) -> None:
            await send({"type": "http.response.body", "body": dumps({"event": item}) + b"\n",
                        "more_body": True})

        async def until_gone(scope: trio.CancelScope) -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            scope.cancel()

        async def keepalive() -> None:
            while True:
                await trio.sleep(KEEPALIVE)
                self.table.admit(op, args)  # the token still valid, the rules still allowing
                await send({"type": "http.response.body", "body": b"\n", "more_body": True})

        last = b""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(until_gone, nursery.cancel_scope)
                nursery.start_soon(keepalive)
                await op.handler(args, emit)
                nursery.cancel_scope.cancel()
        except MeshError as exc:
            last = dumps({"error": exc.to_dict()}) + b"\n"
        except BaseExceptionGroup as group:
            gone, rest = group.split((ClientGone, trio.BrokenResourceError,
                                      trio.ClosedResourceError))
            if rest is not None:
                mesh, other = rest.split(MeshError)
                if other is not None:
                    raise other from None
                last = dumps({"error": mesh.exceptions[0].to_dict()}) + b"\n"  # type: ignore
            elif gone is not None:
                raise ClientGone from None
        await send({"type": "http.response.body", "body": last, "more_body": False})


def dumps(value: Any) -> bytes:
    """JSON for the page (strict: see the module's rules). Bytes (store values, message
    bodies) as text when they are UTF-8, else {"base64": ...}, so the page shows what was
    written and knows binary for what it is."""
    return json.dumps(_plain(value), separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(_plain(k)): _plain(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(raw).decode()}
    return str(value)


def _host_name(host: str) -> str:
    """A Host header's name without its port: "[::1]:8080" -> "[::1]", "a:80" -> "a"."""
    if host.startswith("["):
        end = host.find("]")
        return host[:end + 1] if end > 0 else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _remote(token: str | None, scope: dict[str, Any]) -> RemoteRequest:
    """The block runs as a remote request of `token` (none: only public ops)."""
    client = scope.get("client")
    return RemoteRequest(token, f"web:{client[0] if client else '?'}")


def _same_origin(headers: list[Any], scope: dict[str, Any]) -> None:
    """A browser request from a page of another origin is refused (no credential rides it
    anyway: defence in depth). Requests without Origin (curl, same-origin GETs) pass."""
    origin = header(headers, b"origin")
    if origin is None:
        return
    host = header(headers, b"host") or b""
    if origin not in (b"http://" + host, b"https://" + host):
        raise MeshError(403, "the dashboard's API answers its own pages only", id=ID)


async def _op_error(send: Any, exc: MeshError, content_type: bytes = JSON) -> None:
    """An operation's own failure (denied, not found, the service's error): the request
    itself went through, so HTTP 200 with the structured error, its status in the body and
    in X-Meshd-Status (a browser logs every non-2xx fetch as a console error, and a denial
    is an answer the page shows, not a fault)."""
    body = dumps({"error": exc.to_dict()}) + (b"\n" if content_type == NDJSON else b"")
    await _answer(send, 200, body, content_type,
                  [(b"x-meshd-status", str(exc.status).encode())])


async def _answer(send: Any, status: int, body: bytes, content_type: bytes | None,
                  extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-length", str(len(body)).encode()), *SECURITY_HEADERS,
               *(extra or [])]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    if content_type == JSON:
        headers.append((b"cache-control", b"no-store"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
