"""Streaming endpoints through the gateway: Server-Sent Events and WebSocket.

Rules:
- Both run the node's "rpc.stream" session (meshd/rpc/streams.py) with a connection object
  of their own in place of a control session: the request (from the query string or the JSON
  body; over WebSocket, each text message) goes to the service as the stream's messages, and
  each message the service sends comes back as one event or one WebSocket text message.
- SSE: `data: JSON` per message; the stream's error is `event: error` with the structured
  error, then the response ends. An error before the first message (403, 404, 503) is an
  ordinary JSON error response. A client that disconnects ends the stream for the service.
- WebSocket: the upgrade is accepted once the service side is open (a refusal before that
  is an HTTP error response); text messages are JSON (binary ones are refused: 1003); the
  service's end closes with 1000, its error is sent as {"error": {...}} then 1011. A client
  that closes ends the stream (no half-close in WebSocket).
- Buffers are bounded: the session pulls one message from the client at a time, and the
  stream's own credits bound what the service may send ahead.
"""

from __future__ import annotations

import json
from typing import Any

import trio

from meshd import wire
from meshd.asgi import Receive, Scope, Send
from meshd.errors import MeshError

from .bodies import dumps

MAX_DEPTH = 28  # as gateway/app.py's


class _SseConn:
    """A stream session's connection that writes SSE."""

    def __init__(self, request: Any, resp: Any) -> None:
        self._frames: list[dict[str, Any]] = [{"msg": request}, {"end": True}]
        self.resp = resp

    async def reply(self, result: Any) -> None:
        await self.resp.start(200, [(b"content-type", b"text/event-stream"),
                                    (b"cache-control", b"no-cache"),
                                    (b"x-accel-buffering", b"no")])

    async def receive(self) -> Any:
        if self._frames:
            return self._frames.pop(0)
        await trio.sleep_forever()

    async def send(self, frame: Any) -> None:
        if not isinstance(frame, dict):
            return
        if "msg" in frame:
            await self.resp.body(b"data: " + _json(frame["msg"]) + b"\n\n", more=True)
        elif "error" in frame:
            await self.resp.body(b"event: error\ndata: " + _json(frame["error"]) + b"\n\n",
                                 more=True)


async def serve_sse(table: Any, scope: Scope, receive: Receive, resp: Any, service: str,
                    endpoint: str, request: Any, meta: dict[str, str], ns: str) -> None:
    """Run one stream as SSE until the service ends it or the client goes."""
    conn = _SseConn(request, resp)
    handler = table.get("rpc.stream").handler
    async with trio.open_nursery() as nursery:
        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch_disconnect)
        try:
            await handler({"service": service, "endpoint": endpoint, "meta": meta,
                           "namespace": ns}, conn)
        except MeshError as exc:
            if resp.status == 0:
                raise
            await conn.send({"error": exc.to_dict()})
        if resp.status:
            await resp.body(b"")
        nursery.cancel_scope.cancel()


class _WsConn:
    """A stream session's connection over an ASGI WebSocket."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self.accepted = False
        self.closed = False

    async def reply(self, result: Any) -> None:
        await self._send({"type": "websocket.accept"})
        self.accepted = True

    async def receive(self) -> Any:
        msg = await self._receive()
        if msg["type"] == "websocket.disconnect":
            self.closed = True
            raise EOFError
        text = msg.get("text")
        if text is None:
            await self.close(1003)
            raise EOFError
        try:
            value = wire.loads_json(text)
            wire.check_plain(value, MAX_DEPTH)
        except wire.WireError:
            await self.close(1007)
            raise EOFError from None
        return {"msg": value}

    async def send(self, frame: Any) -> None:
        if not isinstance(frame, dict) or self.closed:
            return
        if "msg" in frame:
            await self._send({"type": "websocket.send", "text": _json(frame["msg"]).decode()})
        elif "error" in frame:
            await self._send({"type": "websocket.send",
                              "text": _json({"error": frame["error"]}).decode()})
            await self.close(1011)
        else:
            await self.close(1000)

    async def close(self, code: int) -> None:
        if not self.closed:
            self.closed = True
            await self._send({"type": "websocket.close", "code": code})


async def serve_websocket_stream(table: Any, scope: Scope, receive: Receive, send: Send,
                                 service: str, endpoint: str, meta: dict[str, str],
                                 ns: str) -> None:
    """Run one stream over a WebSocket (the upgrade not yet accepted)."""
    first = await receive()
    if first.get("type") != "websocket.connect":
        return
    conn = _WsConn(receive, send)
    handler = table.get("rpc.stream").handler
    try:
        await handler({"service": service, "endpoint": endpoint, "meta": meta,
                       "namespace": ns}, conn)
    except MeshError as exc:
        if not conn.accepted:
            data = _json(exc.to_dict())
            await send({"type": "websocket.http.response.start", "status": exc.status,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(data)).encode())]})
            await send({"type": "websocket.http.response.body", "body": data})
            return
        await conn.send({"error": exc.to_dict()})
    await conn.close(1000)


def _json(value: Any) -> bytes:
    try:
        return dumps(value)
    except (TypeError, ValueError):
        return json.dumps({"detail": "a message that is not JSON"}).encode()
