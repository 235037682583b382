"""HTTP services behind the gateway: `/SERVICE/...` reverse-proxied to the HTTP address a
service registered, on whichever node it runs, WebSocket upgrades included.

Theory of operation
-------------------
A service registers `http` in its instance metadata (SDK `Service(..., http="127.0.0.1:8000")`):
an address on its own node. The gateway picks an instance (one on this node first) and opens
a byte stream to it: a TCP connection when it is here, else link channel "api-http" to its
node, whose daemon checks the caller and connects to the address (the bytes ride the secure
link, as tunnels do). Over that stream the gateway speaks HTTP/1.1 with h11 (one request per
stream, bodies streamed both ways, nothing buffered whole) or, for an upgrade, WebSocket with
trio-websocket, pumping messages between the client and the service.

Rules:
- Who may: resource `service:NAME:http` in the instance's namespace, checked where the
  service runs (its daemon), for the caller's token or, without one, the public scope.
- Addresses: only loopback (127.0.0.0/8, ::1, localhost) with a port: a service names a
  port of its own node, never another host (no request forgery through the gateway).
- The upstream path is the request's raw path without /[vN/]SERVICE; the query is kept.
  Hop-by-hop headers are dropped both ways; X-Forwarded-For/-Proto/-Host/-Prefix and
  X-Request-Id are added, and X-Meshd-Caller (who the gateway acted as). The meshd token
  (Authorization: Bearer, cookie meshd_token) is not passed on: a service never holds its
  callers' credentials.
- Bounds: the request body at api.max_body_bytes (413), each wait for the service at most
  api.timeout (504 if it sends nothing for that long before its response head; after the
  head, a stall ends the response), the response head at api.max_header_bytes (502
  beyond), WebSocket messages at api.max_body_bytes.
- A service that cannot be reached is a 502 (connection refused) or 503 (its node
  unreachable); what it answers, 5xx included, is passed on as it is.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import random
from typing import Any

import h11
import trio

from meshd import wire
from meshd.asgi import Receive, Scope, Send
from meshd.errors import MeshError, bad_request, unavailable
from meshd.proxy.tunnels import pipe_channel_stream
from meshd.settings import ApiSettings
from meshd.transport import addr as addrs
from meshd.transport.links import Channel, ChannelClosed, ChannelStream, LinkError

from . import routes
from .bodies import body_chunks

log = logging.getLogger("meshd.api")
CHANNEL = "api-http"
ID = "meshd.api"
CHUNK = 64 * 1024
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate",
                        b"proxy-authorization", b"te", b"trailer", b"transfer-encoding",
                        b"upgrade", b"host", b"content-length", b"expect"})
WS_HEADERS = frozenset({b"sec-websocket-key", b"sec-websocket-version",
                        b"sec-websocket-extensions", b"sec-websocket-protocol"})


def check_address(value: Any) -> tuple[str, int]:
    """(host, port) of a service's HTTP address: loopback only, with a port."""
    if not isinstance(value, str) or not value:
        raise bad_request("a service's http address is HOST:PORT", id=ID)
    text = value.split("://", 1)[1] if "://" in value else value
    text = text.rstrip("/")
    try:
        host, port = addrs.parse(text)
    except addrs.AddressError as exc:
        raise bad_request(f"http address {value!r}: {exc}", id=ID) from None
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise MeshError(403, f"http address {value!r} is not on the service's own node "
                                 "(loopback only)", id=ID)
    if not 0 < port < 65536:
        raise bad_request(f"http address {value!r} needs a port", id=ID)
    return host, port


