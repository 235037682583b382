"""Service: write endpoints as typed async functions; the daemon registers and routes.

Rules:
- `@service.handler("Greeter.Hello")` on `async def f(req: Req) -> Resp`, where Req and Resp
  are dataclasses or TypedDicts (or plain types). Their formats are published in the
  registry; every request is checked on the way in (400 naming the wrong field).
- A handler that raises MeshError answers with it; any other exception answers 500 with its
  message, and the service keeps serving. Each call runs in its own task.
- `await service.run()` registers through the local daemon and serves until cancelled; the
  registration lives as long as the connection (heartbeats keep it within the daemon's TTL).
  When the daemon goes away, run() raises 503; with `reconnect=True` (or MESHD_RECONNECT=1,
  which the runtime sets for processes it keeps over a daemon restart) it registers again
  as soon as a daemon answers (backoff RECONNECT_FIRST doubling to RECONNECT_MAX).
- The built-in endpoint "__health__" answers {"status": "ok"}.
- `@service.subscriber(pattern, queue=, durable=)` on `async def f(event: Event)`: each
  message's body is checked and built as Event; returning acks, raising naks (durable
  subscribers). Subscribers start once the service is registered and use its token.
- A service lives in one namespace: `namespace=`, else MESHD_NAMESPACE, else "default".
  Calls its handlers make through a `Client` stay in that namespace unless they name another
  (`running_service_namespace()`), as they carry its token.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import math
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, get_type_hints

import trio

from meshd import namespaces
from meshd.control import Conn, ControlClient, Framed
from meshd.errors import MeshError

from .broker import Msg
from .daemon import socket_path
from .logship import Shipper
from .schema import SchemaError, describe, dump, load

log = logging.getLogger("sdk.service")
RECONNECT_FIRST, RECONNECT_MAX = 0.1, 5.0


@dataclass(frozen=True)
class CallInfo:
    """What a handler may know about the call it is serving (see `current_call()`)."""

    endpoint: str
    meta: dict[str, Any]

    span_id: str = ""  # the handler's span (the parent of calls the handler makes)

    @property
    def trace_id(self) -> str:
        return str(self.meta.get("trace-id", ""))

    @property
    def traceparent(self) -> str:
        """The W3C traceparent for calls and publishes made while serving this call: they
        are children of the handler's span, in the same trace."""
        tp = self.meta.get("traceparent")
        if not (isinstance(tp, str) and len(tp) == 55):
            return ""
        # sampled: under the handler's span; not: as it came (nothing of it is kept)
        return f"{tp[:36]}{self.span_id}{tp[52:]}" if self.span_id else tp

    @property
    def caller_node(self) -> str:
        return str(self.meta.get("caller-node", ""))

    @property
    def caller(self) -> str:
        """Who is calling, as the callee's daemon established it: an account id (a user, or
        service:NAME for a service) or node:NAME for an in-cluster caller without a token."""
        return str(self.meta.get("caller", ""))


_CURRENT: contextvars.ContextVar[CallInfo | None] = contextvars.ContextVar(
    "meshd_current_call", default=None)


_SERVICE_TOKEN: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "meshd_service_token", default=None)


_SERVICE_NAMESPACE: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "meshd_service_namespace", default=None)


def _current_trace_id() -> str:
    info = _CURRENT.get()
    return info.trace_id if info is not None else ""


def running_service_token() -> str | None:
    """The service account token of the service whose handler is running (if any)."""
    return _SERVICE_TOKEN.get()


def running_service_namespace() -> str | None:
    """The namespace of the service whose handler is running (if any)."""
    return _SERVICE_NAMESPACE.get()


def current_call() -> CallInfo | None:
    """The call being served by the running handler: its metadata (headers), trace id and
    the calling node; None outside a handler."""
    return _CURRENT.get()


@dataclass
class Subscriber:
    pattern: str
    queue: str | None
    durable: str | None
    fn: Callable[[Any], Awaitable[Any]]
    event: Any


@dataclass
class Endpoint:
    name: str
    fn: Callable[[Any], Awaitable[Any]]
    request: Any
    response: Any
    stream: bool = False


