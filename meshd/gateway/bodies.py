"""Request bodies in and JSON out, for every route of the gateway.

Rules:
- `body_chunks` yields a request body's chunks as they arrive: a 413 as soon as it is seen to
  be over the limit (from Content-Length before reading, else from the bytes so far), a 408
  when nothing arrives for `timeout` seconds (timed by the server when its scope says
  "meshd.timed", which gateway/http11.py does), a 400 when the client goes away. Nothing is
  held: a proxied body streams through.
- `read_body` is the whole body, for JSON and forms.
- `dumps` writes a reply as compact UTF-8 JSON; bytes (which JSON lacks) become base64 text.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import trio

from meshd.asgi import Receive, Scope
from meshd.errors import MeshError

from .policy import header

ID = "meshd.api"


class ClientGone(Exception):
    """The client went away while its answer was being written: stop, quietly."""

TIMED = "meshd.timed"  # a scope extension of gateway/http11.py: it times body reads itself


async def body_chunks(scope: Scope, receive: Receive, limit: int, timeout: float
                      ) -> AsyncIterator[bytes]:
    length = header(scope.get("headers") or [], b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise MeshError(413, f"the body is over {limit} bytes", id=ID)
    size = 0
    timed = TIMED in (scope.get("extensions") or {})  # the server times body reads itself
    while True:
        if timed:
            msg = await receive()
        else:
            with trio.move_on_after(timeout) as waited:
                msg = await receive()
            if waited.cancelled_caught:
                raise MeshError(408, f"the body did not arrive within {timeout:g} s", id=ID)
        if msg["type"] == "http.disconnect":
            raise MeshError(400, "the client went away", id=ID)
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise MeshError(413, f"the body is over {limit} bytes", id=ID)
        if chunk:
            yield chunk
        if not msg.get("more_body"):
            return


async def read_body(scope: Scope, receive: Receive, limit: int, timeout: float) -> bytes:
    return b"".join([chunk async for chunk in body_chunks(scope, receive, limit, timeout)])


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False,
                      default=_jsonable).encode()


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    raise TypeError(f"{type(value).__name__} is not JSON")