class Upstream:
    """Opens streams to HTTP services (here or on another node) and proxies requests."""

    def __init__(self, node: Any, settings: ApiSettings) -> None:
        self.node = node
        self.s = settings
        self.stats = {"api_http_proxied": 0, "api_http_remote": 0, "api_http_refused": 0,
                      "api_http_served": 0}
        node.links.handlers[CHANNEL] = self._serve_channel

    # --- the gateway's side -----------------------------------------------------------------

    async def _open(self, instances: list[dict[str, Any]], token: str | None) -> Any:
        """A byte stream to one instance's HTTP address (this node's first), for an outside
        caller: with its token, else as nobody (the public scope)."""
        me = self.node.name
        here = [i for i in instances if i["node"] == me]
        inst = random.choice(here or instances)
        if inst["node"] == me:
            local = self.node.registry.local.get(inst["id"])
            if local is None:
                raise unavailable("the instance is gone", id=ID)
            return await self._connect(local, token, None)  # an outside caller: never as me
        self.stats["api_http_remote"] += 1
        try:
            ch = await self.node.links.open_channel(self.node.rpc.node_addr(inst), CHANNEL)
        except (LinkError, ChannelClosed) as exc:
            raise unavailable(f"cannot reach node {inst['node']}: {exc}", id=ID) from None
        try:
            await ch.send(wire.dumps({"instance": inst["id"], "token": token,
                                      "anonymous": not token}))
            with trio.fail_after(self.s.timeout):
                reply = wire.loads(await ch.receive(), max_depth=8)
        except (ChannelClosed, wire.WireError, trio.TooSlowError):
            await ch.aclose()
            raise unavailable(f"node {inst['node']} did not open the service", id=ID
                              ) from None
        if not isinstance(reply, dict) or not reply.get("ok"):
            await ch.aclose()
            raise MeshError.from_dict(reply.get("error") if isinstance(reply, dict) else None)
        return ChannelStream(ch)

    async def _connect(self, local: Any, token: str | None,
                       node: str | None) -> trio.SocketStream:
        """Check the caller, then connect to a local instance's HTTP address."""
        self.node.auth.check(token, node, ("service", local.service, "http"),
                             namespace=local.namespace)
        mine = [i for i in self.node.registry.instances(local.service, local.namespace)
                if i["id"] == local.id]  # what the process registered through this daemon
        host, port = check_address((mine[0].get("metadata") or {}).get("http") if mine
                                   else None)
        try:
            return await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise MeshError(502, f"service {local.service!r} does not answer on "
                                 f"{host}:{port}: {exc.strerror or exc}", id=ID) from None

    async def proxy(self, scope: Scope, receive: Receive, resp: Any,
                    instances: list[dict[str, Any]], route: routes.Route, token: str | None,
                    meta: dict[str, str]) -> None:
        """One HTTP request to the service, its response back to the client."""
        stream = await self._open(instances, token)
        self.stats["api_http_proxied"] += 1
        async with _closing(stream):
            conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=self.s.max_header_bytes)
            head = self._request_head(scope, route, token, self._with_caller(meta, token))
            await _send(stream, conn, head)
            await self._send_body(scope, receive, stream, conn)
            response = await self._response_head(stream, conn)
            await resp.start(response.status_code, _response_headers(response.headers))
            while True:
                event = await self._next_event(stream, conn)
                if isinstance(event, h11.Data):
                    await resp.body(bytes(event.data), more=True)
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
            await resp.body(b"")

    def _request_head(self, scope: Scope, route: routes.Route, token: str | None,
                      meta: dict[str, str]) -> h11.Request:
        target = routes.upstream_path(scope.get("raw_path") or scope["path"].encode(),
                                      route.depth)
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        headers = _forwarded(scope, route, meta, token)
        body_headers = [(k, v) for k, v in scope.get("headers") or []
                        if k.lower() == b"content-length"]
        has_body = bool(body_headers) or any(
            k.lower() == b"transfer-encoding" for k, _ in scope.get("headers") or [])
        chunked = any(k.lower() == b"transfer-encoding" for k, _ in scope.get("headers") or [])
        if body_headers and not chunked:  # never both (smuggling toward the service)
            headers.append((b"content-length", body_headers[0][1]))
        elif has_body:
            headers.append((b"transfer-encoding", b"chunked"))
        return h11.Request(method=scope["method"], target=target, headers=headers)

    async def _send_body(self, scope: Scope, receive: Receive, stream: Any,
                         conn: h11.Connection) -> None:
        async for chunk in body_chunks(scope, receive, self.s.max_body_bytes,
                                       self.s.read_timeout):
            await _send(stream, conn, h11.Data(data=chunk))
        await _send(stream, conn, h11.EndOfMessage())

    async def _response_head(self, stream: Any, conn: h11.Connection) -> h11.Response:
        """The service's response head, whole within api.timeout (504 otherwise, however
        slowly it trickles); informational answers (100 Continue) are skipped."""
        with trio.move_on_after(self.s.timeout):
            while True:
                event = await self._next_event(stream, conn)
                if isinstance(event, h11.InformationalResponse):
                    continue
                if not isinstance(event, h11.Response):
                    raise MeshError(502, "the service did not answer HTTP", id=ID)
                return event
        raise MeshError(504, f"the service sent no answer within {self.s.timeout:g} s",
                        id=ID)

    async def _next_event(self, stream: Any, conn: h11.Connection) -> Any:
        """The service's next event; a body that stalls for api.timeout ends the answer."""
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise MeshError(502, f"the service's answer is not valid HTTP: {exc}",
                                id=ID) from None
            if event is not h11.NEED_DATA:
                return event
            with trio.move_on_after(self.s.timeout) as waited:
                data = await stream.receive_some(CHUNK)
            if waited.cancelled_caught:
                raise trio.BrokenResourceError("the service stalled")
            conn.receive_data(data)

    async def websocket(self, scope: Scope, receive: Receive, send: Send,
                        instances: list[dict[str, Any]], route: routes.Route,
                        token: str | None, meta: dict[str, str]) -> None:
        """A WebSocket to the service, messages pumped both ways until either side closes."""
        import trio_websocket

        stream = await self._open(instances, token)  # refusals before the client's connect
        self.stats["api_http_proxied"] += 1
        try:
            first = await receive()
        except BaseException:
            await stream.aclose()
            raise
        if first.get("type") != "websocket.connect":
            await stream.aclose()
            return
        target = routes.upstream_path(scope.get("raw_path") or scope["path"].encode(),
                                      route.depth).decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        extra = [(k, v) for k, v in _forwarded(scope, route, self._with_caller(meta, token),
                                               token) if k != b"host"]  # trio-websocket's
        async with _closing(stream), trio.open_nursery() as nursery:
            ws = None
            with trio.move_on_after(self.s.timeout):
                try:
                    ws = await trio_websocket.wrap_client_stream(
                        nursery, stream, _host(scope), target,
                        subprotocols=scope.get("subprotocols") or None, extra_headers=extra,
                        max_message_size=self.s.max_body_bytes)
                except trio_websocket.HandshakeError as exc:
                    raise _Refused(MeshError(502, f"the service refused the WebSocket: "
                                                  f"{exc}", id=ID)) from None
            if ws is None:
                raise _Refused(MeshError(504, f"the service did not take the WebSocket "
                                              f"within {self.s.timeout:g} s", id=ID))
            await send({"type": "websocket.accept", "subprotocol": ws.subprotocol})

            async def to_service() -> None:
                while True:
                    msg = await receive()
                    if msg["type"] == "websocket.disconnect":
                        break
                    data = msg.get("text") if msg.get("text") is not None else msg.get("bytes")
                    if data is not None:
                        await ws.send_message(data)
                with contextlib.suppress(Exception):
                    await ws.aclose()
                nursery.cancel_scope.cancel()

            async def to_client() -> None:
                code = 1000
                try:
                    while True:
                        data = await ws.get_message()
                        key = "text" if isinstance(data, str) else "bytes"
                        await send({"type": "websocket.send", key: data})
                except trio_websocket.ConnectionClosed as exc:
                    code = exc.reason.code if exc.reason and exc.reason.code else 1000
                with contextlib.suppress(Exception):
                    await send({"type": "websocket.close", "code": code})
                nursery.cancel_scope.cancel()

            nursery.start_soon(to_service)
            nursery.start_soon(to_client)

    def _with_caller(self, meta: dict[str, str], token: str | None) -> dict[str, str]:
        """`meta` with who the gateway acts as (X-Meshd-Caller): the token's account, or
        "anonymous"."""
        return {**meta, "caller": self.node.auth.identify(token, None).id}

    # --- the service's node -----------------------------------------------------------------

    async def _serve_channel(self, ch: Channel) -> None:
        try:
            head = wire.loads(await ch.receive(), max_depth=8)
            inst_id, token = head["instance"], head.get("token")
            if not isinstance(inst_id, str) or not isinstance(token, str | None):
                raise TypeError
        except (wire.WireError, TypeError, KeyError, AttributeError, ChannelClosed):
            with contextlib.suppress(ChannelClosed):
                await ch.send(wire.dumps({"ok": False, "error": bad_request(
                    "malformed http request", id=ID).to_dict()}))
            return
        local = self.node.registry.local.get(inst_id)
        node = None if head.get("anonymous") is True else ch.peer_node  # from the link
        try:
            if local is None:
                raise unavailable(f"instance {inst_id} is not on {self.node.name}", id=ID)
            stream = await self._connect(local, token, node)
        except MeshError as exc:
            self.stats["api_http_refused"] += 1
            with contextlib.suppress(ChannelClosed):
                await ch.send(wire.dumps({"ok": False, "error": exc.to_dict()}))
            return
        self.stats["api_http_served"] += 1
        await ch.send(wire.dumps({"ok": True}))
        await pipe_channel_stream(ch, stream)


