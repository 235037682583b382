"""A test HTTP service: an ASGI app served by hypercorn next to an SDK Service that registers
its address (`Service(..., http=...)`), so the API gateway proxies /websvc/... to it.

Routes: GET/POST /echo (JSON: method, path, query, the forwarding headers it got, body size),
GET /stream (a chunked body of 5 parts), WebSocket /ws (echoes each message upper-cased).
Argv: [name]. Prints "listening PORT" once serving.
"""

from __future__ import annotations

import json
import sys

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from meshd_sdk import Service


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        while True:
            msg = await receive()
            if msg["type"] == "websocket.disconnect":
                return
            if msg.get("text") == "close":
                await send({"type": "websocket.close", "code": 4001})
                return
            await send({"type": "websocket.send", "text": (msg.get("text") or "").upper()})
    size = 0
    while True:
        msg = await receive()
        size += len(msg.get("body", b""))
        if not msg.get("more_body"):
            break
    headers = {k.decode(): v.decode() for k, v in scope["headers"]}
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        for i in range(5):
            await send({"type": "http.response.body", "body": f"part{i}\n".encode(),
                        "more_body": True})
            await trio.sleep(0.05)
        await send({"type": "http.response.body", "body": b""})
        return
    body = json.dumps({"method": scope["method"], "path": scope["path"],
                       "raw_path": scope["raw_path"].decode(),
                       "query": scope["query_string"].decode(), "size": size,
                       "headers": {k: v for k, v in headers.items()
                                   if k.startswith("x-") or k in ("authorization", "cookie",
                                                                  "traceparent", "host")}
                       }).encode()
    status = 418 if scope["path"] == "/teapot" else 200
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"set-cookie", b"web=1")]})
    await send({"type": "http.response.body", "body": body})


async def main() -> None:
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    service = Service(sys.argv[1] if len(sys.argv) > 1 else "websvc",
                      http=f"127.0.0.1:{port}")
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, app, config)  # type: ignore[arg-type]
        print(f"listening {port}", flush=True)
        await service.run()


if __name__ == "__main__":
    trio.run(main)
