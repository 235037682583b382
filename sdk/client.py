"""Client: call services through the local daemon.

Rules:
- Every call goes to the local daemon over its control socket; connections are pooled, so
  concurrent calls from many tasks each use their own connection.
- Requests may be dataclasses or plain JSON values; with `response=` a type, the reply is
  checked and built into it. Every failure raises MeshError (status, code, detail).
- With no daemon running, the first call fails at once, saying to start `meshd up`.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

from meshd.control import ControlClient
from meshd.errors import MeshError

from .daemon import socket_path
from .schema import SchemaError, dump, load

T = TypeVar("T")


class Client:
    def __init__(self, addr: str | os.PathLike[str] | None = None, pool: int = 64) -> None:
        self.path = socket_path(addr)
        self._idle: list[ControlClient] = []
        self._pool = pool

    async def _request(self, op: str, **args: Any) -> Any:
        conn = self._idle.pop() if self._idle else ControlClient(self.path)
        ok = False
        try:
            result = await conn.call(op, **args)
            ok = True
            return result
        except MeshError as exc:
            ok = exc.status not in (503,) or "closed" not in exc.detail
            raise
        finally:
            if ok and len(self._idle) < self._pool:
                self._idle.append(conn)
            else:
                await conn.aclose()

    async def call(self, service: str, endpoint: str, request: Any = None, *,
                   timeout: float | None = None, meta: dict[str, str] | None = None,
                   response: type[T] | None = None, selector: str | None = None) -> Any:
        body = await self._request("rpc.call", service=service, endpoint=endpoint,
                                   body=dump(request), timeout=timeout, meta=meta or {},
                                   selector=selector)
        if response is None:
            return body
        try:
            return load(response, body)
        except SchemaError as exc:
            raise MeshError(500, f"reply does not fit {response.__name__}: {exc}",
                            id="sdk") from None

    async def services(self) -> list[dict[str, Any]]:
        return await self._request("services")

    async def describe(self, service: str) -> dict[str, Any]:
        return await self._request("describe", service=service)

    async def aclose(self) -> None:
        while self._idle:
            await self._idle.pop().aclose()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
