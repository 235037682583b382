"""The API gateway's ASGI app: one HTTP entry point to every service of the mesh.

Theory of operation
-------------------
A request is decided in a fixed order, each step able to answer on its own: requests in
flight (503 beyond api.max_in_flight), CORS preflight, the caller's token (gateway/policy.py),
rate limits (429), the namespace (X-Meshd-Namespace, else api.namespace), then the route
(gateway/routes.py): a fixed route, an HTTP service (proxied by gateway/upstream.py), a
streaming endpoint (Server-Sent Events, or WebSocket on an upgrade) or an RPC endpoint. Calls
and publishes run the node's own operations ("rpc.call", "broker.publish", "rpc.stream" on
the op table) as a remote request: with the caller's token, or as nobody (the public scope)
without one, never as this node. The rules are checked where the service runs, as for any
caller.

Rules:
- Every answer is JSON (except SSE and proxied HTTP services); an error is the structured
  error {"id", "code", "detail", "status"} with its status as the HTTP status, and a 404 for
  an unknown service or endpoint adds "near": the closest names.
- Bodies: application/json (or none, or any +json type); an RPC endpoint also takes a form
  (application/x-www-form-urlencoded, typed like a query string); another type is a 415. A
  body over api.max_body_bytes is a 413 as soon as it is seen to be (Content-Length, or the
  bytes read so far); a body that stops arriving for api.read_timeout is a 408. JSON is
  decoded by meshd.wire (bounded depth).
- Time: a call gets X-Meshd-Timeout seconds (or /rpc's "timeout") up to api.max_timeout,
  else api.timeout; the service's 408 comes back as a 408.
- Every response carries X-Request-Id (the client's if sane, else a new one, also passed to
  the service in the call's metadata) and, with tracing on, `traceparent` of the gateway's
  span of the request (its child spans are the call's); a client's traceparent is the
  parent. With api.access_log each request is one log record (method, path, status, time,
  caller, request id) in the node's logs.
- Method rules: an RPC endpoint takes POST (JSON body) and GET (query string); others are 405
  with Allow. /rpc and /events/TOPIC take POST only; /health and /openapi.json GET.
- Nothing a request does can end the listener or the node: an unexpected exception is a 500
  with a generic detail (the traceback stays in the node's log).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from meshd import namespaces, wire
from meshd.asgi import Receive, Scope, Send, allow_header, require_method
from meshd.debug import traces
from meshd.errors import MeshError, bad_request
from meshd.ops import RemoteRequest
from meshd.settings import ApiSettings

from . import openapi, policy, routes
from .bodies import ClientGone, dumps, read_body
from .streaming import serve_sse, serve_websocket_stream

log = logging.getLogger("meshd.api")
# JSON nesting of a request body: what a body may have through the control socket, whose
# envelope takes the rest of meshd.wire's 32 levels (a service decodes its frames no deeper)
MAX_DEPTH = 28
ID = "meshd.api"
JSON = b"application/json"
MAX_TOPIC = 256  # characters: at most the broker's 1024 bytes of UTF-8, whatever they are
FORM = b"application/x-www-form-urlencoded"
BODY_SIZE = "meshd.body_size"  # in the scope: the request body's bytes, once read


class Response:
    """The answer being written for one request: its status once started, and the headers
    every answer carries (request id, traceparent, CORS)."""

    def __init__(self, send: Send, request_id: str) -> None:
        self.send = send
        self.status = 0
        self.caller = "-"  # "token" or "public" once known (the access log's)
        self.headers: list[tuple[bytes, bytes]] = [(b"x-request-id", request_id.encode())]

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        await self.send({"type": "http.response.start", "status": status,
                         "headers": [*headers, *self.headers]})

    async def body(self, data: bytes, more: bool = False) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": more})

    async def json(self, status: int, payload: Any, *extra: tuple[bytes, bytes]) -> None:
        data = dumps(payload)
        await self.start(status, [(b"content-type", JSON),
                                  (b"content-length", str(len(data)).encode()), *extra])
        await self.body(data)

    async def error(self, exc: MeshError, retry_after: bytes | None = None) -> None:
        retry_after = retry_after or getattr(exc, "retry_after", None)
        extra = [(b"retry-after", retry_after)] if retry_after else []
        extra += allow_header(exc)
        await self.json(exc.status, exc.to_dict(), *extra)


class Gateway:
    """The ASGI app. `node` gives the op table, registry, auth, tracer and name; `upstream`
    proxies HTTP services (gateway/upstream.py)."""

    def __init__(self, node: Any, settings: ApiSettings, upstream: Any = None) -> None:
        self.node = node
        self.s = settings
        self.upstream = upstream
        self.cors = policy.Cors.of(settings.cors_origins)
        self.limits = policy.RateLimits(settings.rate_per_token, settings.rate_per_address)
        self.in_flight = 0
        self.stats = {"api_requests": 0, "api_errors": 0, "api_rejected": 0,
                      "api_in_flight_refused": 0, "api_rate_limited": 0}

    # --- entry ------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            from meshd.asgi import non_http
            await non_http(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        headers = scope.get("headers") or []
        rid = policy.request_id(headers)
        resp = Response(send, rid)
        self.stats["api_requests"] += 1
        if self.in_flight >= self.s.max_in_flight:
            self.stats["api_in_flight_refused"] += 1
            await resp.error(MeshError(503, "too many requests in flight; retry", id=ID),
                             retry_after=b"1")
            return
        self.in_flight += 1
        try:
            await self._serve(scope, receive, resp)
        except MeshError as exc:
            if resp.status == 0:
                await resp.error(exc)
        except ClientGone:
            raise  # the server ends the connection; nothing to log
        except Exception:
            log.exception("api request %s %s failed", scope.get("method"), scope.get("path"))
            if resp.status == 0:
                await resp.error(MeshError(500, "the gateway failed on this request (see the "
                                                "node's log)", id=ID))
        finally:
            self.in_flight -= 1
            if resp.status >= 400:
                self.stats["api_errors"] += 1
            if self.s.access_log:
                log.info("api %s %s status=%d ms=%.1f caller=%s client=%s request_id=%s",
                         scope.get("method"), _logged_path(scope), resp.status,
                         (time.perf_counter() - t0) * 1000, resp.caller, _client(scope), rid)

    # --- deciding ---------------------------------------------------------------------------

    async def _serve(self, scope: Scope, receive: Receive, resp: Response) -> None:
        """Answer one request."""
        headers = scope.get("headers") or []
        method = scope["method"]
        origin = policy.header(headers, b"origin")
        if origin is not None:
            text = origin.decode("latin-1")
            if method == "OPTIONS" and \
                    policy.header(headers, b"access-control-request-method") is not None:
                allowed = self.cors.preflight(text, headers)
                if allowed is None:
                    raise MeshError(403, f"origin {text[:100]!r} is not allowed "
                                         "(api.cors_origins)", id=ID)
                await resp.start(204, [(b"content-length", b"0"), *allowed])
                await resp.body(b"")
                return
            resp.headers.extend(self.cors.allow(text))
        token = self._token(scope, headers)
        resp.caller = "token" if token else "public"
        self._rate_limit(token, scope)
        ns = self._namespace(headers)
        route = routes.parse(scope.get("path", ""))
        meta = {"x-request-id": resp.headers[0][1].decode()}
        tp = policy.header(headers, b"traceparent")
        if tp is not None and traces.parse(tp.decode("latin-1")) is not None:
            meta[traces.TRACEPARENT] = tp.decode("latin-1")
        if route.kind == "health":
            require_method(method, ("GET", "HEAD"), ID)
            await resp.json(200, {"status": "ok", "node": self.node.name})
        elif route.kind == "openapi":
            require_method(method, ("GET", "HEAD"), ID)
            await resp.json(200, self._openapi(token, ns, scope))
        elif route.kind == "rpc":
            require_method(method, ("POST",), ID)
            await self._rpc(scope, receive, resp, token, ns, meta)
        elif route.kind == "event":
            require_method(method, ("POST",), ID)
            await self._event(scope, receive, resp, token, ns, route.service, meta)
        elif route.kind == "service":
            await self._service(scope, receive, resp, token, ns, route, meta)
        else:
            raise MeshError(404, "no route: use /SERVICE/ENDPOINT, /rpc, /events/TOPIC, "
                                 "/openapi.json or /health", id=ID)

    def _token(self, scope: Scope, headers: Any) -> str | None:
        """The caller's token (policy.py); the cookie's only from this origin or a listed
        one."""
        token, cookie = policy.credentials(headers)
        if cookie and policy.cross_site(headers, scope.get("scheme", "http"), self.cors):
            raise MeshError(403, "a request from another site may not use the meshd_token "
                                 "cookie (send Authorization: Bearer, or list the site in "
                                 "api.cors_origins)", id=ID)
        return token

    def _rate_limit(self, token: str | None, scope: Scope) -> None:
        wait = self.limits.wait(token, _client(scope), trio.current_time())
        if wait:
            self.stats["api_rate_limited"] += 1
            exc = MeshError(429, f"rate limit: retry in {wait:.1f} s", id=ID)
            exc.retry_after = policy.retry_after(wait)  # type: ignore[attr-defined]
            raise exc

    def _namespace(self, headers: Any) -> str:
        given = policy.header(headers, b"x-meshd-namespace")
        if given is None:
            return self.s.namespace
        return namespaces.check(given.decode("latin-1"))

    def _timeout(self, headers: Any, asked: Any = None) -> float:
        if asked is None:
            given = policy.header(headers, b"x-meshd-timeout")
            if given is not None:
                try:
                    asked = float(given)
                except ValueError:
                    raise bad_request("X-Meshd-Timeout must be seconds", id=ID) from None
        if asked is None:
            return self.s.timeout
        if isinstance(asked, bool) or not isinstance(asked, int | float) or not asked > 0:
            raise bad_request("timeout must be a number of seconds above 0", id=ID)
        return float(min(asked, self.s.max_timeout))

    # --- routes -----------------------------------------------------------------------------

    async def _rpc(self, scope: Scope, receive: Receive, resp: Response, token: str | None,
                   ns: str, meta: dict[str, str]) -> None:
        req = await self._json_body(scope, receive)
        if not isinstance(req, dict) or not isinstance(req.get("service"), str) \
                or not isinstance(req.get("endpoint"), str):
            raise bad_request('POST /rpc takes {"service", "endpoint", "request", "timeout"}',
                              id=ID)
        timeout = self._timeout(scope["headers"], req.get("timeout"))
        reply = await self._traced_call(token, scope, meta, req["service"], req["endpoint"],
                                        {"service": req["service"],
                                         "endpoint": req["endpoint"],
                                         "body": req.get("request", {}), "timeout": timeout,
                                         "namespace": ns}, resp)
        await resp.json(200, reply)

    async def _event(self, scope: Scope, receive: Receive, resp: Response, token: str | None,
                     ns: str, topic: str, meta: dict[str, str]) -> None:
        if len(topic) > MAX_TOPIC:
            raise bad_request(f"a topic through the gateway is at most {MAX_TOPIC} characters",
                              id=ID)
        body = await self._json_body(scope, receive)
        headers = {"x-request-id": meta["x-request-id"]}
        if traces.TRACEPARENT in meta:
            headers[traces.TRACEPARENT] = meta[traces.TRACEPARENT]
        result = await self._as_caller(token, scope, "broker.publish",
                                       {"topic": topic, "body": body, "namespace": ns,
                                        "headers": headers})
        await resp.json(202, {"id": result.get("id") if isinstance(result, dict) else None,
                              "topic": topic})

    async def _service(self, scope: Scope, receive: Receive, resp: Response,
                       token: str | None, ns: str, route: routes.Route,
                       meta: dict[str, str]) -> None:
        registry = self.node.registry
        instances = [i for i in registry.instances(route.service, ns)
                     if routes.version_matches(route.version, i.get("version", ""))]
        http = [i for i in instances if (i.get("metadata") or {}).get("http")]
        if http and self.upstream is not None:
            await self.upstream.proxy(scope, receive, resp, http, route, token, meta)
            return
        service = route.service
        if route.dotted:  # Micro: /foo/bar/baz/cat is service foo.bar when there is one
            dotted = [i for i in registry.instances(route.dotted, ns)
                      if routes.version_matches(route.version, i.get("version", ""))]
            if dotted:
                service, instances = route.dotted, dotted
        if not instances:  # near names only for a caller who may list the services
            names = {i["service"] for i in registry.instances(None, ns)} \
                if self.node.auth.may_read_services(token, ns) else set()
            raise _NotFound(f"no service {service!r}"
                            + (f" of version {route.version}" if route.version else "")
                            + ("" if ns == namespaces.DEFAULT else f" in namespace {ns!r}"),
                            routes.near(service, names))
        eps = {e["name"]: e for i in instances for e in i.get("endpoints", [])}
        name = routes.match_endpoint(route, set(eps))
        if name is None:
            want = route.endpoints[0] if route.endpoints else ""
            listed = self.node.auth.may_read_services(token, ns)  # names only for them
            raise _NotFound(f"service {service!r} has no endpoint {want!r}" if want else
                            f"name an endpoint: /{service}/ENDPOINT",
                            [] if not listed else routes.near(want, set(eps)) if want
                            else sorted(eps)[:5])
        ep = eps[name]
        method = scope["method"]
        if ep.get("stream"):
            require_method(method, ("GET", "POST"), ID)
            request = await self._request(scope, receive, ep)
            await self._with_caller(token, scope, serve_sse(
                self.node.op_table, scope, receive, resp, service, name, request, meta, ns))
            return
        require_method(method, ("GET", "POST"), ID)
        request = await self._request(scope, receive, ep)
        timeout = self._timeout(scope["headers"])
        args = {"service": service, "endpoint": name, "body": request, "timeout": timeout,
                "namespace": ns}
        if route.version:
            args["version"] = route.version
        reply = await self._traced_call(token, scope, meta, service, name, args, resp)
        await resp.json(200, reply)

    async def _request(self, scope: Scope, receive: Receive, ep: dict[str, Any]) -> Any:
        """An endpoint's request: from the query string (GET), a form (POST of
        application/x-www-form-urlencoded, typed like a query) or the JSON body."""
        form = scope["method"] == "GET"
        if not form:
            ctype = policy.header(scope.get("headers") or [], b"content-type") or b""
            form = ctype.split(b";", 1)[0].strip().lower() == FORM
        if not form:
            return await self._json_body(scope, receive)
        query = scope.get("query_string", b"") if scope["method"] == "GET" else \
            await read_body(scope, receive, self.s.max_body_bytes, self.s.read_timeout)
        scope[BODY_SIZE] = len(query)
        try:
            return routes.query_request(query, ep.get("request"))
        except routes.QueryError as exc:
            raise bad_request(str(exc), id=ID) from None

    def _openapi(self, token: str | None, ns: str, scope: Scope) -> dict[str, Any]:
        auth = self.node.auth
        registry = self.node.registry
        services: dict[str, list[dict[str, Any]]] = {}
        for inst in registry.instances(None, ns):
            if not inst["service"].startswith("tunnel:"):
                services.setdefault(inst["service"], []).append(inst)
        who = auth.identify(token, None)  # a bad token: 401

        def allowed(service: str, endpoint: str) -> bool:
            return bool(auth.allows(who, ("service", service, endpoint), ns))
        return openapi.build(services, allowed=allowed)

    # --- acting as the caller ---------------------------------------------------------------

    async def _traced_call(self, token: str | None, scope: Scope, meta: dict[str, str],
                           service: str, endpoint: str, args: dict[str, Any],
                           resp: Response) -> Any:
        """rpc.call as the caller, under the gateway's span of the request (its traceparent
        goes back in the response)."""
        tracer = self.node.debug.tracer if self.node.debug is not None else None
        if tracer is None or not tracer.enabled:
            args["meta"] = meta
            return await self._call(token, scope, args)
        with tracer.span(meta, f"{scope['method']} /{service}/{endpoint}", "server",
                         service, {"gateway": self.node.name}):
            resp.headers.append((b"traceparent", meta[traces.TRACEPARENT].encode()))
            args["meta"] = meta
            return await self._call(token, scope, args)

    async def _call(self, token: str | None, scope: Scope, args: dict[str, Any]) -> Any:
        """rpc.call as the caller: the op's fast path when it takes the call (a local
        instance: answered from the reply's callback, no task), else the ordinary one."""
        op = self.node.op_table.get("rpc.call")
        if op.fast is not None:
            done = trio.Event()
            box: list[Any] = []

            def finish(result: Any, exc: MeshError | None) -> None:
                box.append((result, exc))
                done.set()

            with self._context(token, scope):
                # an upper bound of the body's CBOR size (at most 2.25 times its JSON: a
                # number "1e9," is 5 bytes of CBOR): a larger one is measured by rpc
                taken = op.fast(args, token, finish, 3 * scope.get(BODY_SIZE, 1 << 30))
            if taken:
                await done.wait()
                result, exc = box[0]
                if exc is not None:
                    raise exc
                return result
        with self._context(token, scope):
            return await op.handler(args)

    async def _as_caller(self, token: str | None, scope: Scope, op: str,
                         args: dict[str, Any]) -> Any:
        handler = self.node.op_table.get(op).handler
        with self._context(token, scope):
            return await handler(args)

    async def _with_caller(self, token: str | None, scope: Scope,
                           run: Awaitable[None]) -> None:
        with self._context(token, scope):
            await run

    def _context(self, token: str | None, scope: Scope) -> RemoteRequest:
        return RemoteRequest(token, f"api:{_client(scope)}")

    # --- bodies -----------------------------------------------------------------------------

    async def _json_body(self, scope: Scope, receive: Receive) -> Any:
        ctype = policy.header(scope.get("headers") or [], b"content-type")
        if ctype is not None:
            kind = ctype.split(b";", 1)[0].strip().lower()
            if kind and kind != JSON and not kind.endswith(b"+json"):
                raise MeshError(415, f"send JSON (Content-Type: application/json), not "
                                     f"{kind.decode('latin-1')[:60]}", id=ID)
        data = await read_body(scope, receive, self.s.max_body_bytes, self.s.read_timeout)
        scope[BODY_SIZE] = len(data)
        if not data.strip():
            return {}
        try:
            value = wire.loads_json(data)
            wire.check_plain(value, MAX_DEPTH)
        except wire.WireError as exc:
            raise bad_request(f"the body is not valid JSON: {exc}", id=ID) from None
        return value

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket: to an HTTP service (proxied), or a stream endpoint's messages."""
        try:
            headers = scope.get("headers") or []
            origin = policy.header(headers, b"origin")
            if origin is not None and "*" not in self.cors.origins and policy.cross_site(
                    [(b"origin", origin), *headers], scope.get("scheme", "ws"), self.cors):
                # browsers apply no CORS to WebSockets: the Origin check is the server's
                raise MeshError(403, f"origin {origin.decode('latin-1')[:100]!r} is not "
                                     "allowed (api.cors_origins)", id=ID)
            token = self._token(scope, headers)
            self._rate_limit(token, scope)
            ns = self._namespace(headers)
            route = routes.parse(scope.get("path", ""))
            if route.kind != "service":
                raise MeshError(404, "no WebSocket here", id=ID)
            instances = [i for i in self.node.registry.instances(route.service, ns)
                         if routes.version_matches(route.version, i.get("version", ""))]
            http = [i for i in instances if (i.get("metadata") or {}).get("http")]
            meta = {"x-request-id": policy.request_id(headers)}
            if http and self.upstream is not None:
                with self._context(token, scope):
                    await self.upstream.websocket(scope, receive, send, http, route, token,
                                                  meta)
                return
            eps = {e["name"]: e for i in instances for e in i.get("endpoints", [])}
            name = routes.match_endpoint(route, set(eps))
            if name is None or not eps[name].get("stream"):
                raise MeshError(404, "no streaming endpoint here", id=ID)
            with self._context(token, scope):
                await serve_websocket_stream(self.node.op_table, scope, receive, send,
                                             route.service, name, meta, ns)
        except MeshError as exc:
            await _refuse_websocket(receive, send, exc)
        except Exception:
            log.exception("api websocket %s failed", scope.get("path"))
            await _refuse_websocket(receive, send, MeshError(
                500, "the gateway failed on this request (see the node's log)", id=ID))