class _Refused(MeshError):
    """The service refused a WebSocket after the client's connect was read."""

    def __init__(self, exc: MeshError) -> None:
        super().__init__(exc.status, exc.detail, id=exc.id)
        self.connect_read = True


def _forwarded(scope: Scope, route: routes.Route, meta: dict[str, str],
               token: str | None) -> list[tuple[bytes, bytes]]:
    """The request's headers for the service: hop-by-hop ones and the meshd token dropped,
    forwarding headers added."""
    out: list[tuple[bytes, bytes]] = []
    host = b""
    forwarded_for = b""
    for k, v in scope.get("headers") or []:
        name = k.lower()
        if name == b"host":
            host = v
        if name in HOP_BY_HOP or name in WS_HEADERS or name.startswith(b"x-forwarded-") \
                or name == b"x-meshd-caller" or name == b"x-request-id" or b"_" in name:
            if name == b"x-forwarded-for":
                forwarded_for = v
            continue
        if name == b"authorization" and token is not None and \
                v.decode("latin-1").strip()[7:].strip() == token:
            continue
        if name == b"cookie":
            v = _without_token_cookie(v)
            if not v:
                continue
        out.append((name, v))
    client = scope.get("client")
    addr = str(client[0]).encode() if client else b"?"
    prefix = ("/" + (f"v{route.version}/" if route.version else "") + route.service).encode()
    out += [(b"host", host or b"localhost"),
            (b"x-forwarded-for", forwarded_for + b", " + addr if forwarded_for else addr),
            (b"x-forwarded-proto", scope.get("scheme", "http").encode()),
            (b"x-forwarded-prefix", prefix),
            (b"x-request-id", meta.get("x-request-id", "").encode()),
            (b"x-meshd-caller", meta.get("caller", "anonymous").encode())]
    if host:
        out.append((b"x-forwarded-host", host))
    if "traceparent" in meta:
        out.append((b"traceparent", meta["traceparent"].encode()))
    return out


