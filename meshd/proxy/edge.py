"""The proxy endpoint: outside clients (no cluster secret, no VPN) reach services and tunnels
with a user token, over one WebSocket (`meshd up --proxy-listen HOST:PORT`).

Rules:
- The first message may name the proxy protocol versions the client speaks, `"v": [low,
  high]` (none: the baseline); the proxy speaks the highest both do, says which in the
  control session's first reply (`"v"`), and refuses a client with none in common (426,
  naming both ranges).
- The first message is a CBOR map: {"op": "call", "token", "service", "endpoint", "body",
  "timeout", "meta", "namespace"}, {"op": "tunnel", "token", "name"} or {"op": "control"} (a remote
  environment's control session, below); anything else is a 400 and the socket closes.
- Control session: after the reply {"ok": true, "node": NAME}, every message is a request
  of the node's op table ({"id", "op", "args", "token"}, as on the control socket) and gets
  its reply or events, served by
  meshd.ops.serve_request as a remote caller: the token of each request is who acts (never
  the node), operator-only ops are refused, and a request without a token is a 401 unless
  the op is public (login, refresh). Until a request carries a token that verifies, the
  connection stays pending (its deadline and the pending cap apply). A stream ends as soon
  as its client closes the connection, and one token holds at most
  limits.max_remote_streams streams and sessions at once (429 beyond; `proxy_streams` in
  the stats counts those open).
- A token is required: an outside caller is never taken for this node. No token or a bad
  one: 401; a token the rules do not allow: 403. The rules are applied where the resource is
  (the callee's daemon, the exposing node), exactly as for in-cluster callers.
- call: one reply message {"ok", "body"} or {"ok": false, "error"}; then the socket closes.
- tunnel: after {"ok": true} the socket carries the TCP bytes as binary messages; an empty
  message is end-of-data for that direction.
- Listens where the operator says; like the control API, nothing is exposed by default.
- With `--tls-cert FILE --tls-key FILE` it serves wss:// only: tokens and tunnel bytes never
  cross the network in clear. The TLS handshake is the first step under the pending deadline.
- Served through transport/listeners.py: the WebSocket upgrade and the first message must
  arrive within the pending deadline (2 x limits.handshake_timeout), connections are capped,
  and whatever one connection does (a reset mid-upgrade, a hostile first message) ends that
  connection only. The first message is decoded with depth and size limits (meshd.wire).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from typing import Any

import trio

from meshd import namespaces, versions, wire
from meshd.errors import MeshError, bad_request
from meshd.ops import REQUEST_REMOTE, REQUEST_SOURCE, StreamSlots, serve_request
from meshd.transport import listeners as serving
from meshd.transport.links import WsStream

from .wsframing import WsFraming

# trio_websocket (and wsproto under it) is imported only when a proxy endpoint is served:
# most nodes never pay for it.

log = logging.getLogger("meshd.proxy")
MAX_MESSAGE = 2 << 20  # a request (its body is bounded by rpc.max_body_bytes) or tunnel chunk


class EdgeProxy:
    def __init__(self, node: Any) -> None:
        self.node = node
        self.stats = {"proxy_sessions": 0, "proxy_refused": 0, "proxy_control_sessions": 0}
        self.gate = serving.Gate("proxy", self.stats,
                                 pending_timeout=node.settings.limits.handshake_timeout * 2)
        self.streams = StreamSlots(node.settings.limits.max_remote_streams, self.stats, "proxy")

    async def serve(self, host: str, port: int, tls: ssl.SSLContext | None = None,
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve ws:// on host:port, or wss:// with a server TLS context."""
        listeners = await serving.open_tcp(host, port)
        handler = serving.websocket_handler(self._handle, MAX_MESSAGE)
        if tls is not None:
            handler = serving.tls_handler(handler, tls)
        await serving.serve(listeners, handler, self.gate, task_status=task_status)

    async def _first_message(self, ws: Any, ticket: serving.Ticket) -> dict[str, Any]:
        """The request: a CBOR map, within the connection's pending deadline."""
        raw = None
        with trio.move_on_at(ticket.deadline):
            raw = await ws.get_message()
        if raw is None:
            raise MeshError(408, "no request within the time allowed", id="meshd.proxy")
        try:
            req = wire.loads(raw if isinstance(raw, bytes) else raw.encode(),
                             max_depth=16, max_bytes=MAX_MESSAGE)
        except wire.WireError as exc:
            raise bad_request(f"the first message must be a CBOR map ({exc})") from None
        if not isinstance(req, dict):
            raise bad_request("the first message must be a CBOR map")
        return req

    async def _handle(self, ws: Any, ticket: serving.Ticket) -> None:
        import trio_websocket

        try:
            req = await self._first_message(ws, ticket)
            version = versions.offered("proxy", req.get("v"))  # 426 with none in common
            if req.get("op") == "control":
                await self._control(ws, ticket, version)
                return
            token = req.get("token")
            if not isinstance(token, str) or not token:
                raise MeshError(401, "the proxy needs a token (--token or MESHD_TOKEN)",
                                id="meshd.proxy")
            self.node.auth.identify(token, None)  # a bad token stops here: 401
            ticket.authenticated()
            self.stats["proxy_sessions"] += 1
            if req.get("op") == "call":
                await self._call(ws, req, token)
            elif req.get("op") == "tunnel":
                await self._tunnel(ws, req, token)
            else:
                raise bad_request("op must be call, tunnel or control")
        except MeshError as exc:
            self.stats["proxy_refused"] += 1
            with contextlib.suppress(trio_websocket.ConnectionClosed, trio.BrokenResourceError,
                                     trio.ClosedResourceError), trio.move_on_after(5):
                await ws.send_message(wire.dumps({"ok": False, "error": exc.to_dict()}))
        except trio_websocket.ConnectionClosed:
            pass

    async def _control(self, ws: Any, ticket: serving.Ticket, version: int) -> None:
        """A remote environment's control session on this WebSocket."""
        framed = WsFraming(ws, MAX_MESSAGE)
        REQUEST_REMOTE.set(True)
        REQUEST_SOURCE.set(f"remote:{getattr(ws.remote, 'address', '?')}")
        self.stats["proxy_control_sessions"] += 1
        await framed.write({"ok": True, "node": self.node.name, "v": version})
        req: Any = {}
        while True:
            try:
                if ticket.pending:
                    req = None
                    with trio.move_on_at(ticket.deadline):
                        req = await framed.read()
                    if req is None:
                        return  # no token that verifies in time
                else:
                    req = await framed.read()
            except EOFError:
                return
            except MeshError as exc:
                with trio.move_on_after(5):
                    await framed.write({"id": None, "ok": False, "error": exc.to_dict()})
                return
            if ticket.pending and self._verifies(req):
                ticket.authenticated()
            if not await serve_request(self.node.op_table, framed, req, self.streams):
                return

    def _verifies(self, req: Any) -> bool:
        token = req.get("token") if isinstance(req, dict) else None
        if not isinstance(token, str) or not token:
            return False
        try:
            self.node.auth.identify(token, None)
        except MeshError:
            return False
        return True

    async def _call(self, ws: Any, req: dict[str, Any], token: str) -> None:
        service, endpoint = req.get("service"), req.get("endpoint")
        if not isinstance(service, str) or not isinstance(endpoint, str):
            raise bad_request("call needs a service and an endpoint")
        timeout = req.get("timeout") or self.node.settings.rpc.default_timeout
        meta = req.get("meta") if isinstance(req.get("meta"), dict) else {}
        body = await self.node.rpc.call(service, endpoint, req.get("body"), timeout, meta,
                                        token=token,
                                        namespace=namespaces.check(req.get("namespace")))
        with trio.move_on_after(30):  # a client that never reads its reply is dropped
            await ws.send_message(wire.dumps({"ok": True, "body": body}))

    async def _tunnel(self, ws: Any, req: dict[str, Any], token: str) -> None:
        name = req.get("name")
        if not isinstance(name, str):
            raise bad_request("tunnel needs a name")
        stream = _EofWs(ws)
        await self.node.tunnels._carry(name, token, stream, ack=lambda: ws.send_message(
            wire.dumps({"ok": True})))


class _EofWs(WsStream):
    """A WebSocket as a tunnel's client stream: sends an empty message as end-of-data."""

    async def send_eof(self) -> None:
        import trio_websocket

        with contextlib.suppress(trio_websocket.ConnectionClosed):
            await self.ws.send_message(b"")