class _NotFound(MeshError):
    def __init__(self, detail: str, near: list[str]) -> None:
        super().__init__(404, detail + (f"; did you mean {', '.join(near)}?" if near else ""),
                         id=ID)
        self.near = near

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "near": self.near}


def _logged_path(scope: Scope) -> str:
    """The path as the client sent it (still percent-encoded: a decoded one could forge
    log lines), at most 200 characters."""
    raw = scope.get("raw_path") or scope.get("path", "").encode("utf-8", "replace")
    return raw[:200].decode("latin-1").encode("unicode_escape").decode("ascii")


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "?"


async def _refuse_websocket(receive: Receive, send: Send, exc: MeshError) -> None:
    """Refuse an upgrade with the error's status and JSON body (the ASGI websocket denial
    response extension, which hypercorn serves), else a plain close (403)."""
    try:
        if not getattr(exc, "connect_read", False):  # else the handler read it already
            msg = await receive()
            if msg.get("type") != "websocket.connect":
                return
        data = dumps(exc.to_dict())
        await send({"type": "websocket.http.response.start", "status": exc.status,
                    "headers": [(b"content-type", JSON),
                                (b"content-length", str(len(data)).encode())]})
        await send({"type": "websocket.http.response.body", "body": data})
    except Exception:  # the client went, or the server lacks the extension
        try:
            await send({"type": "websocket.close", "code": 1008})
        except Exception:
            log.debug("could not refuse a websocket", exc_info=True)


Handler = Callable[[Scope, Receive, Send], Awaitable[None]]
