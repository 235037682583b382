"""Whole CBOR values carried one per WebSocket message: the control protocol over the
proxy (both ends: the proxy serving a remote environment, the CLI or SDK using one).

Rules:
- One message is one value (a request, reply or event); binary messages only.
- Reading decodes with meshd.wire's bounds (size `limit`, depth 32, no CBOR tags); a
  closed WebSocket reads as EOFError and writes as trio.BrokenResourceError, as a closed
  control socket does.
"""

from __future__ import annotations

from typing import Any

import cbor2
import trio

from meshd import wire
from meshd.errors import bad_request

MAX_DEPTH = 32


class WsFraming:
    def __init__(self, ws: Any, limit: int) -> None:
        self.ws = ws
        self.limit = limit

    async def read(self, limit: int | None = None) -> Any:
        import trio_websocket

        try:
            raw = await self.ws.get_message()
        except trio_websocket.ConnectionClosed:
            raise EOFError from None
        data = raw if isinstance(raw, bytes) else raw.encode()
        try:
            return wire.loads(data, max_depth=MAX_DEPTH, max_bytes=limit or self.limit)
        except wire.WireError as exc:
            raise bad_request(f"message is not valid: {exc}") from None

    async def write(self, value: Any) -> None:
        import trio_websocket

        try:
            await self.ws.send_message(cbor2.dumps(value))
        except trio_websocket.ConnectionClosed:
            raise trio.BrokenResourceError("websocket closed") from None

    async def aclose(self) -> None:
        await self.ws.aclose()