class StreamClosed(Exception):
    """The other side ended the stream."""


class ServerStream:
    """The service's end of a stream. Sending spends credits the daemon grants as the
    caller reads, so a slow caller pauses the handler instead of filling memory."""

    def __init__(self, conn: Conn, sid: int, credit: int) -> None:
        self._conn = conn
        self._sid = sid
        self._endpoint: Endpoint | None = None
        self._send_in, self._inbound = trio.open_memory_channel[dict[str, Any]](math.inf)
        self._credit = credit
        self._window = max(2, credit)
        self._credit_changed = trio.Event()
        self._consumed = 0
        self._closed = False

    def on_frame(self, frame: dict[str, Any]) -> None:
        if "credit" in frame:
            if isinstance(frame["credit"], int) and frame["credit"] > 0:
                self._credit += frame["credit"]
                self._credit_changed.set()
                self._credit_changed = trio.Event()
            return
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            self._send_in.send_nowait(frame)

    def gone(self) -> None:
        self._closed = True
        self._send_in.close()
        self._credit_changed.set()

    async def receive(self) -> Any:
        """The next message; StreamClosed when the caller has no more."""
        try:
            frame = await self._inbound.receive()
        except trio.EndOfChannel:
            raise StreamClosed from None
        self._consumed += 1
        if self._consumed >= self._window // 2:
            grant, self._consumed = self._consumed, 0
            await _send_quietly(self._conn, {"sid": self._sid, "credit": grant})
        if "msg" not in frame:
            raise StreamClosed
        assert self._endpoint is not None
        try:
            return load(self._endpoint.request, frame["msg"])
        except SchemaError as exc:
            raise MeshError(400, str(exc)) from None

    def __aiter__(self) -> ServerStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except StreamClosed:
            raise StopAsyncIteration from None

    async def send(self, message: Any) -> None:
        while self._credit <= 0:
            if self._closed:
                raise StreamClosed
            await self._credit_changed.wait()
        self._credit -= 1
        await self._conn.send({"sid": self._sid, "msg": dump(message)})


