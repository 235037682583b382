"""Service: write endpoints as typed async functions; the daemon registers and routes.

Rules:
- `@service.handler("Greeter.Hello")` on `async def f(req: Req) -> Resp`, where Req and Resp
  are dataclasses or TypedDicts (or plain types). Their formats are published in the
  registry; every request is checked on the way in (400 naming the wrong field).
- A handler that raises MeshError answers with it; any other exception answers 500 with its
  message, and the service keeps serving. Each call runs in its own task.
- `await service.run()` registers through the local daemon and serves until cancelled; the
  registration lives as long as the connection (heartbeats keep it within the daemon's TTL).
- The built-in endpoint "__health__" answers {"status": "ok"}.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, get_type_hints

import trio

from meshd.control import Conn, ControlClient
from meshd.errors import MeshError

from .daemon import socket_path
from .schema import SchemaError, describe, dump, load

log = logging.getLogger("sdk.service")


@dataclass
class Endpoint:
    name: str
    fn: Callable[[Any], Awaitable[Any]]
    request: Any
    response: Any


class Service:
    def __init__(self, name: str, version: str = "latest",
                 metadata: dict[str, str] | None = None,
                 addr: str | os.PathLike[str] | None = None) -> None:
        self.name = name
        self.version = version
        self.metadata = dict(metadata or {})
        self.path = socket_path(addr)
        self.endpoints: dict[str, Endpoint] = {}
        self.instance_id: str | None = None
        self.registered = trio.Event()

    def handler(self, name: str | None = None) -> Callable[[Any], Any]:
        def wrap(fn: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
            if not inspect.iscoroutinefunction(fn):
                raise TypeError(f"handler {fn.__name__} must be an async function")
            hints = get_type_hints(fn)
            params = [p for p in inspect.signature(fn).parameters]
            if len(params) != 1:
                raise TypeError(f"handler {fn.__name__} must take exactly one request "
                                "argument")
            req_t = hints.get(params[0], Any)
            resp_t = hints.get("return", Any)
            endpoint = name or f"{self.name.title()}.{fn.__name__}"
            describe(req_t), describe(resp_t)  # fail early on unsupported types
            self.endpoints[endpoint] = Endpoint(endpoint, fn, req_t, resp_t)
            return fn
        return wrap

    def _registration(self) -> dict[str, Any]:
        return {"service": self.name, "version": self.version, "metadata": self.metadata,
                "endpoints": [{"name": e.name, "request": describe(e.request),
                               "response": describe(e.response)}
                              for e in self.endpoints.values()]}

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        client = ControlClient(self.path)
        try:
            info, conn = await client.session("service.register", **self._registration())
            self.instance_id = info["id"]
            ttl = float(info.get("ttl", 15.0))
            log.info("registered %s as %s on node %s", self.name, self.instance_id,
                     info.get("node"))
            self.registered.set()
            task_status.started(self.instance_id)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeat, conn, ttl)
                while True:
                    try:
                        msg = await conn.receive()
                    except EOFError:
                        raise MeshError(503, "the daemon closed the service connection",
                                        id="sdk") from None
                    if isinstance(msg, dict) and "call" in msg:
                        nursery.start_soon(self._serve_call, conn, msg)
        finally:
            await client.aclose()

    async def _heartbeat(self, conn: Conn, ttl: float) -> None:
        n = 0
        while True:
            await trio.sleep(max(0.2, ttl / 3))
            n += 1
            try:
                await conn.send({"ping": n})
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def _serve_call(self, conn: Conn, msg: dict[str, Any]) -> None:
        cid = msg.get("call")
        reply = await self._answer(msg)
        reply["reply"] = cid
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await conn.send(reply)

    async def _answer(self, msg: dict[str, Any]) -> dict[str, Any]:
        name = msg.get("endpoint")
        if name == "__health__":
            return {"ok": True, "body": {"status": "ok"}}
        endpoint = self.endpoints.get(name) if isinstance(name, str) else None
        if endpoint is None:
            known = ", ".join(sorted(self.endpoints)) or "(none)"
            return _error(MeshError(404, f"service {self.name!r} has no endpoint {name!r}; "
                                         f"known: {known}", id=self.name))
        try:
            request = load(endpoint.request, msg.get("body"))
        except SchemaError as exc:
            return _error(MeshError(400, str(exc), id=self.name))
        try:
            result = await endpoint.fn(request)
            return {"ok": True, "body": dump(result)}
        except MeshError as exc:
            return _error(exc)
        except Exception as exc:
            log.exception("handler %s failed", endpoint.name)
            return _error(MeshError(500, f"{endpoint.name} failed: {exc}", id=self.name))


def _error(exc: MeshError) -> dict[str, Any]:
    return {"ok": False, "error": exc.to_dict()}
