"""HTTP mode of the identity-aware proxy: `meshd proxy http --listen HOST:PORT`.

Rules:
- POST /SERVICE/ENDPOINT with a JSON body calls ENDPOINT of SERVICE through the local daemon
  and answers its JSON reply; GET / lists the services.
- A bearer token is required (Authorization: Bearer TOKEN): requests come from outside the
  cluster, so they never act as the node. The rules are checked where the service runs.
- Errors keep their meaning as HTTP statuses (400, 401, 403, 404, 408, 500, 503) with the
  structured error as the JSON body.
- It is an ASGI app served by hypercorn on trio; it listens only where the operator says.
- With `--tls-cert FILE --tls-key FILE` it serves https:// only (TLS 1.2 or later); a TLS
  handshake must finish within READ_TIMEOUT, and a failed one ends that connection.
- Bounds: bodies up to MAX_BODY, JSON decoded by meshd.wire (nesting cannot blow the stack),
  at most MAX_IN_FLIGHT requests at once (503 beyond), idle or silent connections closed
  after KEEP_ALIVE seconds and half-sent requests after READ_TIMEOUT. hypercorn's accept loop
  (trio.serve_listeners) backs off when descriptors run out. The proxy is its own process:
  whatever happens to it, the node is not affected.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from meshd import asgi, wire
from meshd.asgi import Receive, Scope, Send
from meshd.errors import MeshError

MAX_BODY = 4 << 20
MAX_DEPTH = 32  # JSON nesting of a request body (the control API decodes no deeper)
MAX_IN_FLIGHT = 256  # requests served at once; more get 503 at once instead of queueing
KEEP_ALIVE = 5.0  # an idle connection (also one that never sends a request) is closed
READ_TIMEOUT = 10.0  # a request that stops arriving half-way is dropped (slow clients)


def make_app(socket: Path) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    from sdk import Client

    in_flight = [0]  # requests being served now (per app: no module state)

    async def respond(send: Send, status: int, payload: Any) -> None:
        await asgi.respond(send, status, json.dumps(payload).encode(), "application/json")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if await asgi.non_http(scope, receive, send):
            return
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if in_flight[0] >= MAX_IN_FLIGHT:
            await respond(send, 503, MeshError(503, "too many requests in flight; retry",
                                               id="meshd.proxy").to_dict())
            return
        in_flight[0] += 1
        try:
            if not token:
                raise MeshError(401, "send Authorization: Bearer TOKEN", id="meshd.proxy")
            body = b""
            while True:
                msg = await receive()
                body += msg.get("body", b"")
                if len(body) > MAX_BODY:
                    raise MeshError(400, f"request body over {MAX_BODY} bytes",
                                    id="meshd.proxy")
                if not msg.get("more_body"):
                    break
            parts = [p for p in scope["path"].split("/") if p]
            async with Client(socket, token=token) as client:
                if scope["method"] == "GET" and not parts:
                    await respond(send, 200, await client.services())
                    return
                if scope["method"] != "POST" or len(parts) != 2:
                    raise MeshError(404, "use POST /SERVICE/ENDPOINT with a JSON body",
                                    id="meshd.proxy")
                try:
                    request = wire.loads_json(body or b"{}")
                    wire.check_plain(request, MAX_DEPTH)
                except wire.WireError as exc:
                    raise MeshError(400, f"body is not valid: {exc}", id="meshd.proxy"
                                    ) from None
                reply = await client.call(parts[0], parts[1], request)
            await respond(send, 200, reply)
        except MeshError as exc:
            await respond(send, exc.status, exc.to_dict())
        finally:
            in_flight[0] -= 1

    return app


async def serve(socket: Path, listen: str, task_status: Any = None, tls_cert: str = "",
                tls_key: str = "") -> None:
    """Serve until cancelled: http://, or https:// with a certificate and its key (checked
    by the caller with meshd.tlsconf.server_context, which hypercorn's TLS context matches:
    TLS 1.2 or later)."""
    import trio
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    config = Config()
    config.bind = [listen]
    config.accesslog = None
    config.errorlog = None
    config.keep_alive_timeout = KEEP_ALIVE
    config.read_timeout = int(READ_TIMEOUT)
    if tls_cert and tls_key:
        config.certfile, config.keyfile = tls_cert, tls_key
        config.ssl_handshake_timeout = READ_TIMEOUT  # hypercorn's default is 60 s
    if task_status is not None:
        await hypercorn_serve(make_app(socket), config,  # type: ignore[arg-type]
                              task_status=task_status)
    else:
        await hypercorn_serve(make_app(socket), config)  # type: ignore[arg-type]
    del trio
