"""Client: call services through the local daemon, or through a remote environment.

Rules:
- Every call goes to the local daemon over its control socket: unary requests from every
  task share one multiplexed connection (`control.mux`: many in flight, replies matched by
  id; reopened after a failure); streams, sessions and subscriptions get their own.
  Through an environment, connections are pooled, one per concurrent call.
- `Client(env="prod")` goes through that environment instead (`meshd env add prod --via
  wss://...`): the same operations over WebSockets to a node's proxy, acting with the
  environment's token (`meshd auth login --env prod`), MESHD_TOKEN or `token=`. Such a
  client is used as `async with Client(env=...) as client:` (its connections live in the
  nursery that opens); `env="local"` is the local daemon.
- Requests may be dataclasses or plain JSON values; with `response=` a type, the reply is
  checked and built into it. Every failure raises MeshError (status, code, detail).
- With no daemon running, the first call fails at once, saying to start `meshd up`.
- Namespace of call, stream, services and describe: the one the method names, else
  `Client(namespace=)`, else that of the service whose handler is running (its outgoing
  calls stay in its namespace), else MESHD_NAMESPACE, else the environment's, else
  "default".
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, TypeVar

import trio

from meshd import namespaces
from meshd.control import Conn, ControlClient, MuxClient
from meshd.errors import MeshError

from .broker import Publisher, Subscription
from .daemon import socket_path
from .schema import SchemaError, dump, load
from .service import current_call, running_service_namespace, running_service_token

T = TypeVar("T")
_NOTHING: Any = object()


class ClientStream:
    """The caller's end of a stream."""

    def __init__(self, conn: Conn) -> None:
        self._conn = conn
        self._done = False

    async def send(self, message: Any) -> None:
        await self._conn.send({"msg": dump(message)})

    async def close_send(self) -> None:
        """End our side. A server stream may already have ended (and the daemon closed the
        connection): then there is nothing to end, and its replies are still to be read."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._conn.send({"end": True})

    async def receive(self) -> Any:
        """The next message; StopAsyncIteration at the end; MeshError on failure."""
        if self._done:
            raise StopAsyncIteration
        try:
            frame = await self._conn.receive()
        except EOFError:
            self._done = True
            raise MeshError(503, "the daemon closed the stream", id="sdk") from None
        if not isinstance(frame, dict):
            raise MeshError(502, "invalid stream frame", id="sdk")
        if "msg" in frame:
            return frame["msg"]
        self._done = True
        if "error" in frame:
            raise MeshError.from_dict(frame["error"])
        raise StopAsyncIteration

    def __aiter__(self) -> ClientStream:
        return self

    async def __anext__(self) -> Any:
        return await self.receive()


class Client:
    def __init__(self, addr: str | os.PathLike[str] | None = None, pool: int = 64,
                 token: str | None = None, env: str | None = None,
                 namespace: str | None = None) -> None:
        self.path = socket_path(addr)
        self._namespace = namespaces.check(namespace) if namespace else None
        self._env_namespace: str | None = None
        self._idle: list[ControlClient] = []
        self._mux: MuxClient | None = None
        self._pool = pool
        self._token = token
        self._via: Any = None
        self._stack: AsyncExitStack | None = None
        self._nursery: trio.Nursery | None = None
        if env is not None:
            self._use_env(env)

    def _use_env(self, name: str) -> None:
        from meshd.envs import EnvError, Environments
        from meshd.proxy.via import Via

        try:
            env = Environments().get(name)
        except EnvError as exc:
            raise MeshError(400, str(exc), id="sdk") from None
        if env.local:
            return
        self._via = Via(env.via, env.ca_file or None)
        self._env_namespace = env.namespace or None
        # the environment's own token before MESHD_TOKEN: one exported for another cluster
        # does not go to this one
        self._token = self._token or env.token or os.environ.get("MESHD_TOKEN") or None

    def _connection(self) -> ControlClient:
        if self._via is None:
            return ControlClient(self.path)
        if self._nursery is None:
            raise MeshError(400, "a Client with env= is used as `async with Client(env=...) "
                                 "as client:`", id="sdk")
        from meshd.proxy.remote import RemoteControlClient

        return RemoteControlClient(self._via, nursery=self._nursery)

    @property
    def token(self) -> str | None:
        """Explicit token, else the token of the service whose handler is running, else
        MESHD_TOKEN; None calls as the local node. Through an environment: only the token
        given, MESHD_TOKEN or the environment's (never a local service's token)."""
        if self._via is not None:
            return self._token

        return self._token or running_service_token() or os.environ.get("MESHD_TOKEN")

    @property
    def namespace(self) -> str:
        """Where this client's calls go unless a call names another: `namespace=`, else the
        running service's namespace, else MESHD_NAMESPACE, else the environment's, else
        "default"."""
        return namespaces.check(self._namespace or running_service_namespace()
                                or os.environ.get(namespaces.ENV) or self._env_namespace)

    def _ns(self, namespace: str | None) -> str:
        return namespaces.check(namespace) if namespace else self.namespace

    async def _request(self, op: str, /, **args: Any) -> Any:
        if self._via is None:
            mux = self._mux
            if mux is None or mux.failed is not None:
                mux = self._mux = MuxClient(self.path)
            return await mux.call(op, args, self.token)
        conn = self._idle.pop() if self._idle else self._connection()
        conn.token = self.token
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
                   response: type[T] | None = None, selector: str | None = None,
                   namespace: str | None = None) -> Any:
        body = await self._request("rpc.call", service=service, endpoint=endpoint,
                                   body=dump(request), timeout=timeout,
                                   meta=_traced(meta),
                                   selector=selector, namespace=self._ns(namespace))
        if response is None:
            return body
        try:
            return load(response, body)
        except SchemaError as exc:
            raise MeshError(500, f"reply does not fit {response.__name__}: {exc}",
                            id="sdk") from None

    @asynccontextmanager
    async def stream(self, service: str, endpoint: str, request: Any = _NOTHING, *,
                     meta: dict[str, str] | None = None, namespace: str | None = None
                     ) -> AsyncIterator[ClientStream]:
        """A streaming call. With `request`, it is sent and the sending side closed (server
        streaming); otherwise use send()/close_send() (bidirectional). Iterate for replies."""
        ns = self._ns(namespace)
        conn_client = self._connection()
        conn_client.token = self.token
        try:
            _, conn = await conn_client.session("rpc.stream", service=service,
                                                endpoint=endpoint, meta=_traced(meta),
                                                namespace=ns)
            stream = ClientStream(conn)
            if request is not _NOTHING:
                await stream.send(request)
                await stream.close_send()
            yield stream
        finally:
            await conn_client.aclose()

    async def publish(self, topic: str, event: Any = None, *,
                      headers: dict[str, str] | None = None, delay: float | None = None,
                      id: str | None = None, namespace: str | None = None) -> dict[str, Any]:
        """Publish `event` (a dataclass, JSON value or bytes) on `topic`. Core topics: sent
        on to every interested node (at most once); durable topics: returns once the
        message is on disk (`seq`); `delay` seconds (durable topics only) holds it back
        from durable subscribers until due; `id` deduplicates republishes."""
        args: dict[str, Any] = {"topic": topic, "body": dump(event),
                                "headers": _traced(headers),
                                "namespace": self._ns(namespace)}
        if delay is not None:
            args["delay"] = delay
        if id is not None:
            args["id"] = id
        return await self._request("broker.publish", **args)

    @asynccontextmanager
    async def subscribe(self, pattern: str, *, queue: str | None = None,
                        durable: str | None = None, buffer: int | None = None,
                        policy: str | None = None, namespace: str | None = None
                        ) -> AsyncIterator[Subscription]:
        """Subscribe to `pattern` (NATS wildcards `*` and `>`): `queue` shares messages
        within a group, `durable` names a durable subscriber (acks, redelivery, resume);
        `buffer` and `policy` ("drop-oldest", "drop-newest", "block") say what happens when
        this subscriber falls behind."""
        conn_client = self._connection()
        conn_client.token = self.token
        try:
            info, conn = await conn_client.session(
                "broker.subscribe", pattern=pattern, queue=queue, durable=durable,
                buffer=buffer, policy=policy, namespace=self._ns(namespace))
            yield Subscription(conn, info)
        finally:
            await conn_client.aclose()

    @asynccontextmanager
    async def publisher(self, namespace: str | None = None) -> AsyncIterator[Publisher]:
        """A pipelined publisher for many messages: `await pub.publish(...)` does not wait
        for the daemon; leaving the block flushes (raising the first failure)."""
        conn_client = self._connection()
        conn_client.token = self.token
        try:
            _, conn = await conn_client.session("broker.publisher")
            pub = Publisher(conn, self._ns(namespace))
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pub.run_writer)
                    try:
                        yield pub
                    finally:
                        pub.stop_writer()  # not cancelled: it may be mid-write
            except BaseExceptionGroup as group:  # (strict trio wraps the block's one error)
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from None
                raise
            await pub.flush()
        finally:
            await conn_client.aclose()

    async def topics(self, namespace: str | None = None) -> dict[str, Any]:
        return await self._request("broker.topics", namespace=self._ns(namespace))

    async def services(self, namespace: str | None = None) -> list[dict[str, Any]]:
        return await self._request("services", namespace=self._ns(namespace))

    async def describe(self, service: str, namespace: str | None = None) -> dict[str, Any]:
        return await self._request("describe", service=service,
                                   namespace=self._ns(namespace))

    async def aclose(self) -> None:
        mux, self._mux = self._mux, None
        if mux is not None:
            await mux.aclose()
        while self._idle:
            await self._idle.pop().aclose()
        stack, self._stack, self._nursery = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def __aenter__(self) -> Client:
        if self._via is not None and self._stack is None:
            stack = AsyncExitStack()
            self._nursery = await stack.enter_async_context(trio.open_nursery())
            self._stack = stack
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _traced(meta: dict[str, str] | None) -> dict[str, str]:
    """A call's metadata (or a message's headers); inside a handler, with the handler's
    traceparent (unless the caller set one): the call or message is part of the trace
    being served."""
    info = current_call()
    if info is None:
        return meta or {}
    tp = info.traceparent
    if not tp or (meta and "traceparent" in meta):
        return meta or {}
    return {**(meta or {}), "traceparent": tp}
