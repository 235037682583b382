"""The proxy endpoint: outside clients (no cluster secret, no VPN) reach services and tunnels
with a user token, over one WebSocket (`meshd up --proxy-listen HOST:PORT`).

Rules:
- The first message is a CBOR map: {"op": "call", "token", "service", "endpoint", "body",
  "timeout", "meta"} or {"op": "tunnel", "token", "name"}.
- A token is required: an outside caller is never taken for this node. No token or a bad
  one: 401; a token the rules do not allow: 403. The rules are applied where the resource is
  (the callee's daemon, the exposing node), exactly as for in-cluster callers.
- call: one reply message {"ok", "body"} or {"ok": false, "error"}; then the socket closes.
- tunnel: after {"ok": true} the socket carries the TCP bytes as binary messages; an empty
  message is end-of-data for that direction.
- Listens where the operator says; like the control API, nothing is exposed by default.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import cbor2
import trio

from meshd.errors import MeshError, bad_request
from meshd.transport.links import WsStream

# trio_websocket (and wsproto under it) is imported only when a proxy endpoint is served:
# most nodes never pay for it.

log = logging.getLogger("meshd.proxy")


class EdgeProxy:
    def __init__(self, node: Any) -> None:
        self.node = node
        self.stats = {"proxy_sessions": 0, "proxy_refused": 0}

    async def serve(self, host: str, port: int,
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        import trio_websocket

        await trio_websocket.serve_websocket(self._handle, host, port, ssl_context=None,
                                             max_message_size=2 << 20, task_status=task_status)

    async def _handle(self, request: Any) -> None:
        import trio_websocket

        ws = await request.accept()
        try:
            raw = await ws.get_message()
            req = cbor2.loads(raw if isinstance(raw, bytes) else raw.encode(), max_depth=32)
            if not isinstance(req, dict):
                raise bad_request("the first message must be a CBOR map")
            token = req.get("token")
            if not isinstance(token, str) or not token:
                raise MeshError(401, "the proxy needs a token (--token or MESHD_TOKEN)",
                                id="meshd.proxy")
            self.node.auth.identify(token, None)  # a bad token stops here: 401
            self.stats["proxy_sessions"] += 1
            if req.get("op") == "call":
                await self._call(ws, req, token)
            elif req.get("op") == "tunnel":
                await self._tunnel(ws, req, token)
            else:
                raise bad_request("op must be call or tunnel")
        except MeshError as exc:
            self.stats["proxy_refused"] += 1
            with contextlib.suppress(trio_websocket.ConnectionClosed):
                await ws.send_message(cbor2.dumps({"ok": False, "error": exc.to_dict()}))
        except (trio_websocket.ConnectionClosed, ValueError, cbor2.CBORDecodeError):
            pass
        finally:
            with contextlib.suppress(Exception):
                await ws.aclose()

    async def _call(self, ws: Any, req: dict[str, Any], token: str) -> None:
        service, endpoint = req.get("service"), req.get("endpoint")
        if not isinstance(service, str) or not isinstance(endpoint, str):
            raise bad_request("call needs a service and an endpoint")
        timeout = req.get("timeout") or self.node.settings.rpc.default_timeout
        meta = req.get("meta") if isinstance(req.get("meta"), dict) else {}
        body = await self.node.rpc.call(service, endpoint, req.get("body"), timeout, meta,
                                        token=token)
        await ws.send_message(cbor2.dumps({"ok": True, "body": body}))

    async def _tunnel(self, ws: Any, req: dict[str, Any], token: str) -> None:
        name = req.get("name")
        if not isinstance(name, str):
            raise bad_request("tunnel needs a name")
        stream = _EofWs(ws)
        await self.node.tunnels._carry(name, token, stream, ack=lambda: ws.send_message(
            cbor2.dumps({"ok": True})))


class _EofWs(WsStream):
    """A WebSocket as a tunnel's client stream: sends an empty message as end-of-data."""

    async def send_eof(self) -> None:
        import trio_websocket

        with contextlib.suppress(trio_websocket.ConnectionClosed):
            await self.ws.send_message(b"")
