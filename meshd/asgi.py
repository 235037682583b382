"""What every ASGI app meshd serves (the HTTP proxy, /metrics, and later the gateway and
dashboard) does the same way: the lifespan handshake, refusing WebSocket upgrades it does not
serve, and writing a whole response.

Rules:
- `non_http(scope, receive, send)` answers the lifespan protocol and refuses a WebSocket
  upgrade (close 1008, which servers send as 403); it returns True when the scope was not
  plain HTTP and the app has nothing more to do.
- `respond` writes one response with its content length; extra headers as byte pairs.
- `require_method` raises the 405 of a method not allowed; `allow_header` is the Allow
  header that error's answer carries.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from meshd.errors import MeshError

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def non_http(scope: Scope, receive: Receive, send: Send) -> bool:
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return True
    if scope["type"] == "websocket":  # not served here: refuse the upgrade (403)
        if (await receive()).get("type") == "websocket.connect":
            await send({"type": "websocket.close", "code": 1008})
        return True
    return scope["type"] != "http"


def require_method(method: str, allowed: tuple[str, ...], id: str) -> None:
    """405 (naming `allowed`, kept for the Allow header) unless `method` is one of them."""
    if method not in allowed:
        exc = MeshError(405, f"use {' or '.join(allowed)}", id=id)
        exc.allow = ", ".join(allowed).encode()  # type: ignore[attr-defined]
        raise exc


def allow_header(exc: MeshError) -> list[tuple[bytes, bytes]]:
    """[("allow", ...)] for a 405 from require_method, else []."""
    allow = getattr(exc, "allow", None)
    return [(b"allow", allow)] if allow else []


async def respond(send: Send, status: int, body: bytes, content_type: str,
                  *extra: tuple[bytes, bytes]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()),
                            (b"content-length", str(len(body)).encode()), *extra]})
    await send({"type": "http.response.body", "body": body})