def _without_token_cookie(value: bytes) -> bytes:
    parts = [p.strip() for p in value.split(b";")]
    return b"; ".join(p for p in parts if p and not p.startswith(b"meshd_token="))


def _response_headers(headers: Any) -> list[tuple[bytes, bytes]]:
    """The service's response headers for the client: hop-by-hop ones dropped (the body is
    framed anew; Content-Length kept only when it framed the service's body), and no
    meshd_token cookie (a service may not plant the gateway's credential)."""
    pairs = [(bytes(k).lower(), bytes(v)) for k, v in headers]
    chunked = any(k == b"transfer-encoding" for k, _ in pairs)
    return [(k, v) for k, v in pairs
            if (k not in HOP_BY_HOP or (k == b"content-length" and not chunked))
            and not (k == b"set-cookie" and v.lstrip().lower().startswith(b"meshd_token="))]


def _host(scope: Scope) -> str:
    for k, v in scope.get("headers") or []:
        if k.lower() == b"host":
            return v.decode("latin-1")
    return "localhost"


async def _send(stream: Any, conn: h11.Connection, event: Any) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)


@contextlib.asynccontextmanager
async def _closing(stream: Any) -> Any:
    try:
        yield stream
    finally:
        with contextlib.suppress(Exception), trio.move_on_after(1) as scope:
            scope.shield = True
            await stream.aclose()