def _connection_lost(exc: BaseException) -> bool:
    """Whether `exc` (or every exception in it) says the daemon went away."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_connection_lost(e) for e in exc.exceptions)
    if isinstance(exc, MeshError):
        return exc.status == 503
    return isinstance(exc, OSError | EOFError | trio.BrokenResourceError
                      | trio.ClosedResourceError)


class Service:
    def __init__(self, name: str, version: str = "latest",
                 metadata: dict[str, str] | None = None,
                 addr: str | os.PathLike[str] | None = None,
                 namespace: str | None = None, http: str | None = None,
                 reconnect: bool | None = None) -> None:
        self.name = name
        self.reconnect = os.environ.get("MESHD_RECONNECT") == "1" if reconnect is None \
            else reconnect
        self.namespace = namespaces.check(namespace) if namespace else namespaces.from_env()
        self.version = version
        self.metadata = dict(metadata or {})
        if http:  # an HTTP app of this process, served by the API gateway under /NAME/
            self.metadata["http"] = http
        self.path = socket_path(addr)
        self.endpoints: dict[str, Endpoint] = {}
        self.subscribers: list[Subscriber] = []
        self.instance_id: str | None = None
        self.token: str | None = None
        self.registered = trio.Event()
        self.logs: Shipper | None = None  # its log shipper while it runs

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

    def stream(self, name: str, request: Any = Any, response: Any = Any
               ) -> Callable[[Any], Any]:
        """A streaming endpoint. An async generator `async def f(req) -> AsyncIterator[T]`
        answers one request with many messages (server streaming); a plain async function
        `async def f(stream: ServerStream)` talks both ways (bidirectional). `request` and
        `response` type each message (taken from the annotations where they say it)."""
        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            req_t, resp_t = request, response
            if inspect.isasyncgenfunction(fn):
                hints = get_type_hints(fn)
                params = list(inspect.signature(fn).parameters)
                if len(params) != 1:
                    raise TypeError(f"stream handler {fn.__name__} takes one request")
                if req_t is Any:
                    req_t = hints.get(params[0], Any)
            elif not inspect.iscoroutinefunction(fn):
                raise TypeError(f"stream handler {fn.__name__} must be async")
            describe(req_t), describe(resp_t)
            self.endpoints[name] = Endpoint(name, fn, req_t, resp_t, stream=True)
            return fn
        return wrap

    def subscriber(self, pattern: str, queue: str | None = None,
                   durable: str | None = None, event: Any = Any) -> Callable[[Any], Any]:
        """A subscriber: `async def f(event: Event) -> None` gets each message on `pattern`
        (its body checked and built as the annotation says); returning acks it, raising
        naks it (durable subscribers; core messages are not acked). Runs while the service
        runs, with the service's token and namespace."""
        def wrap(fn: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
            if not inspect.iscoroutinefunction(fn):
                raise TypeError(f"subscriber {fn.__name__} must be async")
            kind = event
            if kind is Any:
                params = list(inspect.signature(fn).parameters)
                if len(params) != 1:
                    raise TypeError(f"subscriber {fn.__name__} takes one event")
                kind = get_type_hints(fn).get(params[0], Any)
            describe(kind)
            self.subscribers.append(Subscriber(pattern, queue, durable, fn, kind))
            return fn
        return wrap

    def _registration(self) -> dict[str, Any]:
        return {"service": self.name, "version": self.version, "metadata": self.metadata,
                "namespace": self.namespace,
                "endpoints": [{"name": e.name, "request": describe(e.request),
                               "response": describe(e.response), "stream": e.stream}
                              for e in self.endpoints.values()]}

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        shipper = Shipper(_current_trace_id)
        self.logs = shipper
        unship = shipper.install()  # this task and the ones it starts ship their logging
        started = False
        delay = RECONNECT_FIRST
        try:
            while True:
                client = ControlClient(self.path)
                try:
                    await self._session(client, shipper,
                                        trio.TASK_STATUS_IGNORED if started else task_status)
                    delay = RECONNECT_FIRST  # it was registered: the next try comes soon
                except (OSError, EOFError, MeshError, trio.BrokenResourceError,
                        trio.ClosedResourceError, BaseExceptionGroup) as exc:
                    if not self.reconnect or not _connection_lost(exc):
                        raise
                finally:
                    started = started or self.registered.is_set()
                    await client.aclose()
                if not self.reconnect:
                    # raised outside the nursery, so callers get it as is
                    raise MeshError(503, "the daemon closed the service connection",
                                    id="sdk")
                log.warning("the daemon is not answering; registering %s again in %.1f s",
                            self.name, delay)
                await trio.sleep(delay)
                delay = min(RECONNECT_MAX, delay * 2)
        finally:
            unship()

    async def _session(self, client: ControlClient, shipper: Shipper,
                       task_status: Any) -> None:
        """One registration: serves until the daemon closes the connection."""
        info, conn = await client.session("service.register", **self._registration())
        self.instance_id = info["id"]
        self.token = info.get("token")
        _SERVICE_TOKEN.set(self.token)  # calls made from our handlers carry who we are
        _SERVICE_NAMESPACE.set(self.namespace)  # ... and stay in our namespace
        ttl = float(info.get("ttl", 15.0))
        log.info("registered %s as %s in namespace %s on node %s", self.name,
                 self.instance_id, self.namespace, info.get("node"))
        self.registered.set()
        task_status.started(self.instance_id)
        streams: dict[int, ServerStream] = {}
        async with trio.open_nursery() as nursery:
            if isinstance(conn.framed, Framed):  # replies queued, sent together
                nursery.start_soon(conn.framed.run_flusher)
            nursery.start_soon(self._heartbeat, conn, ttl)
            nursery.start_soon(shipper.run, conn.send)
            for sub in self.subscribers:
                await nursery.start(self._subscribe, sub)
            while True:
                try:
                    msg = await conn.receive()
                except EOFError:
                    nursery.cancel_scope.cancel()
                    break
                if not isinstance(msg, dict):
                    continue
                if "call" in msg:
                    nursery.start_soon(self._serve_call, conn, msg)
                elif "open" in msg:
                    credit = msg.get("credit") if isinstance(msg.get("credit"), int) \
                        else 16
                    stream = ServerStream(conn, msg["open"], credit)
                    streams[msg["open"]] = stream
                    nursery.start_soon(self._serve_stream, conn, msg, stream, streams)
                elif "sid" in msg:
                    target = streams.get(msg["sid"])
                    if target is not None:
                        target.on_frame(msg)  # never blocks: credits bound the flow

    async def _subscribe(self, spec: Subscriber,
                         task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """One subscriber of this service: its session, its messages one at a time."""
        from .client import Client

        client = Client(self.path, token=self.token, namespace=self.namespace)
        async with client.subscribe(spec.pattern, queue=spec.queue,
                                    durable=spec.durable) as sub:
            task_status.started()
            async for msg in sub:
                await self._deliver(spec, msg)

    async def _deliver(self, spec: Subscriber, msg: Msg) -> None:
        try:
            event = load(spec.event, msg.body)
        except SchemaError as exc:
            log.warning("message %s on %s does not fit %s: %s", msg.id, msg.topic,
                        getattr(spec.event, "__name__", spec.event), exc)
            await msg.nak()
            return
        try:
            await spec.fn(event)
        except Exception as exc:
            log.warning("subscriber %s failed on message %s: %s", spec.fn.__name__,
                        msg.id, exc)
            await msg.nak()
            return
        await msg.ack()

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
            if not conn.send_nowait(reply):
                await conn.send(reply)

    async def _serve_stream(self, conn: Conn, msg: dict[str, Any], server: ServerStream,
                            streams: dict[int, Any]) -> None:
        sid = msg["open"]
        endpoint = self.endpoints.get(msg.get("endpoint"))  # type: ignore[arg-type]
        try:
            if endpoint is None or not endpoint.stream:
                raise MeshError(404, f"service {self.name!r} has no stream endpoint "
                                     f"{msg.get('endpoint')!r}", id=self.name)
            server._endpoint = endpoint
            if inspect.isasyncgenfunction(endpoint.fn):
                try:
                    request = await server.receive()
                except StreamClosed:
                    raise MeshError(400, "a server-streaming call needs a request",
                                    id=self.name) from None
                async for item in endpoint.fn(request):
                    await server.send(item)
            else:
                await endpoint.fn(server)
            await conn.send({"sid": sid, "end": True})
        except MeshError as exc:
            await _send_quietly(conn, {"sid": sid, "error": exc.to_dict()})
        except Exception as exc:
            log.exception("stream handler %s failed", msg.get("endpoint"))
            await _send_quietly(conn, {"sid": sid, "error": MeshError(
                500, f"{msg.get('endpoint')} failed: {exc}", id=self.name).to_dict()})
        finally:
            streams.pop(sid, None)
            server.gone()

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
        meta = msg.get("meta") if isinstance(msg.get("meta"), dict) else {}
        tp = meta.get("traceparent")
        sampled = isinstance(tp, str) and tp.endswith("1")  # traced: time the handler
        span = f"{random.getrandbits(64) or 1:016x}" if sampled else ""
        token = _CURRENT.set(CallInfo(endpoint.name, meta, span))
        t0 = time.perf_counter()
        try:
            result = await endpoint.fn(request)
            reply = {"ok": True, "body": dump(result)}
        except MeshError as exc:
            reply = _error(exc)
        except Exception as exc:
            log.exception("handler %s failed", endpoint.name)
            reply = _error(MeshError(500, f"{endpoint.name} failed: {exc}", id=self.name))
        finally:
            _CURRENT.reset(token)
        if sampled:  # the handler's span, recorded by the daemon
            reply["took"] = time.perf_counter() - t0
            reply["span"] = span
        return reply


def _error(exc: MeshError) -> dict[str, Any]:
    return {"ok": False, "error": exc.to_dict()}


async def _send_quietly(conn: Conn, frame: dict[str, Any]) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await conn.send(frame)
